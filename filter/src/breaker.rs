//! The circuit breaker on the session store, shared by every worker.
//!
//! A store that hangs would otherwise hold every state-writing response for
//! the full store timeout. After `failures` consecutive failed calls (errors,
//! timeouts, answers to other calls) the breaker opens: store calls fail at
//! once for `cooldown`, so writes go unprotected (counted) and failovers follow
//! the outage policy without waiting. Then one call at a time may probe; its
//! success closes the breaker, its failure opens it again.
//!
//! The state is one small shared-data entry per store cluster, so all workers
//! see one breaker. Updates use compare-and-swap and fail open: a lost race
//! only means one more call tries the store.
//!
//! Envoy's own tools still matter on the store cluster: `circuit_breakers`
//! bound the calls in flight, health checks and `connect_timeout` make a dead
//! endpoint fail fast, and with several endpoints (etcd) outlier detection
//! steers calls to healthy ones. What Envoy cannot do is answer "this write
//! need not wait" for a store that accepts connections and then hangs: that
//! is this breaker's job.

use crate::host::SharedData;

const CAS_TRIES: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Calls go through; `failures` consecutive ones failed so far.
    Closed { failures: u32 },
    /// Calls fail at once until `until_ms`.
    Open { until_ms: u64 },
    /// One probe is out; others fail at once until it answers or `until_ms`.
    Probing { until_ms: u64 },
}

/// Whether a store call may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Call,
    /// This call is the probe.
    Probe,
    /// Fail it now.
    Reject,
}

/// What a call's answer did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Opened,
    Closed,
}

/// The breaker of one store cluster.
pub struct Breaker<'a> {
    key: String,
    shared: &'a dyn SharedData,
    failures: u32,
    cooldown_ms: u64,
    /// How long a probe may take before another call may probe.
    probe_ms: u64,
}

impl<'a> Breaker<'a> {
    pub fn new(shared: &'a dyn SharedData, cluster: &str, failures: u32, cooldown_ms: u64, probe_ms: u64) -> Breaker<'a> {
        Breaker { key: format!("session_affinity.breaker.{cluster}"), shared, failures, cooldown_ms, probe_ms }
    }

    fn read(&self) -> (State, Option<u32>) {
        let (value, cas) = self.shared.get(&self.key);
        (value.as_deref().and_then(parse).unwrap_or(State::Closed { failures: 0 }), cas)
    }

    /// Moves from the state read to `next(state)` with compare-and-swap;
    /// returns the state it moved from, or None when every race was lost.
    fn update(&self, next: impl Fn(State) -> Option<State>) -> Option<(State, State)> {
        for _ in 0..CAS_TRIES {
            let (state, cas) = self.read();
            let Some(new) = next(state) else { return Some((state, state)) };
            if new == state || self.shared.set(&self.key, serialize(new).as_bytes(), cas) {
                return Some((state, new));
            }
        }
        None
    }

    pub fn admit(&self, now_ms: u64) -> Admit {
        let (state, _) = self.read();
        let due = match state {
            State::Closed { .. } => return Admit::Call,
            State::Open { until_ms } | State::Probing { until_ms } => until_ms <= now_ms,
        };
        if !due {
            return Admit::Reject;
        }
        let probe = State::Probing { until_ms: now_ms.saturating_add(self.probe_ms) };
        let took = self.update(|current| match current {
            State::Open { until_ms } | State::Probing { until_ms } if until_ms <= now_ms => Some(probe),
            _ => None,
        });
        match took {
            Some((from, to)) if from != to => Admit::Probe,
            _ => Admit::Reject,
        }
    }

    /// Records a call's outcome.
    pub fn record(&self, success: bool, now_ms: u64) -> Transition {
        let open = State::Open { until_ms: now_ms.saturating_add(self.cooldown_ms) };
        let limit = self.failures;
        let moved = self.update(|state| match (state, success) {
            (State::Closed { failures: 0 }, true) => None,
            (_, true) => Some(State::Closed { failures: 0 }),
            (State::Closed { failures }, false) if failures.saturating_add(1) >= limit => Some(open),
            (State::Closed { failures }, false) => Some(State::Closed { failures: failures + 1 }),
            (State::Probing { .. }, false) => Some(open),
            (State::Open { .. }, false) => None,
        });
        match moved {
            Some((State::Closed { .. }, State::Open { .. })) => Transition::Opened,
            Some((State::Open { .. } | State::Probing { .. }, State::Closed { .. })) => Transition::Closed,
            _ => Transition::None,
        }
    }
}

fn serialize(state: State) -> String {
    match state {
        State::Closed { failures } => format!("closed {failures}"),
        State::Open { until_ms } => format!("open {until_ms}"),
        State::Probing { until_ms } => format!("probing {until_ms}"),
    }
}

fn parse(bytes: &[u8]) -> Option<State> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (kind, number) = text.split_once(' ')?;
    let number: u64 = number.parse().ok()?;
    match kind {
        "closed" => Some(State::Closed { failures: u32::try_from(number).ok()? }),
        "open" => Some(State::Open { until_ms: number }),
        "probing" => Some(State::Probing { until_ms: number }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeShared;

    fn breaker(shared: &FakeShared) -> Breaker<'_> {
        Breaker::new(shared, "store", 3, 5000, 1000)
    }

    #[test]
    fn opens_after_consecutive_failures_and_rejects_until_the_cooldown() {
        let shared = FakeShared::default();
        let b = breaker(&shared);
        assert_eq!(b.record(false, 0), Transition::None);
        assert_eq!(b.record(true, 0), Transition::None, "a success resets the count");
        assert_eq!(b.record(false, 0), Transition::None);
        assert_eq!(b.record(false, 0), Transition::None);
        assert_eq!(b.admit(0), Admit::Call);
        assert_eq!(b.record(false, 100), Transition::Opened);
        assert_eq!(b.admit(101), Admit::Reject);
        assert_eq!(b.admit(5099), Admit::Reject);
    }

    #[test]
    fn one_probe_at_a_time_closes_or_reopens_it() {
        let shared = FakeShared::default();
        let b = breaker(&shared);
        for _ in 0..3 {
            b.record(false, 0);
        }
        assert_eq!(b.admit(5000), Admit::Probe);
        assert_eq!(b.admit(5001), Admit::Reject, "only one probe");
        assert_eq!(b.record(false, 5002), Transition::None, "a failed probe reopens it");
        assert_eq!(b.admit(5003), Admit::Reject);
        assert_eq!(b.admit(10_002), Admit::Probe);
        assert_eq!(b.record(true, 10_003), Transition::Closed);
        assert_eq!(b.admit(10_004), Admit::Call);
    }

    #[test]
    fn a_lost_probe_is_replaced_after_its_time() {
        let shared = FakeShared::default();
        let b = breaker(&shared);
        for _ in 0..3 {
            b.record(false, 0);
        }
        assert_eq!(b.admit(5000), Admit::Probe);
        assert_eq!(b.admit(5999), Admit::Reject);
        assert_eq!(b.admit(6000), Admit::Probe);
    }

    #[test]
    fn workers_share_one_breaker_and_garbage_reads_as_closed() {
        let shared = FakeShared::default();
        for _ in 0..3 {
            breaker(&shared).record(false, 0);
        }
        assert_eq!(Breaker::new(&shared, "store", 3, 5000, 1000).admit(1), Admit::Reject);
        assert_eq!(Breaker::new(&shared, "other", 3, 5000, 1000).admit(1), Admit::Call, "per cluster");
        shared.set("session_affinity.breaker.store", b"\xffnonsense", None);
        assert_eq!(breaker(&shared).admit(1), Admit::Call);
        for state in [State::Closed { failures: 2 }, State::Open { until_ms: 9 }, State::Probing { until_ms: 7 }] {
            assert_eq!(parse(serialize(state).as_bytes()), Some(state));
        }
    }
}

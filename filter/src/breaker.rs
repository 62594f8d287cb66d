//! The circuit breaker on the session store, shared by every worker.
//!
//! A store that hangs would otherwise hold every state-writing response for
//! the full store timeout. After `failures` consecutive failed calls (errors,
//! timeouts) the breaker opens: store calls fail at
//! once for `cooldown`, so writes go unprotected (counted) and failovers follow
//! the outage policy without waiting. Then one call at a time may probe; its
//! success closes the breaker, its failure opens it again.
//!
//! Only an unreachable store may open it: a failed call counts only when
//! the store has answered no call since that call went out. So one client's
//! call that the store cannot serve (a payload it chokes on) while it
//! answers everyone else never opens the breaker for all. An answer to
//! another call (late, mismatched) still proves the store is there.
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
/// The time of the store's last answer is written at most this often (a
/// shared-data write per answer otherwise); a failure is judged against a
/// time at most this old, which can only make it count.
pub const ANSWERED_GRANULARITY_MS: u64 = 20;

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

    fn read(&self) -> (Shared, Option<u32>) {
        let (value, cas) = self.shared.get(&self.key);
        (value.as_deref().and_then(parse).unwrap_or(Shared { state: State::Closed { failures: 0 }, answered_ms: 0 }), cas)
    }

    /// Moves from the state read to `next(state)` with compare-and-swap;
    /// returns the state it moved from, or None when every race was lost.
    fn update(&self, next: impl Fn(Shared) -> Option<Shared>) -> Option<(State, State)> {
        for _ in 0..CAS_TRIES {
            let (shared, cas) = self.read();
            let Some(new) = next(shared) else { return Some((shared.state, shared.state)) };
            if new == shared || self.shared.set(&self.key, serialize(new).as_bytes(), cas) {
                return Some((shared.state, new.state));
            }
        }
        None
    }

    pub fn admit(&self, now_ms: u64) -> Admit {
        let (Shared { state, .. }, _) = self.read();
        let due = match state {
            State::Closed { .. } => return Admit::Call,
            State::Open { until_ms } | State::Probing { until_ms } => until_ms <= now_ms,
        };
        if !due {
            return Admit::Reject;
        }
        let probe = State::Probing { until_ms: now_ms.saturating_add(self.probe_ms) };
        let took = self.update(|current| match current.state {
            State::Open { until_ms } | State::Probing { until_ms } if until_ms <= now_ms => Some(Shared { state: probe, ..current }),
            _ => None,
        });
        match took {
            Some((from, to)) if from != to => Admit::Probe,
            _ => Admit::Reject,
        }
    }

    /// Records that the store answered a call (its answer may still be
    /// unusable for that call: the store is there).
    pub fn answered(&self, now_ms: u64) -> Transition {
        let moved = self.update(|shared| match shared.state {
            State::Closed { failures: 0 } if now_ms < shared.answered_ms.saturating_add(ANSWERED_GRANULARITY_MS) => None,
            _ => Some(Shared { state: State::Closed { failures: 0 }, answered_ms: now_ms.max(shared.answered_ms) }),
        });
        match moved {
            Some((State::Open { .. } | State::Probing { .. }, State::Closed { .. })) => Transition::Closed,
            _ => Transition::None,
        }
    }

    /// Records that a call sent at `sent_ms` got no usable answer (an error,
    /// a timeout). It counts only if the store answered no call since.
    pub fn failed(&self, sent_ms: u64, now_ms: u64) -> Transition {
        let open = State::Open { until_ms: now_ms.saturating_add(self.cooldown_ms) };
        let limit = self.failures;
        let moved = self.update(|shared| {
            if shared.answered_ms >= sent_ms && shared.answered_ms > 0 {
                return None; // the store answered since: this call's own trouble
            }
            let state = match shared.state {
                State::Closed { failures } if failures.saturating_add(1) >= limit => open,
                State::Closed { failures } => State::Closed { failures: failures + 1 },
                State::Probing { .. } => open,
                State::Open { .. } => return None,
            };
            Some(Shared { state, ..shared })
        });
        match moved {
            Some((State::Closed { .. }, State::Open { .. })) => Transition::Opened,
            _ => Transition::None,
        }
    }
}

/// What the shared-data entry holds: the state, and when the store last answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shared {
    state: State,
    answered_ms: u64,
}

fn serialize(shared: Shared) -> String {
    let answered = shared.answered_ms;
    match shared.state {
        State::Closed { failures } => format!("closed {failures} {answered}"),
        State::Open { until_ms } => format!("open {until_ms} {answered}"),
        State::Probing { until_ms } => format!("probing {until_ms} {answered}"),
    }
}

fn parse(bytes: &[u8]) -> Option<Shared> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut words = text.split(' ');
    let kind = words.next()?;
    let number: u64 = words.next()?.parse().ok()?;
    let answered_ms: u64 = words.next()?.parse().ok()?;
    if words.next().is_some() {
        return None;
    }
    let state = match kind {
        "closed" => State::Closed { failures: u32::try_from(number).ok()? },
        "open" => State::Open { until_ms: number },
        "probing" => State::Probing { until_ms: number },
        _ => return None,
    };
    Some(Shared { state, answered_ms })
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
        assert_eq!(b.failed(0, 0), Transition::None);
        assert_eq!(b.answered(0), Transition::None, "a success resets the count");
        assert_eq!(b.failed(0, 0), Transition::None);
        assert_eq!(b.failed(0, 0), Transition::None);
        assert_eq!(b.admit(0), Admit::Call);
        assert_eq!(b.failed(100, 100), Transition::Opened);
        assert_eq!(b.admit(101), Admit::Reject);
        assert_eq!(b.admit(5099), Admit::Reject);
    }

    #[test]
    fn one_probe_at_a_time_closes_or_reopens_it() {
        let shared = FakeShared::default();
        let b = breaker(&shared);
        for _ in 0..3 {
            b.failed(0, 0);
        }
        assert_eq!(b.admit(5000), Admit::Probe);
        assert_eq!(b.admit(5001), Admit::Reject, "only one probe");
        assert_eq!(b.failed(5002, 5002), Transition::None, "a failed probe reopens it");
        assert_eq!(b.admit(5003), Admit::Reject);
        assert_eq!(b.admit(10_002), Admit::Probe);
        assert_eq!(b.answered(10_003), Transition::Closed);
        assert_eq!(b.admit(10_004), Admit::Call);
    }

    #[test]
    fn a_lost_probe_is_replaced_after_its_time() {
        let shared = FakeShared::default();
        let b = breaker(&shared);
        for _ in 0..3 {
            b.failed(0, 0);
        }
        assert_eq!(b.admit(5000), Admit::Probe);
        assert_eq!(b.admit(5999), Admit::Reject);
        assert_eq!(b.admit(6000), Admit::Probe);
    }

    #[test]
    fn workers_share_one_breaker_and_garbage_reads_as_closed() {
        let shared = FakeShared::default();
        for _ in 0..3 {
            breaker(&shared).failed(0, 0);
        }
        assert_eq!(Breaker::new(&shared, "store", 3, 5000, 1000).admit(1), Admit::Reject);
        assert_eq!(Breaker::new(&shared, "other", 3, 5000, 1000).admit(1), Admit::Call, "per cluster");
        shared.set("session_affinity.breaker.store", b"\xffnonsense", None);
        assert_eq!(breaker(&shared).admit(1), Admit::Call);
        for state in [State::Closed { failures: 2 }, State::Open { until_ms: 9 }, State::Probing { until_ms: 7 }] {
            let shared = Shared { state, answered_ms: 5 };
            assert_eq!(parse(serialize(shared).as_bytes()), Some(shared));
        }
    }

    #[test]
    fn a_failure_counts_only_when_the_store_answered_nothing_since_the_call_went_out() {
        let shared = FakeShared::default();
        let b = breaker(&shared);
        for sent in [100, 101, 102] {
            // Another call's answer came after these calls went out: the
            // store is there, whatever made these fail.
            b.answered(1_000);
            assert_eq!(b.failed(sent, 1_500), Transition::None);
        }
        assert_eq!(b.admit(1_501), Admit::Call);
        for sent in [2_000, 2_001] {
            assert_eq!(b.failed(sent, 2_600), Transition::None);
        }
        assert_eq!(b.failed(2_002, 2_600), Transition::Opened, "nothing answered since: the store is out");
    }

    #[test]
    fn answers_are_recorded_at_most_once_per_granularity_while_closed() {
        let shared = FakeShared::default();
        let b = breaker(&shared);
        b.answered(1_000);
        b.answered(1_000 + ANSWERED_GRANULARITY_MS - 1);
        assert_eq!(b.read().0.answered_ms, 1_000);
        b.answered(1_000 + ANSWERED_GRANULARITY_MS);
        assert_eq!(b.read().0.answered_ms, 1_000 + ANSWERED_GRANULARITY_MS);
    }
}

//! Counters and the store-latency histogram.
//!
//! Requests bump plain in-memory counters; the worker's tick adds them to the
//! proxy's metrics once a second. That keeps host calls off the hot path: a
//! pinned request makes no metric call at all.

use std::cell::{Cell, RefCell};

use crate::cookie::Rejection;

/// Every counter the filter exports, named `session_affinity.<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    SessionsCreated,
    Pinned,
    Skipped,
    RejectedMalformed,
    RejectedUnknownKey,
    RejectedBadSignature,
    RejectedExpired,
    CookiesRefreshed,
    FailoversKnown,
    FailoversReplayed,
    FailoversRestart,
    FailoversFresh,
    FailoversJoined,
    StateRestored,
    StoreWrites,
    StoreWritesRejected,
    StoreErrors,
    StoreTimeouts,
    ClaimConflicts,
    HostsMarkedGone,
    OutageRejected,
}

impl Counter {
    pub const ALL: [Counter; 21] = [
        Counter::SessionsCreated,
        Counter::Pinned,
        Counter::Skipped,
        Counter::RejectedMalformed,
        Counter::RejectedUnknownKey,
        Counter::RejectedBadSignature,
        Counter::RejectedExpired,
        Counter::CookiesRefreshed,
        Counter::FailoversKnown,
        Counter::FailoversReplayed,
        Counter::FailoversRestart,
        Counter::FailoversFresh,
        Counter::FailoversJoined,
        Counter::StateRestored,
        Counter::StoreWrites,
        Counter::StoreWritesRejected,
        Counter::StoreErrors,
        Counter::StoreTimeouts,
        Counter::ClaimConflicts,
        Counter::HostsMarkedGone,
        Counter::OutageRejected,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::SessionsCreated => "session_affinity.sessions_created",
            Counter::Pinned => "session_affinity.pinned",
            Counter::Skipped => "session_affinity.skipped",
            Counter::RejectedMalformed => "session_affinity.cookies_rejected.malformed",
            Counter::RejectedUnknownKey => "session_affinity.cookies_rejected.unknown_key",
            Counter::RejectedBadSignature => "session_affinity.cookies_rejected.bad_signature",
            Counter::RejectedExpired => "session_affinity.cookies_rejected.expired",
            Counter::CookiesRefreshed => "session_affinity.cookies_refreshed",
            Counter::FailoversKnown => "session_affinity.failovers.known",
            Counter::FailoversReplayed => "session_affinity.failovers.replayed",
            Counter::FailoversRestart => "session_affinity.failovers.restart",
            Counter::FailoversFresh => "session_affinity.failovers_fresh",
            Counter::FailoversJoined => "session_affinity.failovers_joined",
            Counter::StateRestored => "session_affinity.state_restored",
            Counter::StoreWrites => "session_affinity.store_writes",
            Counter::StoreWritesRejected => "session_affinity.store_writes_rejected",
            Counter::StoreErrors => "session_affinity.store_errors",
            Counter::StoreTimeouts => "session_affinity.store_timeouts",
            Counter::ClaimConflicts => "session_affinity.claim_conflicts",
            Counter::HostsMarkedGone => "session_affinity.hosts_marked_gone",
            Counter::OutageRejected => "session_affinity.outage_rejected",
        }
    }

    pub fn rejected(reason: Rejection) -> Counter {
        match reason {
            Rejection::Malformed => Counter::RejectedMalformed,
            Rejection::UnknownKey => Counter::RejectedUnknownKey,
            Rejection::BadSignature => Counter::RejectedBadSignature,
            Rejection::Expired => Counter::RejectedExpired,
        }
    }
}

/// The name of the store latency histogram (milliseconds).
pub const STORE_LATENCY: &str = "session_affinity.store_latency_ms";

/// Counts not yet handed to the proxy.
#[derive(Debug, Default)]
pub struct Metrics {
    counts: [Cell<u64>; Counter::ALL.len()],
    latencies_ms: RefCell<Vec<u64>>,
}

impl Metrics {
    pub fn incr(&self, counter: Counter) {
        if let Some(cell) = self.counts.get(counter as usize) {
            cell.set(cell.get().saturating_add(1));
        }
    }

    pub fn store_latency(&self, millis: u64) {
        if let Ok(mut samples) = self.latencies_ms.try_borrow_mut() {
            // Bounded: a stalled tick must not grow this without limit.
            if samples.len() < 4096 {
                samples.push(millis);
            }
        }
    }

    /// Takes the pending counts (counter, delta) and latency samples.
    pub fn drain(&self) -> (Vec<(Counter, u64)>, Vec<u64>) {
        let counts = Counter::ALL
            .iter()
            .zip(self.counts.iter())
            .filter_map(|(&counter, cell)| match cell.replace(0) {
                0 => None,
                n => Some((counter, n)),
            })
            .collect();
        let samples = self.latencies_ms.try_borrow_mut().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        (counts, samples)
    }

    #[cfg(test)]
    pub fn get(&self, counter: Counter) -> u64 {
        self.counts.get(counter as usize).map_or(0, Cell::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_counter_in_discriminant_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }

    #[test]
    fn drain_returns_and_resets_counts() {
        let m = Metrics::default();
        m.incr(Counter::Pinned);
        m.incr(Counter::Pinned);
        m.store_latency(3);
        let (counts, lat) = m.drain();
        assert_eq!(counts, vec![(Counter::Pinned, 2)]);
        assert_eq!(lat, vec![3]);
        assert_eq!(m.drain(), (vec![], vec![]));
    }
}

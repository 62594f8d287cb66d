//! Counters and the store-latency histogram.
//!
//! Requests bump plain in-memory counters, which the shell hands to the
//! proxy's metrics: the wasm shell from the worker's tick once a second (a
//! pinned request makes no metric call at all), the native shell after each
//! hook (Envoy's native counters cost an atomic add).
//!
//! Names are `session_affinity.<area>.<event>`, areas `sessions`, `cookies`,
//! `failovers`, `store`, `gone` and `internal` (Envoy shows them as
//! `wasmcustom.session_affinity.…`, Prometheus as `session_affinity_…`).

use std::cell::{Cell, RefCell};

use crate::cookie::Rejection;

macro_rules! counters {
    ($($variant:ident => $name:literal: $doc:literal,)*) => {
        /// Every counter the filter exports.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Counter {
            $(#[doc = $doc] $variant,)*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => concat!("session_affinity.", $name),)*
                }
            }

            /// What it counts, as the README's table says it.
            #[cfg(test)]
            pub fn describe(self) -> &'static str {
                match self {
                    $(Counter::$variant => $doc,)*
                }
            }
        }
    };
}

counters! {
    SessionsCreated => "sessions.created": "new sessions pinned to the host that served them",
    SessionsPinned => "sessions.pinned": "requests sent to their session's pinned host",
    SessionsSkipped => "sessions.skipped": "requests on paths that need no affinity",
    SessionsOtherCluster => "sessions.other_cluster": "requests whose cookie belongs to another cluster's route (not steered)",
    SessionsEnded => "sessions.ended": "sessions the app ended (x-session-end, or unknown to the very instance they are pinned to)",
    SessionsEndedUnconfirmed => "sessions.ended_unconfirmed": "ends (and rotations) the store did not confirm; this proxy treats the old id as ended for store.idle_ttl",
    SessionsRotated => "sessions.rotated": "sessions moved to a new id by the app (x-session-rotate)",
    CookiesRefreshed => "cookies.refreshed": "cookies re-issued (sliding refresh, key rotation, or the other `cookie.format`)",
    RejectedMalformed => "cookies.rejected.malformed": "cookies refused: malformed",
    RejectedUnknownKey => "cookies.rejected.unknown_key": "cookies refused: sealed or signed with a key not in the ring",
    RejectedBadSignature => "cookies.rejected.bad_signature": "cookies refused: forged or tampered (the tag does not check)",
    RejectedExpired => "cookies.rejected.expired": "cookies refused: expired (or past the session's absolute lifetime)",
    RejectedAmbiguous => "cookies.rejected.ambiguous": "requests with valid cookies for different sessions (none trusted)",
    FailoversKnown => "failovers.known": "failovers of sessions whose host this proxy already knew gone",
    FailoversReplayed => "failovers.replayed": "requests found their host gone and were replayed (307)",
    FailoversReset => "failovers.reset": "safe requests whose upstream connection was lost, or that the app server answered with an error around its app (no instance id), replayed (307)",
    FailoversRestart => "failovers.restart": "failovers because the app restarted at the same address",
    FailoversRestored => "failovers.restored": "failovers that restored stored state",
    FailoversJoined => "failovers.joined": "failovers that found the session already moved by another proxy",
    FailoversFresh => "failovers.fresh": "failovers that started an empty session (no store, outage, nothing stored, or an app without the contract)",
    FailoversRefused => "failovers.refused": "restored states a live app refused (started fresh)",
    FailoversBusy => "failovers.busy": "failovers answered 503 while another proxy kept moving the session",
    FailoversRejected => "failovers.rejected": "failovers answered 503 by the outage policy \"reject\"",
    FailoversDeferred => "failovers.deferred": "pinned requests answered 503 + Retry-After, not moved: Envoy does not know the host, this proxy never saw it, and its cookie is seconds old (a newer endpoint view elsewhere)",
    StoreWrites => "store.writes": "state writes sent",
    StoreWritesRejected => "store.writes_rejected": "state writes refused because the host no longer owns the session",
    StoreWritesUnprotected => "store.writes_unprotected": "state changes not stored because the store was unreachable (breaker open or errors)",
    StoreErrors => "store.errors": "store calls that failed (no answer, HTTP error, unreadable answer)",
    StoreTimeouts => "store.timeouts": "store calls that ran out of time",
    StoreCallsDropped => "store.calls_dropped": "worker store calls forgotten because 1,024 were already queued or in flight (the store is far behind)",
    StoreNewSessionsDeferred => "store.new_sessions_deferred": "new sessions' first state writes not sent because the worker's store.new_session_writes_per_second was spent (stored at their next change)",
    StoreBusy => "store.busy": "store calls Envoy refused itself because the store cluster's limits were full (never counted against the store)",
    StoreStatesOversize => "store.states_oversize": "states not stored because they exceed store.max_state_bytes",
    StoreMismatched => "store.replies_mismatched": "store answers that belonged to another call (never used)",
    StoreBreakerOpened => "store.breaker_opened": "times the store circuit breaker opened",
    StoreBreakerRejected => "store.breaker_rejected": "store calls failed at once by the open breaker",
    GoneMarked => "gone.marked": "hosts or instances marked gone",
    GoneCleared => "gone.cleared": "gone marks forgotten because the host answered again",
    InternalErrors => "internal.errors": "work skipped because the filter found its own state in use (a bug: please report it)",
}

impl Counter {
    pub fn rejected(reason: Rejection) -> Counter {
        match reason {
            Rejection::Malformed => Counter::RejectedMalformed,
            Rejection::UnknownKey => Counter::RejectedUnknownKey,
            Rejection::BadSignature => Counter::RejectedBadSignature,
            Rejection::Expired => Counter::RejectedExpired,
            Rejection::Ambiguous => Counter::RejectedAmbiguous,
        }
    }
}

/// The name of the store latency histogram (milliseconds).
pub const STORE_LATENCY: &str = "session_affinity.store.latency_ms";

/// Counts not yet handed to the proxy.
#[derive(Debug)]
pub struct Metrics {
    counts: Vec<Cell<u64>>,
    /// Bit `i` set: `counts[i]` is not zero (a flush visits only those).
    counted: Cell<u64>,
    latencies_ms: RefCell<Vec<u64>>,
}

// The bitmask has a bit for every counter.
const _: () = assert!(Counter::ALL.len() <= 64);

impl Default for Metrics {
    fn default() -> Self {
        Metrics { counts: Counter::ALL.iter().map(|_| Cell::new(0)).collect(), counted: Cell::new(0), latencies_ms: RefCell::default() }
    }
}

impl Metrics {
    pub fn incr(&self, counter: Counter) {
        if let Some(cell) = self.counts.get(counter as usize) {
            cell.set(cell.get().saturating_add(1));
            self.counted.set(self.counted.get() | 1 << (counter as u32));
        }
    }

    pub fn store_latency(&self, millis: u64) {
        if let Ok(mut samples) = self.latencies_ms.try_borrow_mut() {
            // Bounded: a stalled flush must not grow this without limit.
            if samples.len() < 4096 {
                samples.push(millis);
            }
        }
    }

    /// Hands the pending counts (counter, delta) and latency samples to the
    /// proxy, and resets them. Allocates nothing, and costs next to nothing
    /// when little was counted.
    pub fn flush(&self, mut count: impl FnMut(Counter, u64), mut sample: impl FnMut(u64)) {
        let mut counted = self.counted.replace(0);
        while counted != 0 {
            let index = counted.trailing_zeros() as usize;
            counted &= counted - 1;
            if let (Some(&counter), Some(cell)) = (Counter::ALL.get(index), self.counts.get(index)) {
                count(counter, cell.replace(0));
            }
        }
        if let Ok(mut samples) = self.latencies_ms.try_borrow_mut() {
            samples.drain(..).for_each(&mut sample);
        }
    }

    /// A pending count (tests read it before the tick drains it).
    pub fn get(&self, counter: Counter) -> u64 {
        self.counts.get(counter as usize).map_or(0, Cell::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_counter_in_discriminant_order_with_distinct_names() {
        let mut names = std::collections::HashSet::new();
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
            assert!(names.insert(c.name()), "{} twice", c.name());
            let area = c.name().split('.').nth(1).unwrap();
            assert!(["sessions", "cookies", "failovers", "store", "gone", "internal"].contains(&area), "{}", c.name());
        }
    }

    #[test]
    fn the_readme_lists_every_counter_with_what_it_counts() {
        let readme = include_str!("../../README.md");
        for c in Counter::ALL {
            let short = c.name().trim_start_matches("session_affinity.");
            let row = format!("| `{short}` | {} |", c.describe());
            assert!(readme.contains(&row), "README.md has no row {row}");
        }
    }

    fn flushed(m: &Metrics) -> (Vec<(Counter, u64)>, Vec<u64>) {
        let (mut counts, mut samples) = (Vec::new(), Vec::new());
        m.flush(|c, n| counts.push((c, n)), |ms| samples.push(ms));
        (counts, samples)
    }

    #[test]
    fn flush_hands_over_and_resets_counts() {
        let m = Metrics::default();
        m.incr(Counter::SessionsPinned);
        m.incr(Counter::SessionsPinned);
        m.store_latency(3);
        assert_eq!(flushed(&m), (vec![(Counter::SessionsPinned, 2)], vec![3]));
        assert_eq!(flushed(&m), (vec![], vec![]));
        m.incr(Counter::GoneMarked);
        assert_eq!(flushed(&m), (vec![(Counter::GoneMarked, 1)], vec![]));
    }
}

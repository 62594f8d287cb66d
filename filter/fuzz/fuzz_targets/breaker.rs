//! The store's circuit breaker: several workers' breakers over one
//! shared-data entry (the `testing` fake, with real CAS), calls admitted and
//! their outcomes recorded in any order, a clock that moves either way, lost
//! CAS races, and other writers putting any state or garbage in the entry.
//!
//! Properties (besides no panic on any shared-data content):
//! - at most one probe at a time: once a call is admitted as the probe, no
//!   other is until an outcome is recorded or the probe's time is up;
//! - once opened, no call is admitted until the cooldown has passed (or a
//!   late success closed it);
//! - from closed, the `failures`-th consecutive failure opens it, not earlier,
//!   counting only failures of calls sent after the store's last answer
//!   (as recorded: at most once per granularity while closed);
//! - a closed breaker admits every call.
//!
//! Lost races and foreign writes make the state unknown to these checks
//! until a success closes the breaker again.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{ensure, rel, NOW_MS};
use serde::{Deserialize, Serialize};
use session_affinity::breaker::{Admit, Breaker, Transition, ANSWERED_GRANULARITY_MS};
use session_affinity::testing::FakeShared;

const KEY: &str = "session_affinity.breaker.store";
const WORKERS: usize = 3;

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Written {
    Closed(u32),
    /// Open until this many ms from now.
    Open(i32),
    Probing(i32),
    Garbage(Vec<u8>),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Step {
    Admit(u8),
    Record {
        worker: u8,
        success: bool,
        /// How long before now the call went out.
        #[serde(default)]
        sent_ago: u16,
    },
    Clock(i32),
    LoseRaces(bool),
    /// Another writer puts this in the entry.
    Write(Written),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    /// store.breaker.failures (1 to 100), cooldown (100ms to 10m), and the
    /// store timeout (1ms to 60s; a probe may take twice that).
    failures: u8,
    cooldown_ms: u32,
    timeout_ms: u16,
    steps: Vec<Step>,
}

/// What the checks know of the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Closed, after this many consecutive failures.
    Closed(u32),
    /// Opened at this time.
    Opened(u64),
    /// A probe went out at this time.
    Probe(u64),
    /// Lost races or foreign writes.
    Unknown,
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = sa_fuzz::read::<Input>(data) else { return };
    let failures = 1 + u32::from(input.failures) % 100;
    let cooldown_ms = 100 + u64::from(input.cooldown_ms) % 599_901;
    let probe_ms = 2 * (1 + u64::from(input.timeout_ms) % 60_000);
    let shared = FakeShared::default();
    let breakers: Vec<Breaker<'_>> = (0..WORKERS).map(|_| Breaker::new(&shared, "store", failures, cooldown_ms, probe_ms)).collect();
    let mut now = NOW_MS;
    let mut known = Known::Closed(0);
    // When the store last answered, as the breaker recorded it.
    let mut answered_ms = 0u64;
    let mut answered_exact = true;
    for step in input.steps.iter().take(64) {
        match step {
            Step::Admit(worker) => {
                let admit = breakers[usize::from(*worker) % WORKERS].admit(now);
                match known {
                    Known::Closed(_) => ensure!(admit == Admit::Call, "closed", "a closed breaker answered {admit:?}"),
                    Known::Opened(at) if now < at.saturating_add(cooldown_ms) => {
                        ensure!(admit == Admit::Reject, "open", "opened at {at}, {admit:?} at {now} (cooldown {cooldown_ms} ms)")
                    }
                    Known::Probe(at) if now < at.saturating_add(probe_ms) => {
                        ensure!(
                            admit == Admit::Reject,
                            "two-probes",
                            "a probe went out at {at}; {admit:?} at {now} (probe time {probe_ms} ms)"
                        )
                    }
                    _ => {}
                }
                if admit == Admit::Probe && !shared.lose_races.get() {
                    known = Known::Probe(now);
                }
            }
            Step::Record { worker, success, sent_ago } => {
                let breaker = &breakers[usize::from(*worker) % WORKERS];
                let sent = now.saturating_sub(u64::from(*sent_ago));
                let transition = if *success { breaker.answered(now) } else { breaker.failed(sent, now) };
                if shared.lose_races.get() {
                    known = Known::Unknown;
                    continue;
                }
                if *success {
                    let surely_written = now >= answered_ms.saturating_add(ANSWERED_GRANULARITY_MS);
                    if surely_written {
                        answered_exact = true;
                    } else if known == Known::Unknown {
                        // Whether this answer was written depends on a state the checks do not know.
                        answered_exact = false;
                    }
                    if surely_written || known != Known::Closed(0) {
                        answered_ms = answered_ms.max(now);
                    }
                }
                let answered_since = !*success && answered_ms > 0 && answered_ms >= sent;
                if answered_since && !answered_exact {
                    known = Known::Unknown;
                    continue;
                }
                if answered_since && known != Known::Unknown {
                    ensure!(transition == Transition::None, "answered-since", "a failure of a call sent at {sent}, after an answer at {answered_ms}: {transition:?}");
                    continue;
                }
                known = match (known, success) {
                    (_, true) => Known::Closed(0),
                    (Known::Closed(n), false) if n + 1 >= failures => {
                        ensure!(
                            transition == Transition::Opened,
                            "opens",
                            "failure {} of {failures} did not open it: {transition:?}",
                            n + 1
                        );
                        Known::Opened(now)
                    }
                    (Known::Closed(n), false) => {
                        ensure!(transition == Transition::None, "opens", "failure {} of {failures}: {transition:?}", n + 1);
                        Known::Closed(n + 1)
                    }
                    // A failed probe opens it again (from Probing: no new "opened").
                    (Known::Probe(_), false) => Known::Opened(now),
                    (other, false) => other,
                };
            }
            Step::Clock(ms) => now = rel(now, i64::from(*ms)),
            Step::LoseRaces(lose) => shared.lose_races.set(*lose),
            Step::Write(written) => {
                let text = match written {
                    Written::Closed(n) => format!("closed {n} 0").into_bytes(),
                    Written::Open(ms) => format!("open {} 0", rel(now, i64::from(*ms))).into_bytes(),
                    Written::Probing(ms) => format!("probing {} 0", rel(now, i64::from(*ms))).into_bytes(),
                    Written::Garbage(bytes) => bytes.clone(),
                };
                let mut data = shared.data.borrow_mut();
                let cas = data.get(KEY).map_or(1, |(_, c)| c.wrapping_add(1));
                data.insert(KEY.to_string(), (text, cas));
                known = Known::Unknown;
                answered_ms = 0;
                answered_exact = true;
            }
        }
    }
});

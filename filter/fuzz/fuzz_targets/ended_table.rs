//! The process-wide table of sessions ended without the store's word: any
//! session ids, times that move either way, lost CAS races, and other
//! writers putting anything in the table's shared-data entries.
//!
//! Properties (besides no panic on any shared-data content):
//! - right after a remember that did not lose its races, the session reads
//!   as ended until its time, and a session never remembered (since the last
//!   foreign write) never does;
//! - an entry never outlives its time.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{ensure, rel, NOW_MS};
use serde::{Deserialize, Serialize};
use session_affinity::ended;
use session_affinity::testing::FakeShared;

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Step {
    /// Remember session `sid` (an index into a few ids, or any text) until this many ms from now.
    Remember { sid: Sid, for_ms: i32 },
    Check(Sid),
    Clock(i32),
    LoseRaces(bool),
    /// Another writer puts these bytes in bucket `bucket`.
    Write { bucket: u8, bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Sid {
    Known(u8),
    Any(String),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    steps: Vec<Step>,
}

const SIDS: [&str; 4] = ["AAAAAAAAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBBBBBBBB", "s0", "s1"];

fuzz_target!(|data: &[u8]| {
    let Some(input) = sa_fuzz::read::<Input>(data) else { return };
    let shared = FakeShared::default();
    let mut now = NOW_MS;
    // What the checks know: sid -> until, while no foreign write muddied it.
    let mut known: Vec<(String, u64)> = Vec::new();
    let mut exact = true;
    let sid_of = |sid: &Sid| match sid {
        Sid::Known(i) => SIDS[usize::from(*i) % SIDS.len()].to_string(),
        Sid::Any(text) => text.chars().take(64).collect(),
    };
    for step in input.steps.iter().take(128) {
        match step {
            Step::Remember { sid, for_ms } => {
                let sid = sid_of(sid);
                let until = rel(now, i64::from(*for_ms));
                let kept = ended::remember(&shared, &sid, until, now);
                if kept {
                    known.retain(|(s, _)| *s != sid);
                    known.push((sid.clone(), until));
                    ensure!(ended::has_ended(&shared, &sid, now) == (until > now), "remembered", "{sid:?} until {until} at {now}");
                } else if !shared.lose_races.get() {
                    ensure!(sid.is_empty() || !sid.bytes().all(|b| b.is_ascii_graphic()), "listable", "{sid:?} was refused");
                }
            }
            Step::Check(sid) => {
                let sid = sid_of(sid);
                let ended = ended::has_ended(&shared, &sid, now);
                let until = known.iter().find(|(s, _)| *s == sid).map(|(_, until)| *until);
                if ended {
                    ensure!(!exact || until.is_some_and(|u| u > now), "never-remembered", "{sid:?} reads as ended at {now} ({until:?})");
                }
            }
            Step::Clock(ms) => now = rel(now, i64::from(*ms)),
            Step::LoseRaces(lose) => shared.lose_races.set(*lose),
            Step::Write { bucket, bytes } => {
                let key = format!("session_affinity.ended.{}", bucket % 16);
                let mut data = shared.data.borrow_mut();
                let cas = data.get(&key).map_or(1, |(_, c)| c.wrapping_add(1));
                data.insert(key, (bytes.clone(), cas));
                exact = false;
            }
        }
    }
});

//! `VerifiedCookies`, the per-worker cache of verified cookies, against plain
//! `cookie::decode`: a sequence of cookies (valid, forged, edited, repeated,
//! colliding in the direct-mapped table) decoded at a clock that moves either
//! way, under key rings that change as a config reload changes them (a key
//! added, rotated out of signing, removed, or its secret replaced).
//!
//! Property: the cache gives the same answer as `cookie::decode` under the
//! current ring every time (same rejection, or the same claims): it never
//! accepts what the current ring refuses.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{rel, ring, CookieSpec, NOW_S, SECRET_K0, SECRET_K1, SECRET_K9};
use serde::{Deserialize, Serialize};
use session_affinity::cookie::{self, Claims, Rejection, VerifiedCookies};
use session_affinity::keys::KeyRing;

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Step {
    /// Decode a new cookie.
    New(Box<CookieSpec>),
    /// Decode one seen before again (by index).
    Again(u8),
    /// Move the clock, seconds (backwards too: clocks get stepped).
    Wait(i32),
    /// A config reload with another key ring (by index in `rings`).
    Ring(u8),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    steps: Vec<Step>,
}

/// The rings a config could have over time.
fn rings() -> Vec<KeyRing> {
    vec![
        ring(&[("k1", SECRET_K1), ("k0", SECRET_K0)]),
        ring(&[("k1", SECRET_K1)]),
        ring(&[("k0", SECRET_K0), ("k1", SECRET_K1)]),
        ring(&[("k0", SECRET_K0)]),
        // Same ids, one secret replaced (a leaked key rotated in place).
        ring(&[("k1", SECRET_K9), ("k0", SECRET_K0)]),
        KeyRing::new(Vec::new()),
    ]
}

fn fields(c: &Claims) -> (String, String, String, String, u64, u64, u64, String, u8) {
    (c.sid().into(), c.cluster().into(), c.upstream().into(), c.instance().into(), c.since, c.iat, c.exp, c.kid().into(), c.flags)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = sa_fuzz::read::<Input>(data) else { return };
    let rings = rings();
    let mut keys = &rings[0];
    let cache = VerifiedCookies::default();
    let mut now = NOW_S;
    let mut seen: Vec<Vec<u8>> = Vec::new();
    for step in input.steps.iter().take(64) {
        let raw = match step {
            Step::New(spec) => spec.build(now).bytes,
            Step::Again(i) if !seen.is_empty() => seen[*i as usize % seen.len()].clone(),
            Step::Again(_) => continue,
            Step::Wait(s) => {
                now = rel(now, i64::from(*s));
                continue;
            }
            Step::Ring(i) => {
                keys = &rings[*i as usize % rings.len()];
                continue;
            }
        };
        let cached = cache.decode(&raw, keys, now).map(|c| fields(&c));
        let plain = match std::str::from_utf8(&raw) {
            Ok(text) => cookie::decode(text, keys, now).map(|c| fields(&c)),
            Err(_) => Err(Rejection::Malformed),
        };
        assert_eq!(cached, plain, "{:?} at {now} under {keys:?}", String::from_utf8_lossy(&raw));
        seen.push(raw);
    }
});

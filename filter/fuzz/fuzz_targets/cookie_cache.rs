//! `VerifiedCookies`, the per-config cache of verified cookies, against plain
//! `cookie::decode`: a sequence of cookies (valid, forged, edited, repeated,
//! colliding in the direct-mapped table) decoded at a clock that only moves
//! forward, with the ring the config has.
//!
//! Property: the cache gives the same answer as `cookie::decode` every time
//! (same rejection, or claims with the same fields).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{CookieSpec, NOW_S, SECRET_K0, SECRET_K1};
use session_affinity::config::Secret;
use session_affinity::cookie::{self, Claims, VerifiedCookies};
use session_affinity::keys::KeyRing;

#[derive(Arbitrary, Debug)]
enum Step {
    /// Decode a new cookie.
    New(CookieSpec),
    /// Decode one seen before again (by index).
    Again(u8),
    /// Move the clock forward, seconds.
    Wait(u32),
}

fn fields(c: &Claims) -> (String, String, String, u64, u64, String, u8) {
    (c.sid().into(), c.host().into(), c.instance().into(), c.iat, c.exp, c.kid().into(), c.flags)
}

fuzz_target!(|steps: Vec<Step>| {
    let keys = KeyRing::new(vec![("k1".into(), Secret(SECRET_K1.to_vec())), ("k0".into(), Secret(SECRET_K0.to_vec()))]);
    let cache = VerifiedCookies::default();
    let mut now = NOW_S;
    let mut seen: Vec<String> = Vec::new();
    for step in steps.iter().take(64) {
        let raw = match step {
            Step::New(spec) => String::from_utf8_lossy(&spec.build(now).bytes).into_owned(),
            Step::Again(i) if !seen.is_empty() => seen[*i as usize % seen.len()].clone(),
            Step::Again(_) => continue,
            Step::Wait(s) => {
                now = now.saturating_add(u64::from(*s));
                continue;
            }
        };
        let cached = cache.decode(&raw, &keys, now).map(|c| fields(&c));
        let plain = cookie::decode(raw.clone(), &keys, now).map(|c| fields(&c));
        assert_eq!(cached, plain, "{raw:?} at {now}");
        seen.push(raw);
    }
});

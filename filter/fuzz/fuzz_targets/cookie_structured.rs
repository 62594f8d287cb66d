//! Structure-aware cookies: fields from vocabularies or arbitrary text, built
//! with `cookie::encode` or assembled by hand and signed (so odd fields get past
//! the signature), then optionally edited byte by byte.
//!
//! Properties:
//! - no panic;
//! - an unedited `encode` output decodes exactly when it is inside its validity
//!   window (else `Expired`, or `Malformed` for an issue time too far in the
//!   future), to the claims it was made from, and re-encodes byte for byte;
//! - a forged or edited cookie is never accepted, nor reported as merely expired;
//! - any accepted cookie re-encodes byte for byte when its numbers are written
//!   canonically, and otherwise to a cookie with the same claims;
//! - rotation: a cookie signed by a key that no longer signs still decodes.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{check_built, fields, is_canonical_number, new_claims, rel, CookieSpec, NOW_S};
use serde::{Deserialize, Serialize};
use session_affinity::cookie::{self, Claims};
use session_affinity::keys::KeyRing;

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    spec: CookieSpec,
    /// Decode time relative to `NOW_S`, seconds.
    now: i32,
}

fn re_encode(c: &Claims, keys: &KeyRing) -> Option<String> {
    cookie::encode(&new_claims(c), keys)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = sa_fuzz::read::<Input>(data) else { return };
    let now = rel(NOW_S, i64::from(input.now));
    let built = input.spec.build(NOW_S);
    let checked = check_built(&input.spec, &built, now, |claims, own, text| {
        assert_eq!(re_encode(claims, own).as_deref(), Some(text), "round trip");
    });
    let Ok(claims) = &checked.result else { return };
    let text = &checked.text;
    let again = re_encode(claims, &checked.signer.ring()).unwrap_or_else(|| panic!("encode refused the claims of {text:?}"));
    let parts: Vec<&str> = text.split('|').collect();
    let canonical = [5, 6, 7, 9].iter().all(|&i| parts.get(i).is_some_and(|p| is_canonical_number(p)));
    if canonical {
        assert_eq!(&again, text, "round trip");
    } else {
        let decoded = cookie::decode(again, &checked.signer.ring(), now).map(|c| fields(&c));
        assert_eq!(decoded, Ok(fields(claims)), "non-canonical {text:?}");
    }
});

//! Structure-aware sealed (version 3) cookies: fields from vocabularies or
//! arbitrary text, sealed by `cookie::seal` or by hand (so odd fields get past
//! the tag), with any random bytes, then optionally edited byte by byte.
//!
//! Properties:
//! - no panic;
//! - an unedited `seal` output decodes exactly when it is inside its validity
//!   window (else `Expired`, or `Malformed` for an issue time too far in the
//!   future), to the claims it was made from, and sealing those claims again
//!   with the same random bytes gives the same value byte for byte;
//! - a forged or edited cookie is never accepted, nor reported as merely expired;
//! - any accepted cookie's claims seal again to a cookie with the same claims;
//! - rotation: a cookie sealed by a key that no longer seals still opens.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{check_built, fields, new_claims, rel, CookieSpec, NOW_S};
use serde::{Deserialize, Serialize};
use session_affinity::cookie::{self, Format};

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    spec: CookieSpec,
    /// The random bytes the nonce derives from.
    fresh: [u8; 16],
    /// Decode time relative to `NOW_S`, seconds.
    now: i32,
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = sa_fuzz::read::<Input>(data) else { return };
    let now = rel(NOW_S, i64::from(input.now));
    let built = input.spec.build_sealed(NOW_S, &input.fresh);
    let checked = check_built(&input.spec, &built, now, |claims, own, text| {
        assert_eq!((claims.format(), claims.value()), (Format::Sealed, text));
        assert_eq!(cookie::seal(&new_claims(claims), own, &input.fresh).as_deref(), Some(text), "round trip");
    });
    let Ok(claims) = &checked.result else { return };
    let text = &checked.text;
    assert_eq!(claims.format(), Format::Sealed, "{text:?}");
    let again = cookie::seal(&new_claims(claims), &checked.signer.ring(), &input.fresh)
        .unwrap_or_else(|| panic!("seal refused the claims of {text:?}"));
    assert_eq!(cookie::decode(again, &checked.signer.ring(), now).map(|c| fields(&c)), Ok(fields(claims)), "{text:?}");
});

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
use sa_fuzz::{rel, ring_rotated, CookieSpec, KeyPick, NOW_S};
use serde::{Deserialize, Serialize};
use session_affinity::cookie::{self, Claims, Format, NewClaims, Rejection};

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    spec: CookieSpec,
    /// The random bytes the nonce derives from.
    fresh: [u8; 16],
    /// Decode time relative to `NOW_S`, seconds.
    now: i32,
}

type Fields = (String, String, String, String, u64, u64, u64, String, u8);

fn fields(c: &Claims) -> Fields {
    (c.sid().into(), c.cluster().into(), c.upstream().into(), c.instance().into(), c.since, c.iat, c.exp, c.kid().into(), c.flags)
}

fn new_claims(c: &Claims) -> NewClaims<'_> {
    NewClaims { sid: c.sid(), cluster: c.cluster(), upstream: c.upstream(), instance: c.instance(), since: c.since, iat: c.iat, exp: c.exp, flags: c.flags }
}

fn outcome<T>(r: &Result<T, Rejection>) -> Result<(), Rejection> {
    r.as_ref().map(|_| ()).map_err(|e| *e)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = sa_fuzz::read::<Input>(data) else { return };
    let now = rel(NOW_S, i64::from(input.now));
    let spec = &input.spec;
    let built = spec.build_sealed(NOW_S, &input.fresh);
    let text = String::from_utf8_lossy(&built.bytes).into_owned();
    let lossless = text.as_bytes() == built.bytes.as_slice();
    let rotated = ring_rotated();
    let result = cookie::decode(text.as_str(), &rotated, now);

    if built.encoded && !built.edited {
        let own = spec.signer.ring();
        let value = |n: &sa_fuzz::Num| n.value(NOW_S).unwrap_or(0);
        let (iat, exp) = (value(&spec.iat), value(&spec.exp));
        let expected = if now >= exp {
            Err(Rejection::Expired)
        } else if iat > now.saturating_add(300) || iat >= exp {
            Err(Rejection::Malformed)
        } else {
            Ok(())
        };
        let own_result = cookie::decode(text.as_str(), &own, now);
        assert_eq!(outcome(&own_result), expected, "{text:?} at {now}");
        if let Ok(claims) = &own_result {
            let made = (spec.sid(), spec.cluster(), spec.upstream(), spec.instance(), value(&spec.since), iat, exp);
            assert_eq!((claims.sid(), claims.cluster(), claims.upstream(), claims.instance(), claims.since, claims.iat, claims.exp), made);
            assert_eq!((claims.format(), claims.value()), (Format::Sealed, text.as_str()));
            assert_eq!(cookie::seal(&new_claims(claims), &own, &input.fresh).as_deref(), Some(text.as_str()), "round trip");
        }
        if spec.signer != KeyPick::Unknown {
            assert_eq!(outcome(&result), expected, "rotation: {text:?}");
        }
    }

    let forged = spec.kid != spec.signer || built.edited || !lossless;
    match &result {
        Ok(claims) => {
            assert!(!forged, "accepted a forged or edited cookie {text:?} (built {:?})", built.bytes);
            assert!(matches!(claims.kid(), "k1" | "k0") && claims.format() == Format::Sealed);
            assert!(now < claims.exp && claims.since <= claims.iat && claims.iat < claims.exp && claims.iat <= now.saturating_add(300));
            let signer = if claims.kid() == "k1" { KeyPick::K1 } else { KeyPick::K0 };
            let again = cookie::seal(&new_claims(claims), &signer.ring(), &input.fresh).unwrap_or_else(|| panic!("seal refused the claims of {text:?}"));
            assert_eq!(cookie::decode(again, &signer.ring(), now).map(|c| fields(&c)), Ok(fields(claims)), "{text:?}");
        }
        Err(Rejection::Expired) => assert!(!forged, "a forged or edited cookie was reported as merely expired: {text:?}"),
        Err(_) => {}
    }
});

//! Structure-aware cookies: fields from vocabularies or arbitrary text, built
//! with `cookie::encode` or assembled by hand and signed (so odd fields get past
//! the signature), then optionally edited byte by byte.
//!
//! Properties:
//! - no panic;
//! - an unedited `encode` output decodes exactly when it is inside its validity
//!   window (else `Expired`, or `Malformed` for an issue time in the future),
//!   to the same fields, and re-encodes byte for byte (round trip);
//! - a forged or edited cookie is never accepted, nor reported as merely expired;
//! - any accepted cookie re-encodes byte for byte when its numbers are written
//!   canonically, and otherwise re-encodes to a cookie with the same fields;
//! - rotation: a cookie of a key that is no longer the signing key still decodes.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{is_canonical_number, rel, CookieSpec, KeyPick, NOW_S, SECRET_K0, SECRET_K1};
use session_affinity::config::Secret;
use session_affinity::cookie::{self, Claims, NewClaims, Rejection};
use session_affinity::keys::KeyRing;

#[derive(Arbitrary, Debug)]
struct Input {
    spec: CookieSpec,
    /// Decode time relative to `NOW_S`, seconds.
    now: i32,
}

fn fields(c: &Claims) -> (String, String, String, u64, u64, String, u8) {
    (c.sid().into(), c.host().into(), c.instance().into(), c.iat, c.exp, c.kid().into(), c.flags)
}

fn re_encode(c: &Claims, keys: &KeyRing) -> Option<String> {
    let claims = NewClaims { sid: c.sid(), host: c.host(), instance: c.instance(), iat: c.iat, exp: c.exp, flags: c.flags };
    cookie::encode(&claims, keys)
}

fuzz_target!(|input: Input| {
    let now = rel(NOW_S, input.now);
    let built = input.spec.build(NOW_S);
    let text = String::from_utf8_lossy(&built.bytes).into_owned();
    let lossless = text.as_bytes() == built.bytes.as_slice();
    let spec = &input.spec;

    // The ring a proxy has after rotating k0 out of signing: k1 signs, k0 verifies.
    let rotated = KeyRing::new(vec![("k1".into(), Secret(SECRET_K1.to_vec())), ("k0".into(), Secret(SECRET_K0.to_vec()))]);
    let result = cookie::decode(text.clone(), &rotated, now);

    if built.encoded && !built.edited {
        let own = spec.signer.ring();
        let (iat, exp) = (spec.iat.value(NOW_S).unwrap_or(0), spec.exp.value(NOW_S).unwrap_or(0));
        let expected = if now >= exp {
            Err(Rejection::Expired)
        } else if iat > now.saturating_add(300) || iat >= exp {
            Err(Rejection::Malformed)
        } else {
            Ok(())
        };
        let own_result = cookie::decode(text.clone(), &own, now);
        assert_eq!(own_result.as_ref().map(|_| ()).map_err(|e| *e), expected, "{text:?} at {now}");
        if let Ok(claims) = &own_result {
            assert_eq!(claims.sid(), spec.sid.get(sa_fuzz::SIDS));
            assert_eq!(claims.host(), spec.host.get(sa_fuzz::HOSTS));
            assert_eq!(claims.instance(), spec.instance.get(sa_fuzz::INSTANCES));
            assert_eq!((claims.iat, claims.exp), (iat, exp));
            assert_eq!(re_encode(claims, &own).as_deref(), Some(text.as_str()), "round trip");
        }
        if spec.signer != KeyPick::Unknown {
            // Known to the rotated ring, whichever of its keys signed.
            assert_eq!(result.as_ref().map(|_| ()).map_err(|e| *e), expected, "rotation: {text:?}");
        }
    }

    let forged = spec.kid != spec.signer || built.edited || !lossless;
    match &result {
        Ok(claims) => {
            assert!(!forged, "accepted a forged or edited cookie {text:?} (built {:?})", built.bytes);
            assert!(matches!(claims.kid(), "k1" | "k0"));
            assert!(cookie::is_sid(claims.sid()) && cookie::is_host(claims.host()) && cookie::is_instance(claims.instance()));
            assert!(now < claims.exp && claims.iat < claims.exp && claims.iat <= now.saturating_add(300));
            let signer = if claims.kid() == "k1" { KeyPick::K1 } else { KeyPick::K0 };
            let again = re_encode(claims, &signer.ring()).unwrap_or_else(|| panic!("encode refused the fields of {text:?}"));
            let parts: Vec<&str> = text.split('|').collect();
            let canonical = [4, 5, 7].iter().all(|&i| parts.get(i).is_some_and(|p| is_canonical_number(p)));
            if canonical {
                assert_eq!(again, text, "round trip");
            } else {
                let decoded = cookie::decode(again, &signer.ring(), now).map(|c| fields(&c));
                assert_eq!(decoded, Ok(fields(claims)), "non-canonical {text:?}");
            }
        }
        Err(Rejection::Expired) => assert!(!forged, "a forged or edited cookie was reported as merely expired: {text:?}"),
        Err(_) => {}
    }
});

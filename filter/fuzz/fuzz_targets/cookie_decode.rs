//! `cookie::decode` on arbitrary text, at a fixed time and at edge times, and
//! the per-worker cache (`VerifiedCookies`) on the same bytes.
//!
//! Properties: no panic; a cookie that decodes is one `cookie::encode` writes
//! byte for byte from the decoded claims (same cluster, since, iat, exp, flags
//! and key), lies in its validity window, has fields the filter can use and
//! only cookie-octets; an empty key ring accepts nothing; the cache answers as
//! `decode` does, and refuses bytes that are not UTF-8 as malformed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sa_fuzz::{is_cookie_octet, ring_k1, NOW_S};
use session_affinity::cookie::{self, NewClaims, Rejection, VerifiedCookies};
use session_affinity::ids::{is_instance, is_sid, is_upstream};
use session_affinity::keys::KeyRing;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let keys = ring_k1();
    let empty = KeyRing::new(Vec::new());
    let cache = VerifiedCookies::default();
    for now in [NOW_S, 0, NOW_S + 3600, u64::MAX] {
        assert!(cookie::decode(text.as_str(), &empty, now).is_err(), "an empty key ring accepted {text:?}");
        let result = cookie::decode(text.as_str(), &keys, now);
        let cached = cache.decode(data, &keys, now);
        if std::str::from_utf8(data).is_ok() {
            assert_eq!(cached, result, "the cache disagrees on {text:?} at {now}");
        } else {
            assert_eq!(cached, Err(Rejection::Malformed), "bytes that are not UTF-8");
        }
        let Ok(claims) = result else { continue };
        assert!(now < claims.exp && claims.since <= claims.iat && claims.iat < claims.exp, "{claims:?} at {now}");
        assert!(claims.iat <= now.saturating_add(300), "issued too far in the future: {claims:?} at {now}");
        assert!(text.len() <= cookie::MAX_COOKIE_LEN && text.bytes().all(is_cookie_octet), "{text:?}");
        assert!(is_sid(claims.sid()) && is_upstream(claims.upstream()) && is_instance(claims.instance()), "{claims:?}");
        let cluster = claims.cluster();
        assert!(cluster.is_empty() || (cluster.len() == cookie::CLUSTER_TAG_LEN && cluster.bytes().all(is_cookie_octet)), "{cluster:?}");
        assert_eq!((claims.kid(), claims.value()), ("k1", text.as_str()));
        let again = NewClaims {
            sid: claims.sid(),
            cluster,
            upstream: claims.upstream(),
            instance: claims.instance(),
            since: claims.since,
            iat: claims.iat,
            exp: claims.exp,
            flags: claims.flags,
        };
        assert_eq!(cookie::encode(&again, &keys).as_deref(), Some(text.as_str()), "decoded {claims:?}");
    }
});

//! `cookie::decode` on arbitrary text, at a fixed time and at edge times.
//!
//! Properties: no panic; a cookie that decodes is one `cookie::encode` writes
//! byte for byte from the decoded fields (same iat/exp/flags and key), lies in
//! its validity window, and contains only cookie-octets. An empty key ring
//! accepts nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sa_fuzz::{is_cookie_octet, ring_k1, NOW_S};
use session_affinity::cookie::{self, NewClaims};
use session_affinity::keys::KeyRing;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let keys = ring_k1();
    let empty = KeyRing::new(Vec::new());
    for now in [NOW_S, 0, NOW_S + 3600, u64::MAX] {
        assert!(cookie::decode(text.clone(), &empty, now).is_err(), "an empty key ring accepted {text:?}");
        let Ok(claims) = cookie::decode(text.clone(), &keys, now) else { continue };
        assert!(now < claims.exp && claims.iat < claims.exp && claims.iat <= now.saturating_add(300), "{claims:?} at {now}");
        assert!(text.len() <= cookie::MAX_COOKIE_LEN && text.bytes().all(is_cookie_octet), "{text:?}");
        assert!(cookie::is_sid(claims.sid()) && cookie::is_host(claims.host()) && cookie::is_instance(claims.instance()));
        assert_eq!(claims.kid(), "k1");
        let again = NewClaims {
            sid: claims.sid(),
            host: claims.host(),
            instance: claims.instance(),
            iat: claims.iat,
            exp: claims.exp,
            flags: claims.flags,
        };
        assert_eq!(cookie::encode(&again, &keys).as_deref(), Some(text.as_str()), "decoded {claims:?}");
    }
});

//! Version 3 (sealed) cookies from arbitrary bytes: the bytes as the opaque
//! part of `3|<kid>|...` under the signing key's id, an older key's and an
//! unknown one, and the bytes as the whole cookie text.
//!
//! Properties: no panic; nothing sealed is accepted (only a key holder can
//! seal); the rejection is exactly what the shape says: `Malformed` unless the
//! opaque part is a nonce, a whole number of padding blocks and a tag within
//! the cookie's length limit, else `UnknownKey` for the unknown id, else
//! `BadSignature`; the verified-cookie cache answers as `decode`.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{ring_rotated, NOW_S};
use session_affinity::cookie::{self, Rejection, VerifiedCookies, MAX_COOKIE_LEN, PAD};
use session_affinity::keys::{NONCE_LEN, SEAL_TAG_LEN};

fuzz_target!(|data: &[u8]| {
    let keys = ring_rotated();
    let cache = VerifiedCookies::default();
    let opaque = URL_SAFE_NO_PAD.encode(data);
    let body = data.len().checked_sub(NONCE_LEN + SEAL_TAG_LEN);
    for kid in ["k1", "k0", "k9"] {
        let text = format!("3|{kid}|{opaque}");
        let result = cookie::decode(text.as_str(), &keys, NOW_S);
        assert_eq!(cache.decode(text.as_bytes(), &keys, NOW_S), result, "the cache disagrees on {text:?}");
        let shaped = text.len() <= MAX_COOKIE_LEN && body.is_some_and(|n| n > 0 && n % PAD == 0);
        let expected = match (shaped, kid) {
            (false, _) => Rejection::Malformed,
            (true, "k9") => Rejection::UnknownKey,
            (true, _) => Rejection::BadSignature,
        };
        assert_eq!(result, Err(expected), "{text:?}");
    }
    let text = String::from_utf8_lossy(data);
    if text.starts_with("3|") {
        let result = cookie::decode(text.as_ref(), &keys, NOW_S);
        assert!(result.is_err(), "accepted a sealed cookie nobody sealed: {text:?}");
        assert_eq!(cache.decode(text.as_bytes(), &keys, NOW_S), result);
    }
});

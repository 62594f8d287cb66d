//! The routing cookie, version 1.
//!
//! ```text
//! 1|<sid>|<host>|<instance>|<iat>|<exp>|<kid>|<flags>|<tag>
//! ```
//! `tag` is base64url (no padding) of HMAC-SHA256 over every byte before it,
//! keyed by key `kid`. The payload is plain text on purpose: the cookie is
//! signed, not encrypted (like Envoy's own stateful-session cookie it shows the
//! pinned address), and plain text needs no decoding on the hot path. Every
//! character used is legal in a cookie value without quoting.
//!
//! Parsing is strict: exact field count, length limits on every field, and the
//! signature is checked before the expiry so a forged cookie is never reported
//! as merely expired.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use subtle::ConstantTimeEq;

use crate::keys::{KeyRing, TAG_LEN};

/// Longest cookie value accepted.
pub const MAX_COOKIE_LEN: usize = 512;
/// Length of a session id: 16 random bytes in base64url.
pub const SID_LEN: usize = 22;
const TAG_B64_LEN: usize = 43;
pub const MAX_HOST_LEN: usize = 64;
const MAX_INSTANCE_LEN: usize = 64;
const MAX_KEY_ID_LEN: usize = 32;
/// How far in the future an issue time may be (clock skew between replicas).
const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// Flag: the pinned host is known gone; the next request must fail over.
/// Carried by the cookie so that any proxy replica, not only the one that saw
/// the host fail, sends the replayed request down the failover path.
pub const FLAG_MOVING: u8 = 1;

/// Why a cookie was refused. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    UnknownKey,
    BadSignature,
    Expired,
}

/// A verified cookie. Keeps the cookie text and the ranges of its fields, so
/// decoding allocates once and a copy (say, from the cache) allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    raw: Rc<str>,
    sid: Range<usize>,
    host: Range<usize>,
    instance: Range<usize>,
    pub iat: u64,
    pub exp: u64,
    kid: Range<usize>,
    pub flags: u8,
}

impl Claims {
    fn field(&self, range: &Range<usize>) -> &str {
        self.raw.get(range.clone()).unwrap_or("")
    }
    pub fn sid(&self) -> &str {
        self.field(&self.sid)
    }
    /// The pinned upstream, "ip:port".
    pub fn host(&self) -> &str {
        self.field(&self.host)
    }
    /// The app instance the session was pinned to; empty when the app sends none.
    pub fn instance(&self) -> &str {
        self.field(&self.instance)
    }
    pub fn kid(&self) -> &str {
        self.field(&self.kid)
    }
    pub fn is_moving(&self) -> bool {
        self.flags & FLAG_MOVING != 0
    }
    /// The store's name for the owner of this session: "host#instance".
    pub fn owner(&self) -> String {
        owner_of(self.host(), self.instance())
    }
}

/// The store's owner name for an app instance at an address.
pub fn owner_of(host: &str, instance: &str) -> String {
    let mut owner = String::with_capacity(host.len() + 1 + instance.len());
    owner.push_str(host);
    owner.push('#');
    owner.push_str(instance);
    owner
}

/// What a new cookie says.
#[derive(Debug, Clone, Copy)]
pub struct NewClaims<'a> {
    pub sid: &'a str,
    pub host: &'a str,
    pub instance: &'a str,
    pub iat: u64,
    pub exp: u64,
    pub flags: u8,
}

/// Signs a cookie value with the ring's signing key. `None` when a field is
/// out of bounds (the caller then sets no cookie rather than a broken one).
pub fn encode(claims: &NewClaims<'_>, keys: &KeyRing) -> Option<String> {
    let kid = keys.signing_id()?;
    if !is_sid(claims.sid) || !is_host(claims.host) || !is_instance(claims.instance) {
        return None;
    }
    let mut value = String::with_capacity(160);
    for part in [claims.sid, claims.host, claims.instance] {
        if value.is_empty() {
            value.push_str("1|");
        }
        value.push_str(part);
        value.push('|');
    }
    value.push_str(&claims.iat.to_string());
    value.push('|');
    value.push_str(&claims.exp.to_string());
    value.push('|');
    value.push_str(kid);
    value.push('|');
    value.push_str(&claims.flags.to_string());
    value.push('|');
    let tag = keys.sign(value.as_bytes())?;
    URL_SAFE_NO_PAD.encode_string(tag, &mut value);
    Some(value)
}

/// Verifies a cookie value at time `now` (unix seconds).
pub fn decode(raw: impl Into<Rc<str>>, keys: &KeyRing, now: u64) -> Result<Claims, Rejection> {
    let claims = parse(raw.into())?;
    let kid = claims.kid();
    if !keys.knows(kid) {
        return Err(Rejection::UnknownKey);
    }
    let Some(tag_at) = claims.raw.rfind('|').map(|i| i + 1) else {
        return Err(Rejection::Malformed);
    };
    let (message, tag_b64) = claims.raw.split_at(tag_at);
    let mut tag = [0u8; TAG_LEN + 2];
    match URL_SAFE_NO_PAD.decode_slice(tag_b64, &mut tag) {
        Ok(TAG_LEN) => {}
        _ => return Err(Rejection::Malformed),
    }
    if !keys.verify(kid, message.as_bytes(), tag.get(..TAG_LEN).unwrap_or(&[])) {
        return Err(Rejection::BadSignature);
    }
    if now >= claims.exp {
        return Err(Rejection::Expired);
    }
    if claims.iat > now.saturating_add(MAX_CLOCK_SKEW_SECS) || claims.iat >= claims.exp {
        return Err(Rejection::Malformed);
    }
    Ok(claims)
}

/// How many verified cookies a worker remembers (a power of two).
const VERIFIED_SLOTS: usize = 4096;

/// Cookie values this key ring already verified, so a session's later
/// requests skip the MAC. A direct-mapped table: bounded, no eviction
/// bookkeeping, and a hit costs one hash and one comparison. Expiry is still
/// checked on every hit. It lives in the compiled config, next to the key
/// ring, so a new config (say, with a key removed) starts empty.
///
/// A hit needs the exact bytes of a cookie that verified, compared in
/// constant time, so it tells an attacker nothing about other cookies.
#[derive(Debug, Default)]
pub struct VerifiedCookies {
    slots: RefCell<Vec<Option<Claims>>>,
}

impl VerifiedCookies {
    /// Same answer as [`decode`] for the cookie's bytes, faster for a cookie
    /// seen before (a hit needs no UTF-8 check: it equals text that passed one).
    pub fn decode(&self, raw: impl AsRef<[u8]>, keys: &KeyRing, now: u64) -> Result<Claims, Rejection> {
        let raw = raw.as_ref();
        let slot = slot_of(raw);
        let hit = self.slots.try_borrow().ok().and_then(|slots| {
            slots.get(slot)?.as_ref().filter(|c| same_bytes(c.raw.as_bytes(), raw)).cloned()
        });
        if let Some(claims) = hit {
            return if now >= claims.exp { Err(Rejection::Expired) } else { Ok(claims) };
        }
        let text = std::str::from_utf8(raw).map_err(|_| Rejection::Malformed)?;
        let claims = decode(text, keys, now)?;
        if let Ok(mut slots) = self.slots.try_borrow_mut() {
            if slots.is_empty() {
                slots.resize(VERIFIED_SLOTS, None);
            }
            if let Some(entry) = slots.get_mut(slot) {
                *entry = Some(claims.clone());
            }
        }
        Ok(claims)
    }
}

/// The cache slot of a cookie value, from its last 8 bytes: in a cookie that
/// can hit, those are MAC output (uniform, and beyond a client's choosing).
fn slot_of(raw: &[u8]) -> usize {
    let tail = raw.len().checked_sub(8).and_then(|at| raw.get(at..)).and_then(|t| <[u8; 8]>::try_from(t).ok());
    let word = tail.map_or(0, u64::from_le_bytes);
    // Fibonacci hashing: the multiply spreads every input bit into the top bits.
    (word.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - VERIFIED_SLOTS.trailing_zeros())) as usize
}

/// Whether two byte strings are equal, in time that depends only on their
/// lengths (which are not secret): eight bytes per constant-time step.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (words_a, words_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tails = words_a.remainder().ct_eq(words_b.remainder());
    let word = |w: &[u8]| <[u8; 8]>::try_from(w).map_or(0, u64::from_le_bytes);
    let same = words_a.zip(words_b).fold(tails, |same, (x, y)| same & word(x).ct_eq(&word(y)));
    bool::from(same)
}

/// Splits and bounds-checks the fields; checks nothing cryptographic.
fn parse(raw: Rc<str>) -> Result<Claims, Rejection> {
    if raw.len() > MAX_COOKIE_LEN {
        return Err(Rejection::Malformed);
    }
    let mut ranges: [Range<usize>; 9] = Default::default();
    let mut start = 0;
    let mut fields = raw.split('|');
    for slot in ranges.iter_mut() {
        let field = fields.next().ok_or(Rejection::Malformed)?;
        *slot = start..start + field.len();
        start += field.len() + 1;
    }
    if fields.next().is_some() {
        return Err(Rejection::Malformed);
    }
    let [version, sid, host, instance, iat, exp, kid, flags, tag] = ranges;
    let text = |r: &Range<usize>| raw.get(r.clone()).unwrap_or("");
    let valid = text(&version) == "1"
        && is_sid(text(&sid))
        && is_host(text(&host))
        && is_instance(text(&instance))
        && is_key_id(text(&kid))
        && text(&tag).len() == TAG_B64_LEN;
    if !valid {
        return Err(Rejection::Malformed);
    }
    let iat = parse_number(text(&iat))?;
    let exp = parse_number(text(&exp))?;
    let flags = u8::try_from(parse_number(text(&flags))?).map_err(|_| Rejection::Malformed)?;
    Ok(Claims { raw, sid, host, instance, iat, exp, kid, flags })
}

fn parse_number(text: &str) -> Result<u64, Rejection> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::Malformed);
    }
    text.parse().map_err(|_| Rejection::Malformed)
}

fn is_base64url(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A session id as this filter makes them.
pub fn is_sid(text: &str) -> bool {
    text.len() == SID_LEN && is_base64url(text)
}

/// "ip:port" exactly as Envoy prints an upstream address.
pub fn is_host(text: &str) -> bool {
    text.len() <= MAX_HOST_LEN && text.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0)
}

/// An app instance id as carried in the cookie and the store (may be empty).
pub fn is_instance(text: &str) -> bool {
    text.len() <= MAX_INSTANCE_LEN
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

pub fn is_key_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_KEY_ID_LEN
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A new session id from 16 random bytes.
pub fn new_sid(random: &[u8; 16]) -> String {
    URL_SAFE_NO_PAD.encode(random)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    const NOW: u64 = 1_800_000_000;

    fn ring(ids: &[&str]) -> KeyRing {
        KeyRing::new(ids.iter().map(|id| (id.to_string(), Secret(format!("{id}-secret-0123456789abcdef0123456789").into_bytes()))).collect())
    }

    fn claims() -> NewClaims<'static> {
        NewClaims {
            sid: "AAAAAAAAAAAAAAAAAAAAAA",
            host: "10.0.0.7:8080",
            instance: "demo-7f9c",
            iat: NOW - 10,
            exp: NOW + 3600,
            flags: 0,
        }
    }

    fn cookie(keys: &KeyRing, c: &NewClaims<'_>) -> String {
        encode(c, keys).unwrap()
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let keys = ring(&["k1"]);
        let value = cookie(&keys, &claims());
        assert!(value.starts_with("1|AAAAAAAAAAAAAAAAAAAAAA|10.0.0.7:8080|demo-7f9c|"));
        let c = decode(value, &keys, NOW).unwrap();
        assert_eq!(
            (c.sid(), c.host(), c.instance(), c.iat, c.exp, c.kid(), c.flags),
            ("AAAAAAAAAAAAAAAAAAAAAA", "10.0.0.7:8080", "demo-7f9c", NOW - 10, NOW + 3600, "k1", 0)
        );
        assert_eq!(c.owner(), "10.0.0.7:8080#demo-7f9c");
    }

    #[test]
    fn ipv6_hosts_empty_instances_and_flags_round_trip() {
        let keys = ring(&["k1"]);
        let c = NewClaims { host: "[fd00::7]:8080", instance: "", flags: FLAG_MOVING, ..claims() };
        let decoded = decode(cookie(&keys, &c), &keys, NOW).unwrap();
        assert_eq!((decoded.host(), decoded.instance()), ("[fd00::7]:8080", ""));
        assert!(decoded.is_moving());
    }

    #[test]
    fn rotation_old_key_verifies_removed_key_does_not() {
        let old = ring(&["k1"]);
        let value = cookie(&old, &claims());
        assert!(decode(value.clone(), &ring(&["k2", "k1"]), NOW).is_ok());
        assert_eq!(decode(value, &ring(&["k2"]), NOW), Err(Rejection::UnknownKey));
    }

    #[test]
    fn same_id_other_secret_is_a_bad_signature() {
        let value = cookie(&ring(&["k1"]), &claims());
        let other = KeyRing::new(vec![("k1".into(), Secret(b"another-secret-0123456789abcdef0123456789".to_vec()))]);
        assert_eq!(decode(value, &other, NOW), Err(Rejection::BadSignature));
    }

    #[test]
    fn expiry_edges() {
        let keys = ring(&["k1"]);
        let value = cookie(&keys, &claims());
        assert!(decode(value.clone(), &keys, NOW + 3599).is_ok());
        assert_eq!(decode(value.clone(), &keys, NOW + 3600), Err(Rejection::Expired));
        assert_eq!(decode(value, &keys, u64::MAX), Err(Rejection::Expired));
    }

    #[test]
    fn issued_in_the_future_beyond_skew_is_malformed() {
        let keys = ring(&["k1"]);
        let c = NewClaims { iat: NOW + 301, exp: NOW + 4000, ..claims() };
        assert_eq!(decode(cookie(&keys, &c), &keys, NOW), Err(Rejection::Malformed));
        let c = NewClaims { iat: NOW + 300, exp: NOW + 4000, ..claims() };
        assert!(decode(cookie(&keys, &c), &keys, NOW).is_ok());
    }

    #[test]
    fn tampering_with_any_field_breaks_the_signature() {
        let keys = ring(&["k1"]);
        let value = cookie(&keys, &claims());
        for (from, to) in [("10.0.0.7", "10.0.0.8"), ("demo-7f9c", "demo-7f9d"), ("|0|", "|1|"), ("AAAAAAAAAAAAAAAAAAAAAA", "BAAAAAAAAAAAAAAAAAAAAA")] {
            let forged = value.replacen(from, to, 1);
            assert_ne!(forged, value);
            assert_eq!(decode(forged, &keys, NOW), Err(Rejection::BadSignature), "{from} -> {to}");
        }
        let exp = (NOW + 3600).to_string();
        let forged = value.replacen(&exp, &(NOW + 99_999).to_string(), 1);
        assert_eq!(decode(forged, &keys, NOW), Err(Rejection::BadSignature));
    }

    #[test]
    fn malformed_values_are_refused() {
        let keys = ring(&["k1"]);
        let value = cookie(&keys, &claims());
        let cases = [
            String::new(),
            "garbage".into(),
            value[..value.len() - 1].to_string(),
            value[..value.len() / 2].to_string(),
            format!("2{}", &value[1..]),
            format!("{value}|"),
            format!("{value}A"),
            "x".repeat(MAX_COOKIE_LEN + 1),
            value.replacen("10.0.0.7:8080", "10.0.0.7", 1),
            value.replacen("10.0.0.7:8080", "example.com:80", 1),
            value.replacen("demo-7f9c", "demo 7f9c", 1),
            value.replacen("|k1|", "|k1 |", 1),
            value.replacen("|0|", "|256|", 1),
            value.replacen("|0|", "|-1|", 1),
            "1|||||||||".into(),
        ];
        for case in cases {
            assert_eq!(decode(case.clone(), &keys, NOW), Err(Rejection::Malformed), "{case}");
        }
    }

    #[test]
    fn encode_refuses_fields_it_could_not_decode() {
        let keys = ring(&["k1"]);
        assert!(encode(&NewClaims { host: "not-an-address", ..claims() }, &keys).is_none());
        assert!(encode(&NewClaims { instance: "a|b", ..claims() }, &keys).is_none());
        assert!(encode(&NewClaims { sid: "short", ..claims() }, &keys).is_none());
    }

    #[test]
    fn verified_cookies_answer_like_decode_and_still_expire() {
        let keys = ring(&["k1"]);
        let cache = VerifiedCookies::default();
        let value = cookie(&keys, &claims());
        for _ in 0..2 {
            assert_eq!(cache.decode(&value, &keys, NOW), decode(value.clone(), &keys, NOW));
        }
        assert_eq!(cache.decode(&value, &keys, NOW + 3600), Err(Rejection::Expired));
        let forged = value.replacen("10.0.0.7", "10.0.0.8", 1);
        assert_eq!(cache.decode(&forged, &keys, NOW), Err(Rejection::BadSignature));
        assert_eq!(cache.decode("garbage", &keys, NOW), Err(Rejection::Malformed));
    }

    #[test]
    fn verified_cookies_stay_bounded() {
        let keys = ring(&["k1"]);
        let cache = VerifiedCookies::default();
        for i in 0..VERIFIED_SLOTS + 10 {
            let sid = format!("{i:0>22}");
            let value = cookie(&keys, &NewClaims { sid: &sid, ..claims() });
            assert!(cache.decode(&value, &keys, NOW).is_ok());
            assert!(cache.decode(&value, &keys, NOW).is_ok(), "a hit right after the miss");
        }
        assert_eq!(cache.slots.borrow().len(), VERIFIED_SLOTS);
    }

    #[test]
    fn same_bytes_compares_every_word_and_the_tail() {
        let a = b"0123456789abcdefXYZ";
        assert!(same_bytes(a, a));
        for at in 0..a.len() {
            let mut b = *a;
            b[at] ^= 1;
            assert!(!same_bytes(a, &b), "a change at byte {at} went unseen");
        }
        assert!(!same_bytes(a, &a[..18]));
        assert!(same_bytes(b"", b""));
    }

    #[test]
    fn cookies_spread_over_the_cache_slots() {
        let keys = ring(&["k1"]);
        let mut used = std::collections::HashSet::new();
        for i in 0..512 {
            let sid = format!("{i:0>22}");
            let slot = slot_of(cookie(&keys, &NewClaims { sid: &sid, ..claims() }).as_bytes());
            assert!(slot < VERIFIED_SLOTS);
            used.insert(slot);
        }
        // 512 uniform draws from 4096 slots leave about 482 distinct.
        assert!(used.len() > 440, "only {} distinct slots", used.len());
        assert_eq!(slot_of(b"short"), slot_of(b""));
    }

    #[test]
    fn new_sids_are_22_base64url_chars() {
        let sid = new_sid(&[0xff; 16]);
        assert!(is_sid(&sid), "{sid}");
    }
}

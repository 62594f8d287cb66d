//! The routing cookie: version 3 (sealed, the default) or version 2 (signed).
//!
//! ```text
//! 3|<kid>|<sealed>
//! 2|<sid>|<cluster>|<upstream>|<instance>|<since>|<iat>|<exp>|<kid>|<flags>|<tag>
//! ```
//! Both carry the same claims. `cluster` is a short digest of the Envoy cluster
//! the session is pinned in ([`cluster_tag`]): a cookie presented on a route to
//! another cluster never steers, fails over or marks anything there. `since` is
//! when the session started, so no refresh extends it past its absolute
//! lifetime; `iat` and `exp` bound this cookie value.
//!
//! Version 3 shows a client nothing but its version and key id. `sealed` is
//! base64url (no padding) of nonce ‖ ciphertext ‖ tag: ChaCha20-Poly1305 under
//! key `kid`, over the claims as text
//! (`sid|cluster|upstream|instance|iat|age|ttl|flags`, where `age` is
//! `iat - since` and `ttl` is `exp - iat`: short numbers keep the cookie
//! short) padded with `|` to a multiple of [`PAD`] bytes (so the length says
//! little), with `3|<kid>|` as associated data. The nonce is new for each
//! cookie ([`KeyRing::seal`]).
//!
//! Version 2 is plain text: `tag` is base64url of HMAC-SHA256 over every byte
//! before it, keyed by key `kid`. It shows the pinned address, like Envoy's
//! own stateful-session cookie. Every character used in either version is
//! legal in a cookie value without quoting.
//!
//! Parsing is strict: exact field count, length limits on every field, and the
//! tag is checked before the expiry so a forged cookie is never reported as
//! merely expired.

mod verifier;

use std::fmt::Write;
use std::ops::Range;
use std::rc::Rc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::ids::{is_base64url, is_instance, is_sid, is_upstream, Owner};
use crate::keys::{KeyRing, NONCE_LEN, SEAL_TAG_LEN, TAG_LEN};

pub use verifier::VerifiedCookies;

/// Longest cookie value accepted.
pub const MAX_COOKIE_LEN: usize = 512;
const TAG_B64_LEN: usize = 43;
/// Length of a cluster tag: 6 bytes of SHA-256 in base64url.
pub const CLUSTER_TAG_LEN: usize = 8;
const MAX_KEY_ID_LEN: usize = 32;
/// How far in the future an issue time may be (clock skew between replicas).
const MAX_CLOCK_SKEW_SECS: u64 = 300;
const SIGNED: &str = "2";
const SEALED: &str = "3";
/// Sealed claims are padded to a multiple of this many bytes.
pub const PAD: usize = 16;
/// Longest sealed part that fits in a cookie, decoded.
const MAX_SEALED_LEN: usize = MAX_COOKIE_LEN / 4 * 3;

/// Flag: the pinned host is known gone (or its connection was lost); the next
/// request must fail over. Carried by the cookie so that any proxy replica, not
/// only the one that saw the failure, sends the replayed request down the
/// failover path.
pub const FLAG_MOVING: u8 = 1;
/// The cookie of a session that has not come back yet: its store entry
/// lives only `store.new_session_ttl` until it does.
pub const FLAG_NEW: u8 = 2;

/// Which cookie version the filter issues (`cookie.format`). Both versions
/// are accepted under a known key; one in the other format is re-issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Version 3: encrypted and authenticated.
    #[default]
    Sealed,
    /// Version 2: signed plain text.
    Signed,
}

/// Why a cookie was refused. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    UnknownKey,
    BadSignature,
    Expired,
    /// Several valid cookies for different sessions: none is trusted.
    Ambiguous,
}

/// A cluster tag: the first 6 bytes of SHA-256 of the cluster name, base64url.
/// Empty when the proxy does not tell the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClusterTag([u8; CLUSTER_TAG_LEN], bool);

impl ClusterTag {
    pub fn as_str(&self) -> &str {
        if self.1 {
            std::str::from_utf8(&self.0).unwrap_or("")
        } else {
            ""
        }
    }
}

/// The tag of an Envoy cluster name.
pub fn cluster_tag(cluster: &str) -> ClusterTag {
    if cluster.is_empty() {
        return ClusterTag::default();
    }
    let digest = Sha256::digest(cluster.as_bytes());
    let mut text = [0u8; CLUSTER_TAG_LEN];
    match URL_SAFE_NO_PAD.encode_slice(digest.get(..6).unwrap_or_default(), &mut text) {
        Ok(CLUSTER_TAG_LEN) => ClusterTag(text, true),
        _ => ClusterTag::default(),
    }
}

/// A verified cookie. Keeps the cookie text (for a sealed cookie, followed by
/// its opened claims) and the ranges of its fields, so decoding allocates once
/// and a copy (say, from the cache) allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    raw: Rc<str>,
    value_len: usize,
    format: Format,
    sid: Range<usize>,
    cluster: Range<usize>,
    upstream: Range<usize>,
    instance: Range<usize>,
    kid: Range<usize>,
    pub since: u64,
    pub iat: u64,
    pub exp: u64,
    pub flags: u8,
}

impl Claims {
    fn field(&self, range: &Range<usize>) -> &str {
        self.raw.get(range.clone()).unwrap_or("")
    }
    pub fn sid(&self) -> &str {
        self.field(&self.sid)
    }
    /// The tag of the cluster the session is pinned in.
    pub fn cluster(&self) -> &str {
        self.field(&self.cluster)
    }
    /// The pinned upstream, "ip:port".
    pub fn upstream(&self) -> &str {
        self.field(&self.upstream)
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
    pub fn is_new(&self) -> bool {
        self.flags & FLAG_NEW != 0
    }
    pub fn owner(&self) -> Owner<'_> {
        Owner { upstream: self.upstream(), instance: self.instance() }
    }
    /// The exact cookie value, as verified.
    pub fn value(&self) -> &str {
        self.raw.get(..self.value_len).unwrap_or("")
    }
    pub fn format(&self) -> Format {
        self.format
    }
}

/// What a new cookie says.
#[derive(Debug, Clone, Copy)]
pub struct NewClaims<'a> {
    pub sid: &'a str,
    pub cluster: &'a str,
    pub upstream: &'a str,
    pub instance: &'a str,
    pub since: u64,
    pub iat: u64,
    pub exp: u64,
    pub flags: u8,
}

/// A new cookie value in `format`, under the ring's first key; `fresh` is
/// random bytes drawn for this cookie (sealing derives its nonce from them).
/// `None` when a field is out of bounds (the caller then sets no cookie
/// rather than a broken one).
pub fn issue(claims: &NewClaims<'_>, keys: &KeyRing, format: Format, fresh: &[u8]) -> Option<String> {
    match format {
        Format::Sealed => seal(claims, keys, fresh),
        Format::Signed => encode(claims, keys),
    }
}

/// Signs a version 2 cookie value with the ring's signing key.
pub fn encode(claims: &NewClaims<'_>, keys: &KeyRing) -> Option<String> {
    let kid = keys.signing_id()?;
    let mut value = String::with_capacity(200);
    value.push_str(SIGNED);
    value.push('|');
    push_pin(claims, &mut value)?;
    write!(value, "|{}|{}|{}|{kid}|{}|", claims.since, claims.iat, claims.exp, claims.flags).ok()?;
    let tag = keys.sign(value.as_bytes())?;
    URL_SAFE_NO_PAD.encode_string(tag, &mut value);
    Some(value)
}

/// Seals a version 3 cookie value with the ring's signing key.
pub fn seal(claims: &NewClaims<'_>, keys: &KeyRing, fresh: &[u8]) -> Option<String> {
    let kid = keys.signing_id()?;
    let mut text = String::with_capacity(MAX_SEALED_LEN);
    push_pin(claims, &mut text)?;
    let (age, ttl) = (claims.iat - claims.since, claims.exp.checked_sub(claims.iat)?);
    write!(text, "|{}|{age}|{ttl}|{}", claims.iat, claims.flags).ok()?;
    let padded = text.len().div_ceil(PAD) * PAD;
    let sealed_len = NONCE_LEN + padded + SEAL_TAG_LEN;
    let mut sealed = [b'|'; MAX_SEALED_LEN];
    let (nonce_at, rest) = sealed.get_mut(..sealed_len)?.split_at_mut(NONCE_LEN);
    let (body, tag_at) = rest.split_at_mut(padded);
    body.get_mut(..text.len())?.copy_from_slice(text.as_bytes());
    let mut value = String::with_capacity(3 + kid.len() + sealed_len.div_ceil(3) * 4);
    write!(value, "{SEALED}|{kid}|").ok()?;
    let (nonce, tag) = keys.seal(value.as_bytes(), fresh, body)?;
    nonce_at.copy_from_slice(&nonce);
    tag_at.copy_from_slice(&tag);
    URL_SAFE_NO_PAD.encode_string(sealed.get(..sealed_len)?, &mut value);
    (value.len() <= MAX_COOKIE_LEN).then_some(value)
}

/// Writes `sid|cluster|upstream|instance`, or `None` when a field is one that
/// decoding would refuse (or the session starts after this value's issue).
fn push_pin(claims: &NewClaims<'_>, out: &mut String) -> Option<()> {
    let valid = is_sid(claims.sid)
        && is_cluster(claims.cluster)
        && is_upstream(claims.upstream)
        && is_instance(claims.instance)
        && claims.since <= claims.iat;
    if !valid {
        return None;
    }
    let (sid, cluster, upstream, instance) = (claims.sid, claims.cluster, claims.upstream, claims.instance);
    write!(out, "{sid}|{cluster}|{upstream}|{instance}").ok()
}

/// Verifies a cookie value of either version at time `now` (unix seconds).
pub fn decode(raw: impl AsRef<str>, keys: &KeyRing, now: u64) -> Result<Claims, Rejection> {
    let raw = raw.as_ref();
    if raw.len() > MAX_COOKIE_LEN {
        return Err(Rejection::Malformed);
    }
    let claims = match raw.split_once('|') {
        Some((SEALED, rest)) => open(raw, rest, keys)?,
        _ => verify(raw, keys)?,
    };
    check_times(&claims, now)?;
    Ok(claims)
}

/// Checks a version 2 cookie's signature.
fn verify(raw: &str, keys: &KeyRing) -> Result<Claims, Rejection> {
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
    Ok(claims)
}

/// Opens a version 3 cookie (`rest` is what follows `3|`).
fn open(raw: &str, rest: &str, keys: &KeyRing) -> Result<Claims, Rejection> {
    let (kid, sealed_b64) = rest.split_once('|').ok_or(Rejection::Malformed)?;
    if !is_key_id(kid) {
        return Err(Rejection::Malformed);
    }
    let mut sealed = [0u8; MAX_SEALED_LEN];
    let len = URL_SAFE_NO_PAD.decode_slice(sealed_b64, &mut sealed).map_err(|_| Rejection::Malformed)?;
    let body_len = len.checked_sub(NONCE_LEN + SEAL_TAG_LEN).filter(|&n| n > 0 && n % PAD == 0).ok_or(Rejection::Malformed)?;
    if !keys.knows(kid) {
        return Err(Rejection::UnknownKey);
    }
    let (nonce, rest) = sealed.split_first_chunk_mut::<NONCE_LEN>().ok_or(Rejection::Malformed)?;
    let (body, rest) = rest.split_at_mut_checked(body_len).ok_or(Rejection::Malformed)?;
    let tag = rest.first_chunk::<SEAL_TAG_LEN>().ok_or(Rejection::Malformed)?;
    let header = raw.len() - sealed_b64.len();
    let aad = raw.get(..header).ok_or(Rejection::Malformed)?;
    if !keys.open(kid, aad.as_bytes(), nonce, body, tag) {
        return Err(Rejection::BadSignature);
    }
    let text = std::str::from_utf8(body).map_err(|_| Rejection::Malformed)?.trim_end_matches('|');
    // One allocation holds the cookie value and, after it, the claims.
    let mut joined = String::with_capacity(raw.len() + text.len());
    joined.push_str(raw);
    joined.push_str(text);
    let [sid, cluster, upstream, instance, iat, age, ttl, flags] = split(&joined, raw.len())?;
    let number = |r: Range<usize>| parse_number(joined.get(r).unwrap_or(""));
    let (iat, age, ttl) = (number(iat)?, number(age)?, number(ttl)?);
    let times = [iat.checked_sub(age), Some(iat), iat.checked_add(ttl)].map(|t| t.ok_or(Rejection::Malformed));
    let kid = SEALED.len() + 1..SEALED.len() + 1 + kid.len();
    claims_at(joined.into(), raw.len(), Format::Sealed, [sid, cluster, upstream, instance, kid, flags], times)
}
/// Whether signed claims hold at `now`: not expired, not issued further in the
/// future than clock skew allows, times in order. The cache of verified
/// cookies asks again on every hit: the clock may have moved either way.
fn check_times(claims: &Claims, now: u64) -> Result<(), Rejection> {
    if now >= claims.exp {
        return Err(Rejection::Expired);
    }
    if claims.iat > now.saturating_add(MAX_CLOCK_SKEW_SECS) || claims.iat >= claims.exp || claims.since > claims.iat {
        return Err(Rejection::Malformed);
    }
    Ok(())
}

/// Splits and bounds-checks a version 2 cookie's fields; checks nothing
/// cryptographic.
fn parse(raw: Rc<str>) -> Result<Claims, Rejection> {
    let [version, sid, cluster, upstream, instance, since, iat, exp, kid, flags, tag] = split(&raw, 0)?;
    let text = |r: &Range<usize>| raw.get(r.clone()).unwrap_or("");
    if text(&version) != SIGNED || text(&tag).len() != TAG_B64_LEN {
        return Err(Rejection::Malformed);
    }
    let value_len = raw.len();
    let times = [since, iat, exp].map(|r| parse_number(raw.get(r).unwrap_or("")));
    claims_at(raw, value_len, Format::Signed, [sid, cluster, upstream, instance, kid, flags], times)
}

/// The ranges of exactly `N` `|`-separated fields of `text` from `start`.
fn split<const N: usize>(text: &str, start: usize) -> Result<[Range<usize>; N], Rejection> {
    let mut ranges: [Range<usize>; N] = std::array::from_fn(|_| 0..0);
    let mut at = start;
    let mut fields = text.get(start..).ok_or(Rejection::Malformed)?.split('|');
    for slot in ranges.iter_mut() {
        let field = fields.next().ok_or(Rejection::Malformed)?;
        *slot = at..at + field.len();
        at += field.len() + 1;
    }
    if fields.next().is_some() {
        return Err(Rejection::Malformed);
    }
    Ok(ranges)
}

/// The claims at `ranges` (sid, cluster, upstream, instance, kid, flags) of
/// `raw` with `times` (since, iat, exp), if every field is well-formed.
fn claims_at(raw: Rc<str>, value_len: usize, format: Format, ranges: [Range<usize>; 6], times: [Result<u64, Rejection>; 3]) -> Result<Claims, Rejection> {
    let [sid, cluster, upstream, instance, kid, flags] = ranges;
    let text = |r: &Range<usize>| raw.get(r.clone()).unwrap_or("");
    let valid = is_sid(text(&sid))
        && is_cluster(text(&cluster))
        && is_upstream(text(&upstream))
        && is_instance(text(&instance))
        && is_key_id(text(&kid));
    if !valid {
        return Err(Rejection::Malformed);
    }
    let [since, iat, exp] = times;
    let (since, iat, exp) = (since?, iat?, exp?);
    let flags = u8::try_from(parse_number(text(&flags))?).map_err(|_| Rejection::Malformed)?;
    Ok(Claims { raw, value_len, format, sid, cluster, upstream, instance, kid, since, iat, exp, flags })
}

fn parse_number(text: &str) -> Result<u64, Rejection> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::Malformed);
    }
    text.parse().map_err(|_| Rejection::Malformed)
}

fn is_cluster(text: &str) -> bool {
    text.is_empty() || (text.len() == CLUSTER_TAG_LEN && is_base64url(text))
}

pub fn is_key_id(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_KEY_ID_LEN && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Cookie-octets (RFC 6265): what a cookie value may hold unquoted.
pub fn is_cookie_octets(value: &[u8]) -> bool {
    value.iter().all(|&b| matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::MAX_INSTANCE_LEN;
    use crate::keys::Secret;

    pub(super) const NOW: u64 = 1_800_000_000;

    pub(super) fn ring(ids: &[&str]) -> KeyRing {
        KeyRing::new(ids.iter().map(|id| (id.to_string(), Secret(format!("{id}-secret-0123456789abcdef0123456789").into_bytes()))).collect())
    }

    pub(super) fn claims() -> NewClaims<'static> {
        NewClaims {
            sid: "AAAAAAAAAAAAAAAAAAAAAA",
            cluster: "Y2x1c3Rl",
            upstream: "10.0.0.7:8080",
            instance: "demo-7f9c",
            since: NOW - 100,
            iat: NOW - 10,
            exp: NOW + 3600,
            flags: 0,
        }
    }

    pub(super) fn cookie(keys: &KeyRing, c: &NewClaims<'_>) -> String {
        encode(c, keys).unwrap()
    }

    pub(super) fn sealed(keys: &KeyRing, c: &NewClaims<'_>) -> String {
        seal(c, keys, &[7; 16]).unwrap()
    }

    /// The bytes of a sealed cookie's opaque part.
    fn opaque(value: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(value.rsplit('|').next().unwrap()).unwrap()
    }

    fn with_opaque(value: &str, bytes: &[u8]) -> String {
        let header = &value[..value.rfind('|').unwrap() + 1];
        format!("{header}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    #[test]
    fn sealed_round_trip_keeps_every_field_and_shows_only_version_and_key() {
        let keys = ring(&["k1"]);
        let value = sealed(&keys, &claims());
        assert!(value.starts_with("3|k1|") && is_cookie_octets(value.as_bytes()), "{value}");
        let shown = String::from_utf8_lossy(&opaque(&value)).into_owned() + &value;
        for secret in ["AAAAAAAAAAAAAAAAAAAAAA", "Y2x1c3Rl", "10.0.0.7", "8080", "demo-7f9c", &(NOW - 10).to_string()] {
            assert!(!shown.contains(secret), "{secret} shows in {value}");
        }
        let c = decode(value.as_str(), &keys, NOW).unwrap();
        assert_eq!(
            (c.sid(), c.cluster(), c.upstream(), c.instance(), c.since, c.iat, c.exp, c.kid(), c.flags, c.format()),
            ("AAAAAAAAAAAAAAAAAAAAAA", "Y2x1c3Rl", "10.0.0.7:8080", "demo-7f9c", NOW - 100, NOW - 10, NOW + 3600, "k1", 0, Format::Sealed)
        );
        assert_eq!(c.value(), value);
        assert_eq!(decode(cookie(&keys, &claims()), &keys, NOW).unwrap().format(), Format::Signed);
        assert_ne!(seal(&claims(), &keys, &[8; 16]).unwrap(), value, "another nonce");
    }

    #[test]
    fn sealed_lengths_come_in_steps_and_the_longest_claims_fit() {
        let keys = ring(&["k1"]);
        let short = sealed(&keys, &NewClaims { upstream: "10.0.0.7:80", ..claims() });
        let long = sealed(&keys, &NewClaims { upstream: "10.0.0.77:8080", ..claims() });
        assert_eq!(short.len(), long.len());
        let (upstream, instance) = ("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535", "i".repeat(MAX_INSTANCE_LEN));
        let kid = "k".repeat(MAX_KEY_ID_LEN);
        let keys = ring(&[&kid]);
        let c = NewClaims { upstream, instance: &instance, since: u64::MAX - 2, iat: u64::MAX - 1, exp: u64::MAX, flags: 255, ..claims() };
        let value = sealed(&keys, &c);
        assert!(value.len() <= MAX_COOKIE_LEN, "{}", value.len());
        assert_eq!(decode(value, &keys, u64::MAX - 1).map(|c| c.upstream().len()), Ok(upstream.len()));
    }

    #[test]
    fn sealed_rotation_old_key_opens_removed_key_does_not() {
        let value = sealed(&ring(&["k1"]), &claims());
        assert!(decode(value.as_str(), &ring(&["k2", "k1"]), NOW).is_ok());
        assert_eq!(decode(value.as_str(), &ring(&["k2"]), NOW), Err(Rejection::UnknownKey));
        let other = KeyRing::new(vec![("k1".into(), Secret(b"another-secret-0123456789abcdef0123456789".to_vec()))]);
        assert_eq!(decode(value.as_str(), &other, NOW), Err(Rejection::BadSignature));
        let swapped = value.replacen("3|k1|", "3|k2|", 1);
        assert_eq!(decode(swapped, &ring(&["k2", "k1"]), NOW), Err(Rejection::BadSignature), "the key id is authenticated");
    }

    #[test]
    fn sealed_cookies_expire_after_they_open() {
        let keys = ring(&["k1"]);
        let value = sealed(&keys, &claims());
        assert_eq!(decode(value.as_str(), &keys, NOW + 3600), Err(Rejection::Expired));
        let ahead = sealed(&keys, &NewClaims { iat: NOW + 301, exp: NOW + 4000, ..claims() });
        assert_eq!(decode(ahead, &keys, NOW), Err(Rejection::Malformed));
    }

    #[test]
    fn any_change_to_a_sealed_cookie_is_refused_and_never_expired() {
        let keys = ring(&["k1"]);
        let value = sealed(&keys, &claims());
        let bytes = opaque(&value);
        let mut cases = Vec::new();
        for at in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[at] ^= 0x20;
            cases.push((with_opaque(&value, &changed), Rejection::BadSignature));
        }
        for cut in [1, PAD + 1, bytes.len() - NONCE_LEN] {
            cases.push((with_opaque(&value, &bytes[..bytes.len() - cut]), Rejection::Malformed));
        }
        // A whole tag (or block) cut off leaves the shape of a shorter cookie.
        cases.push((with_opaque(&value, &bytes[..bytes.len() - SEAL_TAG_LEN]), Rejection::BadSignature));
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; PAD]);
        cases.push((with_opaque(&value, &longer), Rejection::BadSignature));
        // The nonce of one cookie with the rest of another: nonce reuse gains nothing.
        let other = opaque(&sealed(&keys, &NewClaims { upstream: "10.0.0.8:8080", ..claims() }));
        let mut spliced = bytes[..NONCE_LEN].to_vec();
        spliced.extend_from_slice(&other[NONCE_LEN..]);
        cases.push((with_opaque(&value, &spliced), Rejection::BadSignature));
        for text in [
            format!("{value}A"),
            format!("{value}|"),
            value[..value.len() - 1].to_string(),
            value.replacen("3|k1|", "3|k1 |", 1),
            value.replacen("3|k1|", "3||", 1),
            "3|k1|".into(),
            "3|".into(),
            "3".into(),
            format!("3|k1|{}", "A".repeat(MAX_COOKIE_LEN)),
        ] {
            cases.push((text, Rejection::Malformed));
        }
        cases.push((value.replacen("3|k1|", "3|k9|", 1), Rejection::UnknownKey));
        for (case, expected) in cases {
            assert_eq!(decode(case.as_str(), &keys, NOW), Err(expected), "{case}");
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let keys = ring(&["k1"]);
        let value = cookie(&keys, &claims());
        assert!(value.starts_with("2|AAAAAAAAAAAAAAAAAAAAAA|Y2x1c3Rl|10.0.0.7:8080|demo-7f9c|"), "{value}");
        assert!(is_cookie_octets(value.as_bytes()));
        let c = decode(value.as_str(), &keys, NOW).unwrap();
        assert_eq!(
            (c.sid(), c.cluster(), c.upstream(), c.instance(), c.since, c.iat, c.exp, c.kid(), c.flags),
            ("AAAAAAAAAAAAAAAAAAAAAA", "Y2x1c3Rl", "10.0.0.7:8080", "demo-7f9c", NOW - 100, NOW - 10, NOW + 3600, "k1", 0)
        );
        assert_eq!(c.owner().to_string(), "10.0.0.7:8080#demo-7f9c");
        assert_eq!(c.value(), value);
    }

    #[test]
    fn cluster_tags_are_short_stable_digests() {
        let tag = cluster_tag("outbound|8080||app.demo.svc.cluster.local");
        assert_eq!(tag.as_str().len(), CLUSTER_TAG_LEN);
        assert!(is_base64url(tag.as_str()));
        assert_eq!(tag, cluster_tag("outbound|8080||app.demo.svc.cluster.local"));
        assert_ne!(tag, cluster_tag("app"));
        assert_eq!(cluster_tag("").as_str(), "");
    }

    #[test]
    fn ipv6_upstreams_empty_instances_empty_clusters_and_flags_round_trip() {
        let keys = ring(&["k1"]);
        let c = NewClaims { upstream: "[fd00::7]:8080", instance: "", cluster: "", flags: FLAG_MOVING, ..claims() };
        let decoded = decode(cookie(&keys, &c), &keys, NOW).unwrap();
        assert_eq!((decoded.upstream(), decoded.instance(), decoded.cluster()), ("[fd00::7]:8080", "", ""));
        assert!(decoded.is_moving());
    }

    #[test]
    fn rotation_old_key_verifies_removed_key_does_not() {
        let old = ring(&["k1"]);
        let value = cookie(&old, &claims());
        assert!(decode(value.as_str(), &ring(&["k2", "k1"]), NOW).is_ok());
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
        assert!(decode(value.as_str(), &keys, NOW + 3599).is_ok());
        assert_eq!(decode(value.as_str(), &keys, NOW + 3600), Err(Rejection::Expired));
        assert_eq!(decode(value, &keys, u64::MAX), Err(Rejection::Expired));
    }

    #[test]
    fn issued_in_the_future_beyond_skew_or_before_the_session_is_malformed() {
        let keys = ring(&["k1"]);
        let c = NewClaims { iat: NOW + 301, exp: NOW + 4000, ..claims() };
        assert_eq!(decode(cookie(&keys, &c), &keys, NOW), Err(Rejection::Malformed));
        let c = NewClaims { iat: NOW + 300, exp: NOW + 4000, ..claims() };
        assert!(decode(cookie(&keys, &c), &keys, NOW).is_ok());
        assert!(encode(&NewClaims { since: NOW, iat: NOW - 1, ..claims() }, &keys).is_none());
    }

    #[test]
    fn tampering_with_any_field_breaks_the_signature() {
        let keys = ring(&["k1"]);
        let value = cookie(&keys, &claims());
        let swaps = [
            ("10.0.0.7", "10.0.0.8"),
            ("demo-7f9c", "demo-7f9d"),
            ("|0|", "|1|"),
            ("AAAAAAAAAAAAAAAAAAAAAA", "BAAAAAAAAAAAAAAAAAAAAA"),
            ("Y2x1c3Rl", "Y2x1c3Rm"),
        ];
        for (from, to) in swaps {
            let forged = value.replacen(from, to, 1);
            assert_ne!(forged, value);
            assert_eq!(decode(forged, &keys, NOW), Err(Rejection::BadSignature), "{from} -> {to}");
        }
        for number in [NOW - 100, NOW + 3600] {
            let forged = value.replacen(&number.to_string(), &(number + 1).to_string(), 1);
            assert_eq!(decode(forged, &keys, NOW), Err(Rejection::BadSignature), "{number}");
        }
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
            format!("1{}", &value[1..]),
            format!("{value}|"),
            format!("{value}A"),
            "x".repeat(MAX_COOKIE_LEN + 1),
            value.replacen("10.0.0.7:8080", "10.0.0.7", 1),
            value.replacen("10.0.0.7:8080", "example.com:80", 1),
            value.replacen("demo-7f9c", "demo 7f9c", 1),
            value.replacen("Y2x1c3Rl", "Y2x1c3R", 1),
            value.replacen("|k1|", "|k1 |", 1),
            value.replacen("|0|", "|256|", 1),
            value.replacen("|0|", "|-1|", 1),
            "2||||||||||".into(),
        ];
        for case in cases {
            assert_eq!(decode(case.clone(), &keys, NOW), Err(Rejection::Malformed), "{case}");
        }
    }

    #[test]
    fn encode_refuses_fields_it_could_not_decode() {
        let keys = ring(&["k1"]);
        assert!(encode(&NewClaims { upstream: "not-an-address", ..claims() }, &keys).is_none());
        assert!(encode(&NewClaims { instance: "a|b", ..claims() }, &keys).is_none());
        assert!(encode(&NewClaims { sid: "short", ..claims() }, &keys).is_none());
        assert!(encode(&NewClaims { cluster: "a|b", ..claims() }, &keys).is_none());
    }
}

//! The routing cookie, version 2.
//!
//! ```text
//! 2|<sid>|<cluster>|<upstream>|<instance>|<since>|<iat>|<exp>|<kid>|<flags>|<tag>
//! ```
//! `tag` is base64url (no padding) of HMAC-SHA256 over every byte before it,
//! keyed by key `kid`. `cluster` is a short digest of the Envoy cluster the
//! session is pinned in ([`cluster_tag`]): a cookie presented on a route to
//! another cluster never steers, fails over or marks anything there. `since` is
//! when the session started, so no refresh extends it past its absolute
//! lifetime; `iat` and `exp` bound this cookie value.
//!
//! The payload is plain text on purpose: the cookie is signed, not encrypted
//! (like Envoy's own stateful-session cookie it shows the pinned address), and
//! plain text needs no decoding on the hot path. Every character used is legal
//! in a cookie value without quoting.
//!
//! Parsing is strict: exact field count, length limits on every field, and the
//! signature is checked before the expiry so a forged cookie is never reported
//! as merely expired.

mod verifier;

use std::ops::Range;
use std::rc::Rc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::ids::{is_base64url, is_instance, is_sid, is_upstream, Owner};
use crate::keys::{KeyRing, TAG_LEN};

pub use verifier::VerifiedCookies;

/// Longest cookie value accepted.
pub const MAX_COOKIE_LEN: usize = 512;
const TAG_B64_LEN: usize = 43;
/// Length of a cluster tag: 6 bytes of SHA-256 in base64url.
pub const CLUSTER_TAG_LEN: usize = 8;
const MAX_KEY_ID_LEN: usize = 32;
/// How far in the future an issue time may be (clock skew between replicas).
const MAX_CLOCK_SKEW_SECS: u64 = 300;
const VERSION: &str = "2";
const FIELDS: usize = 11;

/// Flag: the pinned host is known gone (or its connection was lost); the next
/// request must fail over. Carried by the cookie so that any proxy replica, not
/// only the one that saw the failure, sends the replayed request down the
/// failover path.
pub const FLAG_MOVING: u8 = 1;
/// The cookie of a session that has not come back yet: its store entry
/// lives only `store.new_session_ttl` until it does.
pub const FLAG_NEW: u8 = 2;

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

/// A verified cookie. Keeps the cookie text and the ranges of its fields, so
/// decoding allocates once and a copy (say, from the cache) allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    raw: Rc<str>,
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
        &self.raw
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

/// Signs a cookie value with the ring's signing key. `None` when a field is
/// out of bounds (the caller then sets no cookie rather than a broken one).
pub fn encode(claims: &NewClaims<'_>, keys: &KeyRing) -> Option<String> {
    let kid = keys.signing_id()?;
    let valid = is_sid(claims.sid)
        && is_cluster(claims.cluster)
        && is_upstream(claims.upstream)
        && is_instance(claims.instance)
        && claims.since <= claims.iat;
    if !valid {
        return None;
    }
    let numbers = [claims.since.to_string(), claims.iat.to_string(), claims.exp.to_string()];
    let mut value = String::with_capacity(200);
    value.push_str(VERSION);
    for part in [claims.sid, claims.cluster, claims.upstream, claims.instance] {
        value.push('|');
        value.push_str(part);
    }
    for number in &numbers {
        value.push('|');
        value.push_str(number);
    }
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
    check_times(&claims, now)?;
    Ok(claims)
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

/// Splits and bounds-checks the fields; checks nothing cryptographic.
fn parse(raw: Rc<str>) -> Result<Claims, Rejection> {
    if raw.len() > MAX_COOKIE_LEN {
        return Err(Rejection::Malformed);
    }
    let mut ranges: [Range<usize>; FIELDS] = Default::default();
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
    let [version, sid, cluster, upstream, instance, since, iat, exp, kid, flags, tag] = ranges;
    let text = |r: &Range<usize>| raw.get(r.clone()).unwrap_or("");
    let valid = text(&version) == VERSION
        && is_sid(text(&sid))
        && is_cluster(text(&cluster))
        && is_upstream(text(&upstream))
        && is_instance(text(&instance))
        && is_key_id(text(&kid))
        && text(&tag).len() == TAG_B64_LEN;
    if !valid {
        return Err(Rejection::Malformed);
    }
    let since = parse_number(text(&since))?;
    let iat = parse_number(text(&iat))?;
    let exp = parse_number(text(&exp))?;
    let flags = u8::try_from(parse_number(text(&flags))?).map_err(|_| Rejection::Malformed)?;
    Ok(Claims { raw, sid, cluster, upstream, instance, kid, since, iat, exp, flags })
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

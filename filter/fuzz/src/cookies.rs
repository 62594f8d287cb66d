//! Cookie values as a client could send them: built from fields by
//! `cookie::encode` or `cookie::seal`, or assembled by hand and signed or
//! sealed (so fields `encode` refuses still get past the tag), then edited
//! byte by byte.

use arbitrary::Arbitrary;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use session_affinity::cookie::{self, Claims, NewClaims, Rejection, PAD};
use session_affinity::keys::KeyRing;

use crate::{cluster_tags, KeyPick, Num, Text, INSTANCES, SIDS, UPSTREAMS};

/// A byte-level change to a built cookie.
#[derive(Arbitrary, Debug, Clone, Serialize, Deserialize)]
pub enum Edit {
    Flip { at: u16, bit: u8 },
    Set { at: u16, byte: u8 },
    Insert { at: u16, byte: u8 },
    Delete { at: u16 },
    Truncate { at: u16 },
    Append(String),
}

pub fn apply_edits(value: &str, edits: &[Edit]) -> Vec<u8> {
    let mut bytes = value.as_bytes().to_vec();
    for edit in edits {
        let len = bytes.len();
        let pos = |at: u16, extra: usize| if len + extra == 0 { 0 } else { at as usize % (len + extra) };
        match edit {
            Edit::Flip { at, bit } if len > 0 => bytes[pos(*at, 0)] ^= 1 << (bit % 8),
            Edit::Set { at, byte } if len > 0 => bytes[pos(*at, 0)] = *byte,
            Edit::Insert { at, byte } => bytes.insert(pos(*at, 1), *byte),
            Edit::Delete { at } if len > 0 => {
                bytes.remove(pos(*at, 0));
            }
            Edit::Truncate { at } => bytes.truncate(pos(*at, 1)),
            Edit::Append(s) => bytes.extend_from_slice(s.as_bytes()),
            _ => {}
        }
    }
    bytes
}

/// How a cookie is built before any edits.
#[derive(Arbitrary, Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub enum Build {
    /// `cookie::encode` (falls back to `Manual` when encode refuses the fields).
    #[default]
    Encode,
    /// The text assembled by hand from the fields and signed over.
    Manual,
}

/// A cookie value. Vocabulary picks: `sid` from `SIDS`, `cluster` from
/// `cluster_tags()`, `upstream` from `UPSTREAMS`, `instance` from `INSTANCES`;
/// numbers are seconds relative to the time the cookie is built.
#[derive(Arbitrary, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CookieSpec {
    pub sid: Text,
    pub cluster: Text,
    pub upstream: Text,
    pub instance: Text,
    pub since: Num,
    pub iat: Num,
    pub exp: Num,
    pub flags: Num,
    /// The key id written in the cookie.
    pub kid: KeyPick,
    /// The key that signs (a mismatch makes a bad signature).
    pub signer: KeyPick,
    pub build: Build,
    pub edits: Vec<Edit>,
}

impl Default for CookieSpec {
    /// A valid cookie for SIDS[0] in cluster "app", pinned to UPSTREAMS[0] / INSTANCES[0].
    fn default() -> Self {
        CookieSpec {
            sid: Text::Known(0),
            cluster: Text::Known(0),
            upstream: Text::Known(0),
            instance: Text::Known(0),
            since: Num::Rel(-100),
            iat: Num::Rel(-10),
            exp: Num::Rel(3600),
            flags: Num::Abs(0),
            kid: KeyPick::K1,
            signer: KeyPick::K1,
            build: Build::Encode,
            edits: Vec::new(),
        }
    }
}

/// A built cookie and how it came about.
pub struct Built {
    pub bytes: Vec<u8>,
    /// It came out of `cookie::encode`.
    pub encoded: bool,
    /// The edits changed it.
    pub edited: bool,
}

impl CookieSpec {
    pub fn sid(&self) -> &str {
        self.sid.get(SIDS)
    }
    pub fn cluster(&self) -> &str {
        self.cluster.get(cluster_tags())
    }
    pub fn upstream(&self) -> &str {
        self.upstream.get(UPSTREAMS)
    }
    pub fn instance(&self) -> &str {
        self.instance.get(INSTANCES)
    }

    pub fn build(&self, now_s: u64) -> Built {
        let encoded = self.encoded(now_s, |claims| cookie::encode(claims, &self.signer.ring()));
        let is_encoded = encoded.is_some();
        let value = encoded.unwrap_or_else(|| {
            let (since, iat, exp) = (self.since.text(now_s), self.iat.text(now_s), self.exp.text(now_s));
            let message = format!("2|{}|{since}|{iat}|{exp}|{}|{}|", self.pin_text(), self.kid.id(), self.flags.text(now_s));
            sign_message(&message, self.signer)
        });
        let bytes = apply_edits(&value, &self.edits);
        let edited = bytes != value.as_bytes();
        Built { bytes, encoded: is_encoded, edited }
    }

    /// As [`CookieSpec::build`], sealed (version 3) with `fresh` random bytes.
    pub fn build_sealed(&self, now_s: u64, fresh: &[u8]) -> Built {
        let encoded = self.encoded(now_s, |claims| cookie::seal(claims, &self.signer.ring(), fresh));
        let is_encoded = encoded.is_some();
        let value = encoded.unwrap_or_else(|| {
            let (age, ttl) = (self.iat.minus(&self.since, now_s), self.exp.minus(&self.iat, now_s));
            let text = format!("{}|{}|{age}|{ttl}|{}", self.pin_text(), self.iat.text(now_s), self.flags.text(now_s));
            seal_text(&text, self.kid.id(), self.signer, fresh)
        });
        let bytes = apply_edits(&value, &self.edits);
        let edited = bytes != value.as_bytes();
        Built { bytes, encoded: is_encoded, edited }
    }

    /// `sid|cluster|upstream|instance` as written by hand.
    fn pin_text(&self) -> String {
        format!("{}|{}|{}|{}", self.sid(), self.cluster(), self.upstream(), self.instance())
    }

    /// What decoding the unedited built cookie at `now` must answer: accepted
    /// inside its window, `Expired` after it, `Malformed` when issued too far
    /// ahead (or not before it expires).
    pub fn window_outcome(&self, now: u64, now_s: u64) -> Result<(), Rejection> {
        let value = |n: &Num| n.value(now_s).unwrap_or(0);
        let (iat, exp) = (value(&self.iat), value(&self.exp));
        if now >= exp {
            Err(Rejection::Expired)
        } else if iat > now.saturating_add(300) || iat >= exp {
            Err(Rejection::Malformed)
        } else {
            Ok(())
        }
    }

    /// The claims the spec makes, as decoded: sid, cluster, upstream, instance, since, iat, exp.
    pub fn made(&self, now_s: u64) -> (&str, &str, &str, &str, u64, u64, u64) {
        let value = |n: &Num| n.value(now_s).unwrap_or(0);
        (self.sid(), self.cluster(), self.upstream(), self.instance(), value(&self.since), value(&self.iat), value(&self.exp))
    }

    /// What `make` gives for the spec's claims, when the build is `Encode`,
    /// the named key signs and every number is one.
    fn encoded(&self, now_s: u64, make: impl Fn(&NewClaims<'_>) -> Option<String>) -> Option<String> {
        if !matches!(self.build, Build::Encode) || self.kid != self.signer {
            return None;
        }
        let numbers = (self.since.value(now_s), self.iat.value(now_s), self.exp.value(now_s), self.flags.value(now_s));
        let (Some(since), Some(iat), Some(exp), Some(flags)) = numbers else { return None };
        let claims = NewClaims {
            sid: self.sid(),
            cluster: self.cluster(),
            upstream: self.upstream(),
            instance: self.instance(),
            since,
            iat,
            exp,
            flags: flags as u8,
        };
        make(&claims)
    }
}

/// A version 3 value naming `kid`, sealing `text` (padded with '|' as the
/// filter pads) under `key`.
pub fn seal_text(text: &str, kid: &str, key: KeyPick, fresh: &[u8]) -> String {
    let aad = format!("3|{kid}|");
    let mut body = text.as_bytes().to_vec();
    body.resize(body.len().div_ceil(PAD).max(1) * PAD, b'|');
    let Some((nonce, tag)) = key.ring().seal(aad.as_bytes(), fresh, &mut body) else { return aad };
    let sealed: Vec<u8> = nonce.iter().chain(&body).chain(&tag).copied().collect();
    aad + &URL_SAFE_NO_PAD.encode(sealed)
}

/// `message` followed by its base64url tag under `key`.
pub fn sign_message(message: &str, key: KeyPick) -> String {
    let mut value = message.to_string();
    if let Some(tag) = key.ring().sign(message.as_bytes()) {
        URL_SAFE_NO_PAD.encode_string(tag, &mut value);
    }
    value
}

/// Whether a decimal field is written the way `to_string` writes it.
pub fn is_canonical_number(text: &str) -> bool {
    text.parse::<u64>().is_ok_and(|n| n.to_string() == text)
}

/// Every field of decoded claims, to compare two decodings.
pub type Fields = (String, String, String, String, u64, u64, u64, String, u8);

pub fn fields(c: &Claims) -> Fields {
    (c.sid().into(), c.cluster().into(), c.upstream().into(), c.instance().into(), c.since, c.iat, c.exp, c.kid().into(), c.flags)
}

/// The first seven fields of decoded claims, as [`CookieSpec::made`] gives them.
pub fn decoded(c: &Claims) -> (&str, &str, &str, &str, u64, u64, u64) {
    (c.sid(), c.cluster(), c.upstream(), c.instance(), c.since, c.iat, c.exp)
}

/// The claims of `c`, to encode them again.
pub fn new_claims(c: &Claims) -> NewClaims<'_> {
    NewClaims {
        sid: c.sid(),
        cluster: c.cluster(),
        upstream: c.upstream(),
        instance: c.instance(),
        since: c.since,
        iat: c.iat,
        exp: c.exp,
        flags: c.flags,
    }
}

/// Whether a decoding was accepted, or why not.
pub fn outcome<T>(r: &Result<T, Rejection>) -> Result<(), Rejection> {
    r.as_ref().map(|_| ()).map_err(|e| *e)
}

/// A built cookie decoded by the structure-aware targets, after the checks
/// they share.
pub struct Checked {
    pub text: String,
    /// Decoded at `now` under the ring after a rotation (k1 signs, k0 verifies).
    pub result: Result<Claims, Rejection>,
    /// The cookie does not come unedited from the key it names.
    pub forged: bool,
    /// The signer of accepted claims (k1 or k0).
    pub signer: KeyPick,
}

/// Decodes `built` (made from `spec`) at `now` and checks: unedited
/// `encode`/`seal` output decodes under its own key exactly inside its window,
/// to the claims it was made from, and `round_trip` holds for them (given the
/// claims, the key's ring and the text); the rotated ring answers the same;
/// nothing forged is accepted or called merely expired; accepted claims are in
/// their window and name a known key.
pub fn check_built(spec: &CookieSpec, built: &Built, now: u64, round_trip: impl Fn(&Claims, &KeyRing, &str)) -> Checked {
    let text = String::from_utf8_lossy(&built.bytes).into_owned();
    let lossless = text.as_bytes() == built.bytes.as_slice();
    let result = cookie::decode(text.as_str(), &crate::ring_rotated(), now);
    if built.encoded && !built.edited {
        let own = spec.signer.ring();
        let expected = spec.window_outcome(now, crate::NOW_S);
        let own_result = cookie::decode(text.as_str(), &own, now);
        assert_eq!(outcome(&own_result), expected, "{text:?} at {now}");
        if let Ok(claims) = &own_result {
            assert_eq!(decoded(claims), spec.made(crate::NOW_S));
            round_trip(claims, &own, &text);
        }
        if spec.signer != KeyPick::Unknown {
            // Known to the rotated ring, whichever of its keys signed.
            assert_eq!(outcome(&result), expected, "rotation: {text:?}");
        }
    }
    let forged = spec.kid != spec.signer || built.edited || !lossless;
    match &result {
        Ok(claims) => {
            assert!(!forged, "accepted a forged or edited cookie {text:?} (built {:?})", built.bytes);
            assert!(matches!(claims.kid(), "k1" | "k0"));
            assert!(now < claims.exp && claims.since <= claims.iat && claims.iat < claims.exp && claims.iat <= now.saturating_add(300));
        }
        Err(Rejection::Expired) => assert!(!forged, "a forged or edited cookie was reported as merely expired: {text:?}"),
        Err(_) => {}
    }
    let signer = match &result {
        Ok(claims) if claims.kid() == "k0" => KeyPick::K0,
        _ => KeyPick::K1,
    };
    Checked { text, result, forged, signer }
}

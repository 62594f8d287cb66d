//! Cookie values as a client could send them: built from fields by
//! `cookie::encode` or `cookie::seal`, or assembled by hand and signed or
//! sealed (so fields `encode` refuses still get past the tag), then edited
//! byte by byte.

use arbitrary::Arbitrary;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use session_affinity::cookie::{self, NewClaims, PAD};

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
            let message = format!(
                "2|{}|{}|{}|{}|{}|{}|{}|{}|{}|",
                self.sid(),
                self.cluster(),
                self.upstream(),
                self.instance(),
                self.since.text(now_s),
                self.iat.text(now_s),
                self.exp.text(now_s),
                self.kid.id(),
                self.flags.text(now_s)
            );
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
            let text = format!(
                "{}|{}|{}|{}|{}|{}|{}|{}",
                self.sid(),
                self.cluster(),
                self.upstream(),
                self.instance(),
                self.since.text(now_s),
                self.iat.text(now_s),
                self.exp.text(now_s),
                self.flags.text(now_s)
            );
            seal_text(&text, self.kid.id(), self.signer, fresh)
        });
        let bytes = apply_edits(&value, &self.edits);
        let edited = bytes != value.as_bytes();
        Built { bytes, encoded: is_encoded, edited }
    }

    /// What `make` gives for the spec's claims, when the build is `Encode`,
    /// the named key signs and every number is one.
    fn encoded(&self, now_s: u64, make: impl Fn(&NewClaims<'_>) -> Option<String>) -> Option<String> {
        if !matches!(self.build, Build::Encode) || self.kid != self.signer {
            return None;
        }
        let numbers = (self.since.value(now_s), self.iat.value(now_s), self.exp.value(now_s), self.flags.value(now_s));
        let (Some(since), Some(iat), Some(exp), Some(flags)) = numbers else { return None };
        let claims =
            NewClaims { sid: self.sid(), cluster: self.cluster(), upstream: self.upstream(), instance: self.instance(), since, iat, exp, flags: flags as u8 };
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

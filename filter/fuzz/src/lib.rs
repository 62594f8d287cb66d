//! Shared pieces of the fuzz targets: fixed keys and times, vocabularies that
//! let the fuzzer reach valid inputs quickly, cookie builders, the config
//! checks, and how structure-aware inputs are read.
//!
//! Harness code: panics here are the point (a failed property is a crash).

pub mod config_checks;
mod cookies;
mod input;

use arbitrary::Arbitrary;
use serde::{Deserialize, Serialize};
use session_affinity::keys::{KeyRing, Secret};

pub use cookies::{
    apply_edits, check_built, decoded, fields, is_canonical_number, new_claims, outcome, seal_text, sign_message, Build, Built, Checked,
    CookieSpec, Edit, Fields,
};
pub use input::{allowed, read, show};

/// The time most inputs are evaluated at (unix seconds); seeds are valid then.
pub const NOW_S: u64 = 1_800_000_000;
pub const NOW_MS: u64 = NOW_S * 1000;

/// The signing key of every config the targets use.
pub const SECRET_K1: &[u8] = b"0123456789abcdef0123456789abcdef";
/// An older key the configs still verify with.
pub const SECRET_K0: &[u8] = b"an-older-secret-0123456789abcdef-0123";
/// A key no config knows.
pub const SECRET_K9: &[u8] = b"unknown-secret-0123456789abcdef-0123456";

pub fn ring(keys: &[(&str, &[u8])]) -> KeyRing {
    KeyRing::new(keys.iter().map(|(id, secret)| (id.to_string(), Secret(secret.to_vec()))).collect())
}

/// One key, k1.
pub fn ring_k1() -> KeyRing {
    ring(&[("k1", SECRET_K1)])
}

/// The ring after a rotation: k1 signs, k0 still verifies.
pub fn ring_rotated() -> KeyRing {
    ring(&[("k1", SECRET_K1), ("k0", SECRET_K0)])
}

pub const UPSTREAMS: &[&str] = &[
    "10.0.0.1:8080",
    "10.0.0.2:8080",
    "10.0.0.3:80",
    "[fd00::7]:8080",
    "127.0.0.1:1",
    "[::1]:65535",
    "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535",
    "10.0.0.1:0",
    "10.0.0.1",
    "example.com:80",
    "/var/run/app.sock",
    "",
];

pub const INSTANCES: &[&str] = &[
    "pod-a",
    "pod-b",
    "",
    "demo-7f9c",
    "-",
    "a.b:c_d",
    "0123456789012345678901234567890123456789012345678901234567890123",
    "pod a",
    "pod|a",
    "pod#a",
    "01234567890123456789012345678901234567890123456789012345678901234",
];

pub const SIDS: &[&str] = &[
    "AAAAAAAAAAAAAAAAAAAAAA",
    "BBBBBBBBBBBBBBBBBBBBBB",
    "abcdefghijklmnopqrst-_",
    "short",
    "AAAAAAAAAAAAAAAAAAAAAAA",
    "AAAAAAAAAAAAAAAAAAAAA=",
];

/// Envoy cluster names; a cookie carries the tag of one ([`cluster_tags`]).
pub const CLUSTERS: &[&str] = &["app", "other", ""];

/// The tags of [`CLUSTERS`], then two that name no cluster (one well-formed).
pub fn cluster_tags() -> &'static [&'static str] {
    use std::sync::OnceLock;
    static TAGS: OnceLock<Vec<&'static str>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags: Vec<&'static str> =
            CLUSTERS.iter().map(|c| &*Box::leak(session_affinity::cookie::cluster_tag(c).as_str().to_string().into_boxed_str())).collect();
        tags.extend(["AAAAAAAA", "short"]);
        tags
    })
}

/// A string from a vocabulary (JSON: a number), or anything (JSON: a string).
#[derive(Arbitrary, Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Text {
    Known(u8),
    Raw(String),
}

impl Text {
    pub fn get<'a>(&'a self, vocab: &'a [&'a str]) -> &'a str {
        match self {
            Text::Known(i) => vocab.get(*i as usize % vocab.len().max(1)).copied().unwrap_or(""),
            Text::Raw(s) => s,
        }
    }
}

impl Default for Text {
    fn default() -> Self {
        Text::Known(0)
    }
}

/// A number field as written in a cookie.
#[derive(Arbitrary, Debug, Clone, Serialize, Deserialize)]
pub enum Num {
    /// Seconds relative to "now".
    Rel(i32),
    Abs(u64),
    /// Any text (leading zeros, signs, huge values, letters...).
    Raw(String),
}

impl Num {
    pub fn value(&self, now_s: u64) -> Option<u64> {
        match self {
            Num::Rel(off) => Some(rel(now_s, i64::from(*off))),
            Num::Abs(v) => Some(*v),
            Num::Raw(s) => s.parse().ok(),
        }
    }
    pub fn text(&self, now_s: u64) -> String {
        match self {
            Num::Raw(s) => s.clone(),
            other => other.value(now_s).unwrap_or(0).to_string(),
        }
    }
    /// This number less `other` as a sealed cookie writes it (wrapping, so a
    /// negative difference is a huge number); raw text as written.
    pub fn minus(&self, other: &Num, now_s: u64) -> String {
        match (self, self.value(now_s), other.value(now_s)) {
            (Num::Raw(s), _, _) => s.clone(),
            (_, Some(a), Some(b)) => a.wrapping_sub(b).to_string(),
            _ => self.text(now_s),
        }
    }
}

/// `base + offset`, clamped to u64.
pub fn rel(base: u64, offset: i64) -> u64 {
    u64::try_from((i128::from(base) + i128::from(offset)).max(0)).unwrap_or(u64::MAX)
}

/// Which key signs or is named.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyPick {
    K1,
    K0,
    Unknown,
}

impl KeyPick {
    pub fn id(self) -> &'static str {
        match self {
            KeyPick::K1 => "k1",
            KeyPick::K0 => "k0",
            KeyPick::Unknown => "k9",
        }
    }
    pub fn secret(self) -> &'static [u8] {
        match self {
            KeyPick::K1 => SECRET_K1,
            KeyPick::K0 => SECRET_K0,
            KeyPick::Unknown => SECRET_K9,
        }
    }
    pub fn ring(self) -> KeyRing {
        ring(&[(self.id(), self.secret())])
    }
}

/// RFC 6265 cookie-octet: what a cookie value may contain without quoting.
pub fn is_cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// A property failure named `name` (shown as `[name]`), unless allowed with SA_FUZZ_ALLOW.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $name:expr, $($msg:tt)+) => {{
        let name: &str = $name;
        if !$cond && !$crate::allowed(name) {
            panic!("[{}] {}", name, format!($($msg)+));
        }
    }};
}

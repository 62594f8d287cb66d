//! Shared pieces of the fuzz targets: fixed keys and times, vocabularies that
//! let the fuzzer reach valid inputs quickly, and cookie builders.
//!
//! Harness code: panics here are the point (a failed property is a crash).

use arbitrary::Arbitrary;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use session_affinity::config::Secret;
use session_affinity::cookie::{self, NewClaims};
use session_affinity::keys::KeyRing;

/// The time most inputs are evaluated at (unix seconds); seeds are valid then.
pub const NOW_S: u64 = 1_800_000_000;
pub const NOW_MS: u64 = NOW_S * 1000;

/// The signing key of every config the targets use.
pub const SECRET_K1: &[u8] = b"0123456789abcdef0123456789abcdef";
/// An older key the flow's configs still verify with.
pub const SECRET_K0: &[u8] = b"an-older-secret-0123456789abcdef-0123";
/// A key no config knows.
pub const SECRET_K9: &[u8] = b"unknown-secret-0123456789abcdef-0123456";

/// The ring of the brief: one key, k1.
pub fn ring_k1() -> KeyRing {
    KeyRing::new(vec![("k1".into(), Secret(SECRET_K1.to_vec()))])
}

pub const HOSTS: &[&str] = &[
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
];

pub const SIDS: &[&str] = &[
    "AAAAAAAAAAAAAAAAAAAAAA",
    "BBBBBBBBBBBBBBBBBBBBBB",
    "abcdefghijklmnopqrst-_",
    "short",
    "AAAAAAAAAAAAAAAAAAAAAAA",
    "AAAAAAAAAAAAAAAAAAAAA=",
];

/// A string from a vocabulary, or anything.
#[derive(Arbitrary, Debug, Clone)]
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

/// A number field as written in a cookie.
#[derive(Arbitrary, Debug, Clone)]
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
            Num::Rel(off) => Some(rel(now_s, *off)),
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
}

pub fn rel(now_s: u64, off: i32) -> u64 {
    u64::try_from((i128::from(now_s) + i128::from(off)).max(0)).unwrap_or(u64::MAX)
}

/// Which key signs or is named.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
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
        KeyRing::new(vec![(self.id().into(), Secret(self.secret().to_vec()))])
    }
}

/// A byte-level change to a built cookie.
#[derive(Arbitrary, Debug, Clone)]
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
            Edit::Flip { at, bit } if len > 0 => {
                let i = pos(*at, 0);
                bytes[i] ^= 1 << (bit % 8);
            }
            Edit::Set { at, byte } if len > 0 => {
                let i = pos(*at, 0);
                bytes[i] = *byte;
            }
            Edit::Insert { at, byte } => {
                let i = pos(*at, 1);
                bytes.insert(i, *byte);
            }
            Edit::Delete { at } if len > 0 => {
                let i = pos(*at, 0);
                bytes.remove(i);
            }
            Edit::Truncate { at } => {
                let i = pos(*at, 1);
                bytes.truncate(i);
            }
            Edit::Append(s) => bytes.extend_from_slice(s.as_bytes()),
            _ => {}
        }
    }
    bytes
}

/// How a cookie is built before any edits.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Build {
    /// `cookie::encode` (falls back to `Manual` when encode refuses the fields).
    Encode,
    /// The text assembled by hand from the fields and signed over, so that
    /// fields encode would refuse still reach the checks after the signature.
    Manual,
}

/// A cookie value as a client could send it.
#[derive(Arbitrary, Debug, Clone)]
pub struct CookieSpec {
    pub sid: Text,
    pub host: Text,
    pub instance: Text,
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

/// A built cookie and whether it came out of `cookie::encode` unchanged.
pub struct Built {
    pub bytes: Vec<u8>,
    pub encoded: bool,
    pub edited: bool,
}

impl CookieSpec {
    pub fn build(&self, now_s: u64) -> Built {
        let (sid, host, instance) = (self.sid.get(SIDS), self.host.get(HOSTS), self.instance.get(INSTANCES));
        let mut encoded = None;
        if let (Build::Encode, true) = (self.build, self.kid == self.signer) {
            let (iat, exp, flags) = (self.iat.value(now_s), self.exp.value(now_s), self.flags.value(now_s));
            if let (Some(iat), Some(exp), Some(flags)) = (iat, exp, flags) {
                let claims = NewClaims { sid, host, instance, iat, exp, flags: flags as u8 };
                encoded = cookie::encode(&claims, &self.signer.ring());
            }
        }
        let is_encoded = encoded.is_some();
        let value = encoded.unwrap_or_else(|| {
            let message = format!(
                "1|{sid}|{host}|{instance}|{}|{}|{}|{}|",
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

/// RFC 6265 cookie-octet: what a cookie value may contain without quoting.
pub fn is_cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

pub mod config_checks {
    //! Properties every config parse must keep, shared by the config targets.

    use session_affinity::config::{Config, ConfigError};

    /// The value `secret_env: "SA_KEY"` resolves to.
    pub const ENV_SECRET: &str = "from-the-environment-0123456789abcdef";

    pub fn env(name: &str) -> Option<String> {
        (name == "SA_KEY").then(|| ENV_SECRET.to_string())
    }

    const MARK: &str = "~~~~~~~~";

    /// The input with every `keys[*].secret` string replaced by a run of '~'
    /// as long as the secret (at least 8), if nothing else in it has a '~'.
    fn marked(bytes: &[u8]) -> Option<Vec<u8>> {
        let mut json = serde_json::from_slice::<serde_json::Value>(bytes).ok()?;
        let keys = json.get_mut("keys")?.as_array_mut()?;
        let mut secrets = Vec::new();
        for key in keys.iter_mut() {
            if let Some(serde_json::Value::String(s)) = key.get_mut("secret") {
                secrets.push(s.len());
                *s = String::new();
            }
        }
        if secrets.is_empty() || serde_json::to_string(&json).ok()?.contains('~') {
            return None;
        }
        let keys = json.get_mut("keys")?.as_array_mut()?;
        let mut lens = secrets.into_iter();
        for key in keys.iter_mut() {
            if let Some(serde_json::Value::String(s)) = key.get_mut("secret") {
                *s = "~".repeat(lens.next().unwrap_or(8).max(8));
            }
        }
        serde_json::to_vec(&json).ok()
    }

    /// No secret in an error message or in a config's Debug output: the input
    /// with its secrets swapped for '~' runs must not show such a run.
    pub fn check_secrets(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) {
        // A secret read from the environment: what is shown must not depend on it.
        let shown = |env: &dyn Fn(&str) -> Option<String>| match Config::parse(bytes, env) {
            Ok(config) => format!("{config:?}"),
            Err(e) => e.to_string(),
        };
        let other = |name: &str| (name == "SA_KEY").then(|| "another-environment-value-0123456789".to_string());
        let (with_ours, with_other) = (shown(env), shown(&other));
        assert!(!with_ours.contains(ENV_SECRET) || with_other.contains(ENV_SECRET), "secret from the environment shown: {with_ours}");
        let Some(marked) = marked(bytes) else { return };
        match Config::parse(&marked, env) {
            Ok(config) => {
                let debug = format!("{config:?}");
                assert!(!debug.contains(MARK), "secret in Debug output: {debug}");
            }
            Err(e) => {
                let message = e.to_string();
                assert!(!message.contains(MARK), "secret in error: {message}");
            }
        }
    }

    fn is_token(text: &str) -> bool {
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    }

    /// Checks a parse result: what a valid config guarantees.
    pub fn check(result: &Result<Config, ConfigError>) {
        match result {
            Ok(config) => {
                let c = &config.cookie;
                assert!(is_token(&c.name), "cookie name {:?}", c.name);
                // Rendered into Set-Cookie: no control characters, no header splitting.
                assert!(c.attributes.bytes().all(|b| (0x20..0x7f).contains(&b)), "attributes {:?}", c.attributes);
                assert!(c.attributes.starts_with("; Path=/"), "attributes {:?}", c.attributes);
                assert!((60..=400 * 24 * 3600).contains(&c.ttl_secs), "ttl {}", c.ttl_secs);
                assert!(c.refresh_after > 0.0 && c.refresh_after <= 1.0, "refresh_after {}", c.refresh_after);
                assert!(config.keys.signing_id().is_some());
                assert!(config.gone_ttl.as_secs() >= 1);
                let h = &config.headers;
                let names = [&h.route, &h.session_id, &h.session_new, &h.session_state, &h.instance_id, &h.session_unknown];
                for (i, n) in names.iter().enumerate() {
                    assert!(is_token(n) && !n.bytes().any(|b| b.is_ascii_uppercase()), "header {n:?}");
                    assert!(!matches!(n.as_str(), "cookie" | "set-cookie" | "host"), "header {n:?}");
                    assert!(names.iter().take(i).all(|m| m != n), "duplicate header {n:?}");
                }
                if let Some(store) = &config.store {
                    assert!(!store.cluster.is_empty());
                    assert!(store.key_prefix.len() <= 64 && store.key_prefix.bytes().all(|b| b.is_ascii_graphic() && b != b'/'));
                    assert!(store.timeout.0.as_millis() >= 1 && store.timeout.0.as_secs() <= 60);
                    assert!(store.lease.0.as_secs() >= 1 && store.retry_after.0.as_secs() >= 1);
                }
                for p in &config.skip.prefixes {
                    assert!(p.starts_with('/'));
                }
                // The path matcher on a few paths.
                for path in [&b""[..], b"/", b"/static/x.css?v=1", b"?", b"/a?b?c", b"\xff\xfe"] {
                    let _ = config.skips(path);
                }
            }
            Err(_) => {}
        }
    }
}

/// Whether the finding `name` is listed in SA_FUZZ_ALLOW (comma-separated), so
/// a campaign can go on past a known bug.
pub fn allowed(name: &str) -> bool {
    use std::sync::OnceLock;
    static ALLOW: OnceLock<Vec<String>> = OnceLock::new();
    ALLOW
        .get_or_init(|| std::env::var("SA_FUZZ_ALLOW").unwrap_or_default().split(',').map(|s| s.trim().to_string()).collect())
        .iter()
        .any(|a| !a.is_empty() && a == name)
}

/// A property failure named `name` (shown as `[name]`), unless allowed with SA_FUZZ_ALLOW.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $name:expr, $($msg:tt)+) => {
        let name: &str = $name;
        if !$cond && !$crate::allowed(name) {
            panic!("[{}] {}", name, format!($($msg)+));
        }
    };
}

//! Plugin configuration: parsed from JSON, validated, then compiled into the
//! runtime form the filter uses. Nothing is swapped in unless all of it is valid.
//!
//! Every error names the field (`keys[0].secret`) and says what to fix, so the
//! one log line Envoy prints on a refused config is enough to act on.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::cookie::VerifiedCookies;
use crate::keys::KeyRing;

/// Shortest accepted HMAC secret, in bytes (the SHA-256 block is 64; 32 is the
/// usual floor for a 256-bit MAC).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest cookie lifetime browsers honour (RFC 6265bis caps Max-Age at 400 days).
const MAX_COOKIE_TTL: Duration = Duration::from_secs(400 * 24 * 3600);

/// The plugin configuration exactly as the user writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub cookie: CookieConfig,
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub headers: HeaderNames,
    #[serde(default)]
    pub store: Option<StoreConfig>,
    #[serde(default)]
    pub failover: FailoverConfig,
    #[serde(default)]
    pub skip: SkipConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CookieConfig {
    pub name: String,
    pub path: String,
    pub domain: Option<String>,
    pub ttl: TypedDuration,
    /// Share of a cookie's life after which a response re-issues it.
    pub refresh_after: f64,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
}

impl Default for CookieConfig {
    fn default() -> Self {
        CookieConfig {
            name: "sa".into(),
            path: "/".into(),
            domain: None,
            ttl: TypedDuration(Duration::from_secs(24 * 3600)),
            refresh_after: 0.5,
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

impl SameSite {
    fn attribute(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

/// One signing key. The secret is given inline or read from an environment
/// variable that Envoy exposes to the VM (`vm_config.environment_variables`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    #[serde(default)]
    pub secret: Option<Secret>,
    #[serde(default)]
    pub secret_env: Option<String>,
}

/// A secret string. Its `Debug` and its parse errors never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;
        impl Visitor<'_> for SecretVisitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.as_bytes().to_vec()))
            }
            // Any other JSON type: say what is expected without echoing the value.
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(E::custom("must be a string"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(E::custom("must be a string"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(E::custom("must be a string"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(E::custom("must be a string"))
            }
        }
        deserializer.deserialize_any(SecretVisitor)
    }
}

/// Names of the routing header and of the app contract headers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderNames {
    /// Read by Envoy's `stateful_session` header state: base64("ip:port").
    pub route: String,
    pub session_id: String,
    pub session_new: String,
    pub session_state: String,
    pub instance_id: String,
    pub session_unknown: String,
}

impl Default for HeaderNames {
    fn default() -> Self {
        HeaderNames {
            route: "x-session-route".into(),
            session_id: "x-session-id".into(),
            session_new: "x-session-new".into(),
            session_state: "x-session-state".into(),
            instance_id: "x-instance-id".into(),
            session_unknown: "x-session-unknown".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DialectName {
    /// Redis behind webdis, with Lua for the atomic claim and fenced write.
    Webdis,
}

/// Whether a response carrying new state waits for the store's acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// The response leaves only after the store acknowledged the write: nothing is lost.
    Sync,
    /// The response leaves at once; a failed write is counted and logged.
    Async,
}

/// What a failover does when the store cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutagePolicy {
    /// Start a new session on a live host (counted and logged).
    Fresh,
    /// Answer 503 with Retry-After, keeping the cookie, so the client can retry safely.
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default = "default_dialect")]
    pub dialect: DialectName,
    /// The Envoy cluster that reaches the store.
    pub cluster: String,
    #[serde(default = "default_authority")]
    pub authority: String,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_store_timeout")]
    pub timeout: TypedDuration,
    #[serde(default = "default_write_mode")]
    pub write: WriteMode,
    #[serde(default = "default_outage_policy")]
    pub on_outage: OutagePolicy,
    #[serde(default = "default_retry_after")]
    pub retry_after: TypedDuration,
    /// How long a failover may hold a session before another proxy may take it over.
    #[serde(default = "default_lease")]
    pub lease: TypedDuration,
}

fn default_dialect() -> DialectName {
    DialectName::Webdis
}
fn default_authority() -> String {
    "session-store".into()
}
fn default_key_prefix() -> String {
    "sa:".into()
}
fn default_store_timeout() -> TypedDuration {
    TypedDuration(Duration::from_millis(500))
}
fn default_write_mode() -> WriteMode {
    WriteMode::Sync
}
fn default_outage_policy() -> OutagePolicy {
    OutagePolicy::Fresh
}
fn default_retry_after() -> TypedDuration {
    TypedDuration(Duration::from_secs(1))
}
fn default_lease() -> TypedDuration {
    TypedDuration(Duration::from_secs(10))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// How long a host or instance seen gone stays gone in this proxy's view.
    pub gone_ttl: TypedDuration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig { gone_ttl: TypedDuration(Duration::from_secs(30)) }
    }
}

/// Paths that never need affinity (static assets).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SkipConfig {
    pub prefixes: Vec<String>,
    pub suffixes: Vec<String>,
}

/// A duration written as `<integer><unit>`, unit one of ms, s, m, h, d.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypedDuration(pub Duration);

impl<'de> Deserialize<'de> for TypedDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A visitor, so that the error is raised where the value stands and
        // its position (hence its field path) is known.
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = TypedDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TypedDuration, E> {
                parse_duration(v).map(TypedDuration).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// Parses "250ms", "30s", "15m", "24h", "7d".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || format!("`{text}` is not a duration; write it like \"500ms\", \"30s\", \"15m\", \"24h\" or \"7d\"");
    let value: u64 = digits.parse().map_err(|_| bad())?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    value.checked_mul(millis_per_unit).map(Duration::from_millis).ok_or_else(bad)
}

/// The validated, compiled configuration the filter runs with.
#[derive(Debug)]
pub struct Config {
    pub cookie: CookieSettings,
    pub keys: KeyRing,
    /// Cookies the key ring already verified (see [`VerifiedCookies`]).
    pub verified: VerifiedCookies,
    pub headers: HeaderNames,
    pub store: Option<StoreConfig>,
    pub gone_ttl: Duration,
    pub skip: SkipConfig,
}

/// Cookie settings with the constant part of `Set-Cookie` rendered once.
#[derive(Debug)]
pub struct CookieSettings {
    pub name: String,
    pub ttl_secs: u64,
    pub refresh_after: f64,
    /// "; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax" and so on.
    pub attributes: String,
}

/// A config error: the field path and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

fn error(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), message: message.into() }
}

impl Config {
    /// Parses and validates plugin configuration bytes. `env` looks up the
    /// environment variables named by `secret_env`.
    pub fn parse(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| {
            let field = json_path_at(bytes, e.line(), e.column());
            error(field, strip_position(&e.to_string()))
        })?;
        Config::compile(raw, env)
    }

    fn compile(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let cookie = compile_cookie(&raw.cookie)?;
        let keys = compile_keys(&raw.keys, env)?;
        check_headers(&raw.headers)?;
        if let Some(store) = &raw.store {
            check_store(store)?;
        }
        if raw.failover.gone_ttl.0 < Duration::from_secs(1) {
            return Err(error("failover.gone_ttl", "must be at least 1s"));
        }
        check_skip(&raw.skip)?;
        Ok(Config {
            cookie,
            keys,
            verified: VerifiedCookies::default(),
            headers: raw.headers,
            store: raw.store,
            gone_ttl: raw.failover.gone_ttl.0,
            skip: raw.skip,
        })
    }

    /// True when the path (query excluded) needs no affinity.
    pub fn skips(&self, path: &[u8]) -> bool {
        let end = path.iter().position(|&b| b == b'?').unwrap_or(path.len());
        let path = path.get(..end).unwrap_or(path);
        self.skip.prefixes.iter().any(|p| path.starts_with(p.as_bytes()))
            || self.skip.suffixes.iter().any(|s| path.ends_with(s.as_bytes()))
    }
}

/// The path (`keys[0].secret`) of the value at a line and column of a JSON
/// text, for error messages: serde_json reports where it stopped, and this
/// names the field there. (A path-tracking deserializer would do the same at
/// a fifth of the .wasm's size.) Lenient: any text gives some path.
pub fn json_path_at(json: &[u8], line: usize, column: usize) -> String {
    enum Frame {
        Object { key: Option<String>, expect_key: bool },
        Array { index: usize },
    }
    let offset = json
        .split_inclusive(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(<[u8]>::len)
        .sum::<usize>()
        .saturating_add(column);
    let text = json.get(..offset.min(json.len())).unwrap_or(json);
    let mut stack: Vec<Frame> = Vec::new();
    let mut bytes = text.iter().copied();
    while let Some(b) = bytes.next() {
        match b {
            b'{' => stack.push(Frame::Object { key: None, expect_key: true }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array { index }) => *index += 1,
                Some(Frame::Object { key, expect_key }) => {
                    *key = None;
                    *expect_key = true;
                }
                None => {}
            },
            b'"' => {
                let mut string = Vec::new();
                while let Some(c) = bytes.next() {
                    match c {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        c => string.push(c),
                    }
                }
                if let Some(Frame::Object { key, expect_key: expect @ true }) = stack.last_mut() {
                    *key = Some(String::from_utf8_lossy(&string).into_owned());
                    *expect = false;
                }
            }
            _ => {}
        }
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object { key: Some(key), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Array { index } => path.push_str(&format!("[{index}]")),
            Frame::Object { key: None, .. } => {}
        }
    }
    path
}

/// serde_json appends " at line 1 column 42"; the field path says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message.get(..at).unwrap_or(message).to_string(),
        None => message.to_string(),
    }
}

fn is_token(text: &str) -> bool {
    // RFC 7230 token characters, which cookie and header names must use.
    !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_attribute_value(text: &str) -> bool {
    text.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';' && b != b',')
}

fn compile_cookie(c: &CookieConfig) -> Result<CookieSettings, ConfigError> {
    if !is_token(&c.name) {
        return Err(error("cookie.name", "must be a non-empty token (letters, digits, and !#$%&'*+-.^_`|~)"));
    }
    if !c.path.starts_with('/') || !is_attribute_value(&c.path) {
        return Err(error("cookie.path", "must start with '/' and contain no spaces, ';' or ','"));
    }
    if let Some(domain) = &c.domain {
        if domain.is_empty() || !is_attribute_value(domain) {
            return Err(error("cookie.domain", "must be a host name such as \"example.com\", or be left out"));
        }
    }
    let ttl = c.ttl.0;
    if ttl < Duration::from_secs(60) || ttl > MAX_COOKIE_TTL {
        return Err(error("cookie.ttl", "must be between 1m and 400d"));
    }
    if !(c.refresh_after > 0.0 && c.refresh_after <= 1.0) {
        return Err(error("cookie.refresh_after", "must be a share of the cookie's life in (0, 1], e.g. 0.5"));
    }
    if c.same_site == SameSite::None && !c.secure {
        return Err(error("cookie.same_site", "\"none\" requires cookie.secure: true (browsers drop it otherwise)"));
    }
    let mut attributes = format!("; Path={}; Max-Age={}", c.path, ttl.as_secs());
    if let Some(domain) = &c.domain {
        attributes.push_str("; Domain=");
        attributes.push_str(domain);
    }
    if c.secure {
        attributes.push_str("; Secure");
    }
    if c.http_only {
        attributes.push_str("; HttpOnly");
    }
    attributes.push_str("; SameSite=");
    attributes.push_str(c.same_site.attribute());
    Ok(CookieSettings {
        name: c.name.clone(),
        ttl_secs: ttl.as_secs(),
        refresh_after: c.refresh_after,
        attributes,
    })
}

fn compile_keys(keys: &[RawKey], env: &dyn Fn(&str) -> Option<String>) -> Result<KeyRing, ConfigError> {
    if keys.is_empty() {
        return Err(error("keys", "list at least one key {\"id\": ..., \"secret\": ...}; the first one signs"));
    }
    let mut ring = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let field = |name: &str| format!("keys[{i}].{name}");
        if !crate::cookie::is_key_id(&key.id) {
            return Err(error(field("id"), "must be 1 to 32 characters from A-Z a-z 0-9 . _ -"));
        }
        if keys.iter().take(i).any(|k| k.id == key.id) {
            return Err(error(field("id"), "is listed twice; key ids must be unique"));
        }
        let secret = match (&key.secret, &key.secret_env) {
            (Some(secret), None) => secret.clone(),
            (None, Some(var)) => match env(var) {
                Some(value) => Secret(value.into_bytes()),
                None => {
                    return Err(error(
                        field("secret_env"),
                        format!("environment variable {var} is not set for the VM; list it in vm_config.environment_variables.host_env_keys"),
                    ))
                }
            },
            _ => return Err(error(format!("keys[{i}]"), "give exactly one of \"secret\" or \"secret_env\"")),
        };
        if secret.0.len() < MIN_SECRET_LEN {
            let name = if key.secret.is_some() { "secret" } else { "secret_env" };
            return Err(error(
                field(name),
                format!("must be at least {MIN_SECRET_LEN} bytes; generate one with `openssl rand -base64 48`"),
            ));
        }
        ring.push((key.id.clone(), secret));
    }
    Ok(KeyRing::new(ring))
}

fn check_headers(h: &HeaderNames) -> Result<(), ConfigError> {
    let named = [
        ("headers.route", &h.route),
        ("headers.session_id", &h.session_id),
        ("headers.session_new", &h.session_new),
        ("headers.session_state", &h.session_state),
        ("headers.instance_id", &h.instance_id),
        ("headers.session_unknown", &h.session_unknown),
    ];
    for (i, (field, name)) in named.iter().enumerate() {
        if !is_token(name) || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(error(*field, "must be a lower-case header name"));
        }
        if named.iter().take(i).any(|(_, other)| other == name) {
            return Err(error(*field, "is the same as another header name; each must be distinct"));
        }
        if matches!(name.as_str(), "cookie" | "set-cookie" | "host") || name.starts_with(':') {
            return Err(error(*field, "must not name a standard header"));
        }
    }
    Ok(())
}

fn check_store(s: &StoreConfig) -> Result<(), ConfigError> {
    if s.cluster.is_empty() {
        return Err(error("store.cluster", "name the Envoy cluster that reaches the store"));
    }
    if s.authority.is_empty() || !is_attribute_value(&s.authority) {
        return Err(error("store.authority", "must be a host name such as \"session-store\""));
    }
    if s.key_prefix.len() > 64 || !s.key_prefix.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Err(error("store.key_prefix", "must be at most 64 printable characters without '/'"));
    }
    if s.timeout.0 < Duration::from_millis(1) || s.timeout.0 > Duration::from_secs(60) {
        return Err(error("store.timeout", "must be between 1ms and 60s"));
    }
    if s.lease.0 < Duration::from_secs(1) {
        return Err(error("store.lease", "must be at least 1s (longer than the app's slowest response)"));
    }
    if s.retry_after.0.as_secs() == 0 {
        return Err(error("store.retry_after", "must be at least 1s"));
    }
    Ok(())
}

fn check_skip(s: &SkipConfig) -> Result<(), ConfigError> {
    for (i, p) in s.prefixes.iter().enumerate() {
        if !p.starts_with('/') {
            return Err(error(format!("skip.prefixes[{i}]"), "must start with '/'"));
        }
    }
    for (i, p) in s.suffixes.iter().enumerate() {
        if p.is_empty() {
            return Err(error(format!("skip.suffixes[{i}]"), "must not be empty"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = r#"{"id":"k1","secret":"0123456789abcdef0123456789abcdef"}"#;

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::parse(json.as_bytes(), &|name| (name == "SA_KEY").then(|| "from-the-environment-0123456789abcdef".to_string()))
    }

    fn error_of(json: &str) -> String {
        match parse(json) {
            Ok(_) => panic!("accepted: {json}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_takes_safe_defaults() {
        let c = parse(&format!(r#"{{"keys":[{KEY}]}}"#)).unwrap();
        assert_eq!(c.cookie.name, "sa");
        assert_eq!(c.cookie.attributes, "; Path=/; Max-Age=86400; Secure; HttpOnly; SameSite=Lax");
        assert_eq!(c.headers.route, "x-session-route");
        assert!(c.store.is_none());
        assert_eq!(c.gone_ttl, Duration::from_secs(30));
    }

    #[test]
    fn full_config_parses() {
        let c = parse(&format!(
            r#"{{"cookie":{{"name":"route","path":"/app","domain":"example.com","ttl":"7d","refresh_after":0.25,"secure":true,"http_only":false,"same_site":"none"}},
                "keys":[{KEY},{{"id":"k0","secret_env":"SA_KEY"}}],
                "store":{{"cluster":"store","timeout":"250ms","write":"async","on_outage":"reject","retry_after":"2s","lease":"5s"}},
                "failover":{{"gone_ttl":"1m"}},"skip":{{"prefixes":["/static/"],"suffixes":[".css"]}}}}"#
        ))
        .unwrap();
        assert_eq!(c.cookie.attributes, "; Path=/app; Max-Age=604800; Domain=example.com; Secure; SameSite=None");
        let store = c.store.unwrap();
        assert_eq!((store.write, store.on_outage, store.timeout.0), (WriteMode::Async, OutagePolicy::Reject, Duration::from_millis(250)));
        assert_eq!(format!("{:?}", c.keys), r#"["k1", "k0"]"#);
    }

    #[test]
    fn errors_name_the_field_and_say_what_to_fix() {
        let cases = [
            (r#"{}"#.to_string(), "missing field `keys`"),
            (r#"{"keys":[]}"#.to_string(), "keys: list at least one key"),
            (r#"{"keys":[{"id":"k1","secret":"short"}]}"#.to_string(), "keys[0].secret: must be at least 32 bytes"),
            (format!(r#"{{"keys":[{KEY},{KEY}]}}"#), "keys[1].id: is listed twice"),
            (r#"{"keys":[{"id":"k1","secret_env":"MISSING"}]}"#.to_string(), "keys[0].secret_env: environment variable MISSING is not set"),
            (r#"{"keys":[{"id":"k1"}]}"#.to_string(), "keys[0]: give exactly one of"),
            (r#"{"keys":[{"id":"bad id","secret":"0123456789abcdef0123456789abcdef"}]}"#.to_string(), "keys[0].id: must be 1 to 32"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"same_site":"sideways"}}}}"#), "cookie.same_site: unknown variant `sideways`"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"ttl":"10 minutes"}}}}"#), "cookie.ttl: `10 minutes` is not a duration"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"ttl":"10s"}}}}"#), "cookie.ttl: must be between 1m and 400d"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"name":"a b"}}}}"#), "cookie.name: must be a non-empty token"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"same_site":"none","secure":false}}}}"#), "cookie.same_site: \"none\" requires cookie.secure"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"refresh_after":0}}}}"#), "cookie.refresh_after: must be a share"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"colour":"blue"}}}}"#), "cookie.colour: unknown field `colour`, expected one of"),
            (format!(r#"{{"keys":[{KEY}],"headers":{{"route":"x-session-id"}}}}"#), "headers.session_id: is the same as another"),
            (format!(r#"{{"keys":[{KEY}],"headers":{{"route":"X-Route"}}}}"#), "headers.route: must be a lower-case header name"),
            (format!(r#"{{"keys":[{KEY}],"store":{{}}}}"#), "store: missing field `cluster`"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","dialect":"memcached"}}}}"#), "store.dialect: unknown variant `memcached`"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","timeout":"0ms"}}}}"#), "store.timeout: must be between 1ms and 60s"),
            (format!(r#"{{"keys":[{KEY}],"skip":{{"prefixes":["static"]}}}}"#), "skip.prefixes[0]: must start with '/'"),
            ("not json".to_string(), "expected ident"),
        ];
        for (json, expected) in cases {
            let message = error_of(&json);
            assert!(message.starts_with(expected), "{json}\n  expected: {expected}\n  got:      {message}");
        }
    }

    #[test]
    fn secrets_never_appear_in_errors_or_debug_output() {
        let secret = "this-is-the-secret-value-0123456789";
        let message = error_of(&format!(r#"{{"keys":[{{"id":"k1","secret":"{secret}"}}],"cookie":{{"path":"nope"}}}}"#));
        assert!(!message.contains(secret), "{message}");
        let message = error_of(r#"{"keys":[{"id":"k1","secret":12345678901234567890}]}"#);
        assert!(message.contains("must be a string") && !message.contains("12345"), "{message}");
        let config = parse(&format!(r#"{{"keys":[{{"id":"k1","secret":"{secret}"}}]}}"#)).unwrap();
        assert!(!format!("{config:?}").contains(secret));
    }

    #[test]
    fn json_paths_name_the_value_at_a_position() {
        let json = br#"{"a":{"b":[1,{"c":"x,}]"}],"d":2}}"#;
        let at = |needle: &str| {
            let end = json.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() + needle.len();
            json_path_at(json, 1, end)
        };
        assert_eq!(at(r#""c":"x,}]""#), "a.b[1].c");
        assert_eq!(at(r#"[1"#), "a.b[0]");
        assert_eq!(at(r#"}],"d""#), "a.d");
        assert_eq!(json_path_at(b"{\n\"a\":\n  {\"b\":1", 3, 7), "a.b");
        assert_eq!(json_path_at(b"", 9, 9), "");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "5", "ms", "-1s", "1.5s", "1 s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn skip_matches_prefixes_and_suffixes_without_the_query() {
        let c = parse(&format!(r#"{{"keys":[{KEY}],"skip":{{"prefixes":["/static/"],"suffixes":[".css"]}}}}"#)).unwrap();
        assert!(c.skips(b"/static/x.png"));
        assert!(c.skips(b"/a/b.css?v=1"));
        assert!(!c.skips(b"/a/b.css.map"));
        assert!(!c.skips(b"/cart?file=.css"));
    }

    /// The fields the parser accepts where `json` has an unknown one: serde
    /// lists them in its error.
    fn accepted_fields(json: &str) -> Vec<String> {
        let message = error_of(json);
        let list = message.split("expected ").nth(1).unwrap_or_else(|| panic!("{message}"));
        let mut names: Vec<String> = list.trim_start_matches("one of ").replace("` or `", "`, `").split(", ").map(|n| n.trim_matches('`').to_string()).collect();
        names.sort();
        names
    }

    /// The published JSON Schema lists exactly the fields the parser accepts.
    #[test]
    fn schema_fields_match_the_parser() {
        let schema: serde_json::Value = serde_json::from_str(include_str!("../schema/config.schema.json")).unwrap();
        let schema_fields = |value: &serde_json::Value| -> Vec<String> {
            let mut names: Vec<String> = value["properties"].as_object().unwrap().keys().cloned().collect();
            names.sort();
            names
        };
        let props = &schema["properties"];
        assert_eq!(schema_fields(&schema), accepted_fields(r#"{"zzz":1}"#));
        for section in ["cookie", "headers", "store", "failover", "skip"] {
            let json = format!(r#"{{"keys":[{KEY}],"{section}":{{"zzz":1}}}}"#);
            assert_eq!(schema_fields(&props[section]), accepted_fields(&json), "{section}");
        }
        assert_eq!(schema_fields(&props["keys"]["items"]), accepted_fields(r#"{"keys":[{"zzz":1}]}"#));
    }
}

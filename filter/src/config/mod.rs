//! Plugin configuration: parsed from JSON ([`raw`]), validated, then compiled
//! into the immutable settings the filter runs with. Nothing is swapped in
//! unless all of it is valid.
//!
//! Every error names the field (`keys[0].secret`) and says what to fix, so the
//! one log line Envoy prints on a refused config is enough to act on. No error
//! ever shows a secret or the value of a variable named by `*_env`.

mod json_path;
pub mod raw;

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::headers::InternalHeaders;
use crate::cookie::Format;
use crate::keys::{KeyRing, Secret};
pub use json_path::json_path_at;
use raw::{AuthConfig, CookieConfig, RawConfig, RawKey, SkipConfig, StoreConfig};
pub use raw::{DialectName, HeaderNames, OutagePolicy, SameSite, WriteMode};

/// Shortest accepted HMAC secret, in bytes (the SHA-256 block is 64; 32 is the
/// usual floor for a 256-bit MAC).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest cookie lifetime browsers honour (RFC 6265bis caps Max-Age at 400 days).
const MAX_COOKIE_TTL: Duration = Duration::from_secs(400 * 24 * 3600);
/// The largest `store.max_state_bytes` accepted (Envoy caps request headers at 8 MiB; far below it).
const MAX_STATE_LIMIT: usize = 1 << 20;

/// The validated, compiled configuration the filter runs with. Immutable:
/// what changes per worker (caches, the gone table) lives in `flow::Worker`.
#[derive(Debug)]
pub struct Config {
    pub cookie: CookieSettings,
    pub keys: KeyRing,
    pub headers: HeaderNames,
    /// Client-sent headers that must never reach an app.
    pub internal: InternalHeaders,
    pub store: Option<StoreSettings>,
    pub gone_ttl_ms: u64,
    pub skip: SkipConfig,
}

/// Cookie settings with the constant part of `Set-Cookie` rendered once.
#[derive(Debug)]
pub struct CookieSettings {
    pub name: String,
    pub ttl_secs: u64,
    pub max_lifetime_secs: u64,
    pub refresh_after: f64,
    /// The version new cookies are issued in.
    pub format: Format,
    /// "; Path=/; HttpOnly; SameSite=Lax" and so on, without Max-Age.
    pub attributes: String,
}

/// The store, compiled.
#[derive(Debug)]
pub struct StoreSettings {
    pub dialect: DialectSettings,
    pub cluster: String,
    pub authority: String,
    pub key_prefix: String,
    pub timeout: Duration,
    pub write: WriteMode,
    pub on_outage: OutagePolicy,
    pub retry_after_secs: u64,
    pub lease_ms: u64,
    pub idle_ttl_ms: u64,
    pub max_state_bytes: usize,
    pub new_session_ttl_ms: u64,
    pub new_session_writes_per_second: u32,
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
}

/// The dialect and what only it needs.
#[derive(Debug)]
pub enum DialectSettings {
    /// `authorization`: the basic-auth header value for every call, if any.
    Webdis { authorization: Option<Secret> },
    /// `login`: the body of etcd's authenticate call (user and password), if
    /// etcd has auth enabled.
    Etcd { lease_bucket_ms: u64, login: Option<Secret> },
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
    /// environment variables named by `secret_env` and `password_env`.
    pub fn parse(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| {
            let field = json_path_at(bytes, e.line(), e.column());
            error(field, json_path::strip_position(&e.to_string()))
        })?;
        Config::compile(raw, env)
    }

    fn compile(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let cookie = compile_cookie(&raw.cookie)?;
        let keys = compile_keys(&raw.keys, env)?;
        check_headers(&raw.headers)?;
        let store = match &raw.store {
            Some(store) => Some(compile_store(store, &cookie, env)?),
            None => None,
        };
        if raw.failover.gone_ttl.0 < Duration::from_secs(1) {
            return Err(error("failover.gone_ttl", "must be at least 1s"));
        }
        check_skip(&raw.skip)?;
        Ok(Config {
            cookie,
            keys,
            internal: InternalHeaders::new(raw.headers.named().iter().map(|(_, name)| *name)),
            headers: raw.headers,
            store,
            gone_ttl_ms: millis(raw.failover.gone_ttl.0),
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

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn is_token(text: &str) -> bool {
    // RFC 7230 token characters, which cookie and header names must use.
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_attribute_value(text: &str) -> bool {
    text.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';' && b != b',')
}

fn compile_cookie(c: &CookieConfig) -> Result<CookieSettings, ConfigError> {
    if !c.path.starts_with('/') || !is_attribute_value(&c.path) {
        return Err(error("cookie.path", "must start with '/' and contain no spaces, ';' or ','"));
    }
    if let Some(domain) = &c.domain {
        if domain.is_empty() || !is_attribute_value(domain) {
            return Err(error("cookie.domain", "must be a host name such as \"example.com\", or be left out"));
        }
    }
    // A `__Host-` cookie cannot be planted by a sibling subdomain or a
    // narrower path: browsers only accept it Secure, without Domain, on "/".
    let host_prefix_fits = c.secure && c.domain.is_none() && c.path == "/";
    let name = match &c.name {
        Some(name) => name.clone(),
        None if host_prefix_fits => "__Host-sa".into(),
        None => "sa".into(),
    };
    if !is_token(&name) {
        return Err(error("cookie.name", "must be a non-empty token (letters, digits, and !#$%&'*+-.^_`|~)"));
    }
    if name.starts_with("__Host-") && !host_prefix_fits {
        return Err(error("cookie.name", "a __Host- cookie needs cookie.secure: true, no cookie.domain and cookie.path \"/\" (browsers drop it otherwise)"));
    }
    if name.starts_with("__Secure-") && !c.secure {
        return Err(error("cookie.name", "a __Secure- cookie needs cookie.secure: true (browsers drop it otherwise)"));
    }
    let ttl = c.ttl.0;
    if ttl < Duration::from_secs(60) || ttl > MAX_COOKIE_TTL {
        return Err(error("cookie.ttl", "must be between 1m and 400d"));
    }
    let max_lifetime = c.max_lifetime.0;
    if max_lifetime < ttl {
        return Err(error("cookie.max_lifetime", "must be at least cookie.ttl"));
    }
    if !(c.refresh_after > 0.0 && c.refresh_after <= 1.0) {
        return Err(error("cookie.refresh_after", "must be a share of the cookie's life in (0, 1], e.g. 0.5"));
    }
    if c.same_site == SameSite::None && !c.secure {
        return Err(error("cookie.same_site", "\"none\" requires cookie.secure: true (browsers drop it otherwise)"));
    }
    let mut attributes = format!("; Path={}", c.path);
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
        name,
        ttl_secs: ttl.as_secs(),
        max_lifetime_secs: max_lifetime.as_secs(),
        refresh_after: c.refresh_after,
        format: c.format,
        attributes,
    })
}

/// A secret given inline or through an environment variable, exactly one of
/// them. Errors name the field and the variable, never a value.
fn secret_from(
    inline: &Option<Secret>,
    var: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
    (inline_field, env_field, parent): (&str, &str, &str),
) -> Result<Secret, ConfigError> {
    match (inline, var) {
        (Some(secret), None) => Ok(secret.clone()),
        // Not a variable name: likely the secret itself, pasted in the wrong
        // field. Say so without echoing it.
        (None, Some(var)) if !is_env_name(var) => Err(error(
            env_field,
            "must name an environment variable (letters, digits and '_', not starting with a digit, at most 128); it looks like a value: put secrets in the environment, never in the config",
        )),
        (None, Some(var)) => env(var).map(|value| Secret(value.into_bytes())).ok_or_else(|| {
            error(env_field, format!("environment variable {var} is not set for the VM; list it in vm_config.environment_variables.host_env_keys (the native module reads Envoy's own environment)"))
        }),
        _ => {
            let (short_inline, short_env) = (last_part(inline_field), last_part(env_field));
            Err(error(parent, format!("give exactly one of \"{short_inline}\" or \"{short_env}\"")))
        }
    }
}

/// A POSIX-style environment variable name.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 128
        && bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn last_part(field: &str) -> &str {
    field.rsplit('.').next().unwrap_or(field)
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
        let secret = secret_from(&key.secret, &key.secret_env, env, (&field("secret"), &field("secret_env"), &format!("keys[{i}]")))?;
        if secret.0.len() < MIN_SECRET_LEN {
            let name = if key.secret.is_some() { "secret" } else { "secret_env" };
            return Err(error(field(name), format!("must be at least {MIN_SECRET_LEN} bytes; generate one with `openssl rand -base64 48`")));
        }
        ring.push((key.id.clone(), secret));
    }
    Ok(KeyRing::new(ring))
}

fn check_headers(h: &HeaderNames) -> Result<(), ConfigError> {
    let named = h.named();
    for (i, (field, name)) in named.iter().enumerate() {
        if !is_token(name) || name.bytes().any(|b| b.is_ascii_uppercase() || b == b'_') {
            return Err(error(*field, "must be a lower-case header name without '_'"));
        }
        if named.iter().take(i).any(|(_, other)| other == name) {
            return Err(error(*field, "is the same as another header name; each must be distinct"));
        }
        if matches!(*name, "cookie" | "set-cookie" | "host" | "authorization" | "location") || name.starts_with(':') || name.starts_with("x-envoy-") {
            return Err(error(*field, "must not name a standard or Envoy header"));
        }
    }
    Ok(())
}

fn compile_store(s: &StoreConfig, cookie: &CookieSettings, env: &dyn Fn(&str) -> Option<String>) -> Result<StoreSettings, ConfigError> {
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
    let idle_ttl = s.idle_ttl.0;
    if idle_ttl < Duration::from_secs(60) || idle_ttl.as_secs() > cookie.ttl_secs {
        return Err(error("store.idle_ttl", "must be between 1m and cookie.ttl (match the app's own session timeout)"));
    }
    if idle_ttl < s.lease.0.saturating_mul(2) {
        return Err(error("store.idle_ttl", "must be at least twice store.lease"));
    }
    if !(256..=MAX_STATE_LIMIT).contains(&s.max_state_bytes) {
        return Err(error("store.max_state_bytes", "must be between 256 and 1048576 (a restore carries the state in a request header: keep it under Envoy's max_request_headers_kb)"));
    }
    if s.new_session_ttl.0 < Duration::from_secs(1) || s.new_session_ttl.0 > idle_ttl {
        return Err(error("store.new_session_ttl", "must be between 1s and store.idle_ttl (long enough for a client's second request)"));
    }
    if !(1..=1_000_000).contains(&s.new_session_writes_per_second) {
        return Err(error("store.new_session_writes_per_second", "must be between 1 and 1000000 (per worker)"));
    }
    let dialect = compile_dialect(s, env)?;
    let breaker = &s.breaker;
    if !(1..=100).contains(&breaker.failures) {
        return Err(error("store.breaker.failures", "must be between 1 and 100"));
    }
    if breaker.cooldown.0 < Duration::from_millis(100) || breaker.cooldown.0 > Duration::from_secs(600) {
        return Err(error("store.breaker.cooldown", "must be between 100ms and 10m"));
    }
    Ok(StoreSettings {
        dialect,
        cluster: s.cluster.clone(),
        authority: s.authority.clone(),
        key_prefix: s.key_prefix.clone(),
        timeout: s.timeout.0,
        write: s.write,
        on_outage: s.on_outage,
        retry_after_secs: s.retry_after.0.as_secs(),
        lease_ms: millis(s.lease.0),
        idle_ttl_ms: millis(idle_ttl),
        max_state_bytes: s.max_state_bytes,
        new_session_ttl_ms: millis(s.new_session_ttl.0),
        new_session_writes_per_second: s.new_session_writes_per_second,
        breaker_failures: breaker.failures,
        breaker_cooldown_ms: millis(breaker.cooldown.0),
    })
}

fn compile_dialect(s: &StoreConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<DialectSettings, ConfigError> {
    let password = match &s.auth {
        Some(auth) => Some((auth.username.as_str(), store_password(auth, env)?)),
        None => None,
    };
    match (s.dialect, &s.etcd) {
        (DialectName::Webdis, Some(_)) => Err(error("store.etcd", "is only for store.dialect \"etcd\"; remove it, or set the dialect")),
        (DialectName::Webdis, None) => Ok(DialectSettings::Webdis { authorization: password.map(|(user, password)| basic_authorization(user, &password)) }),
        (DialectName::Etcd, etcd) => {
            let bucket = etcd.clone().unwrap_or_default().lease_bucket.0;
            if bucket < Duration::from_secs(1) || bucket > Duration::from_secs(3600) {
                return Err(error("store.etcd.lease_bucket", "must be between 1s and 1h (1m suits most: keys live up to one bucket longer than their TTL)"));
            }
            let login = password.map(|(user, password)| etcd_login(user, &password)).transpose()?;
            Ok(DialectSettings::Etcd { lease_bucket_ms: millis(bucket), login })
        }
    }
}

/// The password of `store.auth`, checked.
fn store_password(auth: &AuthConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, ConfigError> {
    if !is_token(&auth.username) {
        return Err(error("store.auth.username", "must be a non-empty name without ':' or spaces"));
    }
    let password = secret_from(&auth.password, &auth.password_env, env, ("store.auth.password", "store.auth.password_env", "store.auth"))?;
    let field = if auth.password.is_some() { "store.auth.password" } else { "store.auth.password_env" };
    if password.0.is_empty() || password.0.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(error(field, "must be a non-empty password without control characters"));
    }
    Ok(password)
}

/// "Basic base64(username:password)", for HTTP basic auth.
fn basic_authorization(username: &str, password: &Secret) -> Secret {
    let mut credentials = username.as_bytes().to_vec();
    credentials.push(b':');
    credentials.extend_from_slice(&password.0);
    Secret(format!("Basic {}", STANDARD.encode(credentials)).into_bytes())
}

/// The JSON body of etcd's `/v3/auth/authenticate`.
fn etcd_login(username: &str, password: &Secret) -> Result<Secret, ConfigError> {
    #[derive(serde::Serialize)]
    struct Login<'a> {
        name: &'a str,
        password: &'a str,
    }
    let password = std::str::from_utf8(&password.0).map_err(|_| error("store.auth", "the password must be UTF-8 for etcd"))?;
    serde_json::to_vec(&Login { name: username, password }).map(Secret).map_err(|_| error("store.auth", "cannot encode the etcd login"))
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
    const ENV_SECRET: &str = "from-the-environment-0123456789abcdef";

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::parse(json.as_bytes(), &|name| match name {
            "SA_KEY" => Some(ENV_SECRET.to_string()),
            "SHORT" => Some("short-secret-value".to_string()),
            "STORE_PASSWORD" => Some("store-password-value".to_string()),
            _ => None,
        })
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
        assert_eq!(c.cookie.name, "__Host-sa");
        assert_eq!(c.cookie.attributes, "; Path=/; Secure; HttpOnly; SameSite=Lax");
        assert_eq!((c.cookie.ttl_secs, c.cookie.max_lifetime_secs), (86_400, 7 * 86_400));
        assert_eq!(c.headers.route, "x-session-route");
        assert!(c.store.is_none());
        assert_eq!(c.gone_ttl_ms, 30_000);
    }

    #[test]
    fn the_host_prefix_is_the_default_only_where_browsers_accept_it() {
        let name = |cookie: &str| parse(&format!(r#"{{"keys":[{KEY}],"cookie":{cookie}}}"#)).unwrap().cookie.name;
        assert_eq!(name(r#"{"secure":false}"#), "sa");
        assert_eq!(name(r#"{"domain":"example.com"}"#), "sa");
        assert_eq!(name(r#"{"path":"/app"}"#), "sa");
        assert_eq!(name(r#"{"name":"route"}"#), "route");
    }

    #[test]
    fn full_config_parses() {
        let c = parse(&format!(
            r#"{{"cookie":{{"name":"route","path":"/app","domain":"example.com","ttl":"7d","max_lifetime":"30d","refresh_after":0.25,"secure":true,"http_only":false,"same_site":"none"}},
                "keys":[{KEY},{{"id":"k0","secret_env":"SA_KEY"}}],
                "store":{{"cluster":"store","timeout":"250ms","write":"async","on_outage":"reject","retry_after":"2s","lease":"5s","idle_ttl":"1h",
                          "auth":{{"username":"proxy","password_env":"STORE_PASSWORD"}},"breaker":{{"failures":5,"cooldown":"2s"}}}},
                "failover":{{"gone_ttl":"1m"}},"skip":{{"prefixes":["/static/"],"suffixes":[".css"]}}}}"#
        ))
        .unwrap();
        assert_eq!(c.cookie.attributes, "; Path=/app; Domain=example.com; Secure; SameSite=None");
        let store = c.store.unwrap();
        assert_eq!((store.write, store.on_outage, store.timeout), (WriteMode::Async, OutagePolicy::Reject, Duration::from_millis(250)));
        assert_eq!((store.idle_ttl_ms, store.breaker_failures, store.breaker_cooldown_ms), (3_600_000, 5, 2000));
        let DialectSettings::Webdis { authorization: Some(authorization) } = store.dialect else { panic!("{:?}", store.dialect) };
        assert_eq!(authorization.0, format!("Basic {}", STANDARD.encode("proxy:store-password-value")).into_bytes());
        assert_eq!(format!("{:?}", c.keys), r#"["k1", "k0"]"#);
    }

    #[test]
    fn the_etcd_dialect_logs_in_with_the_store_credentials() {
        let c = parse(&format!(
            r#"{{"keys":[{KEY}],"store":{{"cluster":"etcd","dialect":"etcd","etcd":{{"lease_bucket":"30s"}},
                "auth":{{"username":"proxy","password_env":"STORE_PASSWORD"}}}}}}"#
        ))
        .unwrap();
        let DialectSettings::Etcd { lease_bucket_ms, login: Some(login) } = c.store.unwrap().dialect else { panic!("not etcd") };
        assert_eq!(lease_bucket_ms, 30_000);
        assert_eq!(login.0, br#"{"name":"proxy","password":"store-password-value"}"#.to_vec());
        let c = parse(&format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"etcd","dialect":"etcd"}}}}"#)).unwrap();
        assert!(matches!(c.store.unwrap().dialect, DialectSettings::Etcd { lease_bucket_ms: 60_000, login: None }));
        let debug = format!("{:?}", parse(&format!(
            r#"{{"keys":[{KEY}],"store":{{"cluster":"e","dialect":"etcd","auth":{{"username":"u","password_env":"STORE_PASSWORD"}}}}}}"#
        )).unwrap());
        assert!(!debug.contains("store-password-value"), "{debug}");
    }

    #[test]
    fn errors_name_the_field_and_say_what_to_fix() {
        let cases = [
            (r#"{}"#.to_string(), "missing field `keys`"),
            (r#"{"keys":[]}"#.to_string(), "keys: list at least one key"),
            (r#"{"keys":[{"id":"k1","secret":"short"}]}"#.to_string(), "keys[0].secret: must be at least 32 bytes"),
            (r#"{"keys":[{"id":"k1","secret_env":"SHORT"}]}"#.to_string(), "keys[0].secret_env: must be at least 32 bytes"),
            (format!(r#"{{"keys":[{KEY},{KEY}]}}"#), "keys[1].id: is listed twice"),
            (r#"{"keys":[{"id":"k1","secret_env":"MISSING"}]}"#.to_string(), "keys[0].secret_env: environment variable MISSING is not set"),
            (r#"{"keys":[{"id":"k1","secret_env":"c2VjcmV0LXBhc3RlZC1oZXJl+/="}]}"#.to_string(), "keys[0].secret_env: must name an environment variable"),
            (r#"{"keys":[{"id":"k1","secret_env":""}]}"#.to_string(), "keys[0].secret_env: must name an environment variable"),
            (r#"{"keys":[{"id":"k1"}]}"#.to_string(), "keys[0]: give exactly one of \"secret\" or \"secret_env\""),
            (r#"{"keys":[{"id":"bad id","secret":"0123456789abcdef0123456789abcdef"}]}"#.to_string(), "keys[0].id: must be 1 to 32"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"same_site":"sideways"}}}}"#), "cookie.same_site: unknown variant `sideways`"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"format":"plain"}}}}"#), "cookie.format: unknown variant `plain`, expected `sealed` or `signed`"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"ttl":"10 minutes"}}}}"#), "cookie.ttl: `10 minutes` is not a duration"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"ttl":"10s"}}}}"#), "cookie.ttl: must be between 1m and 400d"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"ttl":"8d"}}}}"#), "cookie.max_lifetime: must be at least cookie.ttl"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"name":"a b"}}}}"#), "cookie.name: must be a non-empty token"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"name":"__Host-x","secure":false}}}}"#), "cookie.name: a __Host- cookie needs"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"name":"__Secure-x","secure":false}}}}"#), "cookie.name: a __Secure- cookie needs"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"same_site":"none","secure":false}}}}"#), "cookie.same_site: \"none\" requires cookie.secure"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"refresh_after":0}}}}"#), "cookie.refresh_after: must be a share"),
            (format!(r#"{{"keys":[{KEY}],"cookie":{{"colour":"blue"}}}}"#), "cookie.colour: unknown field `colour`, expected one of"),
            (format!(r#"{{"keys":[{KEY}],"headers":{{"route":"x-session-id"}}}}"#), "headers.session_id: is the same as another"),
            (format!(r#"{{"keys":[{KEY}],"headers":{{"route":"X-Route"}}}}"#), "headers.route: must be a lower-case header name"),
            (format!(r#"{{"keys":[{KEY}],"headers":{{"session_end":"x_end"}}}}"#), "headers.session_end: must be a lower-case header name without '_'"),
            (format!(r#"{{"keys":[{KEY}],"headers":{{"unreached":"x-envoy-foo"}}}}"#), "headers.unreached: must not name a standard or Envoy header"),
            (format!(r#"{{"keys":[{KEY}],"store":{{}}}}"#), "store: missing field `cluster`"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","dialect":"memcached"}}}}"#), "store.dialect: unknown variant `memcached`"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","timeout":"0ms"}}}}"#), "store.timeout: must be between 1ms and 60s"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","idle_ttl":"25h"}}}}"#), "store.idle_ttl: must be between 1m and cookie.ttl"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","idle_ttl":"1m","lease":"40s"}}}}"#), "store.idle_ttl: must be at least twice store.lease"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","auth":{{"username":"a:b","password":"p"}}}}}}"#), "store.auth.username: must be a non-empty name"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","auth":{{"username":"a"}}}}}}"#), "store.auth: give exactly one of \"password\" or \"password_env\""),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","auth":{{"username":"a","password_env":"NOPE"}}}}}}"#), "store.auth.password_env: environment variable NOPE is not set"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","auth":{{"username":"a","password_env":"hunter2 pasted"}}}}}}"#), "store.auth.password_env: must name an environment variable"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","breaker":{{"failures":0}}}}}}"#), "store.breaker.failures: must be between 1 and 100"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","new_session_ttl":"31m"}}}}"#), "store.new_session_ttl: must be between 1s and store.idle_ttl"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","max_state_bytes":100}}}}"#), "store.max_state_bytes: must be between 256 and 1048576"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","etcd":{{}}}}}}"#), "store.etcd: is only for store.dialect \"etcd\""),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","dialect":"etcd","etcd":{{"lease_bucket":"2h"}}}}}}"#), "store.etcd.lease_bucket: must be between 1s and 1h"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","dialect":"etcd","etcd":{{"bucket":"1m"}}}}}}"#), "store.etcd.bucket: unknown field `bucket`, expected `lease_bucket`"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"dialect":"etcd","etcd":{{}}}}}}"#), "store: missing field `cluster`"),
            (format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"","dialect":"etcd"}}}}"#), "store.cluster: name the Envoy cluster"),
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
        let message = error_of(r#"{"keys":[{"id":"k1","secret_env":"SHORT"}]}"#);
        assert!(!message.contains("short-secret-value"), "{message}");
        // A secret pasted where a variable name belongs is not echoed either.
        let pasted = "Zm9vYmFyLXNlY3JldC1wYXN0ZWQtaW4td3JvbmctZmllbGQ=";
        for json in [
            format!(r#"{{"keys":[{{"id":"k1","secret_env":"{pasted}"}}]}}"#),
            format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","auth":{{"username":"u","password_env":"{pasted}"}}}}}}"#),
        ] {
            let message = error_of(&json);
            assert!(message.contains("must name an environment variable") && !message.contains(pasted), "{message}");
        }
        let config = parse(&format!(
            r#"{{"keys":[{{"id":"k1","secret":"{secret}"}}],"store":{{"cluster":"s","auth":{{"username":"u","password_env":"STORE_PASSWORD"}}}}}}"#
        ))
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains(secret) && !debug.contains("store-password-value") && !debug.contains("Basic"), "{debug}");
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
        let mut names: Vec<String> =
            list.trim_start_matches("one of ").replace("` or `", "`, `").split(", ").map(|n| n.trim_matches('`').to_string()).collect();
        names.sort();
        names
    }

    /// The published JSON Schema lists exactly the fields the parser accepts.
    #[test]
    fn schema_fields_match_the_parser() {
        let schema: serde_json::Value = serde_json::from_str(include_str!("../../schema/config.schema.json")).unwrap();
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
        for section in ["auth", "breaker", "etcd"] {
            let json = format!(r#"{{"keys":[{KEY}],"store":{{"cluster":"s","{section}":{{"zzz":1}}}}}}"#);
            assert_eq!(schema_fields(&props["store"]["properties"][section]), accepted_fields(&json), "store.{section}");
        }
    }
}

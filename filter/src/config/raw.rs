//! The plugin configuration exactly as the user writes it: serde structs with
//! defaults, unknown fields refused. [`super::Config::parse`] compiles and
//! validates them into the settings the filter runs with.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::cookie::Format;
use crate::keys::Secret;

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
    /// Defaults to `__Host-sa` where the `__Host-` prefix applies, else `sa`.
    pub name: Option<String>,
    pub path: String,
    pub domain: Option<String>,
    pub ttl: TypedDuration,
    /// The session's absolute lifetime: no refresh extends a cookie past it.
    pub max_lifetime: TypedDuration,
    /// Share of a cookie's life after which a response re-issues it.
    pub refresh_after: f64,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
    /// What a client can read: "sealed" (nothing about pods) or "signed".
    pub format: Format,
}

impl Default for CookieConfig {
    fn default() -> Self {
        CookieConfig {
            name: None,
            path: "/".into(),
            domain: None,
            ttl: TypedDuration(Duration::from_secs(24 * 3600)),
            max_lifetime: TypedDuration(Duration::from_secs(7 * 24 * 3600)),
            refresh_after: 0.5,
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            format: Format::Sealed,
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
    pub fn attribute(self) -> &'static str {
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
    /// The native module picks the host without it (and still strips a
    /// client's copy).
    pub route: String,
    pub session_id: String,
    pub session_new: String,
    pub session_state: String,
    pub instance_id: String,
    pub session_unknown: String,
    pub session_end: String,
    pub session_rotate: String,
    /// Set by a mesh sidecar on its own 503 when it could not reach its app.
    pub unreached: String,
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
            session_end: "x-session-end".into(),
            session_rotate: "x-session-rotate".into(),
            unreached: "x-session-unreached".into(),
        }
    }
}

impl HeaderNames {
    /// Every name with its config field, in a fixed order.
    pub fn named(&self) -> [(&'static str, &str); 9] {
        [
            ("headers.route", &self.route),
            ("headers.session_id", &self.session_id),
            ("headers.session_new", &self.session_new),
            ("headers.session_state", &self.session_state),
            ("headers.instance_id", &self.instance_id),
            ("headers.session_unknown", &self.session_unknown),
            ("headers.session_end", &self.session_end),
            ("headers.session_rotate", &self.session_rotate),
            ("headers.unreached", &self.unreached),
        ]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DialectName {
    /// Redis behind webdis, with Lua for the atomic claim and fenced write.
    Webdis,
    /// etcd v3 through its JSON gateway, with a txn per operation.
    Etcd,
}

/// Whether a response carrying new state waits for the store's acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// The response leaves only after the store acknowledged the write: nothing is lost.
    Sync,
    /// The response leaves at once; the write completes on its own, and a
    /// refusal or failure is counted when its answer arrives.
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

#[derive(Debug, Deserialize)]
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
    /// How long a session's entry lives after its last write.
    #[serde(default = "default_idle_ttl")]
    pub idle_ttl: TypedDuration,
    /// The largest state (the app's `x-session-state` value, in bytes) the
    /// filter stores; a larger one is not stored (counted, logged).
    #[serde(default = "default_max_state_bytes")]
    pub max_state_bytes: usize,
    /// How long a new session's entry lives until its cookie comes back.
    #[serde(default = "default_new_session_ttl")]
    pub new_session_ttl: TypedDuration,
    /// New sessions' first writes a worker sends per second at most; beyond
    /// it a new session's state waits for its next change.
    #[serde(default = "default_new_session_writes_per_second")]
    pub new_session_writes_per_second: u32,
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Settings only the etcd dialect has.
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
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
fn default_idle_ttl() -> TypedDuration {
    TypedDuration(Duration::from_secs(30 * 60))
}
/// Half of Envoy's default request header limit (60 KiB): a restore carries
/// the state in a request header next to the client's own.
pub const DEFAULT_MAX_STATE_BYTES: usize = 32 * 1024;
fn default_new_session_ttl() -> TypedDuration {
    TypedDuration(Duration::from_secs(60))
}
fn default_new_session_writes_per_second() -> u32 {
    500
}
fn default_max_state_bytes() -> usize {
    DEFAULT_MAX_STATE_BYTES
}

/// The etcd dialect's own settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Keys share one etcd lease per bucket of this length, the one covering
    /// their expiry: a key lives its TTL plus up to one bucket.
    pub lease_bucket: TypedDuration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig { lease_bucket: TypedDuration(Duration::from_secs(60)) }
    }
}

/// Credentials for the store: HTTP basic auth to webdis, an etcd user.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub username: String,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_env: Option<String>,
}

/// The filter's circuit breaker on the store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failed store calls that open it.
    pub failures: u32,
    /// How long it stays open before one probe may try the store again.
    pub cooldown: TypedDuration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failures: 3, cooldown: TypedDuration(Duration::from_secs(5)) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// How long a host or instance seen gone stays gone in this proxy's view,
    /// unless it answers again first.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "5", "ms", "-1s", "1.5s", "1 s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

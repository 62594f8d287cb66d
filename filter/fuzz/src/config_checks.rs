//! Properties every config parse must keep, shared by the config targets.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use session_affinity::config::raw::RawConfig;
use session_affinity::config::{Config, ConfigError, DialectSettings};

/// What `secret_env: "SA_KEY"` resolves to.
pub const ENV_SECRET: &str = "from-the-environment-0123456789abcdef";
/// What `password_env: "SA_PASSWORD"` resolves to.
pub const ENV_PASSWORD: &str = "store-password-from-the-environment";

pub fn env(name: &str) -> Option<String> {
    match name {
        "SA_KEY" => Some(ENV_SECRET.into()),
        "SA_PASSWORD" => Some(ENV_PASSWORD.into()),
        _ => None,
    }
}

/// The same variables with other values: what is shown must not follow them.
fn other_env(name: &str) -> Option<String> {
    match name {
        "SA_KEY" => Some("another-environment-value-0123456789".into()),
        "SA_PASSWORD" => Some("another-store-password".into()),
        _ => None,
    }
}

const MARK: &str = "~~~~~~~~";

/// Every secret value in a config: `keys[*].secret` and `store.auth.password`.
fn secrets(json: &mut serde_json::Value) -> Vec<&mut String> {
    let mut found = Vec::new();
    let serde_json::Value::Object(root) = json else { return found };
    for (name, value) in root.iter_mut() {
        match (name.as_str(), value) {
            ("keys", serde_json::Value::Array(keys)) => {
                for key in keys {
                    if let Some(serde_json::Value::String(s)) = key.get_mut("secret") {
                        found.push(s);
                    }
                }
            }
            ("store", store) => {
                if let Some(serde_json::Value::String(s)) = store.get_mut("auth").and_then(|a| a.get_mut("password")) {
                    found.push(s);
                }
            }
            _ => {}
        }
    }
    found
}

/// The input with every secret replaced by a run of '~' as long as it (at
/// least 8), if the input has secrets and no '~' anywhere else.
fn marked(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut json = serde_json::from_slice::<serde_json::Value>(bytes).ok()?;
    let lengths: Vec<usize> = secrets(&mut json).into_iter().map(|s| std::mem::take(s).len()).collect();
    if lengths.is_empty() || serde_json::to_string(&json).ok()?.contains('~') {
        return None;
    }
    for (secret, len) in secrets(&mut json).into_iter().zip(lengths) {
        *secret = "~".repeat(len.max(8));
    }
    serde_json::to_vec(&json).ok()
}

/// What a parse shows: the error, or the config's Debug output.
fn shown(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> String {
    match Config::parse(bytes, env) {
        Ok(config) => format!("{config:?}"),
        Err(e) => e.to_string(),
    }
}

/// No secret or password in an error message or in a config's Debug output,
/// inline (the input with its secrets swapped for '~' runs must not show such
/// a run) or from the environment (what is shown must not depend on it).
pub fn check_secrets(bytes: &[u8]) {
    let (ours, theirs) = (shown(bytes, &env), shown(bytes, &other_env));
    for value in [ENV_SECRET, ENV_PASSWORD] {
        assert!(!ours.contains(value) || theirs.contains(value), "a value from the environment is shown: {ours}");
    }
    if let Some(marked) = marked(bytes) {
        let shown = shown(&marked, &env);
        assert!(!shown.contains(MARK), "a secret is shown: {shown}");
    }
}

fn is_token(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The config's fields: each object's path (`keys[]` for the items of a
/// list) and the names it holds.
pub const FIELDS: &[(&str, &[&str])] = &[
    ("", &["cookie", "keys", "headers", "store", "failover", "skip"]),
    ("cookie", &["name", "path", "domain", "ttl", "max_lifetime", "refresh_after", "secure", "http_only", "same_site"]),
    ("keys[]", &["id", "secret", "secret_env"]),
    (
        "headers",
        &[
            "route",
            "session_id",
            "session_new",
            "session_state",
            "instance_id",
            "session_unknown",
            "session_end",
            "session_rotate",
            "unreached",
        ],
    ),
    (
        "store",
        &[
            "dialect",
            "cluster",
            "authority",
            "key_prefix",
            "timeout",
            "write",
            "on_outage",
            "retry_after",
            "lease",
            "idle_ttl",
            "auth",
            "breaker",
        ],
    ),
    ("store.auth", &["username", "password", "password_env"]),
    ("store.breaker", &["failures", "cooldown"]),
    ("failover", &["gone_ttl"]),
    ("skip", &["prefixes", "suffixes"]),
];

fn children(parent: &str) -> Option<&'static [&'static str]> {
    FIELDS.iter().find(|(path, _)| *path == parent).map(|(_, names)| *names)
}

/// Whether `path` (`keys[0].secret`, `skip.prefixes[2]`) names a config field.
fn is_field(path: &str) -> bool {
    let mut parent = String::new();
    for segment in path.split('.') {
        let (name, indexed) = match segment.split_once('[') {
            Some((name, index)) => (name, index.ends_with(']')),
            None => (segment, false),
        };
        if !children(&parent).is_some_and(|names| names.contains(&name)) {
            return false;
        }
        if !parent.is_empty() {
            parent.push('.');
        }
        parent.push_str(name);
        if indexed {
            parent.push_str("[]");
        }
    }
    true
}

/// An error names the field it is about (`ConfigError::field`). A validation
/// error names exactly a config field. A JSON error names where it stopped:
/// inside a config section, or at an unknown top-level field; only a document
/// that lacks a top-level field gets no path, and the message names the field.
fn check_error(bytes: &[u8], error: &ConfigError) {
    let is_object = serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| v.is_object());
    // An escaped key ("\u0063ookie") is named as written; only plain keys are checked.
    if !is_object || bytes.contains(&b'\\') {
        return;
    }
    if serde_json::from_slice::<RawConfig>(bytes).is_ok() {
        assert!(is_field(&error.field), "a validation error names no config field: {error}");
        return;
    }
    let message = &error.message;
    if error.field.is_empty() {
        assert!(message.contains('`'), "an error names no field: {error}");
        return;
    }
    // serde: "unknown field `<key>`, expected ..." (the key may hold anything).
    let unknown = message.strip_prefix("unknown field `").and_then(|rest| {
        let end = rest.rfind("`, expected ").or_else(|| rest.rfind("`, there are no fields"))?;
        rest.get(..end)
    });
    if unknown == Some(error.field.as_str()) {
        return; // an unknown top-level field
    }
    let section = error.field.split(['.', '[']).next().unwrap_or("");
    assert!(children("").is_some_and(|top| top.contains(&section)), "an error names no config section: {error}");
}

/// Checks a parse result: what a valid config guarantees, and that an error
/// names its field.
pub fn check(bytes: &[u8], result: &Result<Config, ConfigError>) {
    let config = match result {
        Ok(config) => config,
        Err(error) => return check_error(bytes, error),
    };
    let c = &config.cookie;
    assert!(is_token(&c.name), "cookie name {:?}", c.name);
    // Rendered into Set-Cookie: no control characters, no header splitting.
    assert!(c.attributes.bytes().all(|b| (0x20..0x7f).contains(&b)), "attributes {:?}", c.attributes);
    assert!(c.attributes.starts_with("; Path=/"), "attributes {:?}", c.attributes);
    if c.name.starts_with("__Host-") {
        assert!(c.attributes.starts_with("; Path=/;") && c.attributes.contains("; Secure") && !c.attributes.contains("Domain="), "{c:?}");
    }
    if c.name.starts_with("__Secure-") {
        assert!(c.attributes.contains("; Secure"), "{c:?}");
    }
    assert!((60..=400 * 24 * 3600).contains(&c.ttl_secs), "ttl {}", c.ttl_secs);
    assert!(c.max_lifetime_secs >= c.ttl_secs, "max_lifetime {} < ttl {}", c.max_lifetime_secs, c.ttl_secs);
    assert!(c.refresh_after > 0.0 && c.refresh_after <= 1.0, "refresh_after {}", c.refresh_after);
    assert!(config.keys.signing_id().is_some());
    assert!(config.gone_ttl_ms >= 1000);
    let named = config.headers.named();
    for (i, (field, n)) in named.iter().enumerate() {
        assert!(is_token(n) && !n.bytes().any(|b| b.is_ascii_uppercase() || b == b'_'), "{field} {n:?}");
        assert!(
            !matches!(*n, "cookie" | "set-cookie" | "host" | "authorization" | "location") && !n.starts_with("x-envoy-"),
            "{field} {n:?}"
        );
        assert!(named.iter().take(i).all(|(_, m)| m != n), "{field} {n:?} twice");
        // Every spelling a client could send is recognised as internal.
        for spelling in [n.to_string(), n.to_ascii_uppercase(), n.replace('-', "_"), n.to_ascii_uppercase().replace('-', "_")] {
            assert!(config.internal.matches(spelling.as_bytes()), "{field}: {spelling:?} not internal");
        }
    }
    for name in ["cookie", ":path", "host", "x-request-id"] {
        assert!(!config.internal.matches(name.as_bytes()), "{name} taken for internal");
    }
    if let Some(store) = &config.store {
        assert!(!store.cluster.is_empty());
        assert!(!store.authority.is_empty() && store.authority.bytes().all(|b| (0x21..0x7f).contains(&b)), "{:?}", store.authority);
        assert!(store.key_prefix.len() <= 64 && store.key_prefix.bytes().all(|b| b.is_ascii_graphic() && b != b'/'));
        assert!(store.timeout.as_millis() >= 1 && store.timeout.as_secs() <= 60);
        assert!(store.lease_ms >= 1000 && store.retry_after_secs >= 1);
        assert!(
            store.idle_ttl_ms >= 60_000 && store.idle_ttl_ms < (c.ttl_secs + 1) * 1000 && store.idle_ttl_ms >= 2 * store.lease_ms,
            "{store:?}"
        );
        assert!((1..=100).contains(&store.breaker_failures) && (100..=600_000).contains(&store.breaker_cooldown_ms), "{store:?}");
        if let DialectSettings::Webdis { authorization: Some(authorization) } = &store.dialect {
            // Sent as a header value on every store call.
            let value = &authorization.0;
            assert!(value.iter().all(|b| (0x20..0x7f).contains(b)), "authorization is not a header value");
            let credentials = value.strip_prefix(b"Basic ").and_then(|b64| STANDARD.decode(b64).ok()).expect("Basic base64(user:password)");
            let colon = credentials.iter().position(|&b| b == b':').expect("user:password");
            assert!(is_token(std::str::from_utf8(&credentials[..colon]).unwrap_or("")), "username");
            assert!(colon + 1 < credentials.len(), "an empty password");
        }
    }
    for p in &config.skip.prefixes {
        assert!(p.starts_with('/'));
    }
    for s in &config.skip.suffixes {
        assert!(!s.is_empty());
    }
    // The path matcher on a few paths.
    for path in [&b""[..], b"/", b"/static/x.css?v=1", b"?", b"/a?b?c", b"\xff\xfe"] {
        let _ = config.skips(path);
    }
}

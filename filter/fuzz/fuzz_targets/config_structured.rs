//! `Config::parse` on generated JSON: objects whose keys and string values come
//! mostly from the config's own vocabulary, so the fuzzer spends its time in the
//! validation of well-formed documents rather than in the JSON syntax.
//!
//! Properties: as config_json (see `sa_fuzz::config_checks`), plus: compact
//! and pretty JSON of one document parse alike.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use sa_fuzz::config_checks;
use serde_json::{Map, Number, Value};
use session_affinity::config::Config;

const STRINGS: &[&str] = &[
    "k1",
    "k0",
    "0123456789abcdef0123456789abcdef",
    "short",
    "SA_KEY",
    "SA_PASSWORD",
    "MISSING",
    "a-store-password",
    "user:name",
    "webdis",
    "__Host-sa",
    "__Secure-sa",
    "sa",
    "route",
    "a b",
    "/",
    "/app",
    "/static/",
    ".css",
    "",
    "example.com",
    "ex;ample",
    "1m",
    "59s",
    "60s",
    "7d",
    "400d",
    "401d",
    "0ms",
    "1ms",
    "99ms",
    "100ms",
    "10m",
    "601s",
    "30m",
    "24h",
    "25h",
    "60999ms",
    "250ms",
    "60s",
    "61s",
    "1s",
    "10s",
    "99999999999999999999d",
    "18446744073709551615ms",
    "1.5s",
    "-1s",
    "lax",
    "strict",
    "none",
    "webdis",
    "memcached",
    "sync",
    "async",
    "fresh",
    "reject",
    "x-session-route",
    "x-session-id",
    "x-session-end",
    "x-session-rotate",
    "x-session-unreached",
    "x_session_id",
    "x-envoy-retry-on",
    "authorization",
    "location",
    "X-Route",
    "cookie",
    "set-cookie",
    "host",
    ":path",
    "store",
    "session-store",
    "sa:",
    "a/b",
    "é",
    "\u{0}",
    "\r\nx: y",
    "k\u{1}",
    "0123456789012345678901234567890123456789012345678901234567890123456789",
];

fn string(u: &mut Unstructured<'_>, vocab: &[&str]) -> Result<String> {
    if u.ratio(7, 8)? {
        Ok(u.choose(vocab)?.to_string())
    } else {
        u.arbitrary()
    }
}

fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let kind: u8 = if depth == 0 { u.int_in_range(0..=5)? } else { u.int_in_range(0..=7)? };
    Ok(match kind {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::Number(Number::from(u.int_in_range(-2i64..=120)?)),
        3 => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        4 => Value::Number(Number::from(u.arbitrary::<u64>()?)),
        5 => Value::String(string(u, STRINGS)?),
        6 => {
            let n = u.int_in_range(0..=3)?;
            Value::Array((0..n).map(|_| value(u, depth - 1)).collect::<Result<_>>()?)
        }
        _ => object(u, depth - 1)?,
    })
}

/// Every field name of the config.
fn keys() -> &'static [&'static str] {
    static KEYS: OnceLock<Vec<&'static str>> = OnceLock::new();
    KEYS.get_or_init(|| config_checks::FIELDS.iter().flat_map(|(_, names)| names.iter().copied()).collect())
}

fn object(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let n = u.int_in_range(0..=6)?;
    let mut map = Map::new();
    for _ in 0..n {
        map.insert(string(u, keys())?, value(u, depth)?);
    }
    Ok(Value::Object(map))
}

fn document(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut doc = object(u, 3)?;
    // Usually a usable key list, so validation goes past `keys`.
    if u.ratio(3, 4)? {
        if let Value::Object(map) = &mut doc {
            let mut keys = vec![serde_json::json!({"id": "k1", "secret": "0123456789abcdef0123456789abcdef"})];
            if u.ratio(1, 4)? {
                keys.insert(0, serde_json::json!({"id": "k2", "secret_env": "SA_KEY"}));
            }
            if u.arbitrary()? {
                keys.push(serde_json::json!({"id": "k0", "secret_env": "SA_KEY"}));
            }
            map.entry("keys").or_insert(Value::Array(keys));
        }
    }
    Ok(doc)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(doc) = document(&mut u) else { return };
    let bytes = serde_json::to_vec(&doc).unwrap_or_default();
    if sa_fuzz::show() {
        eprintln!("document: {}", String::from_utf8_lossy(&bytes));
    }
    let result = Config::parse(&bytes, &config_checks::env);
    config_checks::check(&bytes, &result);
    config_checks::check_secrets(&bytes);
    let pretty = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    let again = Config::parse(&pretty, &config_checks::env);
    assert_eq!(result.as_ref().map(|_| ()).map_err(|e| e.to_string()), again.as_ref().map(|_| ()).map_err(|e| e.to_string()));
});

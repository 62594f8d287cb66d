//! `Config::parse` on generated JSON: objects whose keys and string values come
//! mostly from the config's own vocabulary, so the fuzzer spends its time in the
//! validation of well-formed documents rather than in the JSON syntax.
//!
//! Properties: as config_json (see `sa_fuzz::config_checks`), plus: every
//! document that parses also parses after a serde_json round trip the same way.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use sa_fuzz::config_checks;
use serde_json::{Map, Number, Value};
use session_affinity::config::Config;

const KEYS: &[&str] = &[
    "keys",
    "id",
    "secret",
    "secret_env",
    "cookie",
    "name",
    "path",
    "domain",
    "ttl",
    "refresh_after",
    "secure",
    "http_only",
    "same_site",
    "headers",
    "route",
    "session_id",
    "session_new",
    "session_state",
    "instance_id",
    "session_unknown",
    "store",
    "dialect",
    "cluster",
    "authority",
    "key_prefix",
    "timeout",
    "write",
    "on_outage",
    "retry_after",
    "lease",
    "failover",
    "gone_ttl",
    "skip",
    "prefixes",
    "suffixes",
];

const STRINGS: &[&str] = &[
    "k1",
    "k0",
    "0123456789abcdef0123456789abcdef",
    "short",
    "SA_KEY",
    "MISSING",
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
        2 => Value::Number(Number::from(u.arbitrary::<i64>()?)),
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

fn object(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let n = u.int_in_range(0..=6)?;
    let mut map = Map::new();
    for _ in 0..n {
        map.insert(string(u, KEYS)?, value(u, depth)?);
    }
    Ok(Value::Object(map))
}

fn document(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut doc = object(u, 3)?;
    // Usually a usable key list, so validation goes past `keys`.
    if u.ratio(3, 4)? {
        if let Value::Object(map) = &mut doc {
            let mut keys = vec![serde_json::json!({"id": "k1", "secret": "0123456789abcdef0123456789abcdef"})];
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
    let result = Config::parse(&bytes, &config_checks::env);
    config_checks::check(&result);
    config_checks::check_secrets(&bytes, &config_checks::env);
    let pretty = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    let again = Config::parse(&pretty, &config_checks::env);
    assert_eq!(result.as_ref().map(|_| ()).map_err(|e| e.to_string()), again.as_ref().map(|_| ()).map_err(|e| e.to_string()));
});

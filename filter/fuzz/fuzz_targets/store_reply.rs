//! The webdis dialect: reply parsing, owner splitting and request building.
//!
//! Input: byte 0 picks the HTTP status (most values mean 200), the rest is the
//! reply body. The body is also split at newlines into strings that feed
//! `split_owner` and the request builders.
//!
//! Properties: no panic; a status other than 200 is `Unavailable(status)`;
//! parsed answers say what the body says (checked against serde_json's Value,
//! both ways for canonical JSON); an owner
//! that splits is exactly `host#instance` with a valid host and instance;
//! request bodies are `EVAL/<script>/2/<key>/<lease key>/<args>` with every part
//! percent-encoded (only [A-Za-z0-9%]) and a number last.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use session_affinity::cookie;
use session_affinity::store::{split_owner, Begin, Dialect, Fenced, Session, StoreCall, StoreError, Webdis};

const STATUSES: [u32; 6] = [0, 201, 404, 500, 503, u32::MAX];

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array()?.iter().map(|x| x.as_str().map(str::to_string)).collect()
}

/// The EVAL strings of a webdis answer, as the reply struct reads it: an
/// object's "EVAL" member (other members ignored), or, serde's sequence form of
/// a struct, a one-element array.
fn eval_strings(json: &Value) -> Option<Vec<String>> {
    match json {
        Value::Object(map) => map.get("EVAL").and_then(strings),
        Value::Array(items) if items.len() == 1 => strings(&items[0]),
        _ => None,
    }
}

fn check_split(owner: &str) {
    if let Some((host, instance)) = split_owner(owner) {
        assert!(cookie::is_host(host) && cookie::is_instance(instance), "{owner:?}");
        assert_eq!(format!("{host}#{instance}"), owner);
    }
}

fn check_call(call: &StoreCall, args: usize) {
    assert_eq!((call.method, call.path.as_str()), ("POST", "/"));
    let body = std::str::from_utf8(&call.body).expect("request body is ASCII");
    let parts: Vec<&str> = body.split('/').collect();
    assert_eq!(parts.len(), 5 + args, "{body}");
    assert_eq!((parts[0], parts[2]), ("EVAL", "2"), "{body}");
    for part in &parts[1..] {
        assert!(part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'%'), "{part:?} in {body}");
    }
    let last = parts[parts.len() - 1];
    assert!(!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()), "last part {last:?} is not a number");
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let status = if pick < 200 { 200 } else { STATUSES[pick as usize % STATUSES.len()] };
    let w = Webdis::new("sa:");
    let begin = w.parse_begin(status, body);
    let fenced = w.parse_fenced(status, body);
    if status != 200 {
        assert_eq!(begin, Err(StoreError::Unavailable(status)));
        assert_eq!(fenced, Err(StoreError::Unavailable(status)));
    } else {
        let json: Option<Value> = serde_json::from_slice(body).ok();
        // Compact JSON with sorted, hence unique, keys: exactly what the parser must accept.
        let canonical = json.as_ref().is_some_and(|j| serde_json::to_vec(j).ok().as_deref() == Some(body));
        let strings = json.as_ref().and_then(eval_strings);
        let s: Option<Vec<&str>> = strings.as_ref().map(|v| v.iter().map(String::as_str).collect());
        let expected_begin = match s.as_deref() {
            Some(["acquired"]) => Some(Begin::Acquired { state: None }),
            Some(["acquired", state]) => Some(Begin::Acquired { state: Some(state.to_string()) }),
            Some(["moved", owner]) => Some(Begin::Moved { owner: owner.to_string() }),
            Some(["busy"]) => Some(Begin::Busy),
            _ => None,
        };
        let expected_fenced = match s.as_deref() {
            Some(["stored"]) => Some(Fenced::Stored),
            Some(["conflict", ""]) => Some(Fenced::Conflict { owner: None }),
            Some(["conflict", owner]) => Some(Fenced::Conflict { owner: Some(owner.to_string()) }),
            _ => None,
        };
        let shown = String::from_utf8_lossy(body);
        // What is accepted is what the body says; canonical bodies are always understood.
        if begin.is_ok() || canonical {
            assert_eq!(begin.as_ref().ok(), expected_begin.as_ref(), "{shown:?}");
        }
        if fenced.is_ok() || canonical {
            assert_eq!(fenced.as_ref().ok(), expected_fenced.as_ref(), "{shown:?}");
        }
        for e in [begin.as_ref().err(), fenced.as_ref().err()].into_iter().flatten() {
            assert!(matches!(e, StoreError::Protocol(_)), "{e:?}");
        }
        for owner in strings.iter().flatten() {
            check_split(owner);
        }
    }

    let text = String::from_utf8_lossy(body);
    check_split(&text);
    let mut parts = text.split('\n');
    let mut next = || parts.next().unwrap_or("");
    let (prefix, sid, owner, token, state) = (next(), next(), next(), next(), next());
    check_split(owner);
    let ttl_ms = u64::from(pick) * 1_000_003;
    let dialect = if pick & 1 == 0 { Webdis::new("sa:") } else { Webdis::new(prefix) };
    {
        let s = Session { sid, ttl_ms };
        check_call(&dialect.begin_failover(s, owner, token, ttl_ms), 3);
        check_call(&dialect.commit_failover(s, token, owner, Some(state)), 5);
        check_call(&dialect.commit_failover(s, token, owner, None), 5);
        check_call(&dialect.write(s, owner, state, token), 4);
        check_call(&dialect.release(s, token), 2);
    }
});

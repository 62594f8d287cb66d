//! The store's typed operations in the webdis dialect: the request each
//! renders, and the reading of any answer (status and body) to it.
//!
//! Properties:
//! - no panic;
//! - a status other than 200 is `Unavailable(status)` (504 or no answer past
//!   the timeout: `Timeout`);
//! - a reply is never Ok unless it echoes the call's nonce and session id, and
//!   one that parses but echoes another call is a `Mismatch`;
//! - an Ok reply is a variant the operation can get, and says exactly what the
//!   body says (it renders back to the same strings);
//! - every answer the store's scripts can give, in plain JSON, is understood;
//! - request bodies are `EVAL/<script>/<n>/<keys>/<args>` with every part
//!   percent-encoded, decoding back to the keys and arguments of the
//!   operation, the nonce and session id first and a number last.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{Text, INSTANCES, SIDS, UPSTREAMS};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use session_affinity::config::{millis, Config};
use session_affinity::store::{is_local_overflow, Client, Dialect, Exchange, Memory, Next, Op, Progress, Reply, Step, StoreError, Webdis};
use session_affinity::testing::webdis_reply;

const PREFIXES: &[&str] = &["sa:", "", "%x:", "a.b", "{tag}"];
const NONCES: &[&str] = &["AQEBAQEBAQEBAQEB", "n", "", "a/b.c", "ünï"];
const WORDS: &[&str] = &["acquired", "moved", "busy", "ended", "stored", "conflict", "taken", "", "10.0.0.1:80#pod-a", "state.1/x"];
const STATES: &[&str] = &["s1", "", "a/b.c d", "{\"json\":1}", "x\r\ny"];

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpSpec {
    /// Which operation (0..7: begin, commit, write, touch, release, end, rotate).
    kind: u8,
    sid: Text,
    new_sid: Text,
    /// Owners: upstream and instance picks.
    from: (Text, Text),
    to: (Text, Text),
    lease: Option<Text>,
    state: Option<Text>,
    ms: u64,
    ttl_ms: u64,
}

impl OpSpec {
    fn op(&self) -> Op {
        let owner = |(u, i): &(Text, Text)| format!("{}#{}", u.get(UPSTREAMS), i.get(INSTANCES));
        let sid = self.sid.get(SIDS).to_string();
        let lease = self.lease.as_ref().map(|l| l.get(NONCES).to_string());
        let state = self.state.as_ref().map(|s| s.get(STATES).to_string());
        let (from, to) = (owner(&self.from), owner(&self.to));
        let (ms, ttl_ms) = (self.ms, self.ttl_ms);
        match self.kind % 7 {
            0 => Op::Begin { sid, from, lease: lease.unwrap_or_default(), lease_ms: ms },
            1 => Op::Commit { sid, lease: lease.unwrap_or_default(), to, state, ttl_ms },
            2 => Op::Write { sid, from, to, state, ttl_ms },
            3 => Op::Touch { sid, owner: from, ttl_ms },
            4 => Op::Release { sid, lease: lease.unwrap_or_default() },
            5 => Op::End { sid, owner: from, lease, tombstone_ms: ms },
            _ => Op::Rotate { sid, new_sid: self.new_sid.get(SIDS).to_string(), from, lease, to, state, ttl_ms, tombstone_ms: ms },
        }
    }
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Echo {
    Right,
    Wrong(Text),
    Missing,
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Body {
    /// `{"EVAL": [nonce, sid, parts...]}` with each echo right or wrong.
    Answer {
        nonce: Echo,
        sid: Echo,
        parts: Vec<Text>,
    },
    /// A Redis error (`[false, "ERR ..."]`) or other JSON.
    Json(String),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    op: OpSpec,
    prefix: Text,
    nonce: Text,
    /// None: the call failed (no answer).
    status: Option<u16>,
    /// How long the call took, ms.
    elapsed_ms: u16,
    body: Body,
}

fn body_bytes(body: &Body, nonce: &str, sid: &str) -> Vec<u8> {
    match body {
        Body::Answer { nonce: n, sid: s, parts } => {
            let mut strings = Vec::new();
            for (echo, right) in [(n, nonce), (s, sid)] {
                match echo {
                    Echo::Right => strings.push(right.to_string()),
                    Echo::Wrong(other) => strings.push(other.get(NONCES).to_string()),
                    Echo::Missing => {}
                }
            }
            strings.extend(parts.iter().take(4).map(|p| p.get(WORDS).to_string()));
            serde_json::to_vec(&serde_json::json!({ "EVAL": strings })).unwrap()
        }
        Body::Json(text) => text.as_bytes().to_vec(),
        Body::Raw(bytes) => bytes.clone(),
    }
}

/// The EVAL strings of a webdis answer as a struct reads it: an object's
/// "EVAL" member, or (serde's sequence form of a struct) a one-element array.
fn eval_strings(json: &Value) -> Option<Vec<String>> {
    let strings = |v: &Value| -> Option<Vec<String>> { v.as_array()?.iter().map(|x| x.as_str().map(str::to_string)).collect() };
    match json {
        Value::Object(map) => map.get("EVAL").and_then(strings),
        Value::Array(items) if items.len() == 1 => strings(&items[0]),
        _ => None,
    }
}

/// What the operation can be answered, as its script documents it. Touch and
/// Release are fenced too (on the owner, on the lease), so a conflict is a
/// possible answer even though their scripts stay silent about it.
fn may_get(op: &Op, reply: &Reply) -> bool {
    let begin = matches!(op, Op::Begin { .. });
    match reply {
        Reply::Acquired { .. } | Reply::Moved { .. } | Reply::Busy => begin,
        Reply::Ended => begin || matches!(op, Op::Write { .. }),
        Reply::Stored | Reply::Conflict { .. } => !begin,
        Reply::Taken => matches!(op, Op::Rotate { .. }),
    }
}

/// Answers the operation's script can give, as the strings after the echo.
fn script_answers(op: &Op) -> Vec<Vec<&'static str>> {
    let conflict = vec![vec!["conflict", ""], vec!["conflict", "10.0.0.2:80#pod-b"], vec!["stored"]];
    match op {
        Op::Begin { .. } => {
            vec![vec!["acquired"], vec!["acquired", "st a/te"], vec!["moved", "10.0.0.2:80#pod-b"], vec!["busy"], vec!["ended"]]
        }
        Op::Commit { .. } | Op::End { .. } => conflict,
        Op::Write { .. } => [conflict, vec![vec!["ended"]]].concat(),
        Op::Touch { .. } | Op::Release { .. } => vec![vec!["stored"]],
        Op::Rotate { .. } => [conflict, vec![vec!["taken"]]].concat(),
    }
}

fn percent_decode(part: &str) -> String {
    let bytes = part.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("decodes to UTF-8")
}

/// The keys and arguments a script gets for `op` (ARGV as webdis.rs documents them).
fn script_inputs(op: &Op, prefix: &str, nonce: &str) -> (Vec<String>, Vec<String>) {
    let keys = |sid: &str| vec![format!("{prefix}{sid}"), format!("{prefix}{sid}:lease")];
    let flag = |s: &Option<String>| if s.is_some() { "1".to_string() } else { "0".to_string() };
    let text = |s: &Option<String>| s.clone().unwrap_or_default();
    let args = |rest: Vec<String>| [vec![nonce.to_string(), op.sid().to_string()], rest].concat();
    match op {
        Op::Begin { sid, from, lease, lease_ms } => (keys(sid), args(vec![from.clone(), lease.clone(), lease_ms.to_string()])),
        Op::Commit { sid, lease, to, state, ttl_ms } => {
            (keys(sid), args(vec![lease.clone(), to.clone(), flag(state), text(state), ttl_ms.to_string()]))
        }
        Op::Write { sid, from, to, state, ttl_ms } => {
            (keys(sid), args(vec![from.clone(), to.clone(), flag(state), text(state), ttl_ms.to_string()]))
        }
        Op::Touch { sid, owner, ttl_ms } => (keys(sid), args(vec![owner.clone(), ttl_ms.to_string()])),
        Op::Release { sid, lease } => (keys(sid), args(vec![lease.clone(), "0".into()])),
        Op::End { sid, owner, lease, tombstone_ms } => (keys(sid), args(vec![owner.clone(), text(lease), tombstone_ms.to_string()])),
        Op::Rotate { sid, new_sid, from, lease, to, state, ttl_ms, tombstone_ms } => (
            [keys(sid), keys(new_sid)].concat(),
            args(vec![from.clone(), text(lease), to.clone(), flag(state), text(state), ttl_ms.to_string(), tombstone_ms.to_string()]),
        ),
    }
}

/// The one call webdis makes for `op`.
fn exchange<'a>(op: &'a Op, nonce: &'a str) -> Exchange<'a> {
    Exchange { op, step: &Step::Op, nonce, now_ms: 0 }
}

/// What webdis makes of an answer to `op`'s call.
fn webdis_answer(dialect: &Webdis<'_>, op: &Op, nonce: &str, status: u32, body: &[u8]) -> Result<Reply, StoreError> {
    match dialect.reply(exchange(op, nonce), status, body, &mut Memory::default())? {
        Next::Done(reply) => Ok(reply),
        Next::Call(step) => panic!("webdis asked for another call ({step:?})"),
    }
}

fn check_request(dialect: &Webdis<'_>, op: &Op, prefix: &str, nonce: &str) {
    assert_eq!(dialect.first_step(op, &Memory::default(), 0), Step::Op);
    let request = dialect.request(exchange(op, nonce), &Memory::default());
    assert_eq!(request.path.as_str(), "/");
    let body = std::str::from_utf8(&request.body).expect("an ASCII body");
    let parts: Vec<&str> = body.split('/').collect();
    assert_eq!(parts[0], "EVAL", "{body}");
    for part in &parts[1..] {
        assert!(part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'%'), "{part:?} in {body}");
    }
    let (keys, args) = script_inputs(op, prefix, nonce);
    assert_eq!(parts[2], keys.len().to_string(), "{body}");
    let decoded: Vec<String> = parts[3..].iter().map(|p| percent_decode(p)).collect();
    assert_eq!(decoded, [keys, args].concat(), "{body}");
    let last = parts[parts.len() - 1];
    assert!(
        !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()),
        "last part {last:?} is not a number: webdis would read a suffix as a format"
    );
}

/// A client with a store cluster and basic auth, for `Client::reply`.
fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let json = r#"{"keys":[{"id":"k1","secret":"0123456789abcdef0123456789abcdef"}],
            "store":{"cluster":"store","timeout":"250ms","auth":{"username":"filter","password":"pw"}}}"#;
        Config::parse(json.as_bytes(), &|_| None).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = sa_fuzz::read::<Input>(data) else { return };
    let op = input.op.op();
    let (prefix, nonce) = (input.prefix.get(PREFIXES), input.nonce.get(NONCES));
    let dialect = Webdis::new(prefix, None);
    check_request(&dialect, &op, prefix, nonce);

    let body = body_bytes(&input.body, nonce, op.sid());
    let status = input.status.map(u32::from);
    match status {
        Some(status) if status != 200 => assert_eq!(webdis_answer(&dialect, &op, nonce, status, &body), Err(StoreError::Unavailable(status))),
        _ => {}
    }
    let result = webdis_answer(&dialect, &op, nonce, 200, &body);
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let strings = json.as_ref().and_then(eval_strings);
    let echoes = strings.as_ref().is_some_and(|s| s.len() >= 2 && s[0] == nonce && s[1] == op.sid());
    match &result {
        Ok(reply) => {
            assert!(
                echoes,
                "a reply that does not echo the call ({nonce:?}, {:?}) was used: {:?}",
                op.sid(),
                String::from_utf8_lossy(&body)
            );
            assert!(may_get(&op, reply), "a {} got {reply:?}", op.name());
            let rendered: Value = serde_json::from_slice(&webdis_reply(nonce, op.sid(), reply)).unwrap();
            assert_eq!(eval_strings(&rendered), strings, "{reply:?} is not what the body says");
        }
        Err(StoreError::Mismatch(_)) => assert!(strings.is_some() && !echoes, "a false mismatch: {:?}", String::from_utf8_lossy(&body)),
        Err(StoreError::Protocol(_)) => {
            assert!(strings.is_none() || echoes, "an answer to another call is a mismatch, not a protocol error")
        }
        Err(e) => panic!("status 200 read as {e:?}"),
    }
    // Every answer the script can give is understood.
    for answer in script_answers(&op) {
        let mut strings = vec![nonce, op.sid()];
        strings.extend(answer);
        let body = serde_json::to_vec(&serde_json::json!({ "EVAL": strings })).unwrap();
        let reply =
            webdis_answer(&dialect, &op, nonce, 200, &body).unwrap_or_else(|e| panic!("a {} did not understand {strings:?}: {e:?}", op.name()));
        assert_eq!(webdis_reply(nonce, op.sid(), &reply), body);
    }

    // The client around the dialect: timeouts, and the headers of every call.
    let store = config().store.as_ref().unwrap();
    let client = Client::new(store);
    let call = client.call(op.clone(), nonce.to_string(), &Memory::default(), 0);
    assert!(call.headers.iter().any(|(name, value)| *name == "authorization" && value.starts_with("Basic ")));
    assert!(call.headers.iter().all(|(_, value)| value.bytes().all(|b| (0x20..0x7f).contains(&b))), "{:?}", call.headers);
    let elapsed = u64::from(input.elapsed_ms);
    let answered = client.reply(&call, status, &body, elapsed, &mut Memory::default(), elapsed);
    let expected = match status {
        Some(504) => Err(StoreError::Timeout),
        Some(503) if is_local_overflow(&body) => Err(StoreError::Busy),
        None if elapsed >= millis(store.timeout) => Err(StoreError::Timeout),
        None => Err(StoreError::Unavailable(0)),
        Some(status) => webdis_answer(&Webdis::new(&store.key_prefix, None), &op, nonce, status, &body),
    }
    .map(Progress::Done);
    assert_eq!(answered, expected);
});

//! Redis through webdis: each operation is one `EVAL` of a small Lua script,
//! so each is atomic in Redis.
//!
//! Keys: `<prefix><sid>` is a hash {owner, state} (or {ended} for a
//! tombstone); `<prefix><sid>:lease` holds the failover lease token with a TTL.
//! Every script takes the call's nonce and session id as its first two
//! arguments and answers `[nonce, sid, tag, ...]`.

use std::fmt::Write;

use super::{Dialect, Exchange, Memory, Next, Op, Reply, Request, Step, StoreError};
use crate::keys::Secret;

/// The reply helper every script starts with.
const PRELUDE: &str = "local function answer(...) return {ARGV[1], ARGV[2], ...} end\n";

/// ARGV: nonce, sid, from owner, lease token, lease ms.
const BEGIN: &str = "\
if redis.call('HEXISTS', KEYS[1], 'ended') == 1 then return answer('ended') end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[3] then return answer('moved', owner) end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[4] then return answer('busy') end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
local state = redis.call('HGET', KEYS[1], 'state')
if state then return answer('acquired', state) end
return answer('acquired')";

/// ARGV: nonce, sid, lease token, to owner, has state, state, ttl ms.
const COMMIT: &str = "\
if redis.call('GET', KEYS[2]) ~= ARGV[3] or redis.call('HEXISTS', KEYS[1], 'ended') == 1 then
  return answer('conflict', redis.call('HGET', KEYS[1], 'owner') or '')
end
redis.call('HSET', KEYS[1], 'owner', ARGV[4])
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'state', ARGV[6]) end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('DEL', KEYS[2])
return answer('stored')";

/// ARGV: nonce, sid, from owner, to owner, has state, state, ttl ms.
const WRITE: &str = "\
if redis.call('HEXISTS', KEYS[1], 'ended') == 1 then return answer('ended') end
local owner = redis.call('HGET', KEYS[1], 'owner')
if redis.call('EXISTS', KEYS[2]) == 1 or (owner and owner ~= ARGV[3] and owner ~= ARGV[4]) then
  return answer('conflict', owner or '')
end
redis.call('HSET', KEYS[1], 'owner', ARGV[4])
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'state', ARGV[6]) else redis.call('HDEL', KEYS[1], 'state') end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return answer('stored')";

/// ARGV: nonce, sid, owner, ttl ms.
const TOUCH: &str = "\
if redis.call('HGET', KEYS[1], 'owner') == ARGV[3] then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return answer('stored')";

/// ARGV: nonce, sid, lease token, 0.
const RELEASE: &str = "\
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return answer('stored')";

/// Fenced on the owner (or our lease) only: a lease another proxy holds does
/// not stop an end; the tombstone makes that failover's commit fail instead.
/// ARGV: nonce, sid, owner, lease token or '', tombstone ms.
const END: &str = "\
local owner = redis.call('HGET', KEYS[1], 'owner')
local ours = ARGV[4] ~= '' and redis.call('GET', KEYS[2]) == ARGV[4]
if owner and owner ~= ARGV[3] and not ours then return answer('conflict', owner) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'ended', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return answer('stored')";

/// Fenced on the owner with no failover under way, or on our lease.
/// KEYS: old entry, old lease, new entry, new lease.
/// ARGV: nonce, sid, from owner, lease token or '', to owner, has state, state, ttl ms, tombstone ms.
const ROTATE: &str = "\
if redis.call('HEXISTS', KEYS[1], 'ended') == 1 then return answer('conflict', '') end
local owner = redis.call('HGET', KEYS[1], 'owner')
local holder = redis.call('GET', KEYS[2])
local ours = ARGV[4] ~= '' and holder == ARGV[4]
if not ours and (holder or (owner and owner ~= ARGV[3])) then return answer('conflict', owner or '') end
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then return answer('taken') end
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[6] == '1' then state = ARGV[7] end
redis.call('HSET', KEYS[3], 'owner', ARGV[5])
if state then redis.call('HSET', KEYS[3], 'state', state) end
redis.call('PEXPIRE', KEYS[3], ARGV[8])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'ended', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[9])
return answer('stored')";

pub struct Webdis<'a> {
    prefix: &'a str,
    /// The basic-auth header value, if webdis wants one.
    authorization: Option<&'a Secret>,
}

impl<'a> Webdis<'a> {
    pub fn new(prefix: &'a str, authorization: Option<&'a Secret>) -> Webdis<'a> {
        Webdis { prefix, authorization }
    }

    fn key(&self, sid: &str) -> String {
        format!("{}{}", self.prefix, sid)
    }
}

/// `EVAL/<script>/<n>/<keys...>/<args...>`, every part percent-encoded. The
/// last argument is always a number: webdis reads a `.ext` suffix on the last
/// part as an output format, and numbers have no dot.
fn eval(script: &str, keys: &[&str], args: &[&str]) -> Vec<u8> {
    let mut body = String::with_capacity(1024);
    body.push_str("EVAL/");
    push_encoded(&mut body, PRELUDE);
    push_encoded(&mut body, script);
    let _ = write!(body, "/{}", keys.len());
    for part in keys.iter().chain(args) {
        body.push('/');
        push_encoded(&mut body, part);
    }
    body.into_bytes()
}

/// Percent-encodes everything but ASCII letters and digits.
fn push_encoded(out: &mut String, text: &str) {
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// "1" and the state, or "0" and nothing.
fn optional(state: &Option<String>) -> (&'static str, &str) {
    match state {
        Some(state) => ("1", state),
        None => ("0", ""),
    }
}

impl Dialect for Webdis<'_> {
    fn first_step(&self, _: &Op, _: &Memory, _: u64) -> Step {
        Step::Op
    }

    fn request(&self, call: Exchange<'_>, _: &Memory) -> Request {
        let authorization = self.authorization.map(|a| String::from_utf8_lossy(&a.0).into_owned());
        Request { path: "/".into(), content_type: "text/plain", authorization, body: self.eval(call.op, call.nonce) }
    }

    fn reply(&self, call: Exchange<'_>, status: u32, body: &[u8], _: &mut Memory) -> Result<Next, StoreError> {
        self.parse(call.op, call.nonce, status, body).map(Next::Done)
    }

    /// One Redis: a call that failed would fail again.
    fn retries(&self, _: &StoreError) -> bool {
        false
    }
}

impl Webdis<'_> {
    /// The `EVAL` body of `op`.
    fn eval(&self, op: &Op, nonce: &str) -> Vec<u8> {
        let key = self.key(op.sid());
        let lease_key = format!("{key}:lease");
        let keys = [key.as_str(), lease_key.as_str()];
        match op {
            Op::Begin { sid, from, lease, lease_ms } => eval(BEGIN, &keys, &[nonce, sid, from, lease, &lease_ms.to_string()]),
            Op::Commit { sid, lease, to, state, ttl_ms } => {
                let (has, state) = optional(state);
                eval(COMMIT, &keys, &[nonce, sid, lease, to, has, state, &ttl_ms.to_string()])
            }
            Op::Write { sid, from, to, state, ttl_ms } => {
                let (has, state) = optional(state);
                eval(WRITE, &keys, &[nonce, sid, from, to, has, state, &ttl_ms.to_string()])
            }
            Op::Touch { sid, owner, ttl_ms } => eval(TOUCH, &keys, &[nonce, sid, owner, &ttl_ms.to_string()]),
            Op::Release { sid, lease } => eval(RELEASE, &keys, &[nonce, sid, lease, "0"]),
            Op::End { sid, owner, lease, tombstone_ms } => {
                let lease = lease.as_deref().unwrap_or("");
                eval(END, &keys, &[nonce, sid, owner, lease, &tombstone_ms.to_string()])
            }
            Op::Rotate { sid, new_sid, from, lease, to, state, ttl_ms, tombstone_ms } => {
                let new_key = self.key(new_sid);
                let new_lease_key = format!("{new_key}:lease");
                let (has, state) = optional(state);
                let lease = lease.as_deref().unwrap_or("");
                let args = [nonce, sid, from, lease, to, has, state, &ttl_ms.to_string(), &tombstone_ms.to_string()];
                eval(ROTATE, &[&key, &lease_key, &new_key, &new_lease_key], &args)
            }
        }
    }

    fn parse(&self, op: &Op, nonce: &str, status: u32, body: &[u8]) -> Result<Reply, StoreError> {
        let reply = eval_reply(status, body)?;
        let (echo, rest) = reply.split_at(reply.len().min(2));
        if echo != [nonce, op.sid()] {
            return Err(StoreError::Mismatch(format!("a {} call got an answer for {echo:?}", op.name())));
        }
        let parsed = match (op, rest) {
            (Op::Begin { .. }, [tag]) if tag == "acquired" => Some(Reply::Acquired { state: None }),
            (Op::Begin { .. }, [tag, state]) if tag == "acquired" => Some(Reply::Acquired { state: Some(state.clone()) }),
            (Op::Begin { .. }, [tag, owner]) if tag == "moved" => Some(Reply::Moved { owner: owner.clone() }),
            (Op::Begin { .. }, [tag]) if tag == "busy" => Some(Reply::Busy),
            (Op::Begin { .. } | Op::Write { .. }, [tag]) if tag == "ended" => Some(Reply::Ended),
            (Op::Rotate { .. }, [tag]) if tag == "taken" => Some(Reply::Taken),
            (Op::Begin { .. }, _) => None,
            (_, [tag]) if tag == "stored" => Some(Reply::Stored),
            (_, [tag, owner]) if tag == "conflict" => Some(Reply::Conflict { owner: Some(owner.clone()).filter(|o| !o.is_empty()) }),
            _ => None,
        };
        parsed.ok_or_else(|| StoreError::Protocol(format!("unexpected {} reply {rest:?}", op.name())))
    }
}

/// webdis answers `{"EVAL": [..strings..]}`; a Redis error comes as
/// `{"EVAL": [false, "<error>"]}`, which is not a list of strings.
#[derive(serde::Deserialize)]
struct EvalReply {
    #[serde(rename = "EVAL")]
    eval: Vec<String>,
}

fn eval_reply(status: u32, body: &[u8]) -> Result<Vec<String>, StoreError> {
    if status != 200 {
        return Err(StoreError::Unavailable(status));
    }
    serde_json::from_slice::<EvalReply>(body).map(|r| r.eval).map_err(|_| {
        let start = body.get(..body.len().min(200)).unwrap_or_default();
        StoreError::Protocol(format!("unexpected reply {:?}", String::from_utf8_lossy(start)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "AAAAAAAAAAAAAAAAAAAAAA";

    fn write() -> Op {
        Op::Write { sid: SID.into(), from: "10.0.0.1:80#a".into(), to: "10.0.0.1:80#a".into(), state: Some("st/a.te".into()), ttl_ms: 60_000 }
    }

    fn answer(parts: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "EVAL": parts })).unwrap()
    }

    #[test]
    fn eval_bodies_are_percent_encoded_and_end_in_a_number() {
        let call = Exchange { op: &write(), step: &Step::Op, nonce: "n0nce", now_ms: 0 };
        let request = Webdis::new("sa:", None).request(call, &Memory::default());
        let body = String::from_utf8(request.body).unwrap();
        assert!(body.starts_with("EVAL/local%20function%20answer"), "{body}");
        let tail = "/2/sa%3AAAAAAAAAAAAAAAAAAAAAAA/sa%3AAAAAAAAAAAAAAAAAAAAAAA%3Alease/n0nce/AAAAAAAAAAAAAAAAAAAAAA\
            /10%2E0%2E0%2E1%3A80%23a/10%2E0%2E0%2E1%3A80%23a/1/st%2Fa%2Ete/60000";
        assert!(body.ends_with(tail), "{body}");
        assert_eq!((request.path.as_str(), request.authorization), ("/", None));
    }

    #[test]
    fn rotate_names_both_keys() {
        let op = Op::Rotate {
            sid: SID.into(),
            new_sid: "BBBBBBBBBBBBBBBBBBBBBB".into(),
            from: "h#i".into(),
            lease: None,
            to: "h#i".into(),
            state: None,
            ttl_ms: 5,
            tombstone_ms: 7,
        };
        let body = String::from_utf8(Webdis::new("sa:", None).eval(&op, "n")).unwrap();
        assert!(body.contains("/4/sa%3AAAAA"), "{body}");
        assert!(body.contains("sa%3ABBBBBBBBBBBBBBBBBBBBBB%3Alease/n/"), "{body}");
        assert!(body.ends_with("/0//5/7"), "{body}");
    }

    #[test]
    fn replies_are_read_only_when_they_echo_the_call() {
        let w = Webdis::new("sa:", None);
        let begin = Op::Begin { sid: SID.into(), from: "h#i".into(), lease: "L".into(), lease_ms: 1000 };
        let cases: [(&[&str], Result<Reply, ()>); 6] = [
            (&["n", SID, "acquired"], Ok(Reply::Acquired { state: None })),
            (&["n", SID, "acquired", "s1"], Ok(Reply::Acquired { state: Some("s1".into()) })),
            (&["n", SID, "moved", "h#j"], Ok(Reply::Moved { owner: "h#j".into() })),
            (&["n", SID, "busy"], Ok(Reply::Busy)),
            (&["n", SID, "ended"], Ok(Reply::Ended)),
            (&["n", SID, "stored"], Err(())),
        ];
        for (parts, expected) in cases {
            let got = w.parse(&begin, "n", 200, &answer(parts));
            assert_eq!(got.as_ref().map_err(|_| ()), expected.as_ref().map_err(|_| ()), "{parts:?}");
        }
        let mismatched = [&["other", SID, "acquired", "someone-elses-state"][..], &["n", "BBBBBBBBBBBBBBBBBBBBBB", "acquired", "x"], &["n"], &[]];
        for parts in mismatched {
            assert!(matches!(w.parse(&begin, "n", 200, &answer(parts)), Err(StoreError::Mismatch(_))), "{parts:?}");
        }
        assert_eq!(w.parse(&begin, "n", 503, b""), Err(StoreError::Unavailable(503)));
        assert!(matches!(w.parse(&begin, "n", 200, br#"{"EVAL":[false,"ERR x"]}"#), Err(StoreError::Protocol(_))));
        assert!(matches!(w.parse(&begin, "n", 200, b"<html>"), Err(StoreError::Protocol(_))));
    }

    #[test]
    fn fenced_replies() {
        let w = Webdis::new("sa:", None);
        let op = write();
        assert_eq!(w.parse(&op, "n", 200, &answer(&["n", SID, "stored"])), Ok(Reply::Stored));
        assert_eq!(w.parse(&op, "n", 200, &answer(&["n", SID, "conflict", "h#i"])), Ok(Reply::Conflict { owner: Some("h#i".into()) }));
        assert_eq!(w.parse(&op, "n", 200, &answer(&["n", SID, "conflict", ""])), Ok(Reply::Conflict { owner: None }));
        assert_eq!(w.parse(&op, "n", 200, &answer(&["n", SID, "ended"])), Ok(Reply::Ended));
        assert!(w.parse(&op, "n", 200, &answer(&["n", SID, "taken"])).is_err());
    }
}

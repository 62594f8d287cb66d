//! The session store, reached over HTTP through an Envoy cluster.
//!
//! Three operations, each atomic in the store:
//! - `begin_failover`: read a session's state and take a short lease on it,
//!   fenced on the owner the cookie names. If another proxy already moved the
//!   session, the reply names the new owner instead.
//! - `commit_failover`: with the lease, record the new owner (and new state).
//! - `write`: store new state, fenced: only the owner (or the proxy moving the
//!   session from the owner it knows) may write.
//!
//! A dialect turns these into HTTP requests and parses the replies. The
//! reference dialect is Redis behind webdis, with Lua for atomicity.

use std::fmt::Write;

/// An HTTP request to the store cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCall {
    pub method: &'static str,
    pub path: String,
    pub body: Vec<u8>,
}

/// The answer to `begin_failover`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The lease is ours. `state` is the last stored state, if any.
    Acquired { state: Option<String> },
    /// Another proxy already moved the session to `owner` ("host#instance").
    Moved { owner: String },
    /// Another proxy holds the lease right now.
    Busy,
}

/// The answer to `commit_failover` and `write`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fenced {
    Stored,
    /// Refused: the session belongs to `owner` (if known), or is being moved.
    Conflict { owner: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// No answer, or an HTTP status other than 200.
    Unavailable(u32),
    /// An answer the dialect could not understand (names what was wrong).
    Protocol(String),
}

/// Arguments shared by the operations.
#[derive(Debug, Clone, Copy)]
pub struct Session<'a> {
    pub sid: &'a str,
    pub ttl_ms: u64,
}

pub trait Dialect {
    fn begin_failover(&self, s: Session<'_>, from_owner: &str, token: &str, lease_ms: u64) -> StoreCall;
    fn commit_failover(&self, s: Session<'_>, token: &str, to_owner: &str, state: Option<&str>) -> StoreCall;
    fn write(&self, s: Session<'_>, from_owner: &str, to_owner: &str, state: &str) -> StoreCall;
    /// Drops the failover lease `token`, if it is still held (no reply needed).
    fn release(&self, s: Session<'_>, token: &str) -> StoreCall;
    fn parse_begin(&self, status: u32, body: &[u8]) -> Result<Begin, StoreError>;
    fn parse_fenced(&self, status: u32, body: &[u8]) -> Result<Fenced, StoreError>;
}

/// Redis through webdis: each operation is one `EVAL` of a small Lua script.
///
/// Keys: `<prefix><sid>` is a hash {owner, state}; `<prefix><sid>:lease`
/// holds the failover lease token with a TTL.
pub struct Webdis<'a> {
    prefix: &'a str,
}

const BEGIN_LUA: &str = "\
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return {'moved', owner} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return {'busy'} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
if state then return {'acquired', state} end
return {'acquired'}";

const COMMIT_LUA: &str = "\
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return {'conflict', redis.call('HGET', KEYS[1], 'owner') or ''}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'state', ARGV[4]) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('DEL', KEYS[2])
return {'stored'}";

const RELEASE_LUA: &str = "\
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return {'stored'}";

const WRITE_LUA: &str = "\
local owner = redis.call('HGET', KEYS[1], 'owner')
if redis.call('EXISTS', KEYS[2]) == 1 or (owner and owner ~= ARGV[1] and owner ~= ARGV[2]) then
  return {'conflict', owner or ''}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'state', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'stored'}";

impl<'a> Webdis<'a> {
    pub fn new(prefix: &'a str) -> Webdis<'a> {
        Webdis { prefix }
    }

    /// `EVAL/<script>/2/<key>/<lease key>/<args...>`, every part percent-encoded.
    /// The last argument is always a number: webdis reads a `.ext` suffix on
    /// the last part as an output format, and numbers have no dot.
    fn eval(&self, script: &str, sid: &str, args: &[&str]) -> StoreCall {
        let key = format!("{}{}", self.prefix, sid);
        let lease = format!("{key}:lease");
        let mut body = String::with_capacity(script.len() * 2 + 128);
        body.push_str("EVAL/");
        push_encoded(&mut body, script);
        body.push_str("/2/");
        push_encoded(&mut body, &key);
        body.push('/');
        push_encoded(&mut body, &lease);
        for arg in args {
            body.push('/');
            push_encoded(&mut body, arg);
        }
        StoreCall { method: "POST", path: "/".into(), body: body.into_bytes() }
    }
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

impl Dialect for Webdis<'_> {
    fn begin_failover(&self, s: Session<'_>, from_owner: &str, token: &str, lease_ms: u64) -> StoreCall {
        self.eval(BEGIN_LUA, s.sid, &[from_owner, token, &lease_ms.to_string()])
    }

    fn commit_failover(&self, s: Session<'_>, token: &str, to_owner: &str, state: Option<&str>) -> StoreCall {
        let (has_state, state) = match state {
            Some(state) => ("1", state),
            None => ("0", ""),
        };
        self.eval(COMMIT_LUA, s.sid, &[token, to_owner, has_state, state, &s.ttl_ms.to_string()])
    }

    fn write(&self, s: Session<'_>, from_owner: &str, to_owner: &str, state: &str) -> StoreCall {
        self.eval(WRITE_LUA, s.sid, &[from_owner, to_owner, state, &s.ttl_ms.to_string()])
    }

    fn release(&self, s: Session<'_>, token: &str) -> StoreCall {
        self.eval(RELEASE_LUA, s.sid, &[token, "0"])
    }

    fn parse_begin(&self, status: u32, body: &[u8]) -> Result<Begin, StoreError> {
        let reply = eval_reply(status, body)?;
        match reply.as_slice() {
            [tag] if tag == "acquired" => Ok(Begin::Acquired { state: None }),
            [tag, state] if tag == "acquired" => Ok(Begin::Acquired { state: Some(state.clone()) }),
            [tag, owner] if tag == "moved" => Ok(Begin::Moved { owner: owner.clone() }),
            [tag] if tag == "busy" => Ok(Begin::Busy),
            _ => Err(StoreError::Protocol(format!("unexpected begin reply {reply:?}"))),
        }
    }

    fn parse_fenced(&self, status: u32, body: &[u8]) -> Result<Fenced, StoreError> {
        let reply = eval_reply(status, body)?;
        match reply.as_slice() {
            [tag] if tag == "stored" => Ok(Fenced::Stored),
            [tag, owner] if tag == "conflict" => {
                Ok(Fenced::Conflict { owner: Some(owner.clone()).filter(|o| !o.is_empty()) })
            }
            _ => Err(StoreError::Protocol(format!("unexpected write reply {reply:?}"))),
        }
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

/// Splits a store owner "host#instance" into its parts.
pub fn split_owner(owner: &str) -> Option<(&str, &str)> {
    let (host, instance) = owner.rsplit_once('#')?;
    (crate::cookie::is_host(host) && crate::cookie::is_instance(instance)).then_some((host, instance))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Session<'static> = Session { sid: "AAAAAAAAAAAAAAAAAAAAAA", ttl_ms: 60_000 };

    #[test]
    fn eval_bodies_are_percent_encoded_and_end_in_a_number() {
        let call = Webdis::new("sa:").write(S, "10.0.0.1:80#a", "10.0.0.1:80#a", "st/a.te");
        let body = String::from_utf8(call.body).unwrap();
        assert!(body.starts_with("EVAL/local%20owner"), "{body}");
        assert!(body.ends_with("/2/sa%3AAAAAAAAAAAAAAAAAAAAAAA/sa%3AAAAAAAAAAAAAAAAAAAAAAA%3Alease/10%2E0%2E0%2E1%3A80%23a/10%2E0%2E0%2E1%3A80%23a/st%2Fa%2Ete/60000"), "{body}");
        assert_eq!((call.method, call.path.as_str()), ("POST", "/"));
    }

    #[test]
    fn begin_replies() {
        let w = Webdis::new("sa:");
        assert_eq!(w.parse_begin(200, br#"{"EVAL":["acquired"]}"#), Ok(Begin::Acquired { state: None }));
        assert_eq!(w.parse_begin(200, br#"{"EVAL":["acquired","s1"]}"#), Ok(Begin::Acquired { state: Some("s1".into()) }));
        assert_eq!(w.parse_begin(200, br#"{"EVAL":["moved","h#i"]}"#), Ok(Begin::Moved { owner: "h#i".into() }));
        assert_eq!(w.parse_begin(200, br#"{"EVAL":["busy"]}"#), Ok(Begin::Busy));
        assert_eq!(w.parse_begin(503, b""), Err(StoreError::Unavailable(503)));
        assert!(matches!(w.parse_begin(200, br#"{"EVAL":[false,"ERR x"]}"#), Err(StoreError::Protocol(_))));
        assert!(matches!(w.parse_begin(200, b"<html>"), Err(StoreError::Protocol(_))));
    }

    #[test]
    fn fenced_replies() {
        let w = Webdis::new("sa:");
        assert_eq!(w.parse_fenced(200, br#"{"EVAL":["stored"]}"#), Ok(Fenced::Stored));
        assert_eq!(w.parse_fenced(200, br#"{"EVAL":["conflict","h#i"]}"#), Ok(Fenced::Conflict { owner: Some("h#i".into()) }));
        assert_eq!(w.parse_fenced(200, br#"{"EVAL":["conflict",""]}"#), Ok(Fenced::Conflict { owner: None }));
    }

    #[test]
    fn owners_split_at_the_last_hash() {
        assert_eq!(split_owner("10.0.0.1:80#pod-a"), Some(("10.0.0.1:80", "pod-a")));
        assert_eq!(split_owner("10.0.0.1:80#"), Some(("10.0.0.1:80", "")));
        assert_eq!(split_owner("nonsense"), None);
    }
}

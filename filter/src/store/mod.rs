//! The session store, reached over HTTP through an Envoy cluster.
//!
//! The flow asks for typed operations ([`Op`]); a dialect renders each as one
//! HTTP request and reads the answer back as a typed [`Reply`]. Every
//! operation is atomic in the store:
//! - `Begin`: read a session's state and take a short lease on it, fenced on
//!   the owner the cookie names. If another proxy already moved the session,
//!   the reply names the new owner; if the session ended, it says so.
//! - `Commit`: with the lease, record the new owner (and new state).
//! - `Write`: store new state, fenced: only the owner (or whoever moves the
//!   session from the owner it knows) may write.
//! - `Touch`, `Release`: keep an idle entry alive; give a lease back.
//! - `End`: replace the session with a tombstone, so no failover anywhere can
//!   bring it back.
//! - `Rotate`: move the session to a new id; the old id becomes a tombstone.
//!
//! Every call carries a nonce and the session id, and the store echoes both:
//! a reply that does not match its call (a late answer, a misrouted one) is
//! never used. That makes handing one session's state to another impossible
//! by construction, whatever the transport does.

mod webdis;

use std::time::Duration;

use crate::config::{DialectName, StoreSettings};
pub use webdis::Webdis;

/// A store operation. Owners are "upstream#instance".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Begin { sid: String, from: String, lease: String, lease_ms: u64 },
    /// `state: None` keeps what is stored.
    Commit { sid: String, lease: String, to: String, state: Option<String>, ttl_ms: u64 },
    /// `state: None` clears what is stored: the new owner starts without it.
    Write { sid: String, from: String, to: String, state: Option<String>, ttl_ms: u64 },
    Touch { sid: String, owner: String, ttl_ms: u64 },
    Release { sid: String, lease: String },
    /// Fenced on `owner`, or on `lease` when the caller holds it.
    End { sid: String, owner: String, lease: Option<String>, tombstone_ms: u64 },
    /// Fenced like `End`; refused with [`Reply::Taken`] if `new_sid` exists.
    /// `state: None` moves what is stored.
    Rotate { sid: String, new_sid: String, from: String, lease: Option<String>, to: String, state: Option<String>, ttl_ms: u64, tombstone_ms: u64 },
}

impl Op {
    pub fn sid(&self) -> &str {
        match self {
            Op::Begin { sid, .. }
            | Op::Commit { sid, .. }
            | Op::Write { sid, .. }
            | Op::Touch { sid, .. }
            | Op::Release { sid, .. }
            | Op::End { sid, .. }
            | Op::Rotate { sid, .. } => sid,
        }
    }

    /// What the operation is called in logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Begin { .. } => "begin",
            Op::Commit { .. } => "commit",
            Op::Write { .. } => "write",
            Op::Touch { .. } => "touch",
            Op::Release { .. } => "release",
            Op::End { .. } => "end",
            Op::Rotate { .. } => "rotate",
        }
    }
}

/// The store's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `Begin`: the lease is ours; `state` is the last stored state, if any.
    Acquired { state: Option<String> },
    /// `Begin`: another proxy already moved the session to `owner`.
    Moved { owner: String },
    /// `Begin`: another proxy holds the lease right now.
    Busy,
    /// `Begin`, `Write`: the session ended (a tombstone).
    Ended,
    Stored,
    /// Fenced out: the session belongs to `owner` (if known), or is being moved.
    Conflict { owner: Option<String> },
    /// `Rotate`: the new id is in use.
    Taken,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// No answer, or an HTTP status other than 200 (0: no answer at all).
    Unavailable(u32),
    /// No answer within the timeout.
    Timeout,
    /// An answer the dialect could not understand (names what was wrong).
    Protocol(String),
    /// An answer to some other call (nonce or session id differ).
    Mismatch(String),
}

/// One HTTP call to the store, ready to send, with the operation it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCall {
    pub op: Op,
    pub nonce: String,
    pub cluster: String,
    pub timeout: Duration,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// How a dialect speaks: one request per operation, one parse per reply.
pub trait Dialect {
    /// (method, path, content type, body) of the request for `op`.
    fn request(&self, op: &Op, nonce: &str) -> Request;
    fn reply(&self, op: &Op, nonce: &str, status: u32, body: &[u8]) -> Result<Reply, StoreError>;
}

/// An HTTP request as a dialect renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: &'static str,
    pub path: String,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// The store as the flow uses it: settings plus the configured dialect.
pub struct Client<'a> {
    settings: &'a StoreSettings,
}

impl<'a> Client<'a> {
    pub fn new(settings: &'a StoreSettings) -> Client<'a> {
        Client { settings }
    }

    fn dialect(&self) -> impl Dialect + 'a {
        match self.settings.dialect {
            DialectName::Webdis => Webdis::new(&self.settings.key_prefix),
        }
    }

    /// The call for `op`, tagged with `nonce`.
    pub fn call(&self, op: Op, nonce: String) -> StoreCall {
        let request = self.dialect().request(&op, &nonce);
        let s = self.settings;
        let mut headers = vec![
            (":method", request.method.to_string()),
            (":path", request.path),
            (":authority", s.authority.clone()),
            ("content-type", request.content_type.to_string()),
        ];
        if let Some(authorization) = &s.authorization {
            headers.push(("authorization", String::from_utf8_lossy(&authorization.0).into_owned()));
        }
        StoreCall { op, nonce, cluster: s.cluster.clone(), timeout: s.timeout, headers, body: request.body }
    }

    /// The answer to `call`: `status` is None when the call failed or timed out
    /// before any answer; `elapsed_ms` tells a timeout from a failure.
    pub fn reply(&self, call: &StoreCall, status: Option<u32>, body: &[u8], elapsed_ms: u64) -> Result<Reply, StoreError> {
        let timed_out = elapsed_ms >= crate::config::millis(self.settings.timeout);
        match status {
            // Envoy answers a call that ran out of time with its own 504.
            Some(504) => Err(StoreError::Timeout),
            None if timed_out => Err(StoreError::Timeout),
            None => Err(StoreError::Unavailable(0)),
            Some(status) => self.dialect().reply(&call.op, &call.nonce, status, body),
        }
    }
}

/// Visible ASCII, space and tab: what may travel in a header value unchanged.
pub fn is_header_value(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

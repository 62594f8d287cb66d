//! The session store, reached over HTTP through an Envoy cluster.
//!
//! The flow asks for typed operations ([`Op`]); a dialect renders each as
//! HTTP requests and reads the answer back as a typed [`Reply`]. Every
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
//! Webdis answers each operation with one call ([`Step::Op`]). etcd may need
//! a few calls first ([`Step`]): a login, a lease grant, or a read; the
//! dialect says which call comes next ([`Next`]), and what it learns (a token,
//! lease ids) stays in the worker's [`Memory`]. A dialect may also send a
//! failed call again (etcd: to another member, or after a leader election),
//! after a pause that doubles each time, for up to [`RETRY_WINDOW_MS`]. An
//! operation never takes more than [`MAX_CALLS`] calls.
//!
//! Every reply is bound to its call: webdis echoes the call's nonce and
//! session id, etcd reads back the nonce the same txn wrote under the
//! session's key. A reply that does not match its call (a late answer, a
//! misrouted one) is never used. That makes handing one session's state to
//! another impossible by construction, whatever the transport does.

mod etcd;
mod memory;
mod webdis;

use std::time::Duration;

use crate::config::{DialectSettings, StoreSettings};
pub use etcd::{Copied, Etcd};
pub use memory::Memory;
pub use webdis::Webdis;

/// The most calls one operation may take: a login, a lease grant and a read
/// before the operation itself, and retries after failures.
pub const MAX_CALLS: u8 = 8;
/// A failed call is sent again only while the operation is younger than
/// this: long enough to outlast an etcd leader election (1 to 2 s with its
/// default 1 s election timeout).
pub const RETRY_WINDOW_MS: u64 = 3_000;
/// The pause before the first retry; each next one waits twice as long, up
/// to [`MAX_RETRY_PAUSE_MS`].
pub const FIRST_RETRY_PAUSE_MS: u64 = 100;
pub const MAX_RETRY_PAUSE_MS: u64 = 1_000;

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
    /// Envoy refused the call itself: the store cluster's connection or
    /// request limits were full. The store may be fine: not its failure.
    Busy,
    /// An answer the dialect could not understand (names what was wrong).
    Protocol(String),
    /// An answer to some other call (nonce or session id differ).
    Mismatch(String),
}

/// Which call of an operation a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The whole operation in one call (webdis).
    Op,
    /// etcd: log in as `store.auth`'s user for a token.
    Login,
    /// etcd: grant the shared lease of a time bucket.
    Grant { bucket: u64 },
    /// etcd: read the state a rotation moves (a txn cannot copy a value).
    Read,
    /// etcd: the operation's txn; what it writes expires with lease `lease`.
    /// `copied`: what `Read` found, for a rotation that moves it.
    Txn { lease: u64, copied: Option<Copied> },
}

/// After an answer: the operation's reply, or the call that comes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Done(Reply),
    Call(Step),
}

/// One HTTP call to the store, ready to send, with the operation it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCall {
    pub op: Op,
    pub nonce: String,
    pub step: Step,
    /// Calls made for `op` so far, this one included.
    pub calls: u8,
    /// How many of them were retries after a failure.
    pub retries: u8,
    /// When the operation's first call was made.
    pub began_ms: u64,
    pub cluster: String,
    pub timeout: Duration,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// An answer to a store call: the operation's reply, or the next call of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Done(Reply),
    /// The operation's next step.
    Call(StoreCall),
    /// The call failed with `error`; send `call` again after `pause_ms`.
    Retry { call: StoreCall, error: StoreError, pause_ms: u64 },
}

/// One call as a dialect sees it: which step of which operation, its
/// nonce, and the time now.
#[derive(Debug, Clone, Copy)]
pub struct Exchange<'a> {
    pub op: &'a Op,
    pub step: &'a Step,
    pub nonce: &'a str,
    pub now_ms: u64,
}

/// How a dialect speaks: which call an operation makes, how each is
/// rendered, and what each answer means.
pub trait Dialect {
    /// The first call of `op` (also the one a retry starts over from).
    fn first_step(&self, op: &Op, memory: &Memory, now_ms: u64) -> Step;
    fn request(&self, call: Exchange<'_>, memory: &Memory) -> Request;
    fn reply(&self, call: Exchange<'_>, status: u32, body: &[u8], memory: &mut Memory) -> Result<Next, StoreError>;
    /// Whether a call that failed so may succeed if sent again (at once:
    /// through Envoy it may reach another member).
    fn retries(&self, error: &StoreError) -> bool;
}

/// An HTTP request as a dialect renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub path: String,
    pub content_type: &'static str,
    /// The `authorization` header, if the call needs one.
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

/// The store as the flow uses it: settings plus the configured dialect.
pub struct Client<'a> {
    settings: &'a StoreSettings,
}

enum Dialects<'a> {
    Webdis(Webdis<'a>),
    Etcd(Etcd<'a>),
}

impl<'a> Client<'a> {
    pub fn new(settings: &'a StoreSettings) -> Client<'a> {
        Client { settings }
    }

    fn dialect(&self) -> Dialects<'a> {
        let s = self.settings;
        match &s.dialect {
            DialectSettings::Webdis { authorization } => Dialects::Webdis(Webdis::new(&s.key_prefix, authorization.as_ref())),
            DialectSettings::Etcd { lease_bucket_ms, login } => Dialects::Etcd(Etcd::new(&s.key_prefix, *lease_bucket_ms, login.as_ref())),
        }
    }

    fn speak<T>(&self, f: impl FnOnce(&dyn Dialect) -> T) -> T {
        match &self.dialect() {
            Dialects::Webdis(d) => f(d),
            Dialects::Etcd(d) => f(d),
        }
    }

    /// The first call of `op`, tagged with `nonce`.
    pub fn call(&self, op: Op, nonce: String, memory: &Memory, now_ms: u64) -> StoreCall {
        let step = self.speak(|d| d.first_step(&op, memory, now_ms));
        self.render(op, nonce, step, memory, now_ms)
    }

    /// The call after `call` in its operation, for `step`.
    fn next_call(&self, call: &StoreCall, step: Step, memory: &Memory, now_ms: u64) -> StoreCall {
        let next = self.render(call.op.clone(), call.nonce.clone(), step, memory, now_ms);
        StoreCall { calls: call.calls.saturating_add(1), retries: call.retries, began_ms: call.began_ms, ..next }
    }

    fn render(&self, op: Op, nonce: String, step: Step, memory: &Memory, now_ms: u64) -> StoreCall {
        let request = self.speak(|d| d.request(Exchange { op: &op, step: &step, nonce: &nonce, now_ms }, memory));
        let s = self.settings;
        let mut headers = vec![
            (":method", "POST".to_string()),
            (":path", request.path),
            (":authority", s.authority.clone()),
            ("content-type", request.content_type.to_string()),
        ];
        if let Some(authorization) = request.authorization {
            headers.push(("authorization", authorization));
        }
        StoreCall { op, nonce, step, calls: 1, retries: 0, began_ms: now_ms, cluster: s.cluster.clone(), timeout: s.timeout, headers, body: request.body }
    }

    /// What the answer to `call` means: `status` is None when the call failed
    /// or timed out before any answer; `elapsed_ms` tells a timeout from a
    /// failure. A step the dialect still needs, or a failure it retries
    /// (within [`RETRY_WINDOW_MS`]), comes back as the next call, until the
    /// operation has made [`MAX_CALLS`] calls.
    pub fn reply(&self, call: &StoreCall, status: Option<u32>, body: &[u8], elapsed_ms: u64, memory: &mut Memory, now_ms: u64) -> Result<Progress, StoreError> {
        let timed_out = elapsed_ms >= crate::config::millis(self.settings.timeout);
        let next_step = match status {
            // Envoy answers a call that ran out of time with its own 504.
            Some(504) => Err(StoreError::Timeout),
            Some(503) if is_local_overflow(body) => Err(StoreError::Busy),
            None if timed_out => Err(StoreError::Timeout),
            None => Err(StoreError::Unavailable(0)),
            Some(status) => self.speak(|d| d.reply(Exchange { op: &call.op, step: &call.step, nonce: &call.nonce, now_ms }, status, body, memory)),
        };
        let in_window = now_ms.saturating_sub(call.began_ms) < RETRY_WINDOW_MS;
        match next_step {
            Ok(Next::Done(reply)) => Ok(Progress::Done(reply)),
            _ if call.calls >= MAX_CALLS => Err(next_step.err().unwrap_or_else(|| StoreError::Protocol(format!("a {} needs more than {MAX_CALLS} calls", call.op.name())))),
            Ok(Next::Call(step)) => Ok(Progress::Call(self.next_call(call, step, memory, now_ms))),
            Err(error) if in_window && self.speak(|d| d.retries(&error)) => {
                let mut again = self.next_call(call, self.speak(|d| d.first_step(&call.op, memory, now_ms)), memory, now_ms);
                again.retries = call.retries.saturating_add(1);
                let pause_ms = FIRST_RETRY_PAUSE_MS.saturating_mul(1 << call.retries.min(8)).min(MAX_RETRY_PAUSE_MS);
                Ok(Progress::Retry { call: again, error, pause_ms })
            }
            Err(error) => Err(error),
        }
    }
}

/// The end of the body of Envoy's own 503 for a call over the cluster's
/// `circuit_breakers` (no store ever answers with it).
const OVERFLOW_BODY: &[u8] = b"reset reason: overflow";

/// Whether a 503's body is Envoy's local answer to a call over the store
/// cluster's limits.
pub fn is_local_overflow(body: &[u8]) -> bool {
    body.ends_with(OVERFLOW_BODY)
}

/// Visible ASCII, space and tab: what may travel in a header value unchanged.
pub fn is_header_value(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

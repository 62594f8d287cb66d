//! The per-request session flow: every decision the filter makes, written
//! against the small [`HttpHost`] interface so it runs natively in tests.
//!
//! The callbacks here only dispatch; each stage lives in its own module:
//! - [`request`]: what a request is (skipped, new, pinned, failing over);
//! - [`response`]: what a response says (reached an app or not, and what the
//!   app asked for);
//! - [`session`]: new and pinned sessions on the way back: pinning, state
//!   writes, and the lifecycle (ended, rotated, restarted, host gone);
//! - [`failover`]: the failover state machine (store lease, polls, restore,
//!   commit);
//! - [`issue`]: cookies and the filter's local replies;
//! - [`worker`]: what the streams of one worker share, and every store call;
//! - [`background`]: the worker's own work: calls that outlive their stream,
//!   and the tick cadence.

pub mod background;
pub mod failover;
mod issue;
pub mod request;
pub mod response;
mod session;
mod worker;

use std::rc::Rc;

use log::warn;

use crate::config::{Config, WriteMode};
use crate::cookie::{Claims, ClusterTag};
use crate::host::{Action, HttpHost};
use crate::ids::SessionId;
use crate::metrics::Counter;
use crate::store::{Op, Reply, StoreCall, StoreError};
use failover::Failover;
use issue::Issuer;
use request::{Arrival, RequestView};
use response::ResponseView;
pub use worker::{Answer, Sent, Worker};

/// Envoy router retry conditions under which the request provably reached no
/// app, for requests the load balancer places (a retry ignores a routing
/// override, so pinned requests never get them).
const RETRY_ON_UNREACHED: &str = "connect-failure,refused-stream,reset-before-request";
/// For safe methods, also a connection lost mid-request (`reset`: a pooled
/// connection to a pod that just died, which the load balancer may still pick
/// for a failover; the filter replays such a GET anyway) and a mesh sidecar's
/// reply that it did not reach its app (the router matches the header's
/// presence, not its flags, so that too covers a lost connection).
const RETRY_ON_UNREACHED_SAFE: &str = "connect-failure,refused-stream,reset,retriable-headers";
const MAX_RETRIES: &str = "3";

/// Whether an operation ends a session id (an end, or a rotation away from it).
fn ends_a_session(op: &Op) -> bool {
    matches!(op, Op::End { .. } | Op::Rotate { .. })
}

/// Facts about the request that the response phase needs.
#[derive(Debug, Default)]
struct Request {
    /// When the request headers arrived: the response phase decides with it
    /// (a host call saved), but reads the clock afresh to sign a cookie.
    started_ms: u64,
    safe_method: bool,
    /// Kept for a 307 back to the same URL (Envoy has checked it is ASCII).
    path: String,
    cluster: ClusterTag,
    /// The response started a new session: a store refusal then means its
    /// id (the app's choice) belongs to another session.
    new_session: bool,
}

#[derive(Debug)]
enum Stream {
    /// Before the request headers.
    Idle,
    /// No affinity here (a skipped path, another cluster's cookie): only the
    /// internal headers are stripped.
    Unmanaged,
    New { sid: SessionId },
    Pinned { claims: Claims, reissue: bool },
    Failover(Failover),
    /// The response headers were handled; trailers may still carry state
    /// for this session.
    Served(Served),
    /// Nothing more to do (a local reply, or a response that ends the story).
    Done,
}

/// The session a response served, and its owner.
#[derive(Debug)]
enum Served {
    /// As the cookie says (the pinned path: nothing to copy).
    Cookie(Claims),
    /// Somewhere new: a new session, a move, a rotation.
    At { sid: String, owner: String, since: u64 },
}

impl Served {
    fn sid(&self) -> &str {
        match self {
            Served::Cookie(claims) => claims.sid(),
            Served::At { sid, .. } => sid,
        }
    }

    fn since(&self) -> u64 {
        match self {
            Served::Cookie(claims) => claims.since,
            Served::At { since, .. } => *since,
        }
    }

    fn owner(&self) -> String {
        match self {
            Served::Cookie(claims) => claims.owner().to_string(),
            Served::At { owner, .. } => owner.clone(),
        }
    }

    /// The fenced write of `state` from this owner.
    fn write(&self, state: &str, ttl_ms: u64) -> Op {
        let owner = self.owner();
        Op::Write { sid: self.sid().to_string(), from: owner.clone(), to: owner, state: Some(state.to_string()), ttl_ms }
    }
}

/// Which direction waits for a store answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Nothing,
    Request,
    Response,
}

/// The store call a stream waits for, and which direction it holds.
#[derive(Debug)]
struct Pending {
    call: Waiting,
    held: Held,
}

#[derive(Debug)]
enum Waiting {
    /// Out: its answer comes with the call's token.
    Sent(Sent),
    /// Failed; goes out again when the stream's timer fires at `due_ms`.
    Later { call: StoreCall, due_ms: u64 },
}

impl Pending {
    fn sent(sent: Sent, held: Held) -> Pending {
        Pending { call: Waiting::Sent(sent), held }
    }
}

pub struct Flow {
    context_id: u32,
    config: Rc<Config>,
    worker: Rc<Worker>,
    stream: Stream,
    request: Request,
    pending: Option<Pending>,
    /// A change that came while another was held (state in a trailer while
    /// the headers' write is out): sent once that one is stored, so the two
    /// land in order and both answers are read.
    deferred: Option<Op>,
}

impl Flow {
    pub fn new(context_id: u32, config: Rc<Config>, worker: Rc<Worker>) -> Flow {
        Flow { context_id, config, worker, stream: Stream::Idle, request: Request::default(), pending: None, deferred: None }
    }

    fn count(&self, counter: Counter) {
        self.worker.count(counter);
    }

    fn issuer(&self) -> Issuer<'_> {
        Issuer { config: &self.config, worker: &self.worker, context_id: self.context_id }
    }

    fn held(&self) -> Held {
        self.pending.as_ref().map_or(Held::Nothing, |p| p.held)
    }

    /// Whether request body data must wait: while the request headers wait
    /// for the store or a timer (continuing the body would release them).
    pub fn holds_request_body(&self) -> bool {
        self.held() == Held::Request || matches!(&self.stream, Stream::Failover(f) if f.is_waiting())
    }

    /// Whether response body data must wait: while a sync write holds the
    /// response (an async write lets the stream go on).
    pub fn holds_response_body(&self) -> bool {
        self.held() == Held::Response
    }

    pub fn on_request_headers(&mut self, host: &mut impl HttpHost) -> Action {
        let config = Rc::clone(&self.config);
        let headers = host.request_headers();
        let view = RequestView::read(&headers, &config);
        for name in &view.internal {
            if let Ok(name) = std::str::from_utf8(name) {
                host.remove_request_header(name);
            }
        }
        let now_ms = host.now_ms();
        self.request = Request {
            started_ms: now_ms,
            safe_method: view.safe_method,
            path: String::new(),
            cluster: ClusterTag::default(),
            new_session: false,
        };
        if config.skips(view.path) {
            self.count(Counter::SessionsSkipped);
            self.stream = Stream::Unmanaged;
            return Action::Continue;
        }
        self.request.cluster = self.worker.cluster_tag(&host.cluster_name());
        let arrival = {
            let gone = self.worker.gone.borrow();
            request::classify(&view, &config, &self.worker.verified, &gone, self.request.cluster, now_ms)
        };
        if matches!(arrival, Arrival::Pinned(_) | Arrival::KnownGone(_) | Arrival::Moving(_)) {
            self.request.path = String::from_utf8_lossy(view.path).into_owned();
        }
        match arrival {
            Arrival::OtherCluster => {
                self.count(Counter::SessionsOtherCluster);
                self.stream = Stream::Unmanaged;
                Action::Continue
            }
            Arrival::New(rejection) => {
                if let Some(reason) = rejection {
                    self.count(Counter::rejected(reason));
                }
                self.start_new_session(host);
                Action::Continue
            }
            Arrival::Pinned(claims) => {
                self.count(Counter::SessionsPinned);
                self.send_pinned(host, claims, false);
                Action::Continue
            }
            Arrival::KnownGone(claims) => {
                self.count(Counter::FailoversKnown);
                self.begin_failover(host, claims)
            }
            // Its failover was counted when the 307 was sent.
            Arrival::Moving(claims) => self.begin_failover(host, claims),
        }
    }

    /// Sends the request to the session's pinned host; `reissue` re-signs the
    /// cookie on the response.
    fn send_pinned(&mut self, host: &mut impl HttpHost, claims: Claims, reissue: bool) {
        host.route_to(claims.upstream());
        host.add_request_header(&self.config.headers.session_id, claims.sid());
        self.stream = Stream::Pinned { claims, reissue };
    }

    /// A new session: a fresh id, and the load balancer picks the host.
    fn start_new_session(&mut self, host: &mut impl HttpHost) {
        let sid = SessionId::from_random(&self.worker.unguessable(host, &self.config, self.context_id));
        self.send_unpinned(host, sid.as_str(), None);
        self.stream = Stream::New { sid };
    }

    /// Sends the request to whatever live host the load balancer picks, with
    /// the session's id and either the state to restore or "create it".
    fn send_unpinned(&self, host: &mut impl HttpHost, sid: &str, state: Option<&str>) {
        let h = &self.config.headers;
        host.add_request_header(&h.session_id, sid);
        match state {
            Some(state) => host.add_request_header(&h.session_state, state),
            None => host.add_request_header(&h.session_new, "1"),
        }
        // The router may retry on another host when no app saw the request:
        // refused connections, and (safe methods) a mesh sidecar's answer.
        if self.request.safe_method {
            host.add_request_header("x-envoy-retry-on", RETRY_ON_UNREACHED_SAFE);
            host.add_request_header("x-envoy-retriable-header-names", &h.unreached);
        } else {
            host.add_request_header("x-envoy-retry-on", RETRY_ON_UNREACHED);
        }
        host.add_request_header("x-envoy-max-retries", MAX_RETRIES);
    }

    pub fn on_response_headers(&mut self, host: &mut impl HttpHost) -> Action {
        if matches!(self.stream, Stream::Idle | Stream::Done) {
            return Action::Continue;
        }
        let config = Rc::clone(&self.config);
        let headers = host.response_headers();
        let mut response = ResponseView::read(&headers, &config);
        for name in response.internal() {
            if let Ok(name) = std::str::from_utf8(name) {
                host.remove_response_header(name);
            }
        }
        if response.state_sent && response.state.is_none() {
            warn!("[{}] the app sent session state that is not a valid header value; not stored", self.context_id);
        }
        self.cap_state(host, &mut response);
        match std::mem::replace(&mut self.stream, Stream::Done) {
            Stream::Idle | Stream::Done | Stream::Served(_) | Stream::Unmanaged => Action::Continue,
            Stream::New { sid } => self.new_session_response(host, &response, sid),
            Stream::Pinned { claims, reissue } => self.pinned_response(host, &response, claims, reissue),
            Stream::Failover(failover) => self.failover_response(host, &response, failover),
        }
    }

    /// A client's request trailers reach the app like headers (an HTTP/2
    /// client's trailers become HTTP/1.1 chunked trailers): every spelling of
    /// an internal name goes, as from the headers. A request held for the
    /// store stays held.
    pub fn on_request_trailers(&mut self, host: &mut impl HttpHost) -> Action {
        let trailers = host.request_trailers();
        let internal: Vec<&[u8]> = trailers.iter().map(|(name, _)| name).filter(|name| self.config.internal.matches(name)).collect();
        for name in internal {
            if let Ok(name) = std::str::from_utf8(name) {
                host.remove_request_trailer(name);
            }
        }
        if self.holds_request_body() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    /// State the app could only send after the body (its response was
    /// already committed) arrives as a trailer: store it like a header. The
    /// trailer never reaches the client, whether it is stored or not.
    pub fn on_response_trailers(&mut self, host: &mut impl HttpHost) -> Action {
        let config = Rc::clone(&self.config);
        let trailers = host.response_trailers();
        let mut trailer = ResponseView::read(&trailers, &config);
        for name in trailer.internal() {
            if let Ok(name) = std::str::from_utf8(name) {
                host.remove_response_trailer(name);
            }
        }
        let Stream::Served(served) = std::mem::replace(&mut self.stream, Stream::Done) else {
            return Action::Continue;
        };
        if trailer.end {
            // Too late to drop the cookie; the app's next "unknown" will.
            return self.end_held(host, served.sid().to_string(), served.owner(), None);
        }
        if trailer.state_sent && trailer.state.is_none() {
            warn!("[{}] the app sent a session state trailer that is not a valid header value; not stored", self.context_id);
        }
        self.cap_state(host, &mut trailer);
        let Some(state) = trailer.state else { return Action::Continue };
        let op = served.write(state, self.store_ttl(served.since(), host.now_ms()));
        self.stream = Stream::Served(served);
        self.count(Counter::StoreWrites);
        if self.pending.is_some() {
            self.deferred = Some(op);
            return Action::Pause;
        }
        self.store_change(host, op)
    }

    /// Drops a state over `store.max_state_bytes` (counted, logged): one
    /// session's size must not cost the store, or anyone else, anything.
    fn cap_state(&self, host: &mut impl HttpHost, response: &mut ResponseView<'_>) {
        let Some(store) = &self.config.store else { return };
        if let Some(len) = response.state.map(str::len).filter(|&len| len > store.max_state_bytes) {
            self.worker.oversize(host.now_ms(), len, store.max_state_bytes);
            response.state = None;
        }
    }

    /// Sends the change that waited for the one just answered, if any.
    fn send_deferred(&mut self, host: &mut impl HttpHost) -> Action {
        match self.deferred.take() {
            Some(op) => self.store_change(host, op),
            None => Action::Continue,
        }
    }

    /// Sends an operation that changes the session to the store: held in sync
    /// mode (the response waits for the answer), in the background in async mode. An
    /// end or a rotation is always held: the client must not learn of it
    /// before a tombstone stands.
    fn store_change(&mut self, host: &mut impl HttpHost, op: Op) -> Action {
        let sync = self.config.store.as_ref().is_some_and(|s| s.write == WriteMode::Sync) || ends_a_session(&op);
        if !sync {
            if !self.worker.send_in_background(host, &self.config, self.context_id, op) {
                self.worker.unprotected(host.now_ms());
            }
            return Action::Continue;
        }
        let failed = op.clone();
        match self.worker.call_store(host, &self.config, self.context_id, op) {
            Some(sent) => {
                self.pending = Some(Pending::sent(sent, Held::Response));
                Action::Pause
            }
            None => {
                self.worker.unprotected(host.now_ms());
                self.end_not_confirmed(host, &failed);
                Action::Continue
            }
        }
    }

    /// The store did not confirm an end or a rotation (it failed, was out, or
    /// refused it): every worker of this proxy treats the old id as ended for
    /// as long as its tombstone would have stood, and it is counted.
    fn end_not_confirmed(&self, host: &mut impl HttpHost, op: &Op) {
        let (Op::End { sid, tombstone_ms, .. } | Op::Rotate { sid, tombstone_ms, .. }) = op else { return };
        self.count(Counter::SessionsEndedUnconfirmed);
        warn!("[{}] the store did not confirm the end of session {sid}; this proxy treats it as ended", self.context_id);
        let now_ms = host.now_ms();
        self.worker.remember_ended(&*host, sid, now_ms.saturating_add(*tombstone_ms), now_ms);
    }

    /// The store's entry TTL for a session started at `since` (unix seconds):
    /// its idle TTL, never past the session's absolute lifetime.
    fn store_ttl(&self, since: u64, now_ms: u64) -> u64 {
        let idle = match &self.config.store {
            // Until its cookie comes back, a new session's entry is short-lived:
            // a flood of one-request sessions expires (and is evicted) first.
            Some(s) if self.request.new_session => s.new_session_ttl_ms,
            Some(s) => s.idle_ttl_ms,
            None => 0,
        };
        let end_of_life_ms = since.saturating_add(self.config.cookie.max_lifetime_secs).saturating_mul(1000);
        idle.min(end_of_life_ms.saturating_sub(now_ms)).max(1)
    }

    /// The store's answer to the call with `token`. `status` is None when the
    /// call failed or timed out.
    pub fn on_store_response(&mut self, host: &mut impl HttpHost, token: u64, status: Option<u32>, body: &[u8]) {
        let Some(pending) = self.pending.take_if(|p| matches!(&p.call, Waiting::Sent(sent) if sent.token == token)) else { return };
        let Waiting::Sent(sent) = pending.call else { return };
        let config = Rc::clone(&self.config);
        let now_ms = host.now_ms();
        let answer = self.worker.store_reply(host, &config, &sent, status, body, now_ms);
        self.on_store_answer(host, sent.call.op, answer, pending.held);
    }

    /// What a store call led to: the operation's reply is acted on; another
    /// call (a login, a lease, a retry) is waited for.
    fn on_store_answer(&mut self, host: &mut impl HttpHost, op: Op, answer: Answer, held: Held) {
        let reply = match answer {
            Answer::Reply(reply) => reply,
            Answer::Waiting(sent) => {
                self.pending = Some(Pending::sent(*sent, held));
                return;
            }
            Answer::Later { call, due_ms } => {
                if host.set_timer(due_ms.saturating_sub(host.now_ms())) {
                    self.pending = Some(Pending { call: Waiting::Later { call: *call, due_ms }, held });
                    return;
                }
                Err(StoreError::Unavailable(0))
            }
        };
        let action = match op {
            Op::Begin { .. } => self.on_begin_reply(host, reply),
            ref op => self.on_change_reply(host, op, reply),
        };
        if action == Action::Continue {
            match held {
                Held::Request => host.resume_request(),
                Held::Response => host.resume_response(),
                Held::Nothing => {}
            }
        }
    }

    /// The answer to a held change of the session (write, commit, end, rotate).
    fn on_change_reply(&mut self, host: &mut impl HttpHost, op: &Op, reply: Result<Reply, StoreError>) -> Action {
        if !matches!(reply, Ok(Reply::Stored | Reply::Ended)) {
            self.end_not_confirmed(host, op);
        }
        if let Op::Rotate { new_sid, to, .. } = op {
            self.rotation_answered(host, new_sid, to, &reply);
        }
        match reply {
            Ok(Reply::Stored) => self.send_deferred(host),
            Ok(Reply::Conflict { owner }) => {
                self.deferred = None;
                self.change_refused(host, op, owner)
            }
            Ok(Reply::Ended) => {
                self.deferred = None;
                // The session ended elsewhere meanwhile: so it ends here too.
                host.add_response_header("set-cookie", &self.issuer().expired_cookie());
                self.stream = Stream::Done;
                Action::Continue
            }
            Ok(other) => {
                warn!("[{}] store answered a {} with {other:?}; ignored", self.context_id, op.name());
                self.deferred = None;
                Action::Continue
            }
            Err(error) => {
                // The app still holds the state; the next write catches the store up.
                warn!("[{}] session {} failed: {error:?}", self.context_id, op.name());
                self.worker.unprotected(host.now_ms());
                self.send_deferred(host)
            }
        }
    }

    /// The store refused a change because this host no longer owns the
    /// session: the change is not kept. In sync mode the client learns it (503,
    /// retry) and is re-pinned to the owner.
    fn change_refused(&mut self, host: &mut impl HttpHost, op: &Op, owner: Option<String>) -> Action {
        self.count(Counter::StoreWritesRejected);
        warn!("[{}] store refused a {} from a host that does not own the session (owner {owner:?})", self.context_id, op.name());
        if !matches!(op, Op::Write { .. } | Op::Commit { .. }) {
            return Action::Continue;
        }
        let now = host.now_ms() / 1000;
        let owner = owner.as_deref().and_then(crate::ids::Owner::parse);
        let since = match &self.stream {
            Stream::Served(served) => served.since(),
            _ => now,
        };
        let set_cookie = if self.request.new_session {
            // Never a cookie for someone else's session: the client starts over.
            Some(self.issuer().expired_cookie())
        } else {
            owner.and_then(|o| {
                let pin = issue::Pin { sid: op.sid(), cluster: self.request.cluster.as_str(), upstream: o.upstream, instance: o.instance, since };
                self.issuer().set_cookie(host, pin, 0)
            })
        };
        self.issuer().retry_later(host, "session belongs to another host; its change was not kept; retry\n", set_cookie.as_deref());
        self.stream = Stream::Done;
        Action::Pause
    }

    /// A timer this stream set has fired.
    pub fn on_timer(&mut self, host: &mut impl HttpHost) {
        let now_ms = host.now_ms();
        if let Some(pending) = self.pending.take_if(|p| matches!(&p.call, Waiting::Later { due_ms, .. } if *due_ms <= now_ms)) {
            let Waiting::Later { call, .. } = pending.call else { return };
            let op = call.op.clone();
            let config = Rc::clone(&self.config);
            let answer = self.worker.resend(host, &config, call);
            return self.on_store_answer(host, op, answer, pending.held);
        }
        if !matches!(&self.stream, Stream::Failover(f) if f.is_waiting()) {
            return;
        }
        if let Stream::Failover(failover) = std::mem::replace(&mut self.stream, Stream::Done) {
            if self.ask_store(host, failover) == Action::Continue {
                host.resume_request();
            }
        }
    }
}

#[cfg(test)]
mod tests;

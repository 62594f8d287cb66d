//! The per-request session flow: every decision the filter makes, written
//! against the small [`HttpHost`] interface so it runs natively in tests.
//!
//! Request phase:
//! - static path: strip internal headers, let the load balancer pick;
//! - no valid cookie: new session id, `x-session-new: 1`, load balancer picks;
//! - valid cookie, host not known gone: the pinned path (override header set);
//! - valid cookie, host known gone (or the cookie is flagged moving): pause,
//!   take the session's state from the store, inject it, let the load
//!   balancer pick a live host.
//!
//! Response phase: pin new sessions, detect hosts found gone (Envoy's 503
//! UH/UF, or the app's "unknown session") and answer a 307 back to the same URL
//! so the client replays a request that provably reached no app, detect app
//! restarts at the same address, and write new state to the store, fenced on
//! the owner.

use std::rc::Rc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use log::{info, warn};

use crate::config::{Config, DialectName, OutagePolicy, StoreConfig, WriteMode};
use crate::cookie::{self, Claims, NewClaims, Rejection, FLAG_MOVING};
use crate::gone::{GoneTable, SharedData, Sighting};
use crate::headers::HeaderMap;
use crate::metrics::{Counter, Metrics};
use crate::store::{self, Begin, Dialect, Fenced, StoreCall, StoreError, Webdis};

/// Envoy response flags (the `response.flags` property) meaning the request
/// reached no upstream: UH (no healthy upstream) and UF (connection failure).
pub const FLAG_NO_HEALTHY_UPSTREAM: u64 = 0x2;
pub const FLAG_UPSTREAM_CONNECTION_FAILURE: u64 = 0x20;
/// How many times a failover re-asks the store while another proxy holds the lease.
const MAX_BUSY_POLLS: u32 = 200;
/// How many owners in a row a failover follows when each is gone too.
const MAX_MOVES: u32 = 3;

/// Whether the proxy should go on with the stream or wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// What the flow needs from the proxy for one HTTP stream.
pub trait HttpHost: SharedData {
    fn request_headers(&mut self) -> HeaderMap;
    /// Replaces every value of the header.
    fn set_request_header(&mut self, name: &str, value: &str);
    fn remove_request_header(&mut self, name: &str);
    fn response_headers(&mut self) -> HeaderMap;
    fn add_response_header(&mut self, name: &str, value: &str);
    fn remove_response_header(&mut self, name: &str);
    /// Envoy's `upstream.address` ("ip:port"), if a host was picked.
    fn upstream_address(&mut self) -> Option<String>;
    /// Envoy's `response.flags` bitmask.
    fn response_flags(&mut self) -> u64;
    /// Sends a local reply in place of whatever the stream would have sent.
    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: &str);
    /// Starts an HTTP call to the store; returns its token. A `detached` call
    /// belongs to the worker rather than the stream, so it still completes when
    /// the stream ends first (its answer reaches the stream only if it lives).
    fn dispatch(&mut self, store: &StoreConfig, call: &StoreCall, detached: bool) -> Option<u32>;
    fn resume_request(&mut self);
    fn resume_response(&mut self);
    /// Wall-clock time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// 16 bytes from the host's CSPRNG; `None` if it has none.
    fn random(&mut self) -> Option<[u8; 16]>;
}

/// State every stream of one worker shares.
#[derive(Debug, Default)]
pub struct Worker {
    pub metrics: Metrics,
    pub gone: std::cell::RefCell<GoneTable>,
    /// Feeds the keyed fallback for unguessable ids when the host has no CSPRNG.
    ids_made: std::cell::Cell<u64>,
}

/// Which of the internal headers the client sent (they must never pass through).
#[derive(Debug, Default, Clone, Copy)]
struct ClientSent {
    route: bool,
    session_id: bool,
    session_new: bool,
    session_state: bool,
}

/// What goes upstream in the internal headers; `None` removes a client's copy.
#[derive(Debug, Default)]
struct Forward<'a> {
    route: Option<&'a str>,
    session_id: Option<&'a str>,
    session_new: bool,
    session_state: Option<&'a str>,
    /// Let the router retry on another host when no app saw the request
    /// (connection refused or reset before sending). Only for requests the
    /// load balancer places: a retry ignores a routing override.
    retry_unreached: bool,
}

/// Room for the routing header value: base64 of the longest host a cookie carries.
const ROUTE_LEN_MAX: usize = cookie::MAX_HOST_LEN.div_ceil(3) * 4;

/// The routing header value for `stateful_session` (base64 of "ip:port"),
/// written into `buffer` so the pinned path allocates nothing for it.
fn route_header<'a>(upstream: &str, buffer: &'a mut [u8; ROUTE_LEN_MAX]) -> Option<&'a str> {
    let len = STANDARD.encode_slice(upstream, buffer).ok()?;
    std::str::from_utf8(buffer.get(..len)?).ok()
}

/// Envoy router retry conditions under which the request provably reached no app.
const RETRY_ON_UNREACHED: &str = "connect-failure,refused-stream,reset-before-request";
const MAX_RETRIES: &str = "3";

#[derive(Debug)]
enum Session {
    /// Before the request headers, or a path that needs no affinity.
    None,
    New { sid: String },
    Pinned { claims: Claims, path: String, reissue: bool },
    Failover(Failover),
}

/// A session moving off a gone host.
#[derive(Debug)]
struct Failover {
    /// The cookie (or the store's later owner) the session moves from.
    from: Claims,
    path: String,
    /// The store lease token; `lease` says whether the store granted it.
    token: String,
    lease: bool,
    /// Whether stored state went upstream with the request.
    restored: bool,
    polls: u32,
    moves: u32,
}

/// A store call in flight and what its answer means.
#[derive(Debug)]
enum Pending {
    Begin,
    /// A commit or write; `held` when the response waits for it (sync mode).
    Fenced { held: bool, sid: String },
}

pub struct Flow {
    context_id: u32,
    config: Rc<Config>,
    worker: Rc<Worker>,
    session: Session,
    client_sent: ClientSent,
    pending: Option<(u32, Pending, u64)>,
    /// Wall-clock time of the request headers. The response phase decides with
    /// it (a host call saved per response) but reads the clock afresh to sign a
    /// cookie, since a long request may outlast a short cookie.
    request_ms: u64,
}

impl Flow {
    pub fn new(context_id: u32, config: Rc<Config>, worker: Rc<Worker>) -> Flow {
        Flow {
            context_id,
            config,
            worker,
            session: Session::None,
            client_sent: ClientSent::default(),
            pending: None,
            request_ms: 0,
        }
    }

    fn count(&self, counter: Counter) {
        self.worker.metrics.incr(counter);
    }

    /// Whether request body data must wait: while the request headers wait
    /// for the store (continuing the body would release them).
    pub fn holds_request_body(&self) -> bool {
        matches!(self.pending, Some((_, Pending::Begin, _)))
    }

    /// Whether response body data must wait: while a sync write holds the
    /// response headers (an async write lets the stream go on).
    pub fn holds_response_body(&self) -> bool {
        matches!(self.pending, Some((_, Pending::Fenced { held: true, .. }, _)))
    }

    pub fn on_request_headers(&mut self, host: &mut impl HttpHost) -> Action {
        let config = Rc::clone(&self.config);
        let names = &config.headers;
        let headers = host.request_headers();
        let mut path: &[u8] = b"";
        for (name, value) in headers.iter() {
            match name {
                b":path" => path = value,
                n if n == names.route.as_bytes() => self.client_sent.route = true,
                n if n == names.session_id.as_bytes() => self.client_sent.session_id = true,
                n if n == names.session_new.as_bytes() => self.client_sent.session_new = true,
                n if n == names.session_state.as_bytes() => self.client_sent.session_state = true,
                _ => {}
            }
        }
        if config.skips(path) {
            self.count(Counter::Skipped);
            self.forward(host, &Forward::default());
            return Action::Continue;
        }
        let now_ms = host.now_ms();
        self.request_ms = now_ms;
        let claims = match self.verified_cookie(&headers, now_ms / 1000) {
            Ok(claims) => claims,
            Err(rejection) => {
                if let Some(reason) = rejection {
                    self.count(Counter::rejected(reason));
                }
                self.start_new_session(host);
                return Action::Continue;
            }
        };
        let known_gone = self.worker.gone.borrow().is_gone(claims.host(), claims.instance(), now_ms);
        // Kept for a 307 back to the same URL (Envoy has checked it is ASCII).
        let path = String::from_utf8(path.to_vec()).unwrap_or_default();
        if !known_gone && !claims.is_moving() {
            self.count(Counter::Pinned);
            return self.send_pinned(host, claims, path, false);
        }
        if !claims.is_moving() {
            // A moving cookie's failover was counted when the 307 was sent.
            self.count(Counter::FailoversKnown);
        }
        self.begin_failover(host, claims, path)
    }

    /// Sends the request to the session's pinned host; `reissue` re-signs the
    /// cookie on the response.
    fn send_pinned(&mut self, host: &mut impl HttpHost, claims: Claims, path: String, reissue: bool) -> Action {
        let mut route = [0u8; ROUTE_LEN_MAX];
        let forward = Forward {
            route: route_header(claims.host(), &mut route),
            session_id: Some(claims.sid()),
            ..Forward::default()
        };
        self.forward(host, &forward);
        self.session = Session::Pinned { claims, path, reissue };
        Action::Continue
    }

    /// The first of the request's cookies with our name that verifies;
    /// `Err(Some(reason))` when one was there but none verified.
    fn verified_cookie(&self, headers: &HeaderMap, now: u64) -> Result<Claims, Option<Rejection>> {
        let mut first_rejection = None;
        let name = self.config.cookie.name.as_bytes();
        for (_, header) in headers.iter().filter(|(n, _)| *n == b"cookie") {
            for pair in header.split(|&b| b == b';') {
                let pair = pair.trim_ascii();
                let Some(eq) = pair.iter().position(|&b| b == b'=') else { continue };
                let (key, value) = pair.split_at(eq);
                if key != name {
                    continue;
                }
                let value = value.get(1..).unwrap_or_default();
                match self.config.verified.decode(value, &self.config.keys, now) {
                    Ok(claims) => return Ok(claims),
                    Err(reason) => {
                        first_rejection.get_or_insert(reason);
                    }
                }
            }
        }
        Err(first_rejection)
    }

    /// 16 unguessable bytes: the host's CSPRNG, or else an HMAC under the
    /// signing key of (time, counter, stream), which only key holders can predict.
    fn unguessable(&self, host: &mut impl HttpHost) -> [u8; 16] {
        if let Some(bytes) = host.random() {
            return bytes;
        }
        let n = self.worker.ids_made.get().wrapping_add(1);
        self.worker.ids_made.set(n);
        let seed = format!("sid|{}|{}|{}", host.now_ms(), n, self.context_id);
        let mut bytes = [0u8; 16];
        if let Some(tag) = self.config.keys.sign(seed.as_bytes()) {
            bytes.iter_mut().zip(tag).for_each(|(b, t)| *b = t);
        }
        bytes
    }

    fn start_new_session(&mut self, host: &mut impl HttpHost) {
        let sid = cookie::new_sid(&self.unguessable(host));
        let forward = Forward { session_id: Some(&sid), session_new: true, retry_unreached: true, ..Forward::default() };
        self.forward(host, &forward);
        self.session = Session::New { sid };
    }

    /// Sets or removes each internal request header.
    fn forward(&self, host: &mut impl HttpHost, f: &Forward<'_>) {
        let names = &self.config.headers;
        let sent = self.client_sent;
        let headers = [
            (&names.route, f.route, sent.route),
            (&names.session_id, f.session_id, sent.session_id),
            (&names.session_new, f.session_new.then_some("1"), sent.session_new),
            (&names.session_state, f.session_state, sent.session_state),
        ];
        for (name, value, client_sent) in headers {
            match value {
                Some(value) => host.set_request_header(name, value),
                None if client_sent => host.remove_request_header(name),
                None => {}
            }
        }
        if f.retry_unreached {
            host.set_request_header("x-envoy-retry-on", RETRY_ON_UNREACHED);
            host.set_request_header("x-envoy-max-retries", MAX_RETRIES);
        }
    }

    fn begin_failover(&mut self, host: &mut impl HttpHost, from: Claims, path: String) -> Action {
        if self.config.store.is_none() {
            // No store: the session starts over on a live host.
            self.count(Counter::FailoversFresh);
            self.start_new_session(host);
            return Action::Continue;
        }
        let token = URL_SAFE_NO_PAD.encode(self.unguessable(host));
        self.ask_store_to_begin(host, Failover { from, path, token, lease: false, restored: false, polls: 0, moves: 0 })
    }

    fn ask_store_to_begin(&mut self, host: &mut impl HttpHost, failover: Failover) -> Action {
        let config = Rc::clone(&self.config);
        let Some(store) = &config.store else { return Action::Continue };
        let call = dialect(store).begin_failover(
            self.store_session(failover.from.sid()),
            &failover.from.owner(),
            &failover.token,
            millis(store.lease.0),
        );
        self.session = Session::Failover(failover);
        match host.dispatch(store, &call, false) {
            Some(token) => {
                self.pending = Some((token, Pending::Begin, host.now_ms()));
                Action::Pause
            }
            None => {
                self.count(Counter::StoreErrors);
                self.store_outage(host, StoreError::Unavailable(0))
            }
        }
    }

    fn store_session<'a>(&self, sid: &'a str) -> store::Session<'a> {
        store::Session { sid, ttl_ms: self.config.cookie.ttl_secs.saturating_mul(1000) }
    }

    /// A failover could not read the store: follow the configured policy.
    fn store_outage(&mut self, host: &mut impl HttpHost, error: StoreError) -> Action {
        let config = Rc::clone(&self.config);
        let Some(store) = &config.store else { return Action::Continue };
        warn!("[{}] session store unavailable during failover ({error:?}); policy {:?}", self.context_id, store.on_outage);
        match store.on_outage {
            OutagePolicy::Fresh => {
                self.count(Counter::FailoversFresh);
                self.start_new_session(host);
                Action::Continue
            }
            OutagePolicy::Reject => {
                self.count(Counter::OutageRejected);
                self.reply_retry_later(host, "session store unavailable; retry later\n", None);
                Action::Pause
            }
        }
    }

    /// Handles the store's answer to the call with `token`. `status` is None
    /// when the call failed or timed out.
    pub fn on_store_response(&mut self, host: &mut impl HttpHost, token: u32, status: Option<u32>, body: &[u8]) {
        let Some((expected, pending, started_ms)) = self.pending.take() else { return };
        if expected != token {
            self.pending = Some((expected, pending, started_ms));
            return;
        }
        let config = Rc::clone(&self.config);
        let Some(store) = &config.store else { return };
        let elapsed = host.now_ms().saturating_sub(started_ms);
        self.worker.metrics.store_latency(elapsed);
        let status = status.unwrap_or_else(|| {
            let timed_out = elapsed >= millis(store.timeout.0);
            self.count(if timed_out { Counter::StoreTimeouts } else { Counter::StoreErrors });
            0
        });
        let dialect = dialect(store);
        match pending {
            Pending::Begin => {
                if self.resolve_begin(host, dialect.parse_begin(status, body)) == Action::Continue {
                    host.resume_request();
                }
            }
            Pending::Fenced { held, sid } => {
                let reply = dialect.parse_fenced(status, body);
                if self.resolve_fenced(host, store, &sid, reply) == Action::Continue && held {
                    host.resume_response();
                }
            }
        }
    }

    fn resolve_begin(&mut self, host: &mut impl HttpHost, reply: Result<Begin, StoreError>) -> Action {
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                if status_counted(&error) {
                    self.count(Counter::StoreErrors);
                }
                return self.store_outage(host, error);
            }
        };
        if let Begin::Acquired { state: Some(state) } = &reply {
            if !is_header_value(state.as_bytes()) {
                self.count(Counter::StoreErrors);
                return self.store_outage(host, StoreError::Protocol("stored state is not a valid header value".into()));
            }
        }
        let Session::Failover(mut failover) = std::mem::replace(&mut self.session, Session::None) else {
            return Action::Continue;
        };
        match reply {
            Begin::Acquired { state } => {
                failover.lease = true;
                failover.restored = state.is_some();
                let forward = Forward {
                    session_id: Some(failover.from.sid()),
                    // Nothing stored yet: the app must create the session, not refuse it.
                    session_new: state.is_none(),
                    session_state: state.as_deref(),
                    retry_unreached: true,
                    ..Forward::default()
                };
                self.forward(host, &forward);
                self.session = Session::Failover(failover);
                Action::Continue
            }
            Begin::Busy if failover.polls < MAX_BUSY_POLLS => {
                failover.polls += 1;
                self.ask_store_to_begin(host, failover)
            }
            Begin::Busy => {
                // Another proxy is still moving this session; the request reached no app.
                self.count(Counter::ClaimConflicts);
                self.reply_retry_later(host, "session is being moved; retry\n", None);
                Action::Pause
            }
            Begin::Moved { owner } => {
                let now_ms = host.now_ms();
                let moved = store::split_owner(&owner).and_then(|(h, i)| self.claims_for(failover.from.sid(), h, i, now_ms / 1000));
                let Some(moved) = moved else {
                    return self.store_outage(host, StoreError::Protocol("owner is not host#instance".into()));
                };
                let gone = self.worker.gone.borrow().is_gone(moved.host(), moved.instance(), now_ms)
                    || moved.owner() == failover.from.owner();
                if gone && failover.moves < MAX_MOVES {
                    // The new owner is gone too: move the session on from there.
                    failover.moves += 1;
                    failover.from = moved;
                    return self.ask_store_to_begin(host, failover);
                }
                // Another proxy finished this failover: join its owner.
                self.count(Counter::FailoversJoined);
                self.send_pinned(host, moved, failover.path, true)
            }
        }
    }

    /// A 503 that tells the client to retry, optionally re-pinning its cookie.
    fn reply_retry_later(&self, host: &mut impl HttpHost, body: &str, set_cookie: Option<&str>) {
        let retry_after = self.config.store.as_ref().map_or(1, |s| s.retry_after.0.as_secs()).to_string();
        let mut headers = vec![("retry-after", retry_after.as_str()), ("cache-control", "no-store")];
        if let Some(set_cookie) = set_cookie {
            headers.push(("set-cookie", set_cookie));
        }
        host.send_response(503, &headers, body);
    }

    /// Gives back a failover lease that led nowhere, so the replay can take it
    /// at once. Fire and forget: the lease also expires by itself.
    fn release_lease(&self, host: &mut impl HttpHost, failover: &Failover) {
        let Some(store) = &self.config.store else { return };
        if failover.lease {
            let call = dialect(store).release(self.store_session(failover.from.sid()), &failover.token);
            if host.dispatch(store, &call, true).is_none() {
                self.count(Counter::StoreErrors);
            }
        }
    }

    /// Signs and re-reads a cookie, giving claims for a session at a new place.
    fn claims_for(&self, sid: &str, host: &str, instance: &str, now: u64) -> Option<Claims> {
        let value = self.cookie_value(sid, host, instance, now, 0)?;
        cookie::decode(value, &self.config.keys, now).ok()
    }

    fn cookie_value(&self, sid: &str, host: &str, instance: &str, now: u64, flags: u8) -> Option<String> {
        let claims = NewClaims { sid, host, instance, iat: now, exp: now.saturating_add(self.config.cookie.ttl_secs), flags };
        cookie::encode(&claims, &self.config.keys)
    }

    fn set_cookie_header(&self, value: &str) -> String {
        let c = &self.config.cookie;
        let mut header = String::with_capacity(c.name.len() + value.len() + c.attributes.len() + 1);
        header.push_str(&c.name);
        header.push('=');
        header.push_str(value);
        header.push_str(&c.attributes);
        header
    }

    pub fn on_response_headers(&mut self, host: &mut impl HttpHost) -> Action {
        if matches!(self.session, Session::None) {
            return Action::Continue;
        }
        let config = Rc::clone(&self.config);
        let headers = host.response_headers();
        let response = ResponseView::read(&headers, &config);
        if response.state_sent {
            host.remove_response_header(&self.config.headers.session_state);
            if response.state.is_none() {
                warn!("[{}] the app sent session state that is not a valid header value; not stored", self.context_id);
            }
        }
        if response.unknown {
            host.remove_response_header(&self.config.headers.session_unknown);
        }
        if response.route {
            host.remove_response_header(&self.config.headers.route);
        }
        let now_ms = self.request_ms;
        match std::mem::replace(&mut self.session, Session::None) {
            Session::None => Action::Continue,
            Session::New { sid } => {
                let Some(upstream) = host.upstream_address() else { return Action::Continue };
                if unreached(host, &response) != Unreached::No {
                    return Action::Continue; // no app served it: nothing to pin to
                }
                self.count(Counter::SessionsCreated);
                self.pin(host, &response, &sid, &upstream, None)
            }
            Session::Pinned { claims, path, reissue } => self.pinned_response(host, &response, claims, path, reissue, now_ms),
            Session::Failover(failover) => {
                match unreached(host, &response) {
                    Unreached::No => {}
                    Unreached::NoHealthyHost => {
                        self.release_lease(host, &failover);
                        return Action::Continue;
                    }
                    Unreached::ConnectFailed => {
                        // Every retry hit hosts that just died: no app saw the
                        // request, so it may go round again (counted once, at its first 307).
                        self.release_lease(host, &failover);
                        info!("[{}] failover of a session found no live host yet; replaying", self.context_id);
                        return self.replay(host, &failover.from, &failover.path);
                    }
                }
                let Some(upstream) = host.upstream_address() else { return Action::Continue };
                if response.unknown {
                    // Even a live host refused the restored session: pass the answer on.
                    self.release_lease(host, &failover);
                    return Action::Continue;
                }
                if failover.restored {
                    self.count(Counter::StateRestored);
                }
                let lease = failover.lease.then_some(failover.token);
                let commit = FailoverCommit { from: &failover.from, lease };
                self.pin(host, &response, failover.from.sid(), &upstream, Some(commit))
            }
        }
    }

    fn pinned_response(&mut self, host: &mut impl HttpHost, response: &ResponseView<'_>, claims: Claims, path: String, reissue: bool, now_ms: u64) -> Action {
        let found_gone = unreached(host, response) != Unreached::No;
        let instance_changed = !claims.instance().is_empty() && response.instance.is_some_and(|i| i != claims.instance());
        if !found_gone && !response.unknown && !instance_changed {
            // The hot path: same host, same instance.
            if reissue || self.needs_refresh(&claims, now_ms / 1000) {
                self.reissue(host, &claims);
            }
            return match response.state {
                Some(state) => self.write_state(host, claims.sid(), &claims.owner(), state),
                None => Action::Continue,
            };
        }
        let upstream = host.upstream_address();
        let ttl_ms = millis(self.config.gone_ttl);
        let same_address = upstream.as_deref().is_none_or(|u| u == claims.host());
        let restarted = same_address && instance_changed;
        if found_gone || !same_address {
            // Nothing answered at the pinned address (or Envoy retried elsewhere).
            self.count(Counter::HostsMarkedGone);
            info!("[{}] upstream {} is gone; its sessions fail over", self.context_id, claims.host());
            self.worker.gone.borrow_mut().mark(host, claims.host(), Sighting::Down, now_ms, ttl_ms);
        } else if let (true, Some(instance)) = (restarted, response.instance) {
            info!("[{}] upstream {} restarted as instance {instance}", self.context_id, claims.host());
            self.worker.gone.borrow_mut().mark(host, claims.host(), Sighting::Replaced { instance: instance.to_string() }, now_ms, ttl_ms);
        }
        if found_gone || response.unknown {
            // The request reached no app, or the app did nothing: replay it.
            self.count(if restarted { Counter::FailoversRestart } else { Counter::FailoversReplayed });
            return self.replay(host, &claims, &path);
        }
        // An app that does not implement "unknown session" served the request
        // on a new instance (or host): its state starts fresh; pin to it.
        self.count(if restarted { Counter::FailoversRestart } else { Counter::FailoversFresh });
        let Some(upstream) = upstream else { return Action::Continue };
        self.pin(host, response, claims.sid(), &upstream, Some(FailoverCommit { from: &claims, lease: None }))
    }

    fn needs_refresh(&self, claims: &Claims, now: u64) -> bool {
        if Some(claims.kid()) != self.config.keys.signing_id() {
            return true; // signed with an older key: move it to the current one
        }
        let life = claims.exp.saturating_sub(claims.iat) as f64;
        now.saturating_sub(claims.iat) as f64 >= life * self.config.cookie.refresh_after
    }

    /// Re-signs the cookie with a fresh expiry (and the current signing key).
    fn reissue(&self, host: &mut impl HttpHost, claims: &Claims) {
        if let Some(value) = self.cookie_value(claims.sid(), claims.host(), claims.instance(), host.now_ms() / 1000, 0) {
            self.count(Counter::CookiesRefreshed);
            host.add_response_header("set-cookie", &self.set_cookie_header(&value));
        }
    }

    /// Answers 307 to the same URL with the cookie flagged moving, so the
    /// client's replay takes the failover path on any proxy replica.
    fn replay(&self, host: &mut impl HttpHost, claims: &Claims, path: &str) -> Action {
        let now = host.now_ms() / 1000;
        let Some(value) = self.cookie_value(claims.sid(), claims.host(), claims.instance(), now, claims.flags | FLAG_MOVING) else {
            return Action::Continue;
        };
        let set_cookie = self.set_cookie_header(&value);
        host.send_response(
            307,
            &[("location", same_site_location(path)), ("set-cookie", &set_cookie), ("cache-control", "no-store")],
            "session moved to a live host; repeat the request\n",
        );
        Action::Pause
    }

    /// Pins the session to the host that answered: sets the cookie and stores
    /// the owner (with any new state). During a failover the owner is recorded
    /// even without new state.
    fn pin(&mut self, host: &mut impl HttpHost, response: &ResponseView<'_>, sid: &str, upstream: &str, failover: Option<FailoverCommit<'_>>) -> Action {
        let instance = response.instance.unwrap_or("");
        let Some(value) = self.cookie_value(sid, upstream, instance, host.now_ms() / 1000, 0) else {
            warn!("[{}] cannot pin to upstream {upstream:?} instance {instance:?}", self.context_id);
            return Action::Continue;
        };
        host.add_response_header("set-cookie", &self.set_cookie_header(&value));
        let config = Rc::clone(&self.config);
        let Some(store) = &config.store else { return Action::Continue };
        let to_owner = cookie::owner_of(upstream, instance);
        let dialect = dialect(store);
        let call = match (&failover, response.state) {
            (Some(FailoverCommit { lease: Some(token), .. }), state) => {
                dialect.commit_failover(self.store_session(sid), token, &to_owner, state)
            }
            (Some(FailoverCommit { from, lease: None }), Some(state)) => dialect.write(self.store_session(sid), &from.owner(), &to_owner, state),
            (None, Some(state)) => dialect.write(self.store_session(sid), &to_owner, &to_owner, state),
            (_, None) => return Action::Continue,
        };
        if response.state.is_some() {
            self.count(Counter::StoreWrites);
        }
        self.dispatch_fenced(host, store, sid, &call)
    }

    /// Stores new state from the session's owner (the pinned path).
    fn write_state(&mut self, host: &mut impl HttpHost, sid: &str, owner: &str, state: &str) -> Action {
        let config = Rc::clone(&self.config);
        let Some(store) = &config.store else { return Action::Continue };
        self.count(Counter::StoreWrites);
        let call = dialect(store).write(self.store_session(sid), owner, owner, state);
        self.dispatch_fenced(host, store, sid, &call)
    }

    fn dispatch_fenced(&mut self, host: &mut impl HttpHost, store: &StoreConfig, sid: &str, call: &StoreCall) -> Action {
        let held = store.write == WriteMode::Sync;
        match host.dispatch(store, call, !held) {
            Some(token) => {
                self.pending = Some((token, Pending::Fenced { held, sid: sid.to_string() }, host.now_ms()));
                if held {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
            None => {
                self.count(Counter::StoreErrors);
                Action::Continue
            }
        }
    }

    fn resolve_fenced(&mut self, host: &mut impl HttpHost, store: &StoreConfig, sid: &str, reply: Result<Fenced, StoreError>) -> Action {
        match reply {
            Ok(Fenced::Stored) => Action::Continue,
            Ok(Fenced::Conflict { owner }) => {
                // This host no longer owns the session: its state is not kept.
                self.count(Counter::StoreWritesRejected);
                warn!("[{}] store refused a write from a host that does not own the session (owner {owner:?})", self.context_id);
                if store.write == WriteMode::Async {
                    return Action::Continue;
                }
                // Tell the client the change was not kept, and pin it to the owner.
                let now = host.now_ms() / 1000;
                let set_cookie = owner
                    .as_deref()
                    .and_then(store::split_owner)
                    .and_then(|(h, i)| self.cookie_value(sid, h, i, now, 0))
                    .map(|v| self.set_cookie_header(&v));
                self.reply_retry_later(host, "session belongs to another host; its change was not kept; retry\n", set_cookie.as_deref());
                Action::Pause
            }
            Err(error) => {
                // The app still holds the state; the next write catches the store up.
                if status_counted(&error) {
                    self.count(Counter::StoreErrors);
                }
                warn!("[{}] session state write failed: {error:?}", self.context_id);
                Action::Continue
            }
        }
    }
}

/// The request's own path as a redirect target, or "/" when a browser could
/// read it as another site ("//evil.example", "/\\evil.example"): the replay
/// must never be an open redirect.
fn same_site_location(path: &str) -> &str {
    let bytes = path.as_bytes();
    let same_site = bytes.first() == Some(&b'/') && !matches!(bytes.get(1), Some(b'/' | b'\\'));
    if same_site {
        path
    } else {
        "/"
    }
}

/// Whether a response proves the request reached no app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unreached {
    No,
    /// Envoy had no healthy host to send it to (503 UH).
    NoHealthyHost,
    /// Envoy could not connect to the host it picked (503 UF).
    ConnectFailed,
}

fn unreached(host: &mut impl HttpHost, response: &ResponseView<'_>) -> Unreached {
    if response.status != 503 {
        return Unreached::No;
    }
    let flags = host.response_flags();
    if flags & FLAG_UPSTREAM_CONNECTION_FAILURE != 0 {
        Unreached::ConnectFailed
    } else if flags & FLAG_NO_HEALTHY_UPSTREAM != 0 {
        Unreached::NoHealthyHost
    } else {
        Unreached::No
    }
}

/// How a pin records the new owner after a failover.
struct FailoverCommit<'a> {
    from: &'a Claims,
    /// The store lease, when the failover took one.
    lease: Option<String>,
}

/// The parts of a response the flow looks at, read with one host call.
#[derive(Debug, Default)]
struct ResponseView<'a> {
    status: u32,
    instance: Option<&'a str>,
    state: Option<&'a str>,
    /// The app sent a state header, readable or not: it never reaches the client.
    state_sent: bool,
    unknown: bool,
    /// `stateful_session` echoes the routing header on responses; it stays internal.
    route: bool,
}

impl<'a> ResponseView<'a> {
    fn read(headers: &'a HeaderMap, config: &Config) -> ResponseView<'a> {
        let names = &config.headers;
        let mut view = ResponseView::default();
        for (name, value) in headers.iter() {
            match name {
                b":status" => view.status = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
                n if n == names.instance_id.as_bytes() => {
                    // An empty or unusable id is no id: it must not look like a restart.
                    view.instance = std::str::from_utf8(value).ok().filter(|i| !i.is_empty() && cookie::is_instance(i));
                }
                n if n == names.session_state.as_bytes() => {
                    view.state_sent = true;
                    view.state = Some(value).filter(|v| is_header_value(v)).and_then(|v| std::str::from_utf8(v).ok());
                }
                n if n == names.session_unknown.as_bytes() => view.unknown = true,
                n if n == names.route.as_bytes() => view.route = true,
                _ => {}
            }
        }
        view
    }
}

/// Visible ASCII, space and tab: what may travel in a header value unchanged.
fn is_header_value(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// The configured store dialect.
fn dialect(store: &StoreConfig) -> impl Dialect + '_ {
    match store.dialect {
        DialectName::Webdis => Webdis::new(&store.key_prefix),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Transport failures were already counted as errors or timeouts.
fn status_counted(error: &StoreError) -> bool {
    !matches!(error, StoreError::Unavailable(0))
}

#[cfg(test)]
mod tests;

//! New and pinned sessions on the way back: pin the cookie, store new state,
//! and follow the session's lifecycle.
//!
//! The rules for a pinned request's answer:
//! - no app was reached (503 UH/UF, or a sidecar's "unreached"): the host is
//!   gone; mark it and replay the request (307) down the failover path;
//! - the connection broke before an answer (503 UC/UR), or the app server
//!   answered an error around an app that marks its answers (no instance
//!   id): replay a safe method the same way, without marking the host (the
//!   replay finds out); pass the error on for any other method, which an app
//!   may have processed;
//! - "unknown session" from the very instance the cookie names: the app ended
//!   it (logout, its own expiry). Ended is not lost: delete the stored copy,
//!   drop the cookie, replay as a new session;
//! - "unknown session" from another instance at the address: the app
//!   restarted and lost it; replay down the failover path to restore it;
//! - another instance that served it anyway (an app without the contract): pin
//!   to that instance and move the owner, fenced;
//! - otherwise the app served it: end, rotate, or store new state as it asks.

use log::{info, warn};

use super::issue::Pin;
use super::response::{Reach, ResponseView};
use super::{Flow, Served, Stream};
use crate::cookie::{Claims, FLAG_MOVING, FLAG_NEW};
use crate::gone::{Change, Sighting};
use crate::host::{Action, HttpHost};
use crate::ids::{Owner, SessionId};
use crate::metrics::Counter;
use crate::store::{Op, Reply, StoreError};

/// A pinned host that Envoy does not know (503 UH), that this worker never
/// saw answer, and that some proxy pinned or refreshed a cookie for less than
/// this long ago is taken for one this proxy's endpoint view lacks yet.
pub(super) const UNSEEN_HOST_GRACE_SECS: u64 = 10;

impl Flow {
    pub(super) fn new_session_response(&mut self, host: &mut impl HttpHost, response: &ResponseView<'_>, sid: SessionId) -> Action {
        if response.reach(|| host.response_flags()) != Reach::Served {
            return Action::Continue; // no app served it: nothing to pin to
        }
        let Some(upstream) = host.upstream_address() else { return Action::Continue };
        let instance = response.instance.unwrap_or("");
        self.host_answered(host, &upstream, instance);
        if response.end {
            return Action::Continue; // the app ended it at once: nothing to keep
        }
        // An app that rotates the id at once (a login form's first request)
        // names the id the session lives under.
        let sid = response.rotate.filter(|s| !s.is_empty()).unwrap_or(sid.as_str()).to_string();
        self.request.new_session = true;
        self.count(Counter::SessionsCreated);
        let since = self.request.started_ms / 1000;
        let flags = if self.config.store.is_some() { FLAG_NEW } else { 0 };
        self.pin_flagged(host, Pin { sid: &sid, cluster: self.request.cluster.as_str(), upstream: &upstream, instance, since }, flags);
        let owner = Owner { upstream: &upstream, instance }.to_string();
        self.write_state(host, Served::At { sid, owner, since }, response.state)
    }

    pub(super) fn pinned_response(&mut self, host: &mut impl HttpHost, response: &ResponseView<'_>, claims: Claims, reissue: bool) -> Action {
        match response.reach(|| host.response_flags()) {
            // Envoy's own "not a host I can send to": this session moves, no
            // other. It may be a host this proxy's endpoint view does not have
            // yet, which a cookie issued moments ago makes likely: then retry.
            Reach::NoHealthyHost => {
                let age = (self.request.started_ms / 1000).saturating_sub(claims.iat);
                if age < UNSEEN_HOST_GRACE_SECS && !self.worker.seen.with(|seen| seen.has_seen(&*host, claims.upstream())) {
                    info!("[{}] upstream {} is unknown here and was pinned {age}s ago; not moving the session", self.context_id, claims.upstream());
                    self.count(Counter::FailoversDeferred);
                    self.stream = Stream::Done;
                    self.issuer().retry_later(host, "the session's host is not known to this proxy yet; retry\n", None);
                    return Action::Pause;
                }
                self.count(Counter::FailoversReplayed);
                return self.replay_moving(host, &claims);
            }
            Reach::ConnectFailed => {
                info!("[{}] upstream {} is gone; its sessions fail over", self.context_id, claims.upstream());
                self.mark(host, claims.upstream(), Sighting::down(claims.instance()));
                self.count(Counter::FailoversReplayed);
                return self.replay_moving(host, &claims);
            }
            Reach::ConnectionLost if self.request.safe_method => {
                self.count(Counter::FailoversReset);
                return self.replay_moving(host, &claims);
            }
            Reach::ConnectionLost => return Action::Continue,
            Reach::Served => {}
        }
        // Not the app's answer, and not Envoy's own (no flags): replay a safe
        // method like a lost connection; the failover path finds a live app.
        if self.request.safe_method && response.is_app_server_error(claims.instance(), || host.response_flags()) {
            self.count(Counter::FailoversReset);
            return self.replay_moving(host, &claims);
        }
        let instance = response.instance.unwrap_or("");
        let instance_changed = !claims.instance().is_empty() && !instance.is_empty() && instance != claims.instance();
        if !response.unknown && !instance_changed {
            // The hot path: the pinned instance answered (strict steering means
            // it came from the pinned upstream: no address to read).
            return self.pinned_session_continues(host, response, claims, reissue);
        }
        // Only a config without `strict` lets Envoy pick another host: then the pinned one is gone.
        let upstream = host.upstream_address().unwrap_or_else(|| claims.upstream().to_string());
        let moved = upstream != claims.upstream();
        let restarted = !moved && instance_changed;
        if moved {
            self.mark(host, claims.upstream(), Sighting::down(claims.instance()));
        } else if restarted {
            info!("[{}] upstream {} restarted as instance {instance}", self.context_id, claims.upstream());
            self.mark(host, claims.upstream(), Sighting::Runs { instance: instance.to_string() });
        }
        if response.unknown {
            if moved || restarted {
                // Lost, not ended: restore it from the store on the replay.
                self.count(if restarted { Counter::FailoversRestart } else { Counter::FailoversReplayed });
                return self.replay_moving(host, &claims);
            }
            self.end_session(host, &claims, None);
            return self.replay_as_new(host);
        }
        // An app without "unknown" served it from a fresh session: pin to it,
        // and move the owner (its stored state no longer applies).
        self.count(if restarted { Counter::FailoversRestart } else { Counter::FailoversFresh });
        if restarted {
            self.count(Counter::FailoversFresh);
        }
        let since = claims.since;
        self.pin(host, claims.sid(), &upstream, instance, since);
        let to = Owner { upstream: &upstream, instance }.to_string();
        self.move_owner(host, &claims, to, response.state, since)
    }

    /// The pinned instance served the request: end, rotate, or refresh the
    /// cookie and store new state, as the app asks.
    fn pinned_session_continues(&mut self, host: &mut impl HttpHost, response: &ResponseView<'_>, claims: Claims, reissue: bool) -> Action {
        self.host_answered(host, claims.upstream(), response.instance.unwrap_or(""));
        if response.end {
            host.add_response_header("set-cookie", &self.issuer().expired_cookie());
            return self.end_held(host, claims.sid().to_string(), claims.owner().to_string(), None);
        }
        if let Some(new_sid) = response.rotate {
            return self.rotate(host, &claims, claims.owner(), new_sid, None, response.state);
        }
        if reissue || self.issuer().needs_refresh(&claims, self.request.started_ms / 1000) {
            self.count(Counter::CookiesRefreshed);
            self.pin(host, claims.sid(), claims.upstream(), claims.instance(), claims.since);
            self.touch(host, &claims);
        }
        self.write_state(host, Served::Cookie(claims), response.state)
    }

    /// Records a sighting of `upstream` in the gone table.
    pub(super) fn mark(&self, host: &mut impl HttpHost, upstream: &str, sighting: Sighting) {
        let now_ms = host.now_ms();
        let change = self.worker.gone.borrow_mut().mark(&*host, upstream, sighting, now_ms, self.config.gone_ttl_ms);
        if change != Change::Unchanged {
            self.count(Counter::GoneMarked);
        }
    }

    /// The app at `upstream` answered as `instance`: whatever marked it gone
    /// before this request was sent is over.
    pub(super) fn host_answered(&self, host: &mut impl HttpHost, upstream: &str, instance: &str) {
        self.worker.seen.with(|seen| seen.saw(&*host, upstream));
        if !self.worker.gone.borrow().mentions(upstream) {
            return; // the usual case: nothing to forget, no clock read
        }
        let sent_ms = self.request.started_ms;
        let now_ms = host.now_ms();
        let change = self.worker.gone.borrow_mut().alive(&*host, upstream, instance, sent_ms, now_ms, self.config.gone_ttl_ms);
        if change != Change::Unchanged {
            info!("[{}] upstream {upstream} answers again (instance {instance:?})", self.context_id);
            self.count(Counter::GoneCleared);
        }
    }

    /// Sets the cookie pinning `sid` to `upstream` and `instance`.
    pub(super) fn pin(&self, host: &mut impl HttpHost, sid: &str, upstream: &str, instance: &str, since: u64) {
        self.pin_flagged(host, Pin { sid, cluster: self.request.cluster.as_str(), upstream, instance, since }, 0);
    }

    fn pin_flagged(&self, host: &mut impl HttpHost, pin: Pin<'_>, flags: u8) {
        match self.issuer().set_cookie(host, pin, flags) {
            Some(set_cookie) => host.add_response_header("set-cookie", &set_cookie),
            None => info!("[{}] no cookie for upstream {:?} instance {:?} (unusable, or the session is past its lifetime)", self.context_id, pin.upstream, pin.instance),
        }
    }

    /// Answers 307 to the same URL with the cookie flagged moving, so the
    /// client's replay takes the failover path on any proxy replica.
    pub(super) fn replay_moving(&mut self, host: &mut impl HttpHost, claims: &Claims) -> Action {
        self.stream = Stream::Done;
        let Some(set_cookie) = self.issuer().set_cookie(host, Pin::of(claims), FLAG_MOVING) else {
            return Action::Continue;
        };
        self.issuer().replay(host, &self.request.path, &set_cookie);
        Action::Pause
    }

    /// Answers 307 to the same URL dropping the cookie: the replay starts a
    /// new session. Only for requests no app acted on.
    pub(super) fn replay_as_new(&mut self, host: &mut impl HttpHost) -> Action {
        self.stream = Stream::Done;
        let expired = self.issuer().expired_cookie();
        self.issuer().replay(host, &self.request.path, &expired);
        Action::Pause
    }

    /// Stores the state a response carries (if any) from its owner, and
    /// remembers the session for a state that may come as a trailer.
    pub(super) fn write_state(&mut self, host: &mut impl HttpHost, served: Served, state: Option<&str>) -> Action {
        let write = match (state, &self.config.store) {
            // A flood of new sessions costs the store a bounded rate.
            (Some(_), Some(store)) if self.request.new_session && !self.worker.new_session_write_allowed(host.now_ms(), store.new_session_writes_per_second) => None,
            (Some(state), Some(_)) => Some(served.write(state, self.store_ttl(served.since(), host.now_ms()))),
            _ => None,
        };
        self.stream = Stream::Served(served);
        let Some(op) = write else { return Action::Continue };
        self.count(Counter::StoreWrites);
        self.store_change(host, op)
    }

    /// Moves the stored owner from the cookie's to `to`, fenced, with the
    /// response's state or none.
    fn move_owner(&mut self, host: &mut impl HttpHost, from: &Claims, to: String, state: Option<&str>, since: u64) -> Action {
        let sid = from.sid().to_string();
        self.stream = Stream::Served(Served::At { sid: sid.clone(), owner: to.clone(), since });
        if self.config.store.is_none() {
            return Action::Continue;
        }
        if state.is_some() {
            self.count(Counter::StoreWrites);
        }
        let ttl_ms = self.store_ttl(since, host.now_ms());
        let op = Op::Write { sid, from: from.owner().to_string(), to, state: state.map(str::to_string), ttl_ms };
        self.store_change(host, op)
    }

    /// Keeps the store entry of an active session from expiring while idle
    /// (fire and forget: the cookie refresh paces it).
    fn touch(&self, host: &mut impl HttpHost, claims: &Claims) {
        if self.config.store.is_none() {
            return;
        }
        let ttl_ms = self.store_ttl(claims.since, host.now_ms());
        let op = Op::Touch { sid: claims.sid().to_string(), owner: claims.owner().to_string(), ttl_ms };
        self.worker.send_in_background(host, &self.config, self.context_id, op);
    }

    /// The app ended the session on a request that is replayed (no response
    /// to hold): its stored copy becomes a tombstone (fenced on the owner, or
    /// on `lease` during a failover), sent by the worker; until the store
    /// has it, every worker of this proxy knows the session ended.
    pub(super) fn end_session(&mut self, host: &mut impl HttpHost, claims: &Claims, lease: Option<String>) {
        self.count(Counter::SessionsEnded);
        self.stream = Stream::Done;
        let Some(store) = &self.config.store else { return };
        let (sid, now_ms) = (claims.sid().to_string(), host.now_ms());
        self.worker.remember_ended(&*host, &sid, now_ms.saturating_add(store.idle_ttl_ms), now_ms);
        let op = Op::End { sid, owner: claims.owner().to_string(), lease, tombstone_ms: store.idle_ttl_ms };
        if !self.worker.send_in_background(host, &self.config, self.context_id, op) {
            self.worker.unprotected(now_ms);
        }
    }

    /// The app ended the session in this response: the response waits until
    /// the store holds the tombstone (fenced on `owner`, or on `lease` during
    /// a failover), whatever `store.write` says, so no failover anywhere
    /// restores the session once the client knows it ended. If the store
    /// cannot say so, the response still goes ([`Flow::end_not_confirmed`]).
    pub(super) fn end_held(&mut self, host: &mut impl HttpHost, sid: String, owner: String, lease: Option<String>) -> Action {
        self.count(Counter::SessionsEnded);
        self.stream = Stream::Done;
        let Some(store) = &self.config.store else { return Action::Continue };
        // While the tombstone is on its way, a failover this proxy already
        // began must not restore the session either.
        let now_ms = host.now_ms();
        self.worker.remember_ended(&*host, &sid, now_ms.saturating_add(store.lease_ms), now_ms);
        let op = Op::End { sid, owner, lease, tombstone_ms: store.idle_ttl_ms };
        self.store_change(host, op)
    }

    /// The app moved the session to `new_sid` (a login): move the stored
    /// entry atomically, now owned by `to`, and re-issue the cookie under the
    /// new id. `lease` fences the move during a failover.
    pub(super) fn rotate(&mut self, host: &mut impl HttpHost, claims: &Claims, to: Owner<'_>, new_sid: &str, lease: Option<String>, state: Option<&str>) -> Action {
        if new_sid.is_empty() {
            info!("[{}] the app asked to rotate the session without a valid new id; ignored", self.context_id);
            return self.write_state(host, Served::Cookie(claims.clone()), state);
        }
        self.count(Counter::SessionsRotated);
        let Some(store) = &self.config.store else {
            self.pin(host, new_sid, to.upstream, to.instance, claims.since);
            return Action::Continue;
        };
        let owner = to.to_string();
        self.stream = Stream::Served(Served::At { sid: new_sid.to_string(), owner: owner.clone(), since: claims.since });
        let op = Op::Rotate {
            sid: claims.sid().to_string(),
            new_sid: new_sid.to_string(),
            from: claims.owner().to_string(),
            lease,
            to: owner,
            state: state.map(str::to_string),
            ttl_ms: self.store_ttl(claims.since, host.now_ms()),
            tombstone_ms: store.idle_ttl_ms,
        };
        // The cookie for the new id waits for the store's answer: an id
        // already in use must not be handed over ([`Flow::rotation_answered`]).
        let action = self.store_change(host, op);
        if action == Action::Continue {
            self.pin(host, new_sid, to.upstream, to.instance, claims.since);
        }
        action
    }

    /// The store answered a held rotation to `new_sid` (owned by `to`): pin
    /// the cookie to it, unless that id belongs to another session (the
    /// cookie is dropped: the client starts over) or the session ended.
    pub(super) fn rotation_answered(&mut self, host: &mut impl HttpHost, new_sid: &str, to: &str, reply: &Result<Reply, StoreError>) {
        match reply {
            Ok(Reply::Taken) => {
                warn!("[{}] the app rotated a session to an id already in use; the cookie is dropped", self.context_id);
                host.add_response_header("set-cookie", &self.issuer().expired_cookie());
                self.stream = Stream::Done;
            }
            Ok(Reply::Ended) => {}
            _ => {
                let since = match &self.stream {
                    Stream::Served(served) => served.since(),
                    _ => self.request.started_ms / 1000,
                };
                if let Some(owner) = Owner::parse(to) {
                    self.pin(host, new_sid, owner.upstream, owner.instance, since);
                }
            }
        }
    }
}

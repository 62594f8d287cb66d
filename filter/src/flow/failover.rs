//! The failover of one session: moving it off a host that is gone, with its
//! state, exactly once across every proxy replica.
//!
//! ```text
//!   Asking ──acquired──▶ Sent ──app answered──▶ commit (new owner, state) ─▶ pinned
//!     │ ▲                  │
//!     │ └─timer── Waiting ◀┘ busy (another proxy holds the lease; a few polls, then 503)
//!     ├─moved──▶ pinned to the owner another proxy chose ("joined")
//!     ├─ended──▶ a new session (the app ended this one elsewhere)
//!     └─store unreachable──▶ outage policy: a new session, or 503 + Retry-After
//! ```
//! The lease is the store's: while one proxy holds it, no other can move the
//! session, and a host that lost the session can never overwrite it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use log::{info, warn};

use super::issue::Pin;
use super::response::{Reach, ResponseView};
use super::{Flow, Held, Pending, Served, Stream};
use crate::config::OutagePolicy;
use crate::cookie::Claims;
use crate::host::{Action, HttpHost};
use crate::ids::Owner;
use crate::metrics::Counter;
use crate::store::{is_header_value, Op, Reply, StoreError};

/// How often a failover asks again while another proxy holds the lease, and
/// the pause before each ask: a bounded number of store calls per request.
pub const POLL_DELAYS_MS: [u64; 3] = [50, 150, 400];
/// How many owners in a row a failover follows when each is gone too.
const MAX_MOVES: u32 = 3;

#[derive(Debug)]
enum Phase {
    /// The store is asked for the lease and the state.
    Asking,
    /// Another proxy holds the lease: ask again when the timer fires.
    Waiting,
    /// The lease is ours and the request went to a live host.
    Sent { restored: bool },
}

/// A session moving off a gone host.
#[derive(Debug)]
pub struct Failover {
    /// The cookie, or the owner the store named later.
    from: Claims,
    /// Our lease token.
    lease: String,
    phase: Phase,
    polls: usize,
    moves: u32,
}

impl Failover {
    pub fn is_waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting)
    }
}

impl Flow {
    pub(super) fn begin_failover(&mut self, host: &mut impl HttpHost, from: Claims) -> Action {
        if self.config.store.is_none() {
            // No store: the session starts over on a live host.
            self.count(Counter::FailoversFresh);
            self.start_new_session(host);
            return Action::Continue;
        }
        if crate::ended::has_ended(&*host, from.sid(), host.now_ms()) {
            // Its tombstone may not have reached the store: never restore it.
            info!("[{}] a failover of a session this proxy ended; starting a new one", self.context_id);
            self.start_new_session(host);
            return Action::Continue;
        }
        let lease = URL_SAFE_NO_PAD.encode(self.worker.unguessable(host, &self.config, self.context_id));
        self.ask_store(host, Failover { from, lease, phase: Phase::Asking, polls: 0, moves: 0 })
    }

    /// Asks the store for the session's lease and state.
    pub(super) fn ask_store(&mut self, host: &mut impl HttpHost, mut failover: Failover) -> Action {
        let lease_ms = self.config.store.as_ref().map_or(0, |s| s.lease_ms);
        let op = Op::Begin { sid: failover.from.sid().to_string(), from: failover.from.owner().to_string(), lease: failover.lease.clone(), lease_ms };
        failover.phase = Phase::Asking;
        match self.worker.call_store(host, &self.config, self.context_id, op) {
            Some(sent) => {
                self.pending = Some(Pending::sent(sent, Held::Request));
                self.stream = Stream::Failover(failover);
                Action::Pause
            }
            None => self.store_outage(host, "store unreachable"),
        }
    }

    /// A failover could not read the store: follow the configured policy.
    fn store_outage(&mut self, host: &mut impl HttpHost, why: &str) -> Action {
        let policy = self.config.store.as_ref().map_or(OutagePolicy::Fresh, |s| s.on_outage);
        warn!("[{}] failover of a session without its state ({why}); policy {policy:?}", self.context_id);
        match policy {
            OutagePolicy::Fresh => {
                self.count(Counter::FailoversFresh);
                self.start_new_session(host);
                Action::Continue
            }
            OutagePolicy::Reject => {
                self.count(Counter::FailoversRejected);
                // The cookie is kept: a later retry restores the session.
                self.issuer().retry_later(host, "session store unavailable; retry later\n", None);
                self.stream = Stream::Done;
                Action::Pause
            }
        }
    }

    pub(super) fn on_begin_reply(&mut self, host: &mut impl HttpHost, reply: Result<Reply, StoreError>) -> Action {
        let Stream::Failover(mut failover) = std::mem::replace(&mut self.stream, Stream::Done) else {
            return Action::Continue;
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => return self.store_outage(host, &format!("{error:?}")),
        };
        match reply {
            Reply::Acquired { .. } if crate::ended::has_ended(&*host, failover.from.sid(), host.now_ms()) => {
                // Ended here while the store was asked.
                self.release(host, &failover);
                self.start_new_session(host);
                Action::Continue
            }
            Reply::Acquired { state: Some(state) } if !is_header_value(state.as_bytes()) || state.is_empty() => {
                self.release(host, &failover);
                self.store_outage(host, "stored state is not a valid header value")
            }
            Reply::Acquired { state } => {
                self.send_unpinned(host, failover.from.sid(), state.as_deref());
                failover.phase = Phase::Sent { restored: state.is_some() };
                self.stream = Stream::Failover(failover);
                Action::Continue
            }
            Reply::Busy => match POLL_DELAYS_MS.get(failover.polls) {
                Some(&delay) if host.set_timer(delay) => {
                    failover.polls += 1;
                    failover.phase = Phase::Waiting;
                    self.stream = Stream::Failover(failover);
                    Action::Pause
                }
                _ => {
                    // Another proxy is still moving this session; no app saw the request.
                    self.count(Counter::FailoversBusy);
                    self.issuer().retry_later(host, "session is being moved; retry\n", None);
                    Action::Pause
                }
            },
            Reply::Moved { owner } => self.follow(host, failover, &owner),
            Reply::Ended => {
                info!("[{}] the session ended elsewhere; starting a new one", self.context_id);
                self.start_new_session(host);
                Action::Continue
            }
            other => {
                warn!("[{}] store answered a failover with {other:?}", self.context_id);
                self.store_outage(host, "unexpected answer")
            }
        }
    }

    /// Another proxy already moved the session to `owner`: join it, or move
    /// on from there if that owner is gone too.
    fn follow(&mut self, host: &mut impl HttpHost, mut failover: Failover, owner: &str) -> Action {
        let now_ms = host.now_ms();
        let pin = Owner::parse(owner).and_then(|o| {
            let pin = Pin { upstream: o.upstream, instance: o.instance, ..Pin::of(&failover.from) };
            self.issuer().claims(pin, now_ms / 1000)
        });
        let Some(moved) = pin else {
            return self.store_outage(host, "owner is not upstream#instance");
        };
        let gone = self.worker.gone.borrow().is_gone(moved.upstream(), moved.instance(), now_ms) || moved.owner() == failover.from.owner();
        if gone && failover.moves < MAX_MOVES {
            failover.moves += 1;
            failover.from = moved;
            return self.ask_store(host, failover);
        }
        self.count(Counter::FailoversJoined);
        self.send_pinned(host, moved, true);
        Action::Continue
    }

    /// Gives back a lease that led nowhere, so the replay can take it at once.
    /// Fire and forget: the lease also expires by itself.
    fn release(&self, host: &mut impl HttpHost, failover: &Failover) {
        let op = Op::Release { sid: failover.from.sid().to_string(), lease: failover.lease.clone() };
        self.worker.send_in_background(host, &self.config, self.context_id, op);
    }

    /// The answer to the request sent with the restored state.
    pub(super) fn failover_response(&mut self, host: &mut impl HttpHost, response: &ResponseView<'_>, failover: Failover) -> Action {
        let Phase::Sent { restored } = failover.phase else { return Action::Continue };
        match response.reach(|| host.response_flags()) {
            Reach::Served => {}
            Reach::NoHealthyHost => {
                self.release(host, &failover);
                return Action::Continue; // no live host at all: the 503 stands
            }
            Reach::ConnectFailed => {
                // Every retry hit hosts that just died; no app saw the request,
                // so it may go round again (counted once, at its first 307).
                self.release(host, &failover);
                info!("[{}] failover of a session found no live host yet; replaying", self.context_id);
                return self.replay_moving(host, &failover.from);
            }
            Reach::ConnectionLost => {
                self.release(host, &failover);
                return if self.request.safe_method { self.replay_moving(host, &failover.from) } else { Action::Continue };
            }
        }
        let Some(upstream) = host.upstream_address() else {
            self.release(host, &failover);
            return Action::Continue;
        };
        if response.is_app_server_error(failover.from.instance(), || host.response_flags()) {
            // No app took the session: its error stands, and the session stays
            // where the store has it (the cookie still says moving).
            self.release(host, &failover);
            return Action::Continue;
        }
        let instance = response.instance.unwrap_or("");
        self.host_answered(host, &upstream, instance);
        let lease = Some(failover.lease.clone());
        if response.unknown {
            // Even a live host refused the restored session (say, its state
            // failed the app's own checks): start over as a new session.
            self.count(Counter::FailoversRefused);
            if response.end {
                self.end_session(host, &failover.from, lease);
            } else {
                self.release(host, &failover);
            }
            return self.replay_as_new(host);
        }
        if response.end {
            host.add_response_header("set-cookie", &self.issuer().expired_cookie());
            return self.end_held(host, failover.from.sid().to_string(), failover.from.owner().to_string(), lease);
        }
        self.count(if restored { Counter::FailoversRestored } else { Counter::FailoversFresh });
        let to = Owner { upstream: &upstream, instance };
        if let Some(new_sid) = response.rotate.filter(|s| !s.is_empty()) {
            return self.rotate(host, &failover.from, to, new_sid, lease, response.state);
        }
        let since = failover.from.since;
        self.pin(host, failover.from.sid(), &upstream, instance, since);
        let sid = failover.from.sid().to_string();
        self.stream = Stream::Served(Served::At { sid: sid.clone(), owner: to.to_string(), since });
        if response.state.is_some() {
            self.count(Counter::StoreWrites);
        }
        let op = Op::Commit { sid, lease: failover.lease, to: to.to_string(), state: response.state.map(str::to_string), ttl_ms: self.store_ttl(since, host.now_ms()) };
        self.store_change(host, op)
    }
}

//! What every stream of one worker shares: counters, the local copy of the
//! gone table, the verified-cookie cache, and the store calls that outlive
//! their stream. Also the one place store calls are made and their answers
//! read, so the breaker, the counters and the reply checks apply to all.

use std::cell::{Cell, RefCell};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use log::{info, warn};

use crate::breaker::{Admit, Breaker, Transition};
use crate::config::{Config, StoreSettings};
use crate::cookie::{cluster_tag, ClusterTag, VerifiedCookies};
use crate::gone::{GoneTable, SeenHosts};
use crate::host::{HttpHost, SharedData, WorkerHost};
use crate::metrics::{Counter, Metrics};
use crate::store::{Client, Memory, Op, Progress, Reply, StoreCall, StoreError, MAX_CALLS};

/// Worker calls queued or in flight at most; beyond it the oldest are
/// forgotten, counted (a store that never answers cannot grow this).
const MAX_DETACHED: usize = 1024;
/// One "state changes are not protected" line per worker per this interval.
const UNPROTECTED_LOG_INTERVAL_MS: u64 = 10_000;

#[derive(Debug, Default)]
pub struct Worker {
    pub metrics: Metrics,
    pub gone: RefCell<GoneTable>,
    pub seen: RefCell<SeenHosts>,
    pub verified: VerifiedCookies,
    /// The last cluster name seen and its tag (hashing it per request would
    /// cost a SHA-256 block on the hot path).
    cluster: RefCell<Option<(String, ClusterTag)>>,
    /// Store calls that must outlive their stream, queued until the worker
    /// sends them from its own context ([`Worker::send_queued`]).
    queued: RefCell<Vec<StoreCall>>,
    /// The worker's calls in flight: (token, call, start time).
    detached: RefCell<Vec<(u64, StoreCall, u64)>>,
    /// The worker's calls that failed and go out again at a time: (due, call).
    retrying: RefCell<Vec<(u64, StoreCall)>>,
    /// What store calls taught the worker (etcd's token and leases).
    store_memory: RefCell<Memory>,
    /// Feeds the keyed fallback for unguessable ids when the host has no CSPRNG.
    ids_made: Cell<u64>,
    unprotected: Cell<u64>,
    unprotected_logged_ms: Cell<u64>,
    oversize_logged_ms: Cell<u64>,
    /// New sessions' first writes in the current second: (second, count).
    new_session_writes: Cell<(u64, u32)>,
}

/// A store call that went out.
#[derive(Debug)]
pub struct Sent {
    pub token: u64,
    pub call: StoreCall,
    pub started_ms: u64,
}

/// What the answer to a store call led to.
#[derive(Debug)]
pub enum Answer {
    /// The operation's outcome.
    Reply(Result<Reply, StoreError>),
    /// The operation needed another call, which went out: wait for it.
    Waiting(Box<Sent>),
    /// The call failed and goes out again at `due_ms` ([`Worker::resend`]).
    Later { call: Box<StoreCall>, due_ms: u64 },
}

impl Worker {
    pub fn count(&self, counter: Counter) {
        self.metrics.incr(counter);
    }

    /// The tag of the route's cluster.
    pub fn cluster_tag(&self, name: &str) -> ClusterTag {
        if let Ok(cached) = self.cluster.try_borrow() {
            if let Some((_, tag)) = cached.as_ref().filter(|(n, _)| n == name) {
                return *tag;
            }
        }
        let tag = cluster_tag(name);
        if let Ok(mut cached) = self.cluster.try_borrow_mut() {
            *cached = Some((name.to_string(), tag));
        }
        tag
    }

    /// 16 unguessable bytes: the host's CSPRNG, or else an HMAC under the
    /// signing key of (time, counter, stream), which only key holders can predict.
    pub fn unguessable(&self, host: &mut impl WorkerHost, config: &Config, context_id: u32) -> [u8; 16] {
        if let Some(bytes) = host.random() {
            return bytes;
        }
        let n = self.ids_made.get().wrapping_add(1);
        self.ids_made.set(n);
        let seed = format!("id|{}|{}|{}", host.now_ms(), n, context_id);
        let mut bytes = [0u8; 16];
        if let Some(tag) = config.keys.sign(seed.as_bytes()) {
            bytes.iter_mut().zip(tag).for_each(|(b, t)| *b = t);
        }
        bytes
    }

    fn breaker<'a>(shared: &'a dyn SharedData, store: &StoreSettings) -> Breaker<'a> {
        let probe_ms = crate::config::millis(store.timeout).saturating_mul(2);
        Breaker::new(shared, &store.cluster, store.breaker_failures, store.breaker_cooldown_ms, probe_ms)
    }

    /// The call for `op`, unless the breaker is open (counted).
    fn make_call(&self, host: &mut impl WorkerHost, config: &Config, context_id: u32, op: Op) -> Option<StoreCall> {
        let store = config.store.as_ref()?;
        if Worker::breaker(&*host, store).admit(host.now_ms()) == Admit::Reject {
            self.count(Counter::StoreBreakerRejected);
            return None;
        }
        let nonce = URL_SAFE_NO_PAD.encode(self.unguessable(host, config, context_id).get(..12).unwrap_or_default());
        let memory = self.store_memory.try_borrow().ok()?;
        Some(Client::new(store).call(op, nonce, &memory, host.now_ms()))
    }

    /// Sends `op` to the store for this stream, which gets the answer
    /// ([`Worker::store_reply`]); `None` when the breaker is open or the call
    /// cannot start (both counted).
    pub fn call_store(&self, host: &mut impl HttpHost, config: &Config, context_id: u32, op: Op) -> Option<Sent> {
        let call = self.make_call(host, config, context_id, op)?;
        let now = host.now_ms();
        let Some(token) = host.dispatch(&call) else {
            self.count(Counter::StoreErrors);
            if let Some(store) = &config.store {
                Worker::breaker(&*host, store).failed(now, now);
            }
            return None;
        };
        Some(Sent { token, call, started_ms: now })
    }

    /// Queues `op` for the worker to send: the call outlives the stream, and
    /// its answer is counted by the worker. False when the breaker is open.
    pub fn send_later(&self, host: &mut impl HttpHost, config: &Config, context_id: u32, op: Op) -> bool {
        let Some(call) = self.make_call(host, config, context_id, op) else { return false };
        self.enqueue(call);
        host.wake_worker();
        true
    }

    /// Queues a call for [`Worker::send_queued`]. A session's state writes go
    /// out one at a time, and a newer one replaces a queued older one, so they
    /// land in order.
    pub fn enqueue(&self, call: StoreCall) {
        let Ok(mut queued) = self.queued.try_borrow_mut() else { return };
        match queued.iter_mut().find(|q| is_write(&q.op) && is_write(&call.op) && q.op.sid() == call.op.sid()) {
            Some(older) => *older = call,
            None => {
                if queued.len() >= MAX_DETACHED {
                    let dropped = queued.remove(0);
                    self.dropped(&dropped.op);
                }
                queued.push(call);
            }
        }
    }

    /// Takes the queued calls: [`Worker::send_queued`] does, and so does a
    /// shell whose workers hand their calls to one long-lived sender (each
    /// call goes to that sender's [`Worker::enqueue`]).
    pub fn take_queued(&self) -> Vec<StoreCall> {
        self.queued.try_borrow_mut().map(|mut q| std::mem::take(&mut *q)).unwrap_or_default()
    }

    /// Whether calls wait to be sent.
    pub fn has_queued(&self) -> bool {
        self.queued.try_borrow().is_ok_and(|q| !q.is_empty()) || self.retrying.try_borrow().is_ok_and(|r| !r.is_empty())
    }

    /// Sends the queued calls, from the worker's own context (so their answers
    /// come to the worker, and no stream's end cancels them).
    pub fn send_queued(&self, host: &mut impl WorkerHost, config: &Config) {
        self.send_retries(host, config);
        for call in self.take_queued() {
            let sid = call.op.sid();
            let busy = self.detached.try_borrow().is_ok_and(|d| d.iter().any(|(_, c, _)| c.op.sid() == sid))
                || self.retrying.try_borrow().is_ok_and(|r| r.iter().any(|(_, c)| c.op.sid() == sid));
            if busy {
                // The session's previous call is still out: this one waits its turn.
                if let Ok(mut queued) = self.queued.try_borrow_mut() {
                    queued.push(call);
                }
                continue;
            }
            let now = host.now_ms();
            let Some(token) = host.dispatch(&call) else {
                self.count(Counter::StoreErrors);
                if let Some(store) = &config.store {
                    Worker::breaker(&*host, store).failed(now, now);
                }
                if is_state_change(&call.op) {
                    self.unprotected(now);
                }
                continue;
            };
            self.track(Sent { token, call, started_ms: now });
        }
    }

    /// Sends the worker's retries that are due.
    fn send_retries(&self, host: &mut impl WorkerHost, config: &Config) {
        let now = host.now_ms();
        let due: Vec<(u64, StoreCall)> = match self.retrying.try_borrow_mut() {
            Ok(mut retrying) => {
                let (due, later) = std::mem::take(&mut *retrying).into_iter().partition(|(at, _)| *at <= now);
                *retrying = later;
                due
            }
            Err(_) => Vec::new(),
        };
        for (_, call) in due {
            let op = call.op.clone();
            let answer = self.resend(host, config, call);
            self.detached_answer(&op, answer, now);
        }
    }

    /// Remembers a worker call in flight.
    fn track(&self, sent: Sent) {
        if let Ok(mut calls) = self.detached.try_borrow_mut() {
            if calls.len() >= MAX_DETACHED {
                let (_, dropped, _) = calls.remove(0);
                self.dropped(&dropped.op);
            }
            calls.push((sent.token, sent.call, sent.started_ms));
        }
    }

    /// Reads the answer to a call, counting failures and feeding the breaker
    /// with the operation's outcome. If the operation needs another call
    /// (a login, a lease, a retry), it goes out from `host`'s context, so its
    /// answer comes where this one came.
    pub fn store_reply(&self, host: &mut impl WorkerHost, config: &Config, sent: &Sent, status: Option<u32>, body: &[u8], now_ms: u64) -> Answer {
        let Some(store) = &config.store else { return Answer::Reply(Err(StoreError::Unavailable(0))) };
        let elapsed = now_ms.saturating_sub(sent.started_ms);
        self.metrics.store_latency(elapsed);
        let progress = match self.store_memory.try_borrow_mut() {
            Ok(mut memory) => Client::new(store).reply(&sent.call, status, body, elapsed, &mut memory, now_ms),
            Err(_) => Err(StoreError::Protocol("store memory in use".into())),
        };
        let result = match progress {
            Ok(Progress::Done(reply)) => Ok(reply),
            Ok(Progress::Call(call)) => return self.send_next(host, store, call, now_ms),
            Ok(Progress::Retry { call, error, pause_ms }) => {
                self.count_failure(&error);
                info!("store {} call failed ({error:?}); trying again in {pause_ms} ms, call {} of at most {MAX_CALLS}", call.op.name(), call.calls);
                return Answer::Later { call: Box::new(call), due_ms: now_ms.saturating_add(pause_ms) };
            }
            Err(error) => {
                self.count_failure(&error);
                Err(error)
            }
        };
        let breaker = Worker::breaker(&*host, store);
        let transition = match &result {
            Err(StoreError::Busy) => Transition::None,
            Err(error) if !store_answered(error) => breaker.failed(sent.started_ms, now_ms),
            _ => breaker.answered(now_ms),
        };
        if transition == Transition::Opened {
            self.count(Counter::StoreBreakerOpened);
            warn!("session store {:?} failing ({:?}); store calls fail at once for {} ms", store.cluster, result.as_ref().err(), store.breaker_cooldown_ms);
        }
        Answer::Reply(result)
    }

    /// Sends a call that failed before, again.
    pub fn resend(&self, host: &mut impl WorkerHost, config: &Config, call: StoreCall) -> Answer {
        match &config.store {
            Some(store) => self.send_next(host, store, call, host.now_ms()),
            None => Answer::Reply(Err(StoreError::Unavailable(0))),
        }
    }

    /// Sends an operation's next call.
    fn send_next(&self, host: &mut impl WorkerHost, store: &StoreSettings, call: StoreCall, now_ms: u64) -> Answer {
        match host.dispatch(&call) {
            Some(token) => Answer::Waiting(Box::new(Sent { token, call, started_ms: now_ms })),
            None => {
                self.count(Counter::StoreErrors);
                Worker::breaker(&*host, store).failed(now_ms, now_ms);
                Answer::Reply(Err(StoreError::Unavailable(0)))
            }
        }
    }

    fn count_failure(&self, error: &StoreError) {
        match error {
            StoreError::Timeout => self.count(Counter::StoreTimeouts),
            StoreError::Mismatch(what) => {
                self.count(Counter::StoreMismatched);
                warn!("store answer not used: {what}");
            }
            StoreError::Protocol(what) => {
                self.count(Counter::StoreErrors);
                warn!("store answer not understood: {what}");
            }
            StoreError::Unavailable(_) => self.count(Counter::StoreErrors),
            StoreError::Busy => self.count(Counter::StoreBusy),
        }
    }

    /// The answer to a detached call (the stream may be gone): counted, never acted on.
    pub fn on_detached_reply(&self, host: &mut impl WorkerHost, config: &Config, token: u64, status: Option<u32>, body: &[u8], now_ms: u64) {
        let found = self.detached.try_borrow_mut().ok().and_then(|mut calls| {
            let at = calls.iter().position(|(t, _, _)| *t == token)?;
            Some(calls.remove(at))
        });
        let Some((_, call, started_ms)) = found else { return };
        let sent = Sent { token, call, started_ms };
        let answer = self.store_reply(host, config, &sent, status, body, now_ms);
        self.detached_answer(&sent.call.op, answer, now_ms);
    }

    /// What the worker does with what a detached call led to: wait for the
    /// next call, retry later, or count the outcome.
    fn detached_answer(&self, op: &Op, answer: Answer, now_ms: u64) {
        let result = match answer {
            Answer::Reply(result) => result,
            Answer::Waiting(next) => return self.track(*next),
            Answer::Later { call, due_ms } => {
                if let Ok(mut retrying) = self.retrying.try_borrow_mut() {
                    if retrying.len() >= MAX_DETACHED {
                        let (_, dropped) = retrying.remove(0);
                        self.dropped(&dropped.op);
                    }
                    retrying.push((due_ms, *call));
                }
                return;
            }
        };
        match result {
            Ok(Reply::Conflict { owner }) if matches!(op, Op::Write { .. } | Op::Commit { .. }) => {
                self.count(Counter::StoreWritesRejected);
                warn!("store refused a {} from a host that does not own the session (owner {owner:?})", op.name());
            }
            Ok(_) => {}
            Err(_) if is_state_change(op) => self.unprotected(now_ms),
            Err(_) => {}
        }
    }

    /// Lists `sid` as ended for every worker of this proxy until `until_ms`:
    /// its tombstone is not known to stand in the store.
    pub fn remember_ended(&self, shared: &dyn SharedData, sid: &str, until_ms: u64, now_ms: u64) {
        if !crate::ended::remember(shared, sid, until_ms, now_ms) {
            warn!("could not list session {sid} as ended for the other workers (shared data busy)");
        }
    }

    /// Counts a worker call forgotten because the worker's queue was full
    /// (the store is far behind); a change it carried is not protected.
    fn dropped(&self, op: &Op) {
        self.count(Counter::StoreCallsDropped);
        if is_state_change(op) {
            self.count(Counter::StoreWritesUnprotected);
        }
    }

    /// Whether a new session's first write may go out now, within
    /// `per_second` per worker (counted when it may not).
    pub fn new_session_write_allowed(&self, now_ms: u64, per_second: u32) -> bool {
        let second = now_ms / 1000;
        let (at, used) = self.new_session_writes.get();
        let used = if at == second { used } else { 0 };
        if used >= per_second {
            self.count(Counter::StoreNewSessionsDeferred);
            return false;
        }
        self.new_session_writes.set((second, used + 1));
        true
    }

    /// Counts a state too large to store, and says so in the log at most
    /// once per interval.
    pub fn oversize(&self, now_ms: u64, len: usize, limit: usize) {
        self.count(Counter::StoreStatesOversize);
        if self.oversize_logged_ms.get() == 0 || now_ms >= self.oversize_logged_ms.get().saturating_add(UNPROTECTED_LOG_INTERVAL_MS) {
            warn!("session state of {len} bytes not stored: over store.max_state_bytes ({limit}); a failover restores that session's last state that fit");
            self.oversize_logged_ms.set(now_ms.max(1));
        }
    }

    /// Counts a state change the store did not take, and says so in the log
    /// at most once per interval.
    pub fn unprotected(&self, now_ms: u64) {
        self.count(Counter::StoreWritesUnprotected);
        let pending = self.unprotected.get().saturating_add(1);
        if now_ms >= self.unprotected_logged_ms.get().saturating_add(UNPROTECTED_LOG_INTERVAL_MS) {
            warn!("session store unreachable: {pending} state change(s) not stored; until it recovers, those sessions lose the changes if their host is lost");
            self.unprotected_logged_ms.set(now_ms);
            self.unprotected.set(0);
        } else {
            self.unprotected.set(pending);
        }
    }
}

/// Whether a failed call still got an answer from the store itself (an
/// unusable one, a refusal): the store is there. Timeouts, lost connections
/// and Envoy's 5xx (no healthy store, a reset) say it may not be.
fn store_answered(error: &StoreError) -> bool {
    match error {
        StoreError::Mismatch(_) | StoreError::Protocol(_) => true,
        StoreError::Unavailable(status) => (400..500).contains(status),
        StoreError::Timeout | StoreError::Busy => false,
    }
}

fn is_write(op: &Op) -> bool {
    matches!(op, Op::Write { .. })
}

/// Whether an operation carries a change of the session that a failed call loses.
pub fn is_state_change(op: &Op) -> bool {
    matches!(op, Op::Write { .. } | Op::Commit { .. } | Op::End { .. } | Op::Rotate { .. })
}

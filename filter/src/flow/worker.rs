//! What every stream of one worker shares: counters, the local copy of the
//! gone table, the verified-cookie cache, and the background work
//! (`background.rs`). Also the one place store calls are made and their
//! answers read, so the breaker, the counters and the reply checks apply to all.

use std::cell::{Cell, RefCell};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use log::{info, warn};

use crate::breaker::{Admit, Breaker, Transition};
use crate::config::{Config, StoreSettings};
use crate::cookie::{cluster_tag, ClusterTag, VerifiedCookies};
use crate::exclusive::Exclusive;
use crate::gone::{GoneTable, SeenHosts};
use super::background::Background;
use crate::host::{HttpHost, SharedData, WorkerHost};
use crate::metrics::{Counter, Metrics};
use crate::store::{Client, Memory, Op, Progress, Reply, StoreCall, StoreError, MAX_CALLS};

/// One "state changes are not protected" line per worker per this interval.
const UNPROTECTED_LOG_INTERVAL_MS: u64 = 10_000;

#[derive(Debug, Default)]
pub struct Worker {
    pub metrics: Metrics,
    pub gone: RefCell<GoneTable>,
    pub seen: Exclusive<SeenHosts>,
    pub verified: VerifiedCookies,
    /// The last cluster name seen and its tag (hashing it per request would
    /// cost a SHA-256 block on the hot path).
    cluster: RefCell<Option<(String, ClusterTag)>>,
    /// The store calls that outlive their stream (`background.rs`).
    background: Exclusive<Background>,
    /// What store calls taught the worker (etcd's token and leases).
    store_memory: Exclusive<Memory>,
    /// The shared-data generation the gone table was last read at, when the
    /// host numbers its writes ([`Worker::refresh_gone`]).
    gone_read_at: Cell<Option<u64>>,
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

    /// Re-reads the proxy's gone table into this worker's copy: every time
    /// (wasm: once per idle tick), or, when the host numbers its shared-data
    /// writes (`generation`), only if any were made since the last read
    /// (native: at every request, an atomic load).
    pub fn refresh_gone(&self, shared: &dyn SharedData, generation: Option<u64>) {
        if generation.is_some() && self.gone_read_at.get() == generation {
            return;
        }
        let Ok(mut gone) = self.gone.try_borrow_mut() else {
            debug_assert!(false, "gone table borrowed during a refresh");
            self.count(Counter::InternalErrors);
            return;
        };
        gone.refresh(shared);
        self.gone_read_at.set(generation);
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
    pub(super) fn make_call(&self, host: &mut impl WorkerHost, config: &Config, context_id: u32, op: Op) -> Option<StoreCall> {
        let store = config.store.as_ref()?;
        if Worker::breaker(&*host, store).admit(host.now_ms()) == Admit::Reject {
            self.count(Counter::StoreBreakerRejected);
            return None;
        }
        let nonce = URL_SAFE_NO_PAD.encode(self.unguessable(host, config, context_id).get(..12).unwrap_or_default());
        let now = host.now_ms();
        Some(self.store_memory.with(|memory| Client::new(store).call(op, nonce, memory, now)))
    }

    /// Sends `op` to the store for this stream, which gets the answer
    /// ([`Worker::store_reply`]); `None` when the breaker is open or the call
    /// cannot start (both counted).
    pub fn call_store(&self, host: &mut impl HttpHost, config: &Config, context_id: u32, op: Op) -> Option<Sent> {
        let call = self.make_call(host, config, context_id, op)?;
        let now = host.now_ms();
        let token = self.dispatch(host, config, &call)?;
        Some(Sent { token, call, started_ms: now })
    }

    /// Starts a call; a call that cannot start is a store failure (counted,
    /// and the breaker hears of it).
    pub(super) fn dispatch(&self, host: &mut impl WorkerHost, config: &Config, call: &StoreCall) -> Option<u64> {
        let token = host.dispatch(call);
        if token.is_none() {
            self.count(Counter::StoreErrors);
            if let Some(store) = &config.store {
                let now = host.now_ms();
                Worker::breaker(&*host, store).failed(now, now);
            }
        }
        token
    }

    /// Runs `f` on the background lists (`f` must not call the worker).
    pub(super) fn background<R>(&self, f: impl FnOnce(&mut Background) -> R) -> R {
        self.background.with(f)
    }

    /// Reads the answer to a call, counting failures and feeding the breaker
    /// with the operation's outcome. If the operation needs another call
    /// (a login, a lease, a retry), it goes out from `host`'s context, so its
    /// answer comes where this one came.
    pub fn store_reply(&self, host: &mut impl WorkerHost, config: &Config, sent: &Sent, status: Option<u32>, body: &[u8], now_ms: u64) -> Answer {
        let Some(store) = &config.store else { return Answer::Reply(Err(StoreError::Unavailable(0))) };
        let elapsed = now_ms.saturating_sub(sent.started_ms);
        self.metrics.store_latency(elapsed);
        let progress = self.store_memory.with(|memory| Client::new(store).reply(&sent.call, status, body, elapsed, memory, now_ms));
        let result = match progress {
            Ok(Progress::Done(reply)) => Ok(reply),
            Ok(Progress::Call(call)) => return self.send_next(host, config, call, now_ms),
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
        let now = host.now_ms();
        self.send_next(host, config, call, now)
    }

    /// Sends an operation's next call.
    fn send_next(&self, host: &mut impl WorkerHost, config: &Config, call: StoreCall, now_ms: u64) -> Answer {
        match self.dispatch(host, config, &call) {
            Some(token) => Answer::Waiting(Box::new(Sent { token, call, started_ms: now_ms })),
            None => Answer::Reply(Err(StoreError::Unavailable(0))),
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

    /// Lists `sid` as ended for every worker of this proxy until `until_ms`:
    /// its tombstone is not known to stand in the store.
    pub fn remember_ended(&self, shared: &dyn SharedData, sid: &str, until_ms: u64, now_ms: u64) {
        if !crate::ended::remember(shared, sid, until_ms, now_ms) {
            warn!("could not list session {sid} as ended for the other workers (shared data busy)");
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

/// Whether an operation carries a change of the session that a failed call loses.
pub fn is_state_change(op: &Op) -> bool {
    matches!(op, Op::Write { .. } | Op::Commit { .. } | Op::End { .. } | Op::Rotate { .. })
}

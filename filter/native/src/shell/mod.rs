//! The native shell: the `session-affinity` core in Envoy's dynamic-module
//! ABI. Every decision is the core's; this only moves data between Envoy and
//! it, like the wasm shell (filter/src/shell/wasm.rs) does for proxy-wasm.
//!
//! Where things live:
//! - [`SessionAffinity`] is one `filter_config`, shared by every thread;
//!   [`threads`] keeps each thread's parsed config and core `Worker`.
//! - [`SessionFilter`] is one stream; its hooks run the core's `Flow` with a
//!   [`host::StreamHost`]. The host is picked with Envoy's own upstream
//!   override (no `stateful_session` filter); timers are stream schedulers
//!   committed by the module's timer thread.
//! - Store calls that must outlive their stream (async writes, ends,
//!   rotations) are sent from the main thread: a stream hands its worker's
//!   queue to the configuration, which sends each call as a configuration
//!   callout. The ABI has no per-worker context that outlives a stream, and a
//!   configuration callout must not be started off the main thread (Envoy
//!   keeps them in an unsynchronised map of the shared configuration). The
//!   main thread's `Worker` runs them as the wasm root does: `on_tick` when
//!   woken (and again when it asks), `on_reply` for their answers.
//! - [`shared_data`] is the gone table's and the breaker's process-wide store.

mod filter;
mod host;
mod metrics;
mod random;
mod shared_data;
mod threads;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use session_affinity::config::Config;
use session_affinity::flow::background::push_bounded;
use session_affinity::flow::Worker;
use session_affinity::host::WorkerHost;
use session_affinity::store::StoreCall;

use crate::abi::{ConfigContext, ConfigHandle, ConfigScheduler};
use crate::filter::{CalloutFailure, CalloutId, CalloutResponse, FilterConfig};
use crate::timer;
pub use filter::SessionFilter;
use host::Host;
use metrics::MetricIds;

/// The configuration event that runs the main thread's `Worker::on_tick`.
const TICK_EVENT: u64 = 1;

/// One `filter_config` of the module.
pub struct SessionAffinity {
    shared: Arc<Shared>,
}

/// What every thread shares of one configuration.
pub struct Shared {
    /// The plugin JSON; each thread compiles its own `Config` from it.
    json: Vec<u8>,
    metrics: MetricIds,
    /// Calls streams handed over for the main thread to send.
    handed_over: Mutex<Vec<StoreCall>>,
    scheduler: ConfigScheduler,
    /// A timed [`TICK_EVENT`] is due (the core asked to tick again).
    tick_set: AtomicBool,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Shared {
    fn parse(&self) -> Result<Config, String> {
        Config::parse(&self.json, &env_var).map_err(|e| e.to_string())
    }

    /// Hands a worker thread's queued calls to the main thread, which sends
    /// them; calls beyond the core's bound are dropped, counted by `worker`.
    fn hand_over(&self, worker: &Worker) {
        let calls = worker.take_queued();
        if calls.is_empty() {
            return;
        }
        let mut handed = self.handed_over.lock().unwrap_or_else(PoisonError::into_inner);
        let dropped: Vec<StoreCall> = calls.into_iter().filter_map(|call| push_bounded(&mut handed, call)).collect();
        drop(handed);
        for call in &dropped {
            worker.dropped(&call.op);
        }
        self.scheduler.commit(TICK_EVENT);
    }

    fn take_handed_over(&self) -> Vec<StoreCall> {
        std::mem::take(&mut *self.handed_over.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl FilterConfig for SessionAffinity {
    type Filter = SessionFilter;

    fn new(_name: &str, config: &[u8], context: &mut ConfigContext<'_>) -> Result<Self, String> {
        let parsed = Config::parse(config, &env_var).map_err(|e| format!("invalid config: {e}"))?;
        let store = parsed.store.as_ref().map_or("none", |s| s.cluster.as_str());
        log::info!(
            "session-affinity {} (native, {}) configured: cookie {:?}, keys {:?}, store {store}",
            env!("CARGO_PKG_VERSION"),
            option_env!("SESSION_AFFINITY_REVISION").unwrap_or("unknown revision"),
            parsed.cookie.name,
            parsed.keys
        );
        let metrics = MetricIds::define(context)?;
        let scheduler = context.scheduler().ok_or("Envoy gave no configuration scheduler")?;
        let shared = Shared { json: config.to_vec(), metrics, handed_over: Mutex::default(), scheduler, tick_set: AtomicBool::new(false) };
        Ok(SessionAffinity { shared: Arc::new(shared) })
    }

    fn new_filter(&self) -> SessionFilter {
        SessionFilter::new(&self.shared)
    }

    /// Sends what streams handed over, from the main thread's `Worker`.
    fn on_scheduled(&self, config: &mut ConfigHandle<'_>, event_id: u64) {
        if event_id != TICK_EVENT {
            return;
        }
        self.shared.tick_set.store(false, Ordering::Relaxed);
        let Some(main) = threads::this_thread(&self.shared) else { return };
        for call in self.shared.take_handed_over() {
            main.worker.enqueue(call);
        }
        self.tick(&main, config);
    }

    /// The answer to a call sent for a stream that may be gone: counted.
    fn on_callout_done(
        &self,
        config: &mut ConfigHandle<'_>,
        callout: CalloutId,
        response: Result<CalloutResponse<'_>, CalloutFailure>,
    ) {
        let Some(main) = threads::this_thread(&self.shared) else { return };
        let (status, body) = answer(response);
        let mut host = Host::new(config);
        let now = host.now_ms();
        main.worker.on_reply(&mut host, &main.config, callout.0, status, &body, now);
        // A session's next call waited for this answer.
        self.tick(&main, config);
    }
}

impl SessionAffinity {
    /// The main thread's `Worker::on_tick`, and its next tick when it asks.
    fn tick(&self, main: &threads::ThreadState, config: &mut ConfigHandle<'_>) {
        let next = main.worker.on_tick(&mut Host::new(config), &main.config);
        self.shared.metrics.flush(&main.worker, config);
        if let Some(after_ms) = next {
            if !self.shared.tick_set.swap(true, Ordering::Relaxed) {
                let shared = Arc::clone(&self.shared);
                timer::schedule(Duration::from_millis(after_ms), move || shared.scheduler.commit(TICK_EVENT));
            }
        }
    }
}

/// A store call's answer as the core reads it: the status (None: no answer)
/// and the body.
fn answer(response: Result<CalloutResponse<'_>, CalloutFailure>) -> (Option<u32>, Vec<u8>) {
    match response {
        Ok(response) => (response.status().map(u32::from), response.body()),
        Err(_) => (None, Vec::new()),
    }
}

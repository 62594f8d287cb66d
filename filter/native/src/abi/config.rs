//! Filter configurations: created on Envoy's main thread, where their own
//! events (scheduled work, callouts that belong to no stream) also run.

use std::cell::Cell;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::time::Duration;

use super::callout::{callout_outcome, callout_started, completion_views, Deferred};
use super::ffi::*;
use crate::filter::{CalloutError, CalloutId, Counter, FilterConfig, Histogram, MetricError};
use crate::Module;

/// Envoy's side of a filter configuration while it is created, on the main
/// thread: metrics can be defined only now (Envoy freezes metric creation
/// once `on_http_filter_config_new` returns).
pub struct ConfigContext<'a> {
    envoy: EnvoyConfigPtr,
    _during_config_new: PhantomData<&'a mut ()>,
}

type DefineMetric = unsafe extern "C" fn(EnvoyConfigPtr, RawBuffer, *mut RawBuffer, usize, *mut usize) -> u32;

impl ConfigContext<'_> {
    pub fn define_counter(&mut self, name: &str) -> Result<Counter, MetricError> {
        self.define(envoy_dynamic_module_callback_http_filter_config_define_counter, name).map(Counter)
    }

    pub fn define_histogram(&mut self, name: &str) -> Result<Histogram, MetricError> {
        self.define(envoy_dynamic_module_callback_http_filter_config_define_histogram, name).map(Histogram)
    }

    /// The number of Envoy worker threads (`--concurrency`), for sizing
    /// per-worker state (see [`Stream::worker_index`]). Envoy answers only on
    /// its main thread, where configurations are created.
    pub fn concurrency(&self) -> u32 {
        // SAFETY: no arguments; ConfigContext exists only in on_http_filter_config_new,
        // which Envoy calls on the main thread (off it, Envoy logs a bug and returns 0).
        unsafe { envoy_dynamic_module_callback_get_concurrency() }
    }

    /// A handle that runs [`FilterConfig::on_scheduled`] on Envoy's main
    /// thread, from any thread. `None` if Envoy returned none.
    pub fn scheduler(&mut self) -> Option<ConfigScheduler> {
        // SAFETY: `self.envoy` is the configuration being created; Envoy keeps only a
        // weak reference to it in the scheduler.
        NonNull::new(unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.envoy) })
            .map(|raw| ConfigScheduler { raw })
    }

    fn define(&mut self, define: DefineMetric, name: &str) -> Result<usize, MetricError> {
        let mut id = 0;
        // SAFETY: `self.envoy` is the configuration being created (a ConfigContext
        // lives only inside on_http_filter_config_new); no labels; Envoy copies the name.
        let result = unsafe { define(self.envoy, RawBuffer::of(name.as_bytes()), ptr::null_mut(), 0, &mut id) };
        match result {
            METRICS_SUCCESS => Ok(id),
            METRICS_METRIC_NOT_FOUND => Err(MetricError::NotFound),
            METRICS_INVALID_LABELS => Err(MetricError::InvalidLabels),
            METRICS_FROZEN => Err(MetricError::Frozen),
            other => Err(MetricError::Other(other)),
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: EnvoyConfigPtr,
    name: RawBuffer,
    config: RawBuffer,
) -> ModulePtr {
    // SAFETY: Envoy passes views of the filter name and config bytes that live for this call.
    let (name, config) = unsafe { (bytes(name), bytes(config)) };
    let created = catch_unwind(AssertUnwindSafe(|| {
        let name = std::str::from_utf8(name).map_err(|_| "filter_name: must be UTF-8".to_owned())?;
        let mut context = ConfigContext { envoy, _during_config_new: PhantomData };
        Module::new(name, config, &mut context)
    }));
    match created {
        Ok(Ok(module)) => Box::into_raw(Box::new(module)).cast_const().cast(),
        Ok(Err(message)) => {
            log::error!("session-affinity-native: the filter configuration is rejected: {message}");
            ptr::null()
        }
        Err(_) => {
            log::error!("session-affinity-native: creating the filter configuration panicked; it is rejected");
            ptr::null()
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ModulePtr) {
    if config.is_null() {
        return;
    }
    // SAFETY: `config` came from Box::into_raw in on_http_filter_config_new, and Envoy
    // destroys a configuration once, after the last filter made from it.
    let _ = catch_unwind(|| drop(unsafe { Box::from_raw(config.cast::<Module>().cast_mut()) }));
}

// ------------------------------------------------ the main thread's events --

/// Runs [`FilterConfig::on_scheduled`] on Envoy's main thread. Any thread may
/// commit to it at the same time: Envoy posts each commit to the main
/// thread's dispatcher, holding the configuration weakly (a commit after the
/// configuration is gone does nothing).
pub struct ConfigScheduler {
    raw: NonNull<c_void>,
}

// SAFETY: commit only reads the scheduler object (a weak pointer and a dispatcher
// reference) and posts to the dispatcher, whose queue is thread-safe; abi.h allows
// committing "from any thread". Drop deletes it, which needs no other thread to be
// committing: the configuration that owns it is dropped after its last filter.
unsafe impl Send for ConfigScheduler {}
// SAFETY: as above; `commit` takes `&self` and is safe to call concurrently.
unsafe impl Sync for ConfigScheduler {}

impl ConfigScheduler {
    pub fn commit(&self, event_id: u64) {
        // SAFETY: `raw` came from config_scheduler_new and is deleted only in Drop.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.raw.as_ptr(), event_id) }
    }
}

impl Drop for ConfigScheduler {
    fn drop(&mut self) {
        // SAFETY: `raw` came from config_scheduler_new and is not used after this.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.raw.as_ptr()) }
    }
}

/// Envoy's side of a filter configuration during one of its main-thread
/// hooks: callouts that belong to no stream (their answers come to
/// [`FilterConfig::on_callout_done`]), and metrics.
pub struct ConfigHandle<'a> {
    envoy: EnvoyConfigPtr,
    _during_hook: PhantomData<&'a mut ()>,
}

// SAFETY (for every call in this impl): a ConfigHandle exists only during a
// configuration hook on the main thread, so `self.envoy` is alive; views passed in
// live for the call (Envoy copies what it keeps); out-pointers are locals.
impl ConfigHandle<'_> {
    /// Sends a request to `cluster` from the main thread. Envoy keeps it with
    /// the configuration, so no stream's end cancels it.
    pub fn http_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
        timeout: Duration,
    ) -> Result<CalloutId, CalloutError> {
        let mut raw: Vec<RawHeader> = headers.iter().map(|(k, v)| RawHeader::of(k.as_bytes(), v)).collect();
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut id = 0;
        // SAFETY: see the impl. A completion inside this call re-enters
        // on_http_filter_config_http_callout_done, which defers it (see MAIN).
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.envoy,
                &mut id,
                RawBuffer::of(cluster.as_bytes()),
                raw.as_mut_ptr(),
                raw.len(),
                RawBuffer::of(body),
                timeout_ms,
            )
        };
        callout_started(result, id)
    }

    pub fn increment(&self, counter: Counter, by: u64) {
        // SAFETY: see the impl; no labels. Envoy rejects only an unknown id.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_increment_counter(
                self.envoy,
                counter.0,
                ptr::null_mut(),
                0,
                by,
            )
        };
    }

    pub fn record(&self, histogram: Histogram, value: u64) {
        // SAFETY: see the impl; no labels.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
                self.envoy,
                histogram.0,
                ptr::null_mut(),
                0,
                value,
            )
        };
    }
}

/// The main thread's hook state. Configuration hooks run only there, one at a
/// time, except that a callout may complete inside `http_callout` itself:
/// that completion is kept and delivered once the running hook returns.
#[derive(Default)]
struct MainThread {
    busy: Cell<bool>,
    deferred: Deferred,
}

thread_local! {
    static MAIN: MainThread = MainThread::default();
}

/// Runs one configuration hook with the module's configuration, catching a
/// panic (the event is dropped: there is no stream to fail open), then
/// delivers callouts that completed during it.
fn run_config_hook(envoy: EnvoyConfigPtr, config: ModulePtr, hook: impl FnOnce(&Module, &mut ConfigHandle<'_>)) {
    // SAFETY: `config` is what on_http_filter_config_new returned; Envoy calls its
    // hooks only while it lives, on the main thread.
    let Some(module) = (unsafe { config.cast::<Module>().as_ref() }) else {
        return;
    };
    let mut handle = ConfigHandle { envoy, _during_hook: PhantomData };
    MAIN.with(|main| {
        main.busy.set(true);
        if catch_unwind(AssertUnwindSafe(|| hook(module, &mut handle))).is_err() {
            log::error!("session-affinity-native: a configuration event panicked; it is dropped");
        }
        main.deferred.deliver(
            || true,
            |id, outcome| {
                if catch_unwind(AssertUnwindSafe(|| module.on_callout_done(&mut handle, id, outcome))).is_err() {
                    log::error!(
                        "session-affinity-native: a configuration callout hook panicked; its answer is dropped"
                    );
                }
            },
        );
        main.busy.set(false);
    });
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    envoy: EnvoyConfigPtr,
    config: ModulePtr,
    event_id: u64,
) {
    run_config_hook(envoy, config, |module, handle| module.on_scheduled(handle, event_id));
}

#[no_mangle]
#[allow(clippy::too_many_arguments)] // the ABI's signature
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    envoy: EnvoyConfigPtr,
    config: ModulePtr,
    callout_id: u64,
    result: u32,
    headers: *const RawHeader,
    headers_size: usize,
    body_chunks: *const RawBuffer,
    body_chunks_size: usize,
) {
    // SAFETY: the arrays and every view in them live for this call.
    let response = unsafe { completion_views(headers, headers_size, body_chunks, body_chunks_size) };
    if MAIN.with(|main| main.busy.get()) {
        // Completed inside `http_callout`: kept until the running hook returns.
        log::debug!("session-affinity-native: configuration callout {callout_id} completed inside http_callout");
        MAIN.with(|main| main.deferred.push(callout_id, result, &response));
        return;
    }
    run_config_hook(envoy, config, |module, handle| {
        module.on_callout_done(handle, CalloutId(callout_id), callout_outcome(result, response));
    });
}

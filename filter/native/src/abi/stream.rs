//! The handles a filter uses during a hook: the stream, and its scheduler.

use std::cell::Cell;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::time::Duration;

use super::callout::{callout_started, Deferred};
use super::ffi::*;
use crate::filter::{CalloutError, CalloutId, Counter, HeaderMap, Histogram, LocalResponse};

/// The current HTTP stream, lent to a filter for the duration of one hook.
pub struct Stream<'a> {
    pub(super) envoy: EnvoyFilterPtr,
    pub(super) state: &'a SlotState,
    pub(super) after: AfterHook,
}

/// A stream's hook bookkeeping, kept in its slot (hooks.rs) beside the
/// filter so that re-entered and destroying hooks stay sound.
#[derive(Default)]
pub(super) struct SlotState {
    /// The filter is mutably borrowed by a running hook.
    pub(super) busy: Cell<bool>,
    /// Hook frames on the stack that use this slot.
    pub(super) frames: Cell<u32>,
    /// Envoy destroyed the filter while a frame was running: the last frame frees it.
    pub(super) destroyed: Cell<bool>,
    /// The filter stopped the request (or response) and has not continued it,
    /// so failing open means continuing it.
    pub(super) decoding_stopped: Cell<bool>,
    pub(super) encoding_stopped: Cell<bool>,
    /// Callouts that Envoy completed while the filter was busy.
    pub(super) deferred: Deferred,
}

/// A header map's entries as Envoy lent them, valid while the [`Stream`] is
/// borrowed (no header can change meanwhile).
pub struct Headers<'a> {
    raw: Vec<RawHeader>,
    _stream: PhantomData<&'a ()>,
}

impl<'a> Headers<'a> {
    /// The `(name, value)` views, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])> + Clone + '_ {
        // SAFETY: as for `Stream::header`: Envoy's header storage outlives the
        // borrow of the stream, and every change takes `&mut Stream`.
        self.raw.iter().map(|header| unsafe { header_parts(header) })
    }
}

/// What the filter asked for that re-enters Envoy's filter chain, done once
/// the filter's code has returned.
#[derive(Default)]
pub(super) struct AfterHook {
    pub(super) continue_decoding: bool,
    pub(super) continue_encoding: bool,
    pub(super) local_response: Option<LocalResponse>,
}

fn header_map(map: HeaderMap) -> u32 {
    match map {
        HeaderMap::RequestHeaders => HEADER_TYPE_REQUEST_HEADER,
        HeaderMap::RequestTrailers => HEADER_TYPE_REQUEST_TRAILER,
        HeaderMap::ResponseHeaders => HEADER_TYPE_RESPONSE_HEADER,
        HeaderMap::ResponseTrailers => HEADER_TYPE_RESPONSE_TRAILER,
    }
}

// SAFETY (for every call in this impl): `self.envoy` is the Envoy filter of the hook
// that lent this Stream, alive for the whole hook; calls happen on its worker thread;
// views passed in live for the call (Envoy copies what it keeps); out-pointers are locals.
impl Stream<'_> {
    /// The first value of a header, as a view valid until the hook returns or
    /// a header changes (the borrow of `self` enforces both).
    pub fn header(&self, map: HeaderMap, name: &str) -> Option<&[u8]> {
        self.header_at(map, name, 0).0
    }

    /// Every value of a header, in order.
    pub fn header_values(&self, map: HeaderMap, name: &str) -> impl Iterator<Item = &[u8]> + '_ {
        let (first, count) = self.header_at(map, name, 0);
        let name = name.to_owned();
        first.into_iter().chain((1..count).filter_map(move |index| self.header_at(map, &name, index).0))
    }

    fn header_at(&self, map: HeaderMap, name: &str, index: usize) -> (Option<&[u8]>, usize) {
        let mut value = RawBuffer::NULL;
        let mut count = 0;
        // SAFETY: see the impl.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.envoy,
                header_map(map),
                RawBuffer::of(name.as_bytes()),
                &mut value,
                index,
                &mut count,
            )
        };
        if !found || value.ptr.is_null() {
            return (None, count);
        }
        // SAFETY: Envoy's header storage outlives the hook unless a header is
        // changed; the view borrows `self`, and every change takes `&mut self`.
        (Some(unsafe { bytes(value) }), count)
    }

    /// Every header of a map, fetched with one call: iterate it for
    /// `(name, value)` views (see [`Stream::header`]).
    pub fn headers(&self, map: HeaderMap) -> Headers<'_> {
        // SAFETY: see the impl.
        let count = unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.envoy, header_map(map)) };
        let mut raw = vec![RawHeader::NULL; count];
        // SAFETY: see the impl; `raw` has room for the `count` headers Envoy just
        // reported, and nothing on this thread changed the map since.
        if !unsafe { envoy_dynamic_module_callback_http_get_headers(self.envoy, header_map(map), raw.as_mut_ptr()) } {
            raw.clear();
        }
        Headers { raw, _stream: PhantomData }
    }

    /// Replaces every value of a header (adding it if absent).
    pub fn set_header(&mut self, map: HeaderMap, name: &str, value: &[u8]) -> bool {
        self.change_header(envoy_dynamic_module_callback_http_set_header, map, name, RawBuffer::of(value))
    }

    /// Adds a value to a header, keeping the others (e.g. another `set-cookie`).
    pub fn add_header(&mut self, map: HeaderMap, name: &str, value: &[u8]) -> bool {
        self.change_header(envoy_dynamic_module_callback_http_add_header, map, name, RawBuffer::of(value))
    }

    /// Removes every value of a header.
    pub fn remove_header(&mut self, map: HeaderMap, name: &str) -> bool {
        // A null value removes the header (abi.h, `..._http_set_header`).
        self.change_header(envoy_dynamic_module_callback_http_set_header, map, name, RawBuffer::NULL)
    }

    fn change_header(
        &mut self,
        change: unsafe extern "C" fn(EnvoyFilterPtr, u32, RawBuffer, RawBuffer) -> bool,
        map: HeaderMap,
        name: &str,
        value: RawBuffer,
    ) -> bool {
        // SAFETY: see the impl.
        unsafe { change(self.envoy, header_map(map), RawBuffer::of(name.as_bytes()), value) }
    }

    /// The cluster the route picked, once the request is routed.
    pub fn cluster_name(&self) -> Option<&str> {
        let mut name = RawBuffer::NULL;
        // SAFETY: see the impl; the name lives until the hook returns or the route changes,
        // and this crate has no call that changes the route.
        let found = unsafe { envoy_dynamic_module_callback_http_get_cluster_name(self.envoy, &mut name) };
        // SAFETY: as above.
        found.then(|| std::str::from_utf8(unsafe { bytes(name) }).ok()).flatten()
    }

    /// Sends this request to the upstream host `host` ("ip:port") of the routed
    /// cluster. With `strict`, a host that is not in the cluster (or not in an
    /// allowed health state) fails the request (503, flag UH) instead of
    /// falling back to load balancing. False if `host` is not a valid address.
    /// Header views stay valid (so `host` may be one).
    pub fn set_upstream_override_host(&self, host: &str, strict: bool) -> bool {
        // SAFETY: see the impl.
        unsafe {
            envoy_dynamic_module_callback_http_set_upstream_override_host(
                self.envoy,
                RawBuffer::of(host.as_bytes()),
                strict,
            )
        }
    }

    /// The upstream host that served the request, "ip:port".
    pub fn upstream_address(&self) -> Option<String> {
        let mut value = RawBuffer::NULL;
        // SAFETY: see the impl.
        let found = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.envoy,
                ATTRIBUTE_UPSTREAM_ADDRESS,
                &mut value,
            )
        };
        // SAFETY: valid during the call at least; copied at once.
        found.then(|| String::from_utf8_lossy(unsafe { bytes(value) }).into_owned())
    }

    /// The response code, once there is a response.
    pub fn response_code(&self) -> Option<u64> {
        self.attribute_int(ATTRIBUTE_RESPONSE_CODE)
    }

    /// Envoy's response flags as a bitmask: UH = 0x2, UF = 0x20, ...
    pub fn response_flags(&self) -> Option<u64> {
        self.attribute_int(ATTRIBUTE_RESPONSE_FLAGS)
    }

    fn attribute_int(&self, attribute: u32) -> Option<u64> {
        let mut value = 0;
        // SAFETY: see the impl.
        unsafe { envoy_dynamic_module_callback_http_filter_get_attribute_int(self.envoy, attribute, &mut value) }
            .then_some(value)
    }

    /// This stream's worker, in `0..ConfigContext::concurrency()`: per-worker
    /// state needs no lock.
    pub fn worker_index(&self) -> u32 {
        // SAFETY: see the impl.
        unsafe { envoy_dynamic_module_callback_http_filter_get_worker_index(self.envoy) }
    }

    /// Adds to a counter. Envoy rejects only an unknown id, which a
    /// [`Counter`] from [`ConfigContext::define_counter`] is not.
    pub fn increment(&self, counter: Counter, by: u64) {
        // SAFETY: see the impl; no labels.
        unsafe {
            envoy_dynamic_module_callback_http_filter_increment_counter(self.envoy, counter.0, ptr::null_mut(), 0, by)
        };
    }

    /// Records a value in a histogram (see [`Stream::increment`]).
    pub fn record(&self, histogram: Histogram, value: u64) {
        // SAFETY: see the impl; no labels.
        unsafe {
            envoy_dynamic_module_callback_http_filter_record_histogram_value(
                self.envoy,
                histogram.0,
                ptr::null_mut(),
                0,
                value,
            )
        };
    }

    /// Sends a request to `cluster`; [`HttpFilter::on_callout_done`] gets the
    /// answer. `headers` must include `:method`, `:path` and `host`.
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
        let mark = self.state.deferred.mark();
        // SAFETY: see the impl. Envoy may complete the callout before returning; that
        // re-enters on_http_filter_http_callout_done, which finds the filter busy and
        // keeps the result for later.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_http_callout(
                self.envoy,
                &mut id,
                RawBuffer::of(cluster.as_bytes()),
                raw.as_mut_ptr(),
                raw.len(),
                RawBuffer::of(body),
                timeout_ms,
            )
        };
        let started = callout_started(result, id);
        if started.is_err() {
            self.state.deferred.forget_since(mark);
        }
        started
    }

    /// A handle that runs [`HttpFilter::on_scheduled`] on this stream's worker,
    /// from any thread.
    pub fn scheduler(&mut self) -> Option<Scheduler> {
        // SAFETY: see the impl.
        NonNull::new(unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(self.envoy) })
            .map(|raw| Scheduler { raw })
    }

    /// Resumes a request held back by a stop status, once this hook returns.
    pub fn continue_decoding(&mut self) {
        self.after.continue_decoding = true;
    }

    /// Resumes a response held back by a stop status, once this hook returns.
    pub fn continue_encoding(&mut self) {
        self.after.continue_encoding = true;
    }

    /// Answers the request with `response` instead of the upstream, once this
    /// hook returns (a request hook should then return a stop status).
    pub fn send_response(&mut self, response: LocalResponse) {
        self.after.local_response = Some(response);
    }

    pub(super) fn perform_after_hook(self) {
        let Self { envoy, state, after } = self;
        if state.destroyed.get() {
            return;
        }
        if let Some(response) = after.local_response {
            let mut headers: Vec<RawHeader> =
                response.headers.iter().map(|(k, v)| RawHeader::of(k.as_bytes(), v)).collect();
            // SAFETY: see the impl; Envoy copies headers, body and details. This may
            // destroy the filter, which `frames` defers.
            unsafe {
                envoy_dynamic_module_callback_http_send_response(
                    envoy,
                    response.status,
                    headers.as_mut_ptr(),
                    headers.len(),
                    RawBuffer::of(&response.body),
                    RawBuffer::of(response.details.as_bytes()),
                )
            };
            return;
        }
        if after.continue_decoding {
            state.decoding_stopped.set(false);
            // SAFETY: see the impl; this may re-enter this stream's hooks, which is why
            // the filter is not borrowed here.
            unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(envoy) };
        }
        if after.continue_encoding && !state.destroyed.get() {
            state.encoding_stopped.set(false);
            // SAFETY: as above.
            unsafe { envoy_dynamic_module_callback_http_filter_continue_encoding(envoy) };
        }
    }
}

// ---------------------------------------------------------- Scheduler --

/// Runs [`HttpFilter::on_scheduled`] on the stream's worker thread. It may be
/// moved to and committed from any thread, and outlive the stream (a commit
/// after the stream ended does nothing).
pub struct Scheduler {
    raw: NonNull<c_void>,
}

// SAFETY: abi.h allows committing "from any thread including the ones managed by the
// module"; Envoy's scheduler posts to the worker's dispatcher (a thread-safe queue) and
// holds the filter weakly, so it is also safe to delete anywhere, before or after the stream.
unsafe impl Send for Scheduler {}

impl Scheduler {
    pub fn commit(&self, event_id: u64) {
        // SAFETY: `raw` came from scheduler_new and is deleted only in Drop.
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_commit(self.raw.as_ptr(), event_id) }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: `raw` came from scheduler_new and is not used after this.
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(self.raw.as_ptr()) }
    }
}

//! The binding to Envoy's dynamic-module C ABI (`abi.h` of Envoy 1.40, ABI
//! version v0.2.0), and the only module with `unsafe`.
//!
//! It holds three things: the raw declarations of the callbacks this crate
//! uses, the event hooks Envoy calls (`#[no_mangle]`), and the safe handles
//! the rest of the crate uses instead ([`Stream`], [`ConfigContext`],
//! [`Scheduler`]). tests/test_native_abi.py checks every imported symbol
//! against the `envoy` binary and exercises each callback in it.
//!
//! The rules that make the handles safe:
//! - A [`Stream`] exists only while a hook runs, so the Envoy filter it points
//!   to is alive. Header and attribute views borrow the `Stream`; everything
//!   that can invalidate them takes `&mut Stream`.
//! - Envoy may call a hook while another hook of the same stream is on the
//!   stack (a callout that completes inside `http_callout`, a local reply
//!   that destroys the filter). A stream's filter is therefore borrowed only
//!   through its [`Slot`], which refuses a second borrow and postpones its
//!   own destruction until the last hook frame returns. Calls that re-enter
//!   the filter chain on purpose (continue, local reply) run after the
//!   filter's code returns.
//! - Every hook catches panics and fails open: the stream continues as if
//!   the filter were absent.
//! - C enums cross the boundary as plain integers and are decoded with a
//!   fallback, so an unexpected value from Envoy can never be undefined
//!   behaviour.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell, UnsafeCell};
use std::ffi::{c_char, c_void, CStr};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::time::Duration;

use crate::filter::{
    BodyStatus, CalloutError, CalloutFailure, CalloutId, CalloutResponse, Counter, FilterConfig,
    HeaderMap, HeadersStatus, Histogram, HttpFilter, LocalResponse, MetricError, TrailersStatus,
};
use crate::Module;

/// The ABI version this binding implements, returned from program init.
/// Envoy logs "Dynamic module ABI version v0.2.0 matched." when it is its own.
pub const ABI_VERSION: &CStr = c"v0.2.0";

// ----------------------------------------------------------------- types --

/// `envoy_dynamic_module_type_http_filter_envoy_ptr`: Envoy's filter object.
type EnvoyFilterPtr = *mut c_void;
/// `envoy_dynamic_module_type_http_filter_config_envoy_ptr`.
type EnvoyConfigPtr = *mut c_void;
/// `..._http_filter_config_module_ptr` and `..._http_filter_module_ptr`: ours.
type ModulePtr = *const c_void;

/// `envoy_dynamic_module_type_envoy_buffer` and `..._module_buffer`, which
/// abi.h declares separately with the same layout: `{const char*, size_t}`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawBuffer {
    ptr: *const u8,
    length: usize,
}

/// `envoy_dynamic_module_type_envoy_http_header` and `..._module_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawHeader {
    key_ptr: *const u8,
    key_length: usize,
    value_ptr: *const u8,
    value_length: usize,
}

impl RawBuffer {
    const NULL: Self = Self { ptr: ptr::null(), length: 0 };

    fn of(bytes: &[u8]) -> Self {
        Self { ptr: bytes.as_ptr(), length: bytes.len() }
    }
}

impl RawHeader {
    const NULL: Self = Self { key_ptr: ptr::null(), key_length: 0, value_ptr: ptr::null(), value_length: 0 };

    fn of(key: &[u8], value: &[u8]) -> Self {
        Self { key_ptr: key.as_ptr(), key_length: key.len(), value_ptr: value.as_ptr(), value_length: value.len() }
    }
}

// C enums (`int`-sized); only the values this crate uses.
const HEADERS_CONTINUE: u32 = 0;
const HEADERS_STOP_ITERATION: u32 = 1;
const HEADERS_STOP_ALL_ITERATION_AND_BUFFER: u32 = 3;
const BODY_CONTINUE: u32 = 0;
const BODY_STOP_ITERATION_AND_BUFFER: u32 = 1;
const TRAILERS_CONTINUE: u32 = 0;
const TRAILERS_STOP_ITERATION: u32 = 1;
const ATTRIBUTE_RESPONSE_CODE: u32 = 15;
const ATTRIBUTE_RESPONSE_FLAGS: u32 = 17;
const ATTRIBUTE_UPSTREAM_ADDRESS: u32 = 41;
const CALLOUT_INIT_SUCCESS: u32 = 0;
const CALLOUT_SUCCESS: u32 = 0;
const METRICS_SUCCESS: u32 = 0;

extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: RawBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;
    fn envoy_dynamic_module_callback_get_concurrency() -> u32;

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: EnvoyConfigPtr,
        name: RawBuffer,
        label_names: *mut RawBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: EnvoyConfigPtr,
        name: RawBuffer,
        label_names: *mut RawBuffer,
        label_names_length: usize,
        histogram_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: EnvoyFilterPtr,
        id: usize,
        label_values: *mut RawBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        filter: EnvoyFilterPtr,
        id: usize,
        label_values: *mut RawBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_get_header(
        filter: EnvoyFilterPtr,
        header_type: u32,
        key: RawBuffer,
        result: *mut RawBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(filter: EnvoyFilterPtr, header_type: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: EnvoyFilterPtr,
        header_type: u32,
        result_headers: *mut RawHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: EnvoyFilterPtr,
        header_type: u32,
        key: RawBuffer,
        value: RawBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter: EnvoyFilterPtr,
        header_type: u32,
        key: RawBuffer,
        value: RawBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_send_response(
        filter: EnvoyFilterPtr,
        status_code: u32,
        headers: *mut RawHeader,
        headers_size: usize,
        body: RawBuffer,
        details: RawBuffer,
    );
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: EnvoyFilterPtr);
    fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter: EnvoyFilterPtr);

    fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: EnvoyFilterPtr,
        callout_id_out: *mut u64,
        cluster_name: RawBuffer,
        headers: *mut RawHeader,
        headers_size: usize,
        body: RawBuffer,
        timeout_milliseconds: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: EnvoyFilterPtr) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler: *mut c_void, event_id: u64);
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);

    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: EnvoyFilterPtr,
        attribute_id: u32,
        result: *mut RawBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: EnvoyFilterPtr,
        attribute_id: u32,
        result: *mut u64,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_cluster_name(filter: EnvoyFilterPtr, result: *mut RawBuffer) -> bool;
    fn envoy_dynamic_module_callback_http_set_upstream_override_host(
        filter: EnvoyFilterPtr,
        host: RawBuffer,
        strict: bool,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_worker_index(filter: EnvoyFilterPtr) -> u32;
}

/// A view of bytes that Envoy owns.
///
/// # Safety
/// `buffer` must be null, empty, or point to `length` bytes that stay valid
/// and unchanged for `'a`.
unsafe fn bytes<'a>(buffer: RawBuffer) -> &'a [u8] {
    if buffer.ptr.is_null() || buffer.length == 0 {
        return &[];
    }
    // SAFETY: non-null and valid for `length` bytes for `'a`, by the contract above.
    unsafe { std::slice::from_raw_parts(buffer.ptr, buffer.length) }
}

/// A view of an array that Envoy owns. Same contract as [`bytes`].
unsafe fn array<'a, T>(first: *const T, length: usize) -> &'a [T] {
    if first.is_null() || length == 0 {
        return &[];
    }
    // SAFETY: non-null and valid for `length` elements for `'a`, by the caller's contract.
    unsafe { std::slice::from_raw_parts(first, length) }
}

/// Views of a header's name and value. Same contract as [`bytes`], for both.
unsafe fn header_parts<'a>(header: &RawHeader) -> (&'a [u8], &'a [u8]) {
    let key = RawBuffer { ptr: header.key_ptr, length: header.key_length };
    let value = RawBuffer { ptr: header.value_ptr, length: header.value_length };
    // SAFETY: the caller vouches for both views.
    unsafe { (bytes(key), bytes(value)) }
}

// --------------------------------------------------- process-wide calls --

fn level_of(level: log::Level) -> u32 {
    match level {
        log::Level::Trace => 0,
        log::Level::Debug => 1,
        log::Level::Info => 2,
        log::Level::Warn => 3,
        log::Level::Error => 4,
    }
}

/// Whether Envoy's `dynamic_modules` logger would print at `level`.
pub fn log_enabled(level: log::Level) -> bool {
    // SAFETY: a plain value in, a bool out; callable from any thread.
    unsafe { envoy_dynamic_module_callback_log_enabled(level_of(level)) }
}

/// Writes a line to Envoy's `dynamic_modules` logger.
pub fn log_message(level: log::Level, message: &str) {
    // SAFETY: Envoy copies the message during the call; callable from any thread.
    unsafe { envoy_dynamic_module_callback_log(level_of(level), RawBuffer::of(message.as_bytes())) }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    crate::envoy_log::install();
    ABI_VERSION.as_ptr()
}

// ------------------------------------------------------ configuration --

/// Defines metrics while Envoy creates a filter configuration: Envoy freezes
/// metric creation once `on_http_filter_config_new` returns.
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

    fn define(&mut self, define: DefineMetric, name: &str) -> Result<usize, MetricError> {
        let mut id = 0;
        // SAFETY: `self.envoy` is the configuration being created (a ConfigContext
        // lives only inside on_http_filter_config_new); no labels; Envoy copies the name.
        let result = unsafe { define(self.envoy, RawBuffer::of(name.as_bytes()), ptr::null_mut(), 0, &mut id) };
        match result {
            METRICS_SUCCESS => Ok(id),
            1 => Err(MetricError::NotFound),
            2 => Err(MetricError::InvalidLabels),
            3 => Err(MetricError::Frozen),
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
        let mut metrics = ConfigContext { envoy, _during_config_new: PhantomData };
        Module::new(name, config, &mut metrics)
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

// ---------------------------------------------------- per-stream state --

type Filter = <Module as FilterConfig>::Filter;

/// What `on_http_filter_new` hands to Envoy: the filter and the bookkeeping
/// that keeps its borrows and its destruction sound under re-entry. It is
/// only ever touched on the stream's worker thread.
struct Slot {
    state: SlotState,
    /// `None` if creating the filter or one of its hooks panicked.
    filter: UnsafeCell<Option<Filter>>,
}

#[derive(Default)]
struct SlotState {
    /// The filter is mutably borrowed by a running hook.
    busy: Cell<bool>,
    /// Hook frames on the stack that use this slot.
    frames: Cell<u32>,
    /// Envoy destroyed the filter while a frame was running: the last frame frees it.
    destroyed: Cell<bool>,
    /// The filter stopped the request (or response) and has not continued it,
    /// so failing open means continuing it.
    decoding_stopped: Cell<bool>,
    encoding_stopped: Cell<bool>,
    /// Callouts that Envoy completed while the filter was busy (inside
    /// `http_callout` itself), delivered once it is free.
    inline_callouts: RefCell<Vec<InlineCallout>>,
}

struct InlineCallout {
    id: u64,
    result: u32,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<Vec<u8>>,
}

/// # Safety
/// `module` must be null or a pointer from `on_http_filter_new` that has not
/// been freed, used on its stream's worker thread.
unsafe fn slot<'a>(module: ModulePtr) -> Option<&'a Slot> {
    // SAFETY: by the contract above. Envoy passes our pointer back only to this
    // stream's hooks, on its worker, and passes null after on_http_filter_destroy.
    unsafe { module.cast::<Slot>().as_ref() }
}

/// Frees a slot.
///
/// # Safety
/// `module` came from `on_http_filter_new`, no reference to its slot is live,
/// and it is not used again.
unsafe fn free(module: ModulePtr) {
    // SAFETY: by the contract above; a panicking Drop of the filter is contained.
    let _ = catch_unwind(|| drop(unsafe { Box::from_raw(module.cast::<Slot>().cast_mut()) }));
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(config: ModulePtr, _envoy: EnvoyFilterPtr) -> ModulePtr {
    // SAFETY: `config` is what on_http_filter_config_new returned; Envoy keeps it until
    // on_http_filter_config_destroy, after all its filters. `Module: Sync` allows the
    // shared use from every worker.
    let config = unsafe { config.cast::<Module>().as_ref() };
    let filter = config.and_then(|config| catch_unwind(AssertUnwindSafe(|| config.new_filter())).ok());
    let slot = Slot { state: SlotState::default(), filter: UnsafeCell::new(filter) };
    Box::into_raw(Box::new(slot)).cast_const().cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: ModulePtr) {
    // SAFETY: Envoy destroys each filter once, on its worker.
    let Some(slot) = (unsafe { slot(module) }) else { return };
    if slot.state.frames.get() > 0 {
        // Called from inside one of this stream's hooks (a local reply ends the
        // stream at once): the outermost frame frees the slot when it returns.
        log::debug!("session-affinity-native: filter destroyed inside its own hook; freed when the hook returns");
        slot.state.destroyed.set(true);
        return;
    }
    // SAFETY: no hook frame is running, so nothing refers to the slot.
    unsafe { free(module) }
}

/// A hook's return value, and what it means when the filter panicked.
trait HookStatus: Copy {
    const FAIL_OPEN: Self;
    /// The filter holds the stream back until it continues it.
    fn stops(self) -> bool;
}

impl HookStatus for () {
    const FAIL_OPEN: Self = ();
    fn stops(self) -> bool {
        false
    }
}

impl HookStatus for HeadersStatus {
    const FAIL_OPEN: Self = HeadersStatus::Continue;
    fn stops(self) -> bool {
        self != HeadersStatus::Continue
    }
}

impl HookStatus for BodyStatus {
    const FAIL_OPEN: Self = BodyStatus::Continue;
    fn stops(self) -> bool {
        self != BodyStatus::Continue
    }
}

impl HookStatus for TrailersStatus {
    const FAIL_OPEN: Self = TrailersStatus::Continue;
    fn stops(self) -> bool {
        self != TrailersStatus::Continue
    }
}

fn headers_status(status: HeadersStatus) -> u32 {
    match status {
        HeadersStatus::Continue => HEADERS_CONTINUE,
        HeadersStatus::StopIteration => HEADERS_STOP_ITERATION,
        HeadersStatus::StopAllIterationAndBuffer => HEADERS_STOP_ALL_ITERATION_AND_BUFFER,
    }
}

fn body_status(status: BodyStatus) -> u32 {
    match status {
        BodyStatus::Continue => BODY_CONTINUE,
        BodyStatus::StopIterationAndBuffer => BODY_STOP_ITERATION_AND_BUFFER,
    }
}

fn trailers_status(status: TrailersStatus) -> u32 {
    match status {
        TrailersStatus::Continue => TRAILERS_CONTINUE,
        TrailersStatus::StopIteration => TRAILERS_STOP_ITERATION,
    }
}

/// Which way of the stream a hook's status holds back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
    Neither,
}

/// Runs one hook of the filter behind `module`: borrows the filter once,
/// catches a panic (failing open), delivers callouts that completed inline,
/// performs the continue or local reply the filter asked for, and frees the
/// slot if Envoy destroyed the filter meanwhile.
fn run<S: HookStatus>(
    envoy: EnvoyFilterPtr,
    module: ModulePtr,
    direction: Direction,
    hook: impl FnOnce(&mut Filter, &mut Stream<'_>) -> S,
) -> S {
    // SAFETY: `module` is this hook's argument from Envoy.
    let Some(slot) = (unsafe { slot(module) }) else { return S::FAIL_OPEN };
    let state = &slot.state;
    if state.busy.get() || state.destroyed.get() {
        return S::FAIL_OPEN;
    }
    state.frames.set(state.frames.get() + 1);
    let mut stream = Stream { envoy, state, after: AfterHook::default() };
    let status = with_filter(slot, &mut stream, hook).unwrap_or(S::FAIL_OPEN);
    match direction {
        Direction::Request => state.decoding_stopped.set(status.stops()),
        Direction::Response => state.encoding_stopped.set(status.stops()),
        Direction::Neither => {}
    }
    loop {
        let inline = std::mem::take(&mut *state.inline_callouts.borrow_mut());
        if inline.is_empty() || state.destroyed.get() {
            break;
        }
        for done in inline {
            let headers = done.headers.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            let body = done.body.iter().map(|chunk| &chunk[..]).collect();
            with_filter(slot, &mut stream, |filter, stream| {
                filter.on_callout_done(stream, CalloutId(done.id), callout_outcome(done.result, headers, body));
            });
        }
    }
    stream.perform_after_hook();
    state.frames.set(state.frames.get() - 1);
    if state.frames.get() == 0 && state.destroyed.get() {
        // SAFETY: this was the last frame, `stream` and `state` are not used below, and
        // Envoy will not pass `module` again: it already called destroy.
        unsafe { free(module) }
    }
    status
}

/// Calls `hook` with the filter mutably borrowed, unless it is borrowed
/// already, gone, or panics (then it is dropped and the stream fails open).
fn with_filter<R>(
    slot: &Slot,
    stream: &mut Stream<'_>,
    hook: impl FnOnce(&mut Filter, &mut Stream<'_>) -> R,
) -> Option<R> {
    let state = &slot.state;
    if state.busy.get() {
        return None;
    }
    state.busy.set(true);
    // SAFETY: `busy` makes this the only reference to the filter: it is checked and
    // set before every borrow, and all of them happen on this one thread.
    let filter = unsafe { &mut *slot.filter.get() };
    let outcome = filter.as_mut().map(|filter| catch_unwind(AssertUnwindSafe(|| hook(filter, stream))));
    let result = match outcome {
        Some(Ok(result)) => Some(result),
        Some(Err(_)) => {
            log::error!("session-affinity-native: the filter panicked; this stream continues without it");
            let _ = catch_unwind(AssertUnwindSafe(|| drop(filter.take())));
            stream.after = AfterHook {
                continue_decoding: state.decoding_stopped.get(),
                continue_encoding: state.encoding_stopped.get(),
                local_response: None,
            };
            None
        }
        None => None,
    };
    state.busy.set(false);
    result
}

fn callout_outcome<'a>(
    result: u32,
    headers: Vec<(&'a [u8], &'a [u8])>,
    body: Vec<&'a [u8]>,
) -> Result<CalloutResponse<'a>, CalloutFailure> {
    match result {
        CALLOUT_SUCCESS => Ok(CalloutResponse::new(headers, body)),
        1 => Err(CalloutFailure::Reset),
        2 => Err(CalloutFailure::ResponseTooLarge),
        other => Err(CalloutFailure::Other(other)),
    }
}

// ------------------------------------------------------- stream hooks --

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: EnvoyFilterPtr,
    module: ModulePtr,
    end_of_stream: bool,
) -> u32 {
    headers_status(run(envoy, module, Direction::Request, |f, s| f.on_request_headers(s, end_of_stream)))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: EnvoyFilterPtr,
    module: ModulePtr,
    end_of_stream: bool,
) -> u32 {
    body_status(run(envoy, module, Direction::Request, |f, s| f.on_request_body(s, end_of_stream)))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(envoy: EnvoyFilterPtr, module: ModulePtr) -> u32 {
    trailers_status(run(envoy, module, Direction::Request, |f, s| f.on_request_trailers(s)))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: EnvoyFilterPtr,
    module: ModulePtr,
    end_of_stream: bool,
) -> u32 {
    headers_status(run(envoy, module, Direction::Response, |f, s| f.on_response_headers(s, end_of_stream)))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    envoy: EnvoyFilterPtr,
    module: ModulePtr,
    end_of_stream: bool,
) -> u32 {
    body_status(run(envoy, module, Direction::Response, |f, s| f.on_response_body(s, end_of_stream)))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(envoy: EnvoyFilterPtr, module: ModulePtr) -> u32 {
    trailers_status(run(envoy, module, Direction::Response, |f, s| f.on_response_trailers(s)))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(envoy: EnvoyFilterPtr, module: ModulePtr) {
    run(envoy, module, Direction::Neither, |f, s| f.on_stream_complete(s))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(envoy: EnvoyFilterPtr, module: ModulePtr, event_id: u64) {
    run(envoy, module, Direction::Neither, |f, s| f.on_scheduled(s, event_id))
}

#[no_mangle]
#[allow(clippy::too_many_arguments)] // the ABI's signature
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    envoy: EnvoyFilterPtr,
    module: ModulePtr,
    callout_id: u64,
    result: u32,
    headers: *const RawHeader,
    headers_size: usize,
    body_chunks: *const RawBuffer,
    body_chunks_size: usize,
) {
    // SAFETY: the arrays (null when empty) and every view in them live for this call.
    let (headers, body_chunks) = unsafe { (array(headers, headers_size), array(body_chunks, body_chunks_size)) };
    // SAFETY: as above, for each header's name and value.
    let headers: Vec<(&[u8], &[u8])> = headers.iter().map(|header| unsafe { header_parts(header) }).collect();
    // SAFETY: as above, for each body chunk.
    let body: Vec<&[u8]> = body_chunks.iter().map(|chunk| unsafe { bytes(*chunk) }).collect();

    // SAFETY: `module` is this hook's argument from Envoy.
    if let Some(slot) = unsafe { slot(module) } {
        if slot.state.busy.get() {
            // Completed inside `http_callout`: keep a copy for when the filter is free.
            log::debug!("session-affinity-native: callout {callout_id} completed inside http_callout");
            slot.state.inline_callouts.borrow_mut().push(InlineCallout {
                id: callout_id,
                result,
                headers: headers.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect(),
                body: body.iter().map(|chunk| chunk.to_vec()).collect(),
            });
            return;
        }
    }
    run(envoy, module, Direction::Neither, |f, s| {
        f.on_callout_done(s, CalloutId(callout_id), callout_outcome(result, headers, body))
    })
}

// Hooks that Envoy requires but this crate does not use: streamed callouts
// (it never starts one) and downstream watermarks (only for terminal filters).

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: EnvoyFilterPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _headers: *const RawHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: EnvoyFilterPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _data: *const RawBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: EnvoyFilterPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _trailers: *const RawHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: EnvoyFilterPtr,
    _module: ModulePtr,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: EnvoyFilterPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: EnvoyFilterPtr,
    _module: ModulePtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: EnvoyFilterPtr,
    _module: ModulePtr,
) {
}

// ------------------------------------------------------------- Stream --

/// The current HTTP stream, lent to a filter for the duration of one hook.
pub struct Stream<'a> {
    envoy: EnvoyFilterPtr,
    state: &'a SlotState,
    after: AfterHook,
}

/// What the filter asked for that re-enters Envoy's filter chain, done once
/// the filter's code has returned.
#[derive(Default)]
struct AfterHook {
    continue_decoding: bool,
    continue_encoding: bool,
    local_response: Option<LocalResponse>,
}

fn header_map(map: HeaderMap) -> u32 {
    match map {
        HeaderMap::RequestHeaders => 0,
        HeaderMap::RequestTrailers => 1,
        HeaderMap::ResponseHeaders => 2,
        HeaderMap::ResponseTrailers => 3,
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

    /// Every header of a map, as `(name, value)` views (see [`Stream::header`]).
    pub fn headers(&self, map: HeaderMap) -> Vec<(&[u8], &[u8])> {
        // SAFETY: see the impl.
        let count = unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.envoy, header_map(map)) };
        let mut raw = vec![RawHeader::NULL; count];
        // SAFETY: see the impl; `raw` has room for the `count` headers Envoy just
        // reported, and nothing on this thread changed the map since.
        if !unsafe { envoy_dynamic_module_callback_http_get_headers(self.envoy, header_map(map), raw.as_mut_ptr()) } {
            return Vec::new();
        }
        // SAFETY: as for `header`.
        raw.iter().map(|header| unsafe { header_parts(header) }).collect()
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
    pub fn set_upstream_override_host(&mut self, host: &str, strict: bool) -> bool {
        // SAFETY: see the impl.
        unsafe { envoy_dynamic_module_callback_http_set_upstream_override_host(self.envoy, RawBuffer::of(host.as_bytes()), strict) }
    }

    /// The upstream host that served the request, "ip:port".
    pub fn upstream_address(&self) -> Option<String> {
        let mut value = RawBuffer::NULL;
        // SAFETY: see the impl.
        let found = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(self.envoy, ATTRIBUTE_UPSTREAM_ADDRESS, &mut value)
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
        unsafe { envoy_dynamic_module_callback_http_filter_increment_counter(self.envoy, counter.0, ptr::null_mut(), 0, by) };
    }

    /// Records a value in a histogram (see [`Stream::increment`]).
    pub fn record(&self, histogram: Histogram, value: u64) {
        // SAFETY: see the impl; no labels.
        unsafe {
            envoy_dynamic_module_callback_http_filter_record_histogram_value(self.envoy, histogram.0, ptr::null_mut(), 0, value)
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
        let inline_before = self.state.inline_callouts.borrow().len();
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
        if result == CALLOUT_INIT_SUCCESS {
            return Ok(CalloutId(id));
        }
        // A callout that did not start has no completion to deliver.
        self.state.inline_callouts.borrow_mut().truncate(inline_before);
        Err(match result {
            1 => CalloutError::MissingRequiredHeaders,
            2 => CalloutError::ClusterNotFound,
            3 => CalloutError::DuplicateCalloutId,
            4 => CalloutError::CannotCreateRequest,
            other => CalloutError::Other(other),
        })
    }

    /// A handle that runs [`HttpFilter::on_scheduled`] on this stream's worker,
    /// from any thread.
    pub fn scheduler(&mut self) -> Option<Scheduler> {
        // SAFETY: see the impl.
        NonNull::new(unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(self.envoy) }).map(|raw| Scheduler { raw })
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

    fn perform_after_hook(self) {
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

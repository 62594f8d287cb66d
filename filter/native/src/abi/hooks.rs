//! The event hooks of one HTTP stream, and the slot that keeps the filter's
//! borrows and destruction sound when Envoy re-enters them.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::callout::{callout_outcome, completion_views};
use super::ffi::*;
use super::stream::{AfterHook, SlotState, Stream};
use crate::filter::{BodyStatus, CalloutId, FilterConfig, HeadersStatus, HttpFilter, TrailersStatus};
use crate::Module;

type Filter = <Module as FilterConfig>::Filter;

/// What `on_http_filter_new` hands to Envoy: the filter and the bookkeeping
/// that keeps its borrows and its destruction sound under re-entry. It is
/// only ever touched on the stream's worker thread.
struct Slot {
    state: SlotState,
    /// `None` if creating the filter or one of its hooks panicked.
    filter: UnsafeCell<Option<Filter>>,
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
    let Some(slot) = (unsafe { slot(module) }) else {
        return;
    };
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
    let Some(slot) = (unsafe { slot(module) }) else {
        return S::FAIL_OPEN;
    };
    let state = &slot.state;
    if state.busy.get() || state.destroyed.get() {
        return S::FAIL_OPEN;
    }
    state.frames.set(state.frames.get() + 1);
    let mut stream = Stream { envoy, state, after: AfterHook::default() };
    let status = with_filter(slot, &mut stream, hook).unwrap_or(S::FAIL_OPEN);
    // A hook that returns Continue resumes its own way of the stream; a continue
    // call on top (asked for, or set by failing open) would resume it twice.
    match direction {
        Direction::Request => {
            state.decoding_stopped.set(status.stops());
            stream.after.continue_decoding &= status.stops();
        }
        Direction::Response => {
            state.encoding_stopped.set(status.stops());
            stream.after.continue_encoding &= status.stops();
        }
        Direction::Neither => {}
    }
    state.deferred.deliver(
        || !state.destroyed.get(),
        |id, outcome| {
            with_filter(slot, &mut stream, |filter, stream| filter.on_callout_done(stream, id, outcome));
        },
    );
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
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    envoy: EnvoyFilterPtr,
    module: ModulePtr,
) -> u32 {
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
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    envoy: EnvoyFilterPtr,
    module: ModulePtr,
) -> u32 {
    trailers_status(run(envoy, module, Direction::Response, |f, s| f.on_response_trailers(s)))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(envoy: EnvoyFilterPtr, module: ModulePtr) {
    run(envoy, module, Direction::Neither, |f, s| f.on_stream_complete(s))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    envoy: EnvoyFilterPtr,
    module: ModulePtr,
    event_id: u64,
) {
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
    let response = unsafe { completion_views(headers, headers_size, body_chunks, body_chunks_size) };

    // SAFETY: `module` is this hook's argument from Envoy.
    if let Some(slot) = unsafe { slot(module) } {
        if slot.state.busy.get() {
            // Completed inside `http_callout`: kept for when the filter is free.
            log::debug!("session-affinity-native: callout {callout_id} completed inside http_callout");
            slot.state.deferred.push(callout_id, result, &response);
            return;
        }
    }
    run(envoy, module, Direction::Neither, |f, s| {
        f.on_callout_done(s, CalloutId(callout_id), callout_outcome(result, response))
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

//! The raw C declarations of `abi.h` that this crate uses, and views of the
//! memory Envoy lends through them.

use std::ffi::c_void;
use std::ptr;

// ----------------------------------------------------------------- types --

/// `envoy_dynamic_module_type_http_filter_envoy_ptr`: Envoy's filter object.
pub type EnvoyFilterPtr = *mut c_void;
/// `envoy_dynamic_module_type_http_filter_config_envoy_ptr`.
pub type EnvoyConfigPtr = *mut c_void;
/// `..._http_filter_config_module_ptr` and `..._http_filter_module_ptr`: ours.
pub type ModulePtr = *const c_void;

/// `envoy_dynamic_module_type_envoy_buffer` and `..._module_buffer`, which
/// abi.h declares separately with the same layout: `{const char*, size_t}`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawBuffer {
    pub ptr: *const u8,
    pub length: usize,
}

/// `envoy_dynamic_module_type_envoy_http_header` and `..._module_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawHeader {
    pub key_ptr: *const u8,
    pub key_length: usize,
    pub value_ptr: *const u8,
    pub value_length: usize,
}

impl RawBuffer {
    pub const NULL: Self = Self { ptr: ptr::null(), length: 0 };

    pub fn of(bytes: &[u8]) -> Self {
        Self { ptr: bytes.as_ptr(), length: bytes.len() }
    }
}

impl RawHeader {
    pub const NULL: Self = Self { key_ptr: ptr::null(), key_length: 0, value_ptr: ptr::null(), value_length: 0 };

    pub fn of(key: &[u8], value: &[u8]) -> Self {
        Self { key_ptr: key.as_ptr(), key_length: key.len(), value_ptr: value.as_ptr(), value_length: value.len() }
    }
}

// C enums (`int`-sized), named as in abi.h; only the types this crate uses.

// `envoy_dynamic_module_type_on_http_filter_request_headers_status` (and response).
pub const HEADERS_CONTINUE: u32 = 0;
pub const HEADERS_STOP_ITERATION: u32 = 1;
pub const HEADERS_STOP_ALL_ITERATION_AND_BUFFER: u32 = 3;
// `..._on_http_filter_request_body_status` (and response).
pub const BODY_CONTINUE: u32 = 0;
pub const BODY_STOP_ITERATION_AND_BUFFER: u32 = 1;
// `..._on_http_filter_request_trailers_status` (and response).
pub const TRAILERS_CONTINUE: u32 = 0;
pub const TRAILERS_STOP_ITERATION: u32 = 1;
// `envoy_dynamic_module_type_attribute_id`.
pub const ATTRIBUTE_RESPONSE_CODE: u32 = 15;
pub const ATTRIBUTE_RESPONSE_FLAGS: u32 = 17;
pub const ATTRIBUTE_UPSTREAM_ADDRESS: u32 = 41;
// `envoy_dynamic_module_type_http_header_type`.
pub const HEADER_TYPE_REQUEST_HEADER: u32 = 0;
pub const HEADER_TYPE_REQUEST_TRAILER: u32 = 1;
pub const HEADER_TYPE_RESPONSE_HEADER: u32 = 2;
pub const HEADER_TYPE_RESPONSE_TRAILER: u32 = 3;
// `envoy_dynamic_module_type_http_callout_init_result`.
pub const CALLOUT_INIT_SUCCESS: u32 = 0;
pub const CALLOUT_INIT_MISSING_REQUIRED_HEADERS: u32 = 1;
pub const CALLOUT_INIT_CLUSTER_NOT_FOUND: u32 = 2;
pub const CALLOUT_INIT_DUPLICATE_CALLOUT_ID: u32 = 3;
pub const CALLOUT_INIT_CANNOT_CREATE_REQUEST: u32 = 4;
// `envoy_dynamic_module_type_http_callout_result`.
pub const CALLOUT_SUCCESS: u32 = 0;
pub const CALLOUT_RESET: u32 = 1;
pub const CALLOUT_EXCEED_RESPONSE_BUFFER_LIMIT: u32 = 2;
// `envoy_dynamic_module_type_metrics_result`.
pub const METRICS_SUCCESS: u32 = 0;
pub const METRICS_METRIC_NOT_FOUND: u32 = 1;
pub const METRICS_INVALID_LABELS: u32 = 2;
pub const METRICS_FROZEN: u32 = 3;
// `envoy_dynamic_module_type_log_level`.
pub const LOG_LEVEL_TRACE: u32 = 0;
pub const LOG_LEVEL_DEBUG: u32 = 1;
pub const LOG_LEVEL_INFO: u32 = 2;
pub const LOG_LEVEL_WARN: u32 = 3;
pub const LOG_LEVEL_ERROR: u32 = 4;

extern "C" {
    pub fn envoy_dynamic_module_callback_log(level: u32, message: RawBuffer);
    pub fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;
    pub fn envoy_dynamic_module_callback_get_concurrency() -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: EnvoyConfigPtr,
        name: RawBuffer,
        label_names: *mut RawBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: EnvoyConfigPtr,
        name: RawBuffer,
        label_names: *mut RawBuffer,
        label_names_length: usize,
        histogram_id: *mut usize,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: EnvoyFilterPtr,
        id: usize,
        label_values: *mut RawBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: EnvoyConfigPtr,
        id: usize,
        label_values: *mut RawBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
        config: EnvoyConfigPtr,
        id: usize,
        label_values: *mut RawBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    pub fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        filter: EnvoyFilterPtr,
        id: usize,
        label_values: *mut RawBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_get_header(
        filter: EnvoyFilterPtr,
        header_type: u32,
        key: RawBuffer,
        result: *mut RawBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_headers_size(filter: EnvoyFilterPtr, header_type: u32) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter: EnvoyFilterPtr,
        header_type: u32,
        result_headers: *mut RawHeader,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: EnvoyFilterPtr,
        header_type: u32,
        key: RawBuffer,
        value: RawBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter: EnvoyFilterPtr,
        header_type: u32,
        key: RawBuffer,
        value: RawBuffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: EnvoyFilterPtr,
        status_code: u32,
        headers: *mut RawHeader,
        headers_size: usize,
        body: RawBuffer,
        details: RawBuffer,
    );
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: EnvoyFilterPtr);
    pub fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter: EnvoyFilterPtr);

    pub fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: EnvoyFilterPtr,
        callout_id_out: *mut u64,
        cluster_name: RawBuffer,
        headers: *mut RawHeader,
        headers_size: usize,
        body: RawBuffer,
        timeout_milliseconds: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: EnvoyConfigPtr,
        callout_id_out: *mut u64,
        cluster_name: RawBuffer,
        headers: *mut RawHeader,
        headers_size: usize,
        body: RawBuffer,
        timeout_milliseconds: u64,
    ) -> u32;

    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(config: EnvoyConfigPtr) -> *mut c_void;
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler: *mut c_void, event_id: u64);
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: *mut c_void);

    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: EnvoyFilterPtr) -> *mut c_void;
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler: *mut c_void, event_id: u64);
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);

    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: EnvoyFilterPtr,
        attribute_id: u32,
        result: *mut RawBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: EnvoyFilterPtr,
        attribute_id: u32,
        result: *mut u64,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_get_cluster_name(filter: EnvoyFilterPtr, result: *mut RawBuffer) -> bool;
    pub fn envoy_dynamic_module_callback_http_set_upstream_override_host(
        filter: EnvoyFilterPtr,
        host: RawBuffer,
        strict: bool,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_get_worker_index(filter: EnvoyFilterPtr) -> u32;
}

/// A view of bytes that Envoy owns.
///
/// # Safety
/// `buffer` must be null, empty, or point to `length` bytes that stay valid
/// and unchanged for `'a`.
pub unsafe fn bytes<'a>(buffer: RawBuffer) -> &'a [u8] {
    if buffer.ptr.is_null() || buffer.length == 0 {
        return &[];
    }
    // SAFETY: non-null and valid for `length` bytes for `'a`, by the contract above.
    unsafe { std::slice::from_raw_parts(buffer.ptr, buffer.length) }
}

/// A view of an array that Envoy owns. Same contract as [`bytes`].
pub unsafe fn array<'a, T>(first: *const T, length: usize) -> &'a [T] {
    if first.is_null() || length == 0 {
        return &[];
    }
    // SAFETY: non-null and valid for `length` elements for `'a`, by the caller's contract.
    unsafe { std::slice::from_raw_parts(first, length) }
}

/// Views of a header's name and value. Same contract as [`bytes`], for both.
pub unsafe fn header_parts<'a>(header: &RawHeader) -> (&'a [u8], &'a [u8]) {
    let key = RawBuffer { ptr: header.key_ptr, length: header.key_length };
    let value = RawBuffer { ptr: header.value_ptr, length: header.value_length };
    // SAFETY: the caller vouches for both views.
    unsafe { (bytes(key), bytes(value)) }
}

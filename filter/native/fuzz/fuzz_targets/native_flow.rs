//! The native module's entry points, driven through a fake Envoy.
//!
//! The module's real `#[no_mangle]` hooks run; every callback they import is
//! implemented here by a fake Envoy that plays Envoy's part strictly. The
//! input has the shape of filter/fuzz's `flow` target: a config pick and a few
//! streams, each a set of request headers (paths, cookies signed with the
//! config's key for vocabulary hosts and instances, raw cookies, client copies
//! of internal headers in any spelling) and then any sequence of: the
//! upstream response (status, instance, state, unknown, end, rotate, upstream
//! address, response flags), body data, trailers, answers to the stream's
//! callouts (store replies echoing the call, other statuses, garbage, resets,
//! Envoy's 504 for a timeout), the main thread's events and the answers to the
//! configuration's own callouts, a timer firing, a callout that completes
//! inside `http_callout` itself, and Envoy destroying the stream at once.
//! Envoy's local reply re-enters the filter's response hook, as Envoy does.
//!
//! Properties (besides no panic, caught or not: a caught panic is logged to
//! Envoy's log, which the fake watches):
//! - no client copy of an internal header reaches the upstream, in any spelling;
//! - no internal response header reaches the client;
//! - a hook that stops its direction leaves something that will resume it (a
//!   callout in flight, a timer, a local reply) [hang];
//! - continue is only called on a stopped direction [spurious-continue];
//! - at most one local reply, and only before the response headers left [local-reply].
#![no_main]

use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::sync::{Mutex, Once};
use std::time::{SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use session_affinity::config::Config;
use session_affinity::cookie::{self, NewClaims, FLAG_MOVING};

// Link the module: its hooks are what this target calls.
use session_affinity_native as _;

// ------------------------------------------------------------ the ABI types --

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buf {
    ptr: *const u8,
    len: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Hdr {
    key: *const u8,
    key_len: usize,
    value: *const u8,
    value_len: usize,
}

fn buf(bytes: &[u8]) -> Buf {
    Buf { ptr: bytes.as_ptr(), len: bytes.len() }
}

unsafe fn slice<'a>(b: Buf) -> &'a [u8] {
    if b.ptr.is_null() || b.len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(b.ptr, b.len)
    }
}

type Ptr = *const c_void;
type EnvoyPtr = *mut c_void;

extern "C" {
    fn envoy_dynamic_module_on_program_init() -> *const c_char;
    fn envoy_dynamic_module_on_http_filter_config_new(envoy: EnvoyPtr, name: Buf, config: Buf) -> Ptr;
    fn envoy_dynamic_module_on_http_filter_config_destroy(config: Ptr);
    fn envoy_dynamic_module_on_http_filter_config_scheduled(envoy: EnvoyPtr, config: Ptr, event: u64);
    fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
        envoy: EnvoyPtr, config: Ptr, id: u64, result: u32, headers: *const Hdr, n: usize, body: *const Buf, nb: usize,
    );
    fn envoy_dynamic_module_on_http_filter_new(config: Ptr, envoy: EnvoyPtr) -> Ptr;
    fn envoy_dynamic_module_on_http_filter_destroy(module: Ptr);
    fn envoy_dynamic_module_on_http_filter_request_headers(envoy: EnvoyPtr, module: Ptr, eos: bool) -> u32;
    fn envoy_dynamic_module_on_http_filter_request_body(envoy: EnvoyPtr, module: Ptr, eos: bool) -> u32;
    fn envoy_dynamic_module_on_http_filter_response_headers(envoy: EnvoyPtr, module: Ptr, eos: bool) -> u32;
    fn envoy_dynamic_module_on_http_filter_response_body(envoy: EnvoyPtr, module: Ptr, eos: bool) -> u32;
    fn envoy_dynamic_module_on_http_filter_response_trailers(envoy: EnvoyPtr, module: Ptr) -> u32;
    fn envoy_dynamic_module_on_http_filter_stream_complete(envoy: EnvoyPtr, module: Ptr);
    fn envoy_dynamic_module_on_http_filter_scheduled(envoy: EnvoyPtr, module: Ptr, event: u64);
    fn envoy_dynamic_module_on_http_filter_http_callout_done(
        envoy: EnvoyPtr, module: Ptr, id: u64, result: u32, headers: *const Hdr, n: usize, body: *const Buf, nb: usize,
    );
}

// ------------------------------------------------------------------ inputs --

const SECRET: &str = "native-fuzz-secret-0123456789abcdef";
const HOSTS: &[&str] = &["10.0.0.1:8080", "10.0.0.2:8080", "127.0.0.1:18081"];
const INSTANCES: &[&str] = &["pod-a", "pod-b", ""];
const SIDS: &[&str] = &["AAAAAAAAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBBBBBBBB", "abcdefghijklmnopqrstuv"];
const PATHS: &[&str] = &["/cart?x=1", "/", "/static/app.js", "/a.css", "//evil.example/x", "*"];
const INTERNAL: &[&str] = &[
    "x-session-route", "x-session-id", "x-session-new", "x-session-state", "x-instance-id", "x-session-unknown",
    "x-session-end", "x-session-rotate", "x-session-unreached", "x-envoy-retry-on", "x-envoy-max-retries",
    "x-envoy-retriable-header-names",
];
/// What a client's copy of an internal header carries: never a value the filter writes.
const CLIENT_MARK: &str = "client-";

fn config_json(pick: u8) -> String {
    let keys = format!(r#""keys":[{{"id":"k1","secret":"{SECRET}"}}]"#);
    let skip = r#""skip":{"prefixes":["/static/"],"suffixes":[".css"]}"#;
    let store = |rest: &str| format!(r#","store":{{"cluster":"store","timeout":"200ms"{rest}}}"#);
    let tail = match pick % 4 {
        0 => String::new(),
        1 => store(r#","write":"sync","on_outage":"fresh""#),
        2 => store(r#","write":"async","on_outage":"reject","lease":"1s""#),
        _ => store(r#","write":"sync","breaker":{"failures":1,"cooldown":"1s"}"#),
    };
    format!(r#"{{"cookie":{{"name":"sa","secure":false}},{keys},{skip}{tail}}}"#)
}

#[derive(Arbitrary, Debug)]
enum CookieIn {
    Pinned { sid: u8, host: u8, instance: u8, moving: bool, age_s: u16 },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Spelling {
    Lower,
    Upper,
    Underscores,
}

#[derive(Arbitrary, Debug)]
struct RequestIn {
    post: bool,
    path: u8,
    cookies: Vec<CookieIn>,
    internal: Vec<(u8, Spelling, u8)>,
    other: Vec<(u8, Vec<u8>)>,
}

#[derive(Arbitrary, Debug)]
enum Flags {
    None,
    NoHealthyUpstream,
    ConnectFailure,
    Reset,
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct ResponseIn {
    status: u16,
    instance: Option<u8>,
    state: Option<Vec<u8>>,
    unknown: bool,
    end: bool,
    rotate: Option<u8>,
    upstream: Option<u8>,
    flags: Flags,
}

#[derive(Arbitrary, Debug, Clone)]
enum Body {
    Acquired,
    AcquiredWith(String),
    Moved(u8, u8),
    Busy,
    Stored,
    Conflict(Option<(u8, u8)>),
    Ended,
    Taken,
    /// Another call's nonce.
    Stale,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone)]
enum Outcome {
    Reply(Body),
    Status(u16, Body),
    Reset,
    TooLarge,
    /// Envoy's own answer to a callout that ran out of time.
    Timeout,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Response(ResponseIn),
    RequestBody,
    ResponseBody,
    Trailers(Option<Vec<u8>>),
    Reply { pick: u8, outcome: Outcome },
    /// The main thread runs its events, then the configuration's callouts are answered.
    MainThread(Outcome),
    Timer,
    /// The stream's next callout completes inside `http_callout`.
    InlineNext(Outcome),
    /// Envoy resets the stream now.
    Destroy,
}

#[derive(Arbitrary, Debug)]
struct StreamIn {
    request: RequestIn,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    config: u8,
    streams: Vec<StreamIn>,
}

// --------------------------------------------------------------- the fake --

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Before,
    Paused,
    Gone,
}

type Headers = Vec<(Vec<u8>, Vec<u8>)>;

struct Stream {
    request: Headers,
    response: Headers,
    trailers: Headers,
    upstream: Option<Vec<u8>>,
    flags: u64,
    code: u64,
    module: Ptr,
    req: Dir,
    resp: Dir,
    /// Callouts in flight: (id, request body).
    callouts: Vec<(u64, Vec<u8>)>,
    next_callout: u64,
    inline: Option<Outcome>,
    local_replies: u32,
    timer: bool,
    destroyed: bool,
}

impl Stream {
    fn new() -> Stream {
        Stream {
            request: Vec::new(),
            response: Vec::new(),
            trailers: Vec::new(),
            upstream: None,
            flags: 0,
            code: 0,
            module: std::ptr::null(),
            req: Dir::Before,
            resp: Dir::Before,
            callouts: Vec::new(),
            next_callout: 1,
            inline: None,
            local_replies: 0,
            timer: false,
            destroyed: false,
        }
    }

    fn map(&mut self, kind: u32) -> Option<&mut Headers> {
        match kind {
            0 => Some(&mut self.request),
            2 => Some(&mut self.response),
            3 => Some(&mut self.trailers),
            _ => None,
        }
    }
}

/// The configuration's side: its callouts in flight.
#[derive(Default)]
struct FakeConfig {
    callouts: Vec<(u64, Vec<u8>)>,
    next_callout: u64,
}

/// A stream's fake `Envoy` object, handed to the module as its envoy pointer.
type StreamCell = RefCell<Stream>;

thread_local! {
    static LOGGED_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static FINDING: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Config scheduler events may be committed from any thread.
static CONFIG_EVENTS: Mutex<u32> = Mutex::new(0);

fn finding(name: &str, detail: String) {
    FINDING.with(|f| {
        if f.borrow().is_none() {
            *f.borrow_mut() = Some(format!("[{name}] {detail}"));
        }
    });
}

unsafe fn stream<'a>(envoy: EnvoyPtr) -> &'a StreamCell {
    &*(envoy as *const StreamCell)
}

unsafe fn fake_config<'a>(envoy: EnvoyPtr) -> &'a RefCell<FakeConfig> {
    &*(envoy as *const RefCell<FakeConfig>)
}

// ------------------------------------------------------- Envoy's callbacks --

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_log(level: u32, message: Buf) {
    let text = String::from_utf8_lossy(unsafe { slice(message) }).into_owned();
    if level >= 3 && text.contains("panicked") {
        LOGGED_PANIC.with(|p| *p.borrow_mut() = Some(text));
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool {
    level >= 3
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_get_concurrency() -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_get_worker_index(_: EnvoyPtr) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_counter(
    _: EnvoyPtr, _: Buf, _: *mut Buf, _: usize, id: *mut usize,
) -> u32 {
    unsafe { *id = 1 };
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
    _: EnvoyPtr, _: Buf, _: *mut Buf, _: usize, id: *mut usize,
) -> u32 {
    unsafe { *id = 1 };
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_increment_counter(
    _: EnvoyPtr, _: usize, _: *mut Buf, _: usize, _: u64,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
    _: EnvoyPtr, _: usize, _: *mut Buf, _: usize, _: u64,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
    _: EnvoyPtr, _: usize, _: *mut Buf, _: usize, _: u64,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
    _: EnvoyPtr, _: usize, _: *mut Buf, _: usize, _: u64,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_get_header(
    envoy: EnvoyPtr, kind: u32, key: Buf, result: *mut Buf, index: usize, size: *mut usize,
) -> bool {
    let s = unsafe { stream(envoy) };
    let mut s = s.borrow_mut();
    let key = unsafe { slice(key) };
    let Some(map) = s.map(kind) else { return false };
    let values: Vec<&(Vec<u8>, Vec<u8>)> = map.iter().filter(|(k, _)| k.as_slice() == key).collect();
    if !size.is_null() {
        unsafe { *size = values.len() };
    }
    match values.get(index) {
        Some((_, v)) => {
            unsafe { *result = buf(v) };
            true
        }
        None => false,
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_get_headers_size(envoy: EnvoyPtr, kind: u32) -> usize {
    let s = unsafe { stream(envoy) };
    let mut s = s.borrow_mut();
    s.map(kind).map_or(0, |m| m.len())
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_get_headers(envoy: EnvoyPtr, kind: u32, out: *mut Hdr) -> bool {
    let s = unsafe { stream(envoy) };
    let mut s = s.borrow_mut();
    let Some(map) = s.map(kind) else { return false };
    for (i, (k, v)) in map.iter().enumerate() {
        unsafe { *out.add(i) = Hdr { key: k.as_ptr(), key_len: k.len(), value: v.as_ptr(), value_len: v.len() } };
    }
    true
}

/// Envoy lower-cases names; the module only ever passes lower case.
fn check_name(name: &[u8]) {
    if name.iter().any(|b| b.is_ascii_uppercase()) {
        finding("header-case", format!("the module wrote a header name with upper case: {:?}", String::from_utf8_lossy(name)));
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_set_header(envoy: EnvoyPtr, kind: u32, key: Buf, value: Buf) -> bool {
    let s = unsafe { stream(envoy) };
    let mut s = s.borrow_mut();
    let (key, value) = unsafe { (slice(key).to_vec(), value) };
    check_name(&key);
    let Some(map) = s.map(kind) else { return false };
    map.retain(|(k, _)| *k != key);
    if !value.ptr.is_null() && value.len > 0 {
        map.push((key, unsafe { slice(value) }.to_vec()));
    }
    true
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_add_header(envoy: EnvoyPtr, kind: u32, key: Buf, value: Buf) -> bool {
    let s = unsafe { stream(envoy) };
    let mut s = s.borrow_mut();
    let (key, value) = unsafe { (slice(key).to_vec(), slice(value).to_vec()) };
    check_name(&key);
    let Some(map) = s.map(kind) else { return false };
    map.push((key, value));
    true
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_get_cluster_name(_: EnvoyPtr, out: *mut Buf) -> bool {
    unsafe { *out = buf(b"app") };
    true
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_set_upstream_override_host(_: EnvoyPtr, host: Buf, _: bool) -> bool {
    let host = unsafe { slice(host) };
    std::str::from_utf8(host).ok().and_then(|h| h.parse::<std::net::SocketAddr>().ok()).is_some()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_get_attribute_string(envoy: EnvoyPtr, id: u32, out: *mut Buf) -> bool {
    let s = unsafe { stream(envoy) };
    let s = s.borrow();
    match (id, &s.upstream) {
        (41, Some(address)) => {
            // Envoy's storage outlives the hook; the stream's does too.
            unsafe { *out = buf(address) };
            true
        }
        _ => false,
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_get_attribute_int(envoy: EnvoyPtr, id: u32, out: *mut u64) -> bool {
    let s = unsafe { stream(envoy) };
    let s = s.borrow();
    let value = match id {
        15 => s.code,
        17 => s.flags,
        _ => return false,
    };
    unsafe { *out = value };
    true
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_send_response(
    envoy: EnvoyPtr, status: u32, headers: *mut Hdr, n: usize, _: Buf, _: Buf,
) {
    let cell = unsafe { stream(envoy) };
    let module = {
        let mut s = cell.borrow_mut();
        s.local_replies += 1;
        if s.local_replies > 1 {
            finding("local-reply", "two local replies".into());
        }
        if s.resp == Dir::Gone {
            finding("local-reply", "a local reply after the response headers left".into());
        }
        let mut response: Headers = vec![(b":status".to_vec(), status.to_string().into_bytes())];
        for i in 0..n {
            let h = unsafe { *headers.add(i) };
            let (k, v) = unsafe { (slice(Buf { ptr: h.key, len: h.key_len }), slice(Buf { ptr: h.value, len: h.value_len })) };
            response.push((k.to_vec(), v.to_vec()));
        }
        s.response = response;
        s.code = u64::from(status);
        s.req = Dir::Gone;
        s.resp = Dir::Before;
        s.module
    };
    // Envoy encodes its local reply through the filter chain, this filter included.
    let status = unsafe { envoy_dynamic_module_on_http_filter_response_headers(envoy, module, true) };
    let mut s = cell.borrow_mut();
    s.resp = if status == 0 { Dir::Gone } else { Dir::Paused };
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_continue_decoding(envoy: EnvoyPtr) {
    let cell = unsafe { stream(envoy) };
    let mut s = cell.borrow_mut();
    if s.req != Dir::Paused {
        finding("spurious-continue", format!("continue_decoding on a request that is {:?}", s.req));
    }
    s.req = Dir::Gone;
    check_upstream(&s);
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_continue_encoding(envoy: EnvoyPtr) {
    let cell = unsafe { stream(envoy) };
    let mut s = cell.borrow_mut();
    if s.resp != Dir::Paused {
        finding("spurious-continue", format!("continue_encoding on a response that is {:?}", s.resp));
    }
    s.resp = Dir::Gone;
    check_downstream(&s);
}

fn record_callout(callouts: &mut Vec<(u64, Vec<u8>)>, next: &mut u64, body: Buf, out: *mut u64) -> u64 {
    let id = *next;
    *next += 1;
    callouts.push((id, unsafe { slice(body) }.to_vec()));
    unsafe { *out = id };
    id
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_http_callout(
    envoy: EnvoyPtr, out: *mut u64, cluster: Buf, _: *mut Hdr, _: usize, body: Buf, _: u64,
) -> u32 {
    if unsafe { slice(cluster) } != b"store" {
        return 2;
    }
    let cell = unsafe { stream(envoy) };
    let (id, inline, module) = {
        let mut s = cell.borrow_mut();
        let s = &mut *s;
        let id = record_callout(&mut s.callouts, &mut s.next_callout, body, out);
        (id, s.inline.take(), s.module)
    };
    if let Some(outcome) = inline {
        // Envoy completes some callouts before returning (a cluster without hosts).
        deliver(envoy, module, id, &outcome);
    }
    0
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_config_http_callout(
    envoy: EnvoyPtr, out: *mut u64, cluster: Buf, _: *mut Hdr, _: usize, body: Buf, _: u64,
) -> u32 {
    if unsafe { slice(cluster) } != b"store" {
        return 2;
    }
    let config = unsafe { fake_config(envoy) };
    let mut c = config.borrow_mut();
    let c = &mut *c;
    record_callout(&mut c.callouts, &mut c.next_callout, body, out);
    0
}

/// A stream's scheduler (Envoy's holds the stream weakly; this one nothing).
struct FakeScheduler;

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_new(envoy: EnvoyPtr) -> *mut c_void {
    unsafe { stream(envoy) }.borrow_mut().timer = true;
    Box::into_raw(Box::new(FakeScheduler)).cast()
}

/// The module's timer thread commits after the delay; the fuzzer fires timers
/// itself ([`Op::Timer`]), so late commits are dropped.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_commit(_: *mut c_void, _: u64) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void) {
    drop(unsafe { Box::from_raw(scheduler.cast::<FakeScheduler>()) });
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(_: EnvoyPtr) -> *mut c_void {
    Box::into_raw(Box::new(0u8)).cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(_: *mut c_void, _: u64) {
    *CONFIG_EVENTS.lock().unwrap() += 1;
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: *mut c_void) {
    drop(unsafe { Box::from_raw(scheduler.cast::<u8>()) });
}

// ------------------------------------------------------------- properties --

fn spells_internal(name: &[u8]) -> bool {
    INTERNAL.iter().any(|i| {
        i.len() == name.len() && name.iter().zip(i.bytes()).all(|(&a, c)| a.to_ascii_lowercase() == c || (a == b'_' && c == b'-'))
    })
}

fn check_upstream(s: &Stream) {
    for (k, v) in &s.request {
        if spells_internal(k) && v.starts_with(CLIENT_MARK.as_bytes()) {
            finding("internal-upstream", format!("a client's {:?} reached the upstream", String::from_utf8_lossy(k)));
        }
    }
}

const INTERNAL_RESPONSE: &[&[u8]] = &[
    b"x-instance-id", b"x-session-state", b"x-session-unknown", b"x-session-end", b"x-session-rotate",
    b"x-session-unreached", b"x-session-route",
];

fn check_downstream(s: &Stream) {
    if s.local_replies > 0 {
        return; // the filter's own reply
    }
    for (k, _) in &s.response {
        if INTERNAL_RESPONSE.contains(&k.as_slice()) {
            finding("internal-downstream", format!("{:?} reached the client", String::from_utf8_lossy(k)));
        }
    }
}

fn check_alive(s: &Stream, after: &str) {
    let waiting = s.req == Dir::Paused || s.resp == Dir::Paused;
    if waiting && s.callouts.is_empty() && !s.timer && s.local_replies == 0 {
        finding("hang", format!("after {after}: request {:?}, response {:?}, nothing in flight", s.req, s.resp));
    }
}

// ----------------------------------------------------------------- driving --

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn percent_decode(text: &[u8]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' && i + 2 < text.len() {
            if let Ok(b) = u8::from_str_radix(std::str::from_utf8(&text[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(text[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The nonce and session id of a webdis call: `EVAL/<script>/<n>/<keys>/<nonce>/<sid>/...`.
fn nonce_and_sid(body: &[u8]) -> (String, String) {
    let parts: Vec<&[u8]> = body.split(|&b| b == b'/').collect();
    let keys: usize = parts.get(2).and_then(|n| std::str::from_utf8(n).ok()).and_then(|n| n.parse().ok()).unwrap_or(0);
    let arg = |i: usize| parts.get(3 + keys + i).map(|p| percent_decode(p)).unwrap_or_default();
    (arg(0), arg(1))
}

fn owner(host: u8, instance: u8) -> String {
    let instance = INSTANCES[instance as usize % INSTANCES.len()];
    format!("{}#{}", HOSTS[host as usize % HOSTS.len()], if instance.is_empty() { "-" } else { instance })
}

fn reply_body(body: &Body, call: &[u8]) -> Vec<u8> {
    let (nonce, sid) = nonce_and_sid(call);
    let eval = |rest: serde_json::Value| {
        let mut items = vec![serde_json::json!(nonce), serde_json::json!(sid)];
        if let serde_json::Value::Array(rest) = rest {
            items.extend(rest);
        }
        serde_json::json!({ "EVAL": items }).to_string().into_bytes()
    };
    match body {
        Body::Acquired => eval(serde_json::json!(["acquired"])),
        Body::AcquiredWith(state) => eval(serde_json::json!(["acquired", state])),
        Body::Moved(h, i) => eval(serde_json::json!(["moved", owner(*h, *i)])),
        Body::Busy => eval(serde_json::json!(["busy"])),
        Body::Stored => eval(serde_json::json!(["stored"])),
        Body::Conflict(o) => eval(serde_json::json!(["conflict", o.map(|(h, i)| owner(h, i)).unwrap_or_default()])),
        Body::Ended => eval(serde_json::json!(["ended"])),
        Body::Taken => eval(serde_json::json!(["taken"])),
        Body::Stale => serde_json::json!({ "EVAL": ["stale-nonce", sid, "stored"] }).to_string().into_bytes(),
        Body::Raw(raw) => raw.clone(),
    }
}

/// The answer to callout `id` of a stream (`module` non-null) or the configuration.
fn answer(outcome: &Outcome, call: &[u8]) -> (u32, Vec<u8>, Vec<u8>) {
    match outcome {
        Outcome::Reply(body) => (0, b"200".to_vec(), reply_body(body, call)),
        Outcome::Status(code, body) => (0, code.to_string().into_bytes(), reply_body(body, call)),
        Outcome::Reset => (1, Vec::new(), Vec::new()),
        Outcome::TooLarge => (2, Vec::new(), Vec::new()),
        Outcome::Timeout => (0, b"504".to_vec(), b"upstream request timeout".to_vec()),
    }
}

fn deliver(envoy: EnvoyPtr, module: Ptr, id: u64, outcome: &Outcome) {
    let call = {
        let mut s = unsafe { stream(envoy) }.borrow_mut();
        let Some(at) = s.callouts.iter().position(|(i, _)| *i == id) else { return };
        s.callouts.remove(at).1
    };
    let (result, status, body) = answer(outcome, &call);
    let headers = [Hdr { key: b":status".as_ptr(), key_len: 7, value: status.as_ptr(), value_len: status.len() }];
    let chunks = [buf(&body)];
    let (h, n) = if result == 0 { (headers.as_ptr(), 1) } else { (std::ptr::null(), 0) };
    let (b, nb) = if result == 0 && !body.is_empty() { (chunks.as_ptr(), 1) } else { (std::ptr::null(), 0) };
    unsafe { envoy_dynamic_module_on_http_filter_http_callout_done(envoy, module, id, result, h, n, b, nb) };
}

fn request_headers(input: &RequestIn, keys: &Config) -> Headers {
    let now = now_s();
    let mut out: Headers = vec![
        (b":method".to_vec(), if input.post { b"POST".to_vec() } else { b"GET".to_vec() }),
        (b":path".to_vec(), PATHS[input.path as usize % PATHS.len()].as_bytes().to_vec()),
        (b":authority".to_vec(), b"shop.example".to_vec()),
    ];
    let tag = cookie::cluster_tag("app");
    let mut cookies = Vec::new();
    for c in input.cookies.iter().take(4) {
        match c {
            CookieIn::Pinned { sid, host, instance, moving, age_s } => {
                let iat = now.saturating_sub(u64::from(*age_s));
                let claims = NewClaims {
                    sid: SIDS[*sid as usize % SIDS.len()],
                    cluster: tag.as_str(),
                    upstream: HOSTS[*host as usize % HOSTS.len()],
                    instance: INSTANCES[*instance as usize % INSTANCES.len()],
                    since: iat,
                    iat,
                    exp: iat + 3600,
                    flags: if *moving { FLAG_MOVING } else { 0 },
                };
                if let Some(value) = cookie::encode(&claims, &keys.keys) {
                    cookies.push(format!("sa={value}").into_bytes());
                }
            }
            CookieIn::Raw(raw) => cookies.push(raw.clone()),
        }
    }
    if !cookies.is_empty() {
        out.push((b"cookie".to_vec(), cookies.join(&b"; "[..])));
    }
    for (pick, spelling, value) in input.internal.iter().take(6) {
        let name = INTERNAL[*pick as usize % INTERNAL.len()];
        let name = match spelling {
            Spelling::Lower => name.to_string(),
            Spelling::Upper => name.to_ascii_uppercase(),
            Spelling::Underscores => name.replace('-', "_"),
        };
        out.push((name.into_bytes(), format!("{CLIENT_MARK}{value}").into_bytes()));
    }
    for (pick, value) in input.other.iter().take(4) {
        out.push((format!("x-other-{pick}").into_bytes(), value.clone()));
    }
    // Envoy's codecs hand every name over in lower case.
    for (name, _) in &mut out {
        name.make_ascii_lowercase();
    }
    out
}

fn response_headers(r: &ResponseIn) -> (Headers, Option<Vec<u8>>, u64) {
    let mut h: Headers = vec![(b":status".to_vec(), r.status.to_string().into_bytes())];
    if let Some(i) = r.instance {
        h.push((b"x-instance-id".to_vec(), INSTANCES[i as usize % INSTANCES.len()].as_bytes().to_vec()));
    }
    if let Some(state) = &r.state {
        h.push((b"x-session-state".to_vec(), state.clone()));
    }
    if r.unknown {
        h.push((b"x-session-unknown".to_vec(), b"1".to_vec()));
    }
    if r.end {
        h.push((b"x-session-end".to_vec(), b"1".to_vec()));
    }
    if let Some(s) = r.rotate {
        h.push((b"x-session-rotate".to_vec(), SIDS[s as usize % SIDS.len()].as_bytes().to_vec()));
    }
    let flags = match r.flags {
        Flags::None => 0,
        Flags::NoHealthyUpstream => 0x2,
        Flags::ConnectFailure => 0x20,
        Flags::Reset => 0x40,
        Flags::Raw(f) => f,
    };
    let upstream = r.upstream.map(|u| HOSTS[u as usize % HOSTS.len()].as_bytes().to_vec());
    (h, upstream, flags)
}

fn run_main_thread(config_envoy: EnvoyPtr, config: Ptr, outcome: &Outcome) {
    let events = std::mem::take(&mut *CONFIG_EVENTS.lock().unwrap());
    for _ in 0..events.min(8) {
        unsafe { envoy_dynamic_module_on_http_filter_config_scheduled(config_envoy, config, 1) };
    }
    let calls = std::mem::take(&mut unsafe { fake_config(config_envoy) }.borrow_mut().callouts);
    for (id, call) in calls {
        let (result, status, body) = answer(outcome, &call);
        let headers = [Hdr { key: b":status".as_ptr(), key_len: 7, value: status.as_ptr(), value_len: status.len() }];
        let chunks = [buf(&body)];
        let (h, n) = if result == 0 { (headers.as_ptr(), 1) } else { (std::ptr::null(), 0) };
        let (b, nb) = if result == 0 && !body.is_empty() { (chunks.as_ptr(), 1) } else { (std::ptr::null(), 0) };
        unsafe { envoy_dynamic_module_on_http_filter_config_http_callout_done(config_envoy, config, id, result, h, n, b, nb) };
    }
}

fn status_dir(status: u32) -> Dir {
    if status == 0 {
        Dir::Gone
    } else {
        Dir::Paused
    }
}

fn run_stream(config_envoy: EnvoyPtr, config: Ptr, keys: &Config, input: &StreamIn) {
    let cell: Box<StreamCell> = Box::new(RefCell::new(Stream::new()));
    let envoy = (&*cell as *const StreamCell).cast_mut().cast::<c_void>();
    cell.borrow_mut().request = request_headers(&input.request, keys);
    let module = unsafe { envoy_dynamic_module_on_http_filter_new(config, envoy) };
    cell.borrow_mut().module = module;
    let status = unsafe { envoy_dynamic_module_on_http_filter_request_headers(envoy, module, false) };
    {
        let mut s = cell.borrow_mut();
        if s.req == Dir::Before {
            s.req = status_dir(status);
            if s.req == Dir::Gone {
                check_upstream(&s);
            }
        }
        check_alive(&s, "the request headers");
    }
    for op in input.ops.iter().take(24) {
        if cell.borrow().destroyed {
            break;
        }
        match op {
            Op::Response(r) => {
                let ready = {
                    let s = cell.borrow();
                    s.req == Dir::Gone && s.resp == Dir::Before && s.local_replies == 0
                };
                if !ready {
                    continue;
                }
                {
                    let (headers, upstream, flags) = response_headers(r);
                    let mut s = cell.borrow_mut();
                    s.response = headers;
                    s.upstream = upstream;
                    s.flags = flags;
                    s.code = u64::from(r.status);
                }
                let status = unsafe { envoy_dynamic_module_on_http_filter_response_headers(envoy, module, false) };
                let mut s = cell.borrow_mut();
                if s.resp == Dir::Before {
                    s.resp = status_dir(status);
                    if s.resp == Dir::Gone {
                        check_downstream(&s);
                    }
                }
                check_alive(&s, "the response headers");
            }
            Op::RequestBody => {
                if cell.borrow().req != Dir::Gone {
                    continue;
                }
                let status = unsafe { envoy_dynamic_module_on_http_filter_request_body(envoy, module, false) };
                if status != 0 && cell.borrow().callouts.is_empty() && !cell.borrow().timer {
                    finding("hang", "request body held with nothing in flight".into());
                }
            }
            Op::ResponseBody => {
                if cell.borrow().resp != Dir::Gone {
                    continue;
                }
                let status = unsafe { envoy_dynamic_module_on_http_filter_response_body(envoy, module, false) };
                if status != 0 && cell.borrow().callouts.is_empty() {
                    finding("hang", "response body held with nothing in flight".into());
                }
            }
            Op::Trailers(state) => {
                if cell.borrow().resp != Dir::Gone {
                    continue;
                }
                cell.borrow_mut().trailers = state.iter().map(|s| (b"x-session-state".to_vec(), s.clone())).collect();
                let status = unsafe { envoy_dynamic_module_on_http_filter_response_trailers(envoy, module) };
                let mut s = cell.borrow_mut();
                if status != 0 {
                    s.resp = Dir::Paused;
                }
                if s.trailers.iter().any(|(k, _)| k == b"x-session-state") {
                    finding("internal-downstream", "a state trailer reached the client".into());
                }
                check_alive(&s, "the trailers");
            }
            Op::Reply { pick, outcome } => {
                let id = {
                    let s = cell.borrow();
                    if s.callouts.is_empty() {
                        continue;
                    }
                    s.callouts[*pick as usize % s.callouts.len()].0
                };
                deliver(envoy, module, id, outcome);
                check_alive(&cell.borrow(), "a callout's answer");
            }
            Op::MainThread(outcome) => run_main_thread(config_envoy, config, outcome),
            Op::Timer => {
                if !std::mem::replace(&mut cell.borrow_mut().timer, false) {
                    continue;
                }
                unsafe { envoy_dynamic_module_on_http_filter_scheduled(envoy, module, 1) };
                check_alive(&cell.borrow(), "a timer");
            }
            Op::InlineNext(outcome) => cell.borrow_mut().inline = Some(outcome.clone()),
            Op::Destroy => {
                unsafe { envoy_dynamic_module_on_http_filter_destroy(module) };
                cell.borrow_mut().destroyed = true;
            }
        }
    }
    if cell.borrow().destroyed {
        return;
    }
    // Envoy answers every callout in the end: a timeout at the latest.
    loop {
        let next = cell.borrow().callouts.first().map(|(id, _)| *id);
        let Some(id) = next else { break };
        deliver(envoy, module, id, &Outcome::Timeout);
    }
    {
        let s = cell.borrow();
        if !s.timer {
            check_alive(&s, "every callout timed out");
        }
    }
    unsafe {
        envoy_dynamic_module_on_http_filter_stream_complete(envoy, module);
        envoy_dynamic_module_on_http_filter_destroy(module);
    }
}

fuzz_target!(|input: Input| {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        unsafe { envoy_dynamic_module_on_program_init() };
    });
    let json = config_json(input.config);
    let keys = Config::parse(json.as_bytes(), &|_| None).expect("the harness's configs are valid");
    let fake: Box<RefCell<FakeConfig>> = Box::default();
    let config_envoy = (&*fake as *const RefCell<FakeConfig>).cast_mut().cast::<c_void>();
    let config = unsafe { envoy_dynamic_module_on_http_filter_config_new(config_envoy, buf(b"session_affinity"), buf(json.as_bytes())) };
    assert!(!config.is_null(), "the module refused a valid config");
    for stream in input.streams.iter().take(4) {
        run_stream(config_envoy, config, &keys, stream);
    }
    run_main_thread(config_envoy, config, &Outcome::Reply(Body::Stored));
    unsafe { envoy_dynamic_module_on_http_filter_config_destroy(config) };
    if let Some(message) = LOGGED_PANIC.with(|p| p.borrow_mut().take()) {
        panic!("[panic] the module caught a panic: {message}");
    }
    if let Some(message) = FINDING.with(|f| f.borrow_mut().take()) {
        let allowed = std::env::var("SA_FUZZ_ALLOW").unwrap_or_default();
        let name = message.trim_start_matches('[').split(']').next().unwrap_or("");
        if !allowed.split(',').any(|a| a == name) {
            panic!("{message}");
        }
    }
});

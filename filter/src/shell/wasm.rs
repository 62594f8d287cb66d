//! The wasm glue: proxy-wasm contexts that move data between the proxy and the
//! pure core. Every host call here is the fallible `hostcalls::*` form, and a
//! failed call degrades (a header not set, a metric not bumped), never panics.
//!
//! Steering: `route_to` writes base64("ip:port") into the routing header,
//! which Envoy's `stateful_session` filter (header state, strict) after this
//! one turns into the upstream host choice.
//!
//! Call routing: the SDK hands an HTTP call's answer to the context that was
//! running when the call was made, not to the one the host names. So calls
//! that must outlive their stream are queued in the worker and sent from the
//! root's tick (`Worker::on_tick`; their answers come to the root, which
//! hands them to `Worker::on_reply`), and a stream's calls made from the
//! root (after a timer) are routed back to the stream here.

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action as ProxyAction, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::config::Config;
use crate::exclusive::Exclusive;
use crate::flow::background::{BUSY_TICK_MS, IDLE_TICK_MS};
use crate::flow::{Flow, Worker};
use crate::headers::HeaderMap;
use crate::host::{Action, HttpHost, SharedData, WorkerHost};
use crate::ids::MAX_UPSTREAM_LEN;
use crate::metrics::{Counter, STORE_LATENCY};
use crate::store::StoreCall;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            context_id,
            config: None,
            worker: Rc::default(),
            metrics: None,
            waiters: Rc::default(),
            last_flush_ms: 0,
            fast: false,
        })
    });
}}

/// How often each worker flushes its counters and re-reads the gone table.
const TICK: Duration = Duration::from_millis(IDLE_TICK_MS);
/// The tick while the worker has work waiting (queued calls, stream timers).
const FAST_TICK: Duration = Duration::from_millis(BUSY_TICK_MS);

/// What a stream waits for from the root: a timer (due time) or the answer
/// to a call the root made for it (token).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    Timer(u64),
    Call(u32),
}

/// A stream's flow, as the root holds it: the stream may end any time.
type StreamFlow = Weak<RefCell<Flow>>;

/// Streams waiting on the root: (what, stream context id, its flow).
#[derive(Default)]
struct Waiters {
    waiting: Exclusive<Vec<(Wait, u32, StreamFlow)>>,
}

impl Waiters {
    fn add(&self, wait: Wait, context_id: u32, flow: &Rc<RefCell<Flow>>) {
        self.waiting.with(|waiting| waiting.push((wait, context_id, Rc::downgrade(flow))));
    }

    /// Takes the waiters `pick` selects.
    fn take(&self, pick: impl Fn(Wait) -> bool) -> Vec<(u32, StreamFlow)> {
        let picked = self.waiting.with(|waiting| {
            let (picked, rest): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(wait, _, _)| pick(*wait));
            *waiting = rest;
            picked
        });
        picked.into_iter().map(|(_, id, flow)| (id, flow)).collect()
    }

    fn is_empty(&self) -> bool {
        self.waiting.with(|waiting| waiting.is_empty())
    }
}

struct Root {
    context_id: u32,
    config: Option<Rc<Config>>,
    worker: Rc<Worker>,
    /// Metric ids in `Counter::ALL` order, then the latency histogram.
    metrics: Option<(Vec<Option<u32>>, Option<u32>)>,
    waiters: Rc<Waiters>,
    last_flush_ms: u64,
    /// Whether the tick runs at [`FAST_TICK`].
    fast: bool,
}

impl Context for Root {
    /// Answers to the worker's own calls, and to calls the root made for a
    /// stream (after its timer): those go back to the stream.
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _: usize) {
        let Some(config) = self.config.clone() else { return };
        let (status, body) = call_response(num_headers, body_size);
        let streams = self.waiters.take(|wait| wait == Wait::Call(token));
        if streams.is_empty() {
            let mut proxy = Proxy::new(self.context_id, &config, &self.waiters);
            let now_ms = proxy.now_ms();
            self.worker.on_reply(&mut proxy, &config, token.into(), status, &body, now_ms);
            return;
        }
        self.run_for_streams(&config, streams, |flow, proxy| flow.on_store_response(proxy, token.into(), status, &body));
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        info!(
            "[{}] session-affinity {} ({}) starting",
            self.context_id,
            env!("CARGO_PKG_VERSION"),
            option_env!("SESSION_AFFINITY_REVISION").unwrap_or("unknown revision")
        );
        true
    }

    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(bytes)) => bytes,
            _ => {
                error!("[{}] invalid config: no plugin configuration; pass the JSON as a google.protobuf.StringValue", self.context_id);
                return false;
            }
        };
        match Config::parse(&bytes, &env_var) {
            Ok(config) => {
                let store = config.store.as_ref().map_or("none", |s| s.cluster.as_str());
                info!("[{}] configured: cookie {:?}, keys {:?}, store {store}", self.context_id, config.cookie.name, config.keys);
                self.config = Some(Rc::new(config));
                self.define_metrics();
                if hostcalls::set_tick_period(TICK).is_err() {
                    warn!("[{}] no tick: metrics, the gone table and failover polls will not run", self.context_id);
                }
                true
            }
            Err(e) => {
                error!("[{}] invalid config: {e}", self.context_id);
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(config) = self.config.clone() else { return };
        let mut proxy = Proxy::new(self.context_id, &config, &self.waiters);
        let now_ms = proxy.now_ms();
        let busy = self.worker.on_tick(&mut proxy, &config).is_some();
        let due = self.waiters.take(|wait| matches!(wait, Wait::Timer(at) if at <= now_ms));
        self.run_for_streams(&config, due, |flow, proxy| flow.on_timer(proxy));
        // Once a second, whatever the tick (a tick may come a little early).
        if now_ms.saturating_add(BUSY_TICK_MS) >= self.last_flush_ms.saturating_add(IDLE_TICK_MS) {
            self.last_flush_ms = now_ms;
            self.flush_metrics();
            self.worker.refresh_gone(&proxy, None);
        }
        let fast = busy || !self.waiters.is_empty();
        if fast != self.fast && hostcalls::set_tick_period(if fast { FAST_TICK } else { TICK }).is_ok() {
            self.fast = fast;
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        let proxy = Proxy::new(context_id, &config, &self.waiters);
        let flow = Rc::new(RefCell::new(Flow::new(context_id, config, Rc::clone(&self.worker))));
        Some(Box::new(Filter { flow, proxy }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    fn define_metrics(&mut self) {
        if self.metrics.is_some() {
            return;
        }
        let counters = Counter::ALL.iter().map(|c| hostcalls::define_metric(MetricType::Counter, c.name()).ok()).collect();
        let histogram = hostcalls::define_metric(MetricType::Histogram, STORE_LATENCY).ok();
        self.metrics = Some((counters, histogram));
    }

    fn flush_metrics(&self) {
        let Some((counters, histogram)) = &self.metrics else { return };
        self.worker.metrics.flush(
            |counter, delta| {
                if let Some(Some(id)) = counters.get(counter as usize) {
                    let _ = hostcalls::increment_metric(*id, i64::try_from(delta).unwrap_or(i64::MAX));
                }
            },
            |millis| {
                if let Some(id) = histogram {
                    let _ = hostcalls::record_metric(*id, millis);
                }
            },
        );
    }

    /// Runs a flow callback for each stream, in the stream's context, and
    /// keeps track of what the streams wait for next.
    fn run_for_streams(&self, config: &Rc<Config>, streams: Vec<(u32, StreamFlow)>, callback: impl Fn(&mut Flow, &mut Proxy)) {
        for (context_id, flow) in streams {
            let Some(flow) = flow.upgrade() else { continue };
            if hostcalls::set_effective_context(context_id).is_err() {
                continue; // the stream ended
            }
            let mut proxy = Proxy::new(context_id, config, &self.waiters);
            if let Ok(mut flow_ref) = flow.try_borrow_mut() {
                callback(&mut flow_ref, &mut proxy);
            }
            // Calls made now were made by the root: their answers come here.
            proxy.register(&flow, true);
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }
}

/// The status and body of a store call's answer (status None: no answer).
fn call_response(num_headers: usize, body_size: usize) -> (Option<u32>, Vec<u8>) {
    let status = if num_headers == 0 {
        None // the call failed or timed out
    } else {
        match hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status") {
            Ok(Some(status)) => std::str::from_utf8(&status).ok().and_then(|s| s.parse().ok()),
            _ => None,
        }
    };
    let body = match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
        Ok(Some(body)) => body,
        _ => Vec::new(),
    };
    (status, body)
}

/// One HTTP stream.
struct Filter {
    flow: Rc<RefCell<Flow>>,
    proxy: Proxy,
}

impl Filter {
    /// Runs one flow callback, then registers any timer it set.
    fn run<T>(&mut self, callback: impl FnOnce(&mut Flow, &mut Proxy) -> T, fallback: T) -> T {
        let result = match self.flow.try_borrow_mut() {
            Ok(mut flow) => callback(&mut flow, &mut self.proxy),
            Err(_) => fallback,
        };
        // Calls made from the stream's own callbacks come back to it.
        self.proxy.register(&self.flow, false);
        result
    }
}

fn proxy_action(action: Action) -> ProxyAction {
    match action {
        Action::Continue => ProxyAction::Continue,
        Action::Pause => ProxyAction::Pause,
    }
}

/// Body data waits (buffered) while its direction waits for the store.
fn hold_body(hold: bool) -> ProxyAction {
    if hold {
        ProxyAction::Pause
    } else {
        ProxyAction::Continue
    }
}

impl Context for Filter {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _: usize) {
        let (status, body) = call_response(num_headers, body_size);
        self.run(|flow, proxy| flow.on_store_response(proxy, token.into(), status, &body), ());
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> ProxyAction {
        proxy_action(self.run(|flow, proxy| flow.on_request_headers(proxy), Action::Continue))
    }

    fn on_http_request_body(&mut self, _: usize, _: bool) -> ProxyAction {
        hold_body(self.run(|flow, _| flow.holds_request_body(), false))
    }

    fn on_http_request_trailers(&mut self, _: usize) -> ProxyAction {
        proxy_action(self.run(|flow, proxy| flow.on_request_trailers(proxy), Action::Continue))
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> ProxyAction {
        proxy_action(self.run(|flow, proxy| flow.on_response_headers(proxy), Action::Continue))
    }

    fn on_http_response_body(&mut self, _: usize, _: bool) -> ProxyAction {
        hold_body(self.run(|flow, _| flow.holds_response_body(), false))
    }

    fn on_http_response_trailers(&mut self, _: usize) -> ProxyAction {
        proxy_action(self.run(|flow, proxy| flow.on_response_trailers(proxy), Action::Continue))
    }
}

/// The proxy, as the pure core sees it, for one stream (or the root).
struct Proxy {
    context_id: u32,
    config: Rc<Config>,
    waiters: Rc<Waiters>,
    /// What the flow started in the current callback: a timer, store calls.
    started: Vec<Wait>,
}

impl Proxy {
    fn new(context_id: u32, config: &Rc<Config>, waiters: &Rc<Waiters>) -> Proxy {
        Proxy { context_id, config: Rc::clone(config), waiters: Rc::clone(waiters), started: Vec::new() }
    }

    /// Hands the root what the flow now waits for: timers always, and the
    /// calls made while the root was running (`by_root`).
    fn register(&mut self, flow: &Rc<RefCell<Flow>>, by_root: bool) {
        for wait in std::mem::take(&mut self.started) {
            if by_root || matches!(wait, Wait::Timer(_)) {
                self.waiters.add(wait, self.context_id, flow);
            }
        }
    }
}

impl SharedData for Proxy {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), cas).is_ok()
    }
}

/// Room for the routing header value: base64 of the longest upstream a cookie carries.
const ROUTE_LEN_MAX: usize = MAX_UPSTREAM_LEN.div_ceil(3) * 4;

impl WorkerHost for Proxy {
    fn dispatch(&mut self, call: &StoreCall) -> Option<u64> {
        let headers: Vec<(&str, &str)> = call.headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
        match hostcalls::dispatch_http_call(&call.cluster, headers, Some(&call.body), vec![], call.timeout) {
            Ok(token) => {
                self.started.push(Wait::Call(token));
                Some(token.into())
            }
            Err(status) => {
                warn!("[{}] store call to cluster {:?} failed to start: {status:?}", self.context_id, call.cluster);
                None
            }
        }
    }

    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn random(&mut self) -> Option<[u8; 16]> {
        let mut bytes = [0u8; 16];
        // SAFETY: the host writes exactly `len` bytes into the buffer we own.
        match unsafe { random_get(bytes.as_mut_ptr(), bytes.len()) } {
            0 => Some(bytes),
            errno => {
                warn!("[{}] random_get failed with WASI errno {errno}", self.context_id);
                None
            }
        }
    }
}

impl HttpHost for Proxy {
    fn request_headers(&mut self) -> HeaderMap {
        header_map(MapType::HttpRequestHeaders)
    }

    fn add_request_header(&mut self, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value);
    }

    fn remove_request_header(&mut self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
    }

    fn route_to(&mut self, upstream: &str) {
        // Encoded on the stack: the pinned path allocates nothing for it.
        let mut buffer = [0u8; ROUTE_LEN_MAX];
        let Ok(len) = STANDARD.encode_slice(upstream, &mut buffer) else { return };
        if let Some(Ok(value)) = buffer.get(..len).map(std::str::from_utf8) {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, &self.config.headers.route, Some(value));
        }
    }

    fn cluster_name(&mut self) -> Cow<'_, str> {
        match hostcalls::get_property(vec!["xds", "cluster_name"]) {
            Ok(Some(bytes)) => Cow::Owned(String::from_utf8(bytes).unwrap_or_default()),
            _ => Cow::Borrowed(""),
        }
    }

    fn response_headers(&mut self) -> HeaderMap {
        header_map(MapType::HttpResponseHeaders)
    }

    fn add_response_header(&mut self, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
    }

    fn remove_response_header(&mut self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpResponseHeaders, name);
    }

    fn request_trailers(&mut self) -> HeaderMap {
        header_map(MapType::HttpRequestTrailers)
    }

    fn remove_request_trailer(&mut self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpRequestTrailers, name);
    }

    fn response_trailers(&mut self) -> HeaderMap {
        header_map(MapType::HttpResponseTrailers)
    }

    fn remove_response_trailer(&mut self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpResponseTrailers, name);
    }

    fn upstream_address(&mut self) -> Option<String> {
        let bytes = hostcalls::get_property(vec!["upstream", "address"]).ok()??;
        String::from_utf8(bytes).ok().filter(|a| !a.is_empty())
    }

    fn response_flags(&mut self) -> u64 {
        // Integer properties arrive as 8 little-endian bytes.
        match hostcalls::get_property(vec!["response", "flags"]) {
            Ok(Some(bytes)) => <[u8; 8]>::try_from(bytes.as_slice()).map_or(0, u64::from_le_bytes),
            _ => 0,
        }
    }

    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: &str) {
        if let Err(status) = hostcalls::send_http_response(status, headers.to_vec(), Some(body.as_bytes())) {
            warn!("[{}] local reply failed: {status:?}", self.context_id);
        }
    }

    fn set_timer(&mut self, after_ms: u64) -> bool {
        self.started.push(Wait::Timer(self.now_ms().saturating_add(after_ms)));
        self.wake_worker();
        true
    }

    fn wake_worker(&mut self) {
        // The tick is the root's: a stream's setting reaches its root context.
        let _ = hostcalls::set_tick_period(FAST_TICK);
    }

    fn resume_request(&mut self) {
        let _ = hostcalls::resume_http_request();
    }

    fn resume_response(&mut self) {
        let _ = hostcalls::resume_http_response();
    }
}

/// A whole header map in one host call, kept serialised: the SDK's
/// `get_map_bytes` would allocate two buffers per header.
fn header_map(map_type: MapType) -> HeaderMap {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size = 0usize;
    // SAFETY: on success the host hands over a buffer of `size` bytes that it
    // allocated through this module's `malloc` export (the SDK's allocator, a
    // boxed byte slice), so it is ours to own and free as a Vec.
    unsafe {
        if proxy_get_header_map_pairs(map_type, &mut data, &mut size) != Status::Ok || data.is_null() {
            return HeaderMap::default();
        }
        HeaderMap::from_serialized(Vec::from_raw_parts(data, size, size))
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: MapType, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> Status;
}

/// Reads an environment variable that Envoy exposes to the VM
/// (`vm_config.environment_variables`), through WASI.
fn env_var(name: &str) -> Option<String> {
    let mut count = 0usize;
    let mut size = 0usize;
    // SAFETY: the host writes two sizes into our locals.
    if unsafe { environ_sizes_get(&mut count, &mut size) } != 0 || count == 0 {
        return None;
    }
    let mut pointers = vec![std::ptr::null_mut::<u8>(); count];
    let mut buffer = vec![0u8; size];
    // SAFETY: both buffers have the sizes the host just reported.
    if unsafe { environ_get(pointers.as_mut_ptr(), buffer.as_mut_ptr()) } != 0 {
        return None;
    }
    buffer
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .find_map(|entry| entry.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
        .map(str::to_string)
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn random_get(buf: *mut u8, len: usize) -> u16;
    fn environ_sizes_get(count: *mut usize, size: *mut usize) -> u16;
    fn environ_get(environ: *mut *mut u8, buffer: *mut u8) -> u16;
}

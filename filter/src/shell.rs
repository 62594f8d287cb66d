//! The wasm glue: proxy-wasm contexts that move data between the proxy and the
//! pure core. Every host call here is the fallible `hostcalls::*` form, and a
//! failed call degrades (a header not set, a metric not bumped), never panics.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action as ProxyAction, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::config::{Config, StoreConfig};
use crate::flow::{Action, Flow, HttpHost, Worker};
use crate::gone::SharedData;
use crate::headers::HeaderMap;
use crate::metrics::{Counter, STORE_LATENCY};
use crate::store::StoreCall;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { context_id, config: None, worker: Rc::default(), metrics: RefCell::default() })
    });
}}

/// How often each worker flushes its counters and re-reads the gone table.
const TICK: Duration = Duration::from_secs(1);

struct Root {
    context_id: u32,
    config: Option<Rc<Config>>,
    worker: Rc<Worker>,
    /// Metric ids in `Counter::ALL` order, then the latency histogram.
    metrics: RefCell<Option<(Vec<Option<u32>>, Option<u32>)>>,
}

impl Context for Root {}

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
                info!("[{}] configured: cookie {:?}, keys {:?}, store {}", self.context_id, config.cookie.name, config.keys, config.store.as_ref().map_or("none", |s| s.cluster.as_str()));
                self.config = Some(Rc::new(config));
                self.define_metrics();
                if hostcalls::set_tick_period(TICK).is_err() {
                    warn!("[{}] no tick: metrics and the gone table will not refresh", self.context_id);
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
        self.flush_metrics();
        self.worker.gone.borrow_mut().refresh(&Proxy { context_id: self.context_id, root_id: self.context_id });
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        let proxy = Proxy { context_id, root_id: self.context_id };
        Some(Box::new(Filter { flow: Flow::new(context_id, config, Rc::clone(&self.worker)), proxy }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    fn define_metrics(&self) {
        if self.metrics.borrow().is_some() {
            return;
        }
        let counters = Counter::ALL.iter().map(|c| hostcalls::define_metric(MetricType::Counter, c.name()).ok()).collect();
        let histogram = hostcalls::define_metric(MetricType::Histogram, STORE_LATENCY).ok();
        *self.metrics.borrow_mut() = Some((counters, histogram));
    }

    fn flush_metrics(&self) {
        let (counts, latencies) = self.worker.metrics.drain();
        let ids = self.metrics.borrow();
        let Some((counters, histogram)) = ids.as_ref() else { return };
        for (counter, delta) in counts {
            if let Some(Some(id)) = counters.get(counter as usize) {
                let _ = hostcalls::increment_metric(*id, i64::try_from(delta).unwrap_or(i64::MAX));
            }
        }
        if let Some(id) = histogram {
            for millis in latencies {
                let _ = hostcalls::record_metric(*id, millis);
            }
        }
    }
}

/// One HTTP stream.
struct Filter {
    flow: Flow,
    proxy: Proxy,
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
        self.flow.on_store_response(&mut self.proxy, token, status, &body);
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> ProxyAction {
        proxy_action(self.flow.on_request_headers(&mut self.proxy))
    }

    fn on_http_request_body(&mut self, _: usize, _: bool) -> ProxyAction {
        hold_body(self.flow.holds_request_body())
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> ProxyAction {
        proxy_action(self.flow.on_response_headers(&mut self.proxy))
    }

    fn on_http_response_body(&mut self, _: usize, _: bool) -> ProxyAction {
        hold_body(self.flow.holds_response_body())
    }
}

/// The proxy, as the pure core sees it, for one stream.
struct Proxy {
    context_id: u32,
    /// The worker's root context, which owns detached store calls.
    root_id: u32,
}

impl SharedData for Proxy {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), cas).is_ok()
    }
}

impl HttpHost for Proxy {
    fn request_headers(&mut self) -> HeaderMap {
        header_map(MapType::HttpRequestHeaders)
    }

    fn set_request_header(&mut self, name: &str, value: &str) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
    }

    fn remove_request_header(&mut self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
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
            warn!("local reply failed: {status:?}");
        }
    }

    fn dispatch(&mut self, store: &StoreConfig, call: &StoreCall, detached: bool) -> Option<u32> {
        let headers = vec![
            (":method", call.method),
            (":path", call.path.as_str()),
            (":authority", store.authority.as_str()),
            ("content-type", "text/plain"),
        ];
        // The proxy cancels a stream's calls when the stream ends; the root lives on.
        if detached && hostcalls::set_effective_context(self.root_id).is_err() {
            return None;
        }
        let result = hostcalls::dispatch_http_call(&store.cluster, headers, Some(&call.body), vec![], store.timeout.0);
        if detached {
            let _ = hostcalls::set_effective_context(self.context_id);
        }
        match result {
            Ok(token) => Some(token),
            Err(status) => {
                warn!("store call to cluster {:?} failed to start: {status:?}", store.cluster);
                None
            }
        }
    }

    fn resume_request(&mut self) {
        let _ = hostcalls::resume_http_request();
    }

    fn resume_response(&mut self) {
        let _ = hostcalls::resume_http_response();
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
                warn!("random_get failed with WASI errno {errno}");
                None
            }
        }
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

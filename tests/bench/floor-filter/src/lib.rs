//! BENCHMARK BASELINE, NOT A PRODUCT FILTER.
//!
//! The host-call floor of the real filter's pinned path: the same proxy-wasm
//! calls, in the same callbacks, with no logic between them. Per request:
//!
//! 1. read the whole request header map;
//! 2. read the clock;
//! 3. read the route's cluster name (`xds.cluster_name`: the cookie is bound
//!    to its cluster);
//! 4. set `x-session-route` (its value is the plugin configuration: the
//!    base64 address of the pinned upstream, for `stateful_session`) and
//!    `x-session-id`;
//! 5. read the whole response header map, and remove `x-instance-id` (an
//!    internal header that must not reach the client).
//!
//! `tests/bench/run` measures it next to the filter, so the filter's own work
//! (cookie check, cache, decisions) shows as the gap between the two, and the
//! gap from here down to the no-op filter is what those host calls cost in
//! Envoy. It reads maps with the SDK's `get_map_bytes`, which copies every
//! header out; the filter reads the serialised map in place, so it can come
//! in a little under this floor. Host calls are the fallible
//! `proxy_wasm::hostcalls` ones.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

const ROUTE_HEADER: &str = "x-session-route";
const SESSION_ID_HEADER: &str = "x-session-id";
const INSTANCE_HEADER: &str = "x-instance-id";
/// A session id of the real length (22 characters).
const SESSION_ID: &str = "AAAAAAAAAAAAAAAAAAAAAA";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(FloorRoot { route: Rc::from("") })
    });
}}

/// Root context: holds the route value read once from the configuration.
struct FloorRoot {
    route: Rc<str>,
}

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        let route = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        match route {
            Some(route) if !route.is_empty() => {
                self.route = Rc::from(route);
                true
            }
            _ => {
                log::warn!("floor: the plugin configuration must be the route header value");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor { route: Rc::clone(&self.route) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Per-request context.
struct Floor {
    route: Rc<str>,
}

impl Context for Floor {}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
        let _ = hostcalls::get_current_time();
        let _ = hostcalls::get_property(vec!["xds", "cluster_name"]);
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, ROUTE_HEADER, Some(&self.route));
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, SESSION_ID_HEADER, Some(SESSION_ID));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let _ = hostcalls::get_map_bytes(MapType::HttpResponseHeaders);
        let _ = hostcalls::remove_map_value(MapType::HttpResponseHeaders, INSTANCE_HEADER);
        Action::Continue
    }
}

//! BENCHMARK BASELINE, NOT A PRODUCT FILTER.
//!
//! A proxy-wasm HTTP filter that does nothing: every callback keeps the SDK's
//! default (`Action::Continue`) and no header is read or written. It measures
//! the floor cost of running any wasm filter in Envoy's V8 runtime (VM entry
//! and exit for each callback, the SDK dispatcher, context creation per
//! request). `tests/bench/run` compares it with a router-only Envoy in the
//! same run; no filter that does real work can be cheaper than this.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_http_context(|_context_id, _root_context_id| -> Box<dyn HttpContext> {
        Box::new(Noop)
    });
}}

/// The per-request context. It holds nothing and overrides nothing.
struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}

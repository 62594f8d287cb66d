//! Session affinity for Envoy and Istio: a proxy-wasm HTTP filter that pins a
//! session to an upstream host with a signed cookie, and moves the session's
//! state through a session store when that host is gone.
//!
//! The pure core (config, cookie, keys, flow, gone, headers, store, metrics) has no
//! proxy-wasm dependency and is tested natively; `shell` is the thin glue that
//! connects it to the proxy's host calls.

pub mod config;
pub mod cookie;
pub mod flow;
pub mod gone;
pub mod headers;
pub mod keys;
pub mod metrics;
pub mod store;

#[cfg(target_arch = "wasm32")]
mod shell;

//! What the core needs from the proxy. The wasm shell implements these traits
//! over proxy-wasm host calls, the native module (filter/native) over Envoy's
//! dynamic-module ABI, and `testing` for unit tests.

use std::borrow::Cow;

use crate::headers::HeaderMap;
use crate::store::StoreCall;

/// Whether the proxy should go on with the stream or wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// Data every worker of the proxy shares, with compare-and-swap.
pub trait SharedData {
    /// The value and its CAS token.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Stores `value` if the entry still has CAS token `cas`; false on a mismatch or error.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
}

/// Rewrites shared entry `key` from its current value with compare-and-swap,
/// at most `tries` times (a lost race is retried, never waited on). `next`
/// gives the new value, or None when the current one needs no change. False
/// when every race was lost.
pub fn update_shared(shared: &dyn SharedData, key: &str, tries: usize, next: impl Fn(Option<&[u8]>) -> Option<Vec<u8>>) -> bool {
    for _ in 0..tries {
        let (value, cas) = shared.get(key);
        let Some(new) = next(value.as_deref()) else { return true };
        if shared.set(key, &new, cas) {
            return true;
        }
    }
    false
}

/// What a worker's own context can do (and every stream too): shared data,
/// store calls, the clock, randomness.
pub trait WorkerHost: SharedData {
    /// Starts an HTTP call to the store; returns its token (64 bits: Envoy's
    /// native callout ids are). The answer comes back to whoever made the
    /// call: the stream's flow, or the worker.
    fn dispatch(&mut self, call: &StoreCall) -> Option<u64>;
    /// Wall-clock time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// 16 bytes from the host's CSPRNG; `None` if it has none.
    fn random(&mut self) -> Option<[u8; 16]>;
}

/// The proxy, for one HTTP stream.
pub trait HttpHost: WorkerHost {
    fn request_headers(&mut self) -> HeaderMap;
    /// Adds a header the request does not carry. The flow removes the
    /// client's copies of its headers first and writes each at most once, so
    /// it never needs Envoy's replace, which costs a search of the whole map.
    fn add_request_header(&mut self, name: &str, value: &str);
    fn remove_request_header(&mut self, name: &str);
    /// Sends the request to exactly this upstream ("ip:port") of the route's
    /// cluster, or answers 503 UH if the cluster does not have it healthy.
    fn route_to(&mut self, upstream: &str);
    /// The route's upstream cluster, as the proxy names it ("" if unknown).
    fn cluster_name(&mut self) -> Cow<'_, str>;
    fn response_headers(&mut self) -> HeaderMap;
    fn add_response_header(&mut self, name: &str, value: &str);
    fn remove_response_header(&mut self, name: &str);
    fn request_trailers(&mut self) -> HeaderMap;
    fn remove_request_trailer(&mut self, name: &str);
    fn response_trailers(&mut self) -> HeaderMap;
    fn remove_response_trailer(&mut self, name: &str);
    /// Envoy's `upstream.address` ("ip:port"), if a host was picked.
    fn upstream_address(&mut self) -> Option<String>;
    /// Envoy's `response.flags` bitmask.
    fn response_flags(&mut self) -> u64;
    /// Sends a local reply in place of whatever the stream would have sent.
    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: &str);
    /// Calls the stream's `on_timer` after about `after_ms`.
    fn set_timer(&mut self, after_ms: u64) -> bool;
    /// Asks for the calls the worker queued to be sent soon from a context
    /// that outlives the stream (the wasm shell: the worker's root context,
    /// which runs `Worker::on_tick`; the native module: Envoy's main thread).
    fn wake_worker(&mut self);
    fn resume_request(&mut self);
    fn resume_response(&mut self);
}

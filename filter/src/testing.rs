//! A fake proxy for the core's tests, the fuzz targets and the profiling
//! example: shared data with real compare-and-swap, and an HTTP stream that
//! records every side effect, including the typed store operations sent.
//!
//! Built for `cargo test` and with the `testing` feature; never in the module.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use crate::headers::HeaderMap;
use crate::host::{HttpHost, SharedData, WorkerHost};
use crate::store::{Op, Reply, StoreCall};

/// Shared data with real CAS semantics, plus a switch to make writes lose races.
#[derive(Default)]
pub struct FakeShared {
    pub data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    pub lose_races: Cell<bool>,
    writes: Cell<u64>,
}

impl FakeShared {
    /// How many writes succeeded.
    pub fn writes(&self) -> u64 {
        self.writes.get()
    }
}

impl SharedData for FakeShared {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.data.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        let mut data = self.data.borrow_mut();
        let current = data.get(key).map(|(_, c)| *c);
        if self.lose_races.get() || (cas.is_some() && cas != current) {
            return false;
        }
        let next = current.unwrap_or(0).wrapping_add(1);
        data.insert(key.to_string(), (value.to_vec(), next));
        self.writes.set(self.writes.get() + 1);
        true
    }
}

/// One HTTP stream through a fake proxy.
#[derive(Default)]
pub struct FakeProxy {
    pub request: Vec<(String, String)>,
    pub response: Vec<(String, String)>,
    pub trailers: Vec<(String, String)>,
    pub request_trailers: Vec<(String, String)>,
    /// The upstream `route_to` chose, if any.
    pub routed_to: Option<String>,
    /// Request headers the flow added although the request had them (the
    /// host interface says it never does).
    pub added_twice: Vec<String>,
    pub cluster: String,
    pub upstream: Option<String>,
    pub flags: u64,
    pub local_reply: Option<(u32, Vec<(String, String)>)>,
    /// How many local replies were sent (Envoy takes one per stream; the
    /// flow fuzzer checks the filter never tries a second).
    pub local_replies: u32,
    /// Every store call this proxy sent, in order.
    pub calls: Vec<StoreCall>,
    /// How often the stream asked the worker to run.
    pub worker_wakes: u32,
    pub timers: Vec<u64>,
    pub resumed_request: u32,
    pub resumed_response: u32,
    /// Shared data; clone the `Rc` into several proxies to play one worker's streams.
    pub shared: Rc<FakeShared>,
    pub now_ms: u64,
    /// Store calls fail to start.
    pub no_store: bool,
    /// The host has no CSPRNG.
    pub no_random: bool,
    random_calls: u8,
}

impl FakeProxy {
    /// A request with these headers (`:path` defaults to "/cart?x=1", `:method` to GET).
    pub fn new(request: &[(&str, &str)], now_ms: u64) -> FakeProxy {
        let mut request: Vec<(String, String)> = request.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        for (name, default) in [(":path", "/cart?x=1"), (":method", "GET")] {
            if !request.iter().any(|(k, _)| k == name) {
                request.push((name.into(), default.into()));
            }
        }
        FakeProxy { request, now_ms, cluster: "app".into(), ..FakeProxy::default() }
    }

    pub fn req(&self, name: &str) -> Option<&str> {
        self.request.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn resp(&self, name: &str) -> Option<&str> {
        self.response.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Every value of a response header, the local reply's included.
    pub fn resp_all(&self, name: &str) -> Vec<&str> {
        let local = self.local_reply.iter().flat_map(|(_, h)| h.iter());
        self.response.iter().chain(local).filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }

    /// The upstream answers from `upstream` with these headers (`:status` defaults to 200).
    pub fn respond(&mut self, upstream: &str, headers: &[(&str, &str)]) {
        self.upstream = Some(upstream.into());
        self.response = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if !self.response.iter().any(|(k, _)| k == ":status") {
            self.response.push((":status".into(), "200".into()));
        }
    }

    /// The typed operations sent to the store, in order.
    pub fn ops(&self) -> Vec<&Op> {
        self.calls.iter().map(|c| &c.op).collect()
    }

    /// The store's answer to the most recent call, as webdis would send it
    /// (echoing the call's nonce and session id): (token, status, body).
    pub fn answer(&self, reply: &Reply) -> (u64, Option<u32>, Vec<u8>) {
        let token = u64::try_from(self.calls.len()).unwrap_or(u64::MAX);
        let Some(call) = self.calls.last() else { return (token, None, Vec::new()) };
        (token, Some(200), webdis_reply(&call.nonce, call.op.sid(), reply))
    }
}

/// A webdis `EVAL` answer for `reply` to the call (`nonce`, `sid`).
pub fn webdis_reply(nonce: &str, sid: &str, reply: &Reply) -> Vec<u8> {
    let mut parts = vec![nonce.to_string(), sid.to_string()];
    let rest: Vec<String> = match reply {
        Reply::Acquired { state: None } => vec!["acquired".into()],
        Reply::Acquired { state: Some(state) } => vec!["acquired".into(), state.clone()],
        Reply::Moved { owner } => vec!["moved".into(), owner.clone()],
        Reply::Busy => vec!["busy".into()],
        Reply::Ended => vec!["ended".into()],
        Reply::Stored => vec!["stored".into()],
        Reply::Conflict { owner } => vec!["conflict".into(), owner.clone().unwrap_or_default()],
        Reply::Taken => vec!["taken".into()],
    };
    parts.extend(rest);
    serde_json::to_vec(&serde_json::json!({ "EVAL": parts })).unwrap_or_default()
}

fn to_map(headers: &[(String, String)]) -> HeaderMap {
    HeaderMap::from_pairs(headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
}

impl SharedData for FakeProxy {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.shared.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        self.shared.set(key, value, cas)
    }
}

impl WorkerHost for FakeProxy {
    fn dispatch(&mut self, call: &StoreCall) -> Option<u64> {
        if self.no_store {
            return None;
        }
        self.calls.push(call.clone());
        u64::try_from(self.calls.len()).ok()
    }
    fn now_ms(&self) -> u64 {
        self.now_ms
    }
    fn random(&mut self) -> Option<[u8; 16]> {
        if self.no_random {
            return None;
        }
        self.random_calls = self.random_calls.wrapping_add(1);
        Some([self.random_calls; 16])
    }
}

impl HttpHost for FakeProxy {
    fn request_headers(&mut self) -> HeaderMap {
        to_map(&self.request)
    }
    fn add_request_header(&mut self, name: &str, value: &str) {
        if self.request.iter().any(|(k, _)| k == name) {
            self.added_twice.push(name.into());
        }
        self.request.push((name.into(), value.into()));
    }
    fn remove_request_header(&mut self, name: &str) {
        self.request.retain(|(k, _)| k != name);
    }
    fn route_to(&mut self, upstream: &str) {
        self.routed_to = Some(upstream.to_string());
    }
    fn cluster_name(&mut self) -> Cow<'_, str> {
        Cow::Borrowed(&self.cluster)
    }
    fn response_headers(&mut self) -> HeaderMap {
        to_map(&self.response)
    }
    fn add_response_header(&mut self, name: &str, value: &str) {
        self.response.push((name.into(), value.into()));
    }
    fn remove_response_header(&mut self, name: &str) {
        self.response.retain(|(k, _)| k != name);
    }
    fn request_trailers(&mut self) -> HeaderMap {
        to_map(&self.request_trailers)
    }
    fn remove_request_trailer(&mut self, name: &str) {
        self.request_trailers.retain(|(k, _)| k != name);
    }
    fn response_trailers(&mut self) -> HeaderMap {
        to_map(&self.trailers)
    }
    fn remove_response_trailer(&mut self, name: &str) {
        self.trailers.retain(|(k, _)| k != name);
    }
    fn upstream_address(&mut self) -> Option<String> {
        self.upstream.clone()
    }
    fn response_flags(&mut self) -> u64 {
        self.flags
    }
    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], _body: &str) {
        // Like Envoy: a local reply replaces whatever the upstream answered.
        self.response.clear();
        self.local_replies += 1;
        self.local_reply = Some((status, headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()));
    }
    fn set_timer(&mut self, after_ms: u64) -> bool {
        self.timers.push(after_ms);
        true
    }
    fn wake_worker(&mut self) {
        self.worker_wakes += 1;
    }
    fn resume_request(&mut self) {
        self.resumed_request += 1;
    }
    fn resume_response(&mut self) {
        self.resumed_response += 1;
    }
}

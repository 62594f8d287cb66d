//! The pinned path's own code, without a proxy: a repeatable profile of the
//! pure core (the proxy's side of each host call is not in it).
//!
//! ```text
//! cargo build --profile profiling --example pinned_path
//! valgrind --tool=callgrind --toggle-collect='pinned_path::serve' \
//!     target/profiling/examples/pinned_path hit 100000
//! ```
//!
//! `hit` sends one session's cookie on every request (the verified-cookie
//! cache answers); `miss` cycles through twice as many sessions as the cache
//! has slots, so every request pays for the full check. Only `serve` is
//! counted: divide its instructions by the request count.

use std::process::ExitCode;
use std::rc::Rc;

use session_affinity::config::{Config, StoreConfig};
use session_affinity::cookie::{self, NewClaims};
use session_affinity::flow::{Flow, HttpHost, Worker};
use session_affinity::gone::SharedData;
use session_affinity::headers::HeaderMap;
use session_affinity::store::StoreCall;

const CONFIG: &str = r#"{"cookie": {"name": "sa", "ttl": "24h"},
    "keys": [{"id": "k1", "secret": "profile-only-secret-0123456789abcdef"}]}"#;
const NOW_S: u64 = 1_800_000_000;
const UPSTREAM: &str = "10.0.0.7:8080";

/// Headers as Envoy hands them over; every other call does nothing.
struct Host<'a> {
    request: &'a HeaderMap,
    response: HeaderMap,
}

impl SharedData for Host<'_> {
    fn get(&self, _: &str) -> (Option<Vec<u8>>, Option<u32>) {
        (None, None)
    }
    fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> bool {
        true
    }
}

impl HttpHost for Host<'_> {
    fn request_headers(&mut self) -> HeaderMap {
        self.request.clone() // stands in for the host's copy into the VM
    }
    fn set_request_header(&mut self, _: &str, _: &str) {}
    fn remove_request_header(&mut self, _: &str) {}
    fn response_headers(&mut self) -> HeaderMap {
        self.response.clone()
    }
    fn add_response_header(&mut self, _: &str, _: &str) {}
    fn remove_response_header(&mut self, _: &str) {}
    fn upstream_address(&mut self) -> Option<String> {
        Some(UPSTREAM.to_string())
    }
    fn response_flags(&mut self) -> u64 {
        0
    }
    fn send_response(&mut self, _: u32, _: &[(&str, &str)], _: &str) {}
    fn dispatch(&mut self, _: &StoreConfig, _: &StoreCall, _: bool) -> Option<u32> {
        None
    }
    fn resume_request(&mut self) {}
    fn resume_response(&mut self) {}
    fn now_ms(&self) -> u64 {
        (NOW_S + 1) * 1000
    }
    fn random(&mut self) -> Option<[u8; 16]> {
        Some([7; 16])
    }
}

fn request(cookie: &str) -> HeaderMap {
    let cookie = format!("sa={cookie}");
    HeaderMap::from_pairs([
        (":authority", &b"shop.example.com"[..]),
        (":path", b"/cart"),
        (":method", b"GET"),
        (":scheme", b"https"),
        ("cookie", cookie.as_bytes()),
        ("x-forwarded-proto", b"https"),
        ("x-request-id", b"0d4b7a0e-8a3c-4c37-9d8e-1f2e3d4c5b6a"),
    ])
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(Ok(requests))) = (args.next(), args.next().map(|n| n.parse::<u32>())) else {
        eprintln!("usage: pinned_path hit|miss REQUESTS");
        return ExitCode::FAILURE;
    };
    let Ok(config) = Config::parse(CONFIG.as_bytes(), &|_| None) else {
        eprintln!("pinned_path: the built-in config does not parse");
        return ExitCode::FAILURE;
    };
    let sessions = if mode == "miss" { 2 * 4096 } else { 1 };
    let cookies: Vec<HeaderMap> = (0..sessions)
        .filter_map(|i| {
            let sid = format!("{i:0>22}");
            let claims = NewClaims { sid: &sid, host: UPSTREAM, instance: "app-7f9c", iat: NOW_S, exp: NOW_S + 86_400, flags: 0 };
            cookie::encode(&claims, &config.keys).map(|value| request(&value))
        })
        .collect();
    let config = Rc::new(config);
    let worker = Rc::new(Worker::default());
    let response = HeaderMap::from_pairs([
        (":status", &b"200"[..]),
        ("content-type", b"text/html"),
        ("content-length", b"5120"),
        ("date", b"Sat, 21 Nov 2026 08:00:00 GMT"),
        ("x-instance-id", b"app-7f9c"),
    ]);
    serve(&config, &worker, &cookies, response, requests);
    println!("{requests} requests, {sessions} sessions, counters {:?}", worker.metrics.drain().0);
    ExitCode::SUCCESS
}

/// Each request through both phases of a new flow, as Envoy drives them.
#[inline(never)]
fn serve(config: &Rc<Config>, worker: &Rc<Worker>, requests: &[HeaderMap], response: HeaderMap, count: u32) {
    let none = HeaderMap::default();
    let mut host = Host { request: &none, response };
    for (i, request) in (0..count).zip(requests.iter().cycle()) {
        host.request = request;
        let mut flow = Flow::new(i, Rc::clone(config), Rc::clone(worker));
        flow.on_request_headers(&mut host);
        flow.on_response_headers(&mut host);
    }
}

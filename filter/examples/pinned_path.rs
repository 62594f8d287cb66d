//! The pinned path's own code, without a proxy: a repeatable profile of the
//! pure core driven through the `testing` fake proxy.
//!
//! ```text
//! cargo build --profile profiling --example pinned_path
//! valgrind --tool=callgrind --toggle-collect='pinned_path::serve' \
//!     target/profiling/examples/pinned_path hit 100000 [sealed|signed]
//! ```
//!
//! `hit` sends one session's cookie on every request (the verified-cookie
//! cache answers); `miss` cycles through twice as many sessions as the cache
//! has slots, so every request pays for the full check (opening a sealed
//! cookie, or checking a signed one's HMAC). Only `serve` is
//! counted: divide its instructions by the request count. The fake proxy's
//! own bookkeeping (copying headers in and out) is in the count too, as the
//! real host's copy into the VM would be.

use std::process::ExitCode;
use std::rc::Rc;

use session_affinity::config::Config;
use session_affinity::cookie::{self, cluster_tag, NewClaims};
use session_affinity::flow::{Flow, Worker};
use session_affinity::testing::FakeProxy;

const CONFIG: &str = r#"{"cookie": {"name": "sa", "ttl": "24h", "format": "FORMAT"},
    "keys": [{"id": "k1", "secret": "profile-only-secret-0123456789abcdef"}]}"#;
const NOW_S: u64 = 1_800_000_000;
const UPSTREAM: &str = "10.0.0.7:8080";

fn request(cookie: &str) -> FakeProxy {
    let cookie = format!("sa={cookie}");
    let mut proxy = FakeProxy::new(
        &[
            (":authority", "shop.example.com"),
            (":path", "/cart"),
            (":method", "GET"),
            (":scheme", "https"),
            ("cookie", &cookie),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "0d4b7a0e-8a3c-4c37-9d8e-1f2e3d4c5b6a"),
        ],
        (NOW_S + 1) * 1000,
    );
    proxy.cluster = "app".into();
    proxy
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(Ok(requests))) = (args.next(), args.next().map(|n| n.parse::<u32>())) else {
        eprintln!("usage: pinned_path hit|miss REQUESTS [sealed|signed]");
        return ExitCode::FAILURE;
    };
    let format = args.next().unwrap_or_else(|| "sealed".into());
    let Ok(config) = Config::parse(CONFIG.replace("FORMAT", &format).as_bytes(), &|_| None) else {
        eprintln!("pinned_path: the built-in config does not parse");
        return ExitCode::FAILURE;
    };
    let sessions: u32 = if mode == "miss" { 2 * 4096 } else { 1 };
    let tag = cluster_tag("app");
    let proxies: Vec<FakeProxy> = (0..sessions)
        .filter_map(|i: u32| {
            let sid = format!("{i:0>22}");
            let claims = NewClaims { sid: &sid, cluster: tag.as_str(), upstream: UPSTREAM, instance: "app-7f9c", since: NOW_S, iat: NOW_S, exp: NOW_S + 86_400, flags: 0 };
            cookie::issue(&claims, &config.keys, config.cookie.format, &i.to_le_bytes()).map(|value| request(&value))
        })
        .collect();
    let config = Rc::new(config);
    let worker = Rc::new(Worker::default());
    let response = [
        (":status", "200"),
        ("content-type", "text/html"),
        ("content-length", "5120"),
        ("date", "Sat, 21 Nov 2026 08:00:00 GMT"),
        ("x-instance-id", "app-7f9c"),
    ];
    serve(&config, &worker, proxies, &response, requests);
    let mut counts = Vec::new();
    worker.metrics.flush(|counter, n| counts.push((counter, n)), |_| {});
    println!("{requests} requests, {sessions} {format} sessions, counters {counts:?}");
    ExitCode::SUCCESS
}

/// Each request through both phases of a new flow, as Envoy drives them.
#[inline(never)]
fn serve(config: &Rc<Config>, worker: &Rc<Worker>, mut proxies: Vec<FakeProxy>, response: &[(&str, &str)], count: u32) {
    let sessions = proxies.len();
    for i in 0..count {
        let Some(proxy) = proxies.get_mut(i as usize % sessions.max(1)) else { return };
        let mut flow = Flow::new(i, Rc::clone(config), Rc::clone(worker));
        flow.on_request_headers(proxy);
        proxy.respond(UPSTREAM, response);
        flow.on_response_headers(proxy);
    }
}

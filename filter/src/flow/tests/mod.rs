//! The session flow against the fake proxy: every path of the design's flows.
//! Store calls are asserted as typed operations and answered as webdis would.

mod failover;
mod lifecycle;
mod pinned;
mod store;

use std::rc::Rc;

use super::*;
use crate::config::Config;
use crate::cookie::{self, NewClaims};
use crate::store::Op;
use crate::testing::{FakeProxy, FakeShared};

const NOW_MS: u64 = 1_800_000_000_000;
const NOW: u64 = NOW_MS / 1000;
const SECRET: &str = "0123456789abcdef0123456789abcdef";
const B1: &str = "10.0.0.1:8080";
const B2: &str = "10.0.0.2:8080";
const SID: &str = "AAAAAAAAAAAAAAAAAAAAAA";
const COOKIE: &str = "sa";

/// The test config plus `extra` (",\"section\": {...}"); the cookie is named
/// "sa" unless `extra` has its own cookie section.
fn config(extra: &str) -> Rc<Config> {
    let cookie = if extra.contains(r#""cookie""#) { String::new() } else { format!(r#""cookie":{{"name":"{COOKIE}"}},"#) };
    let json = format!(r#"{{{cookie}"keys":[{{"id":"k1","secret":"{SECRET}"}}],"skip":{{"prefixes":["/static/"],"suffixes":[".css"]}}{extra}}}"#);
    Rc::new(Config::parse(json.as_bytes(), &|_| None).unwrap())
}

fn with_store(write: &str) -> Rc<Config> {
    config(&format!(r#","store":{{"cluster":"store","write":"{write}"}}"#))
}

/// A worker and its config: what every stream of a test shares.
struct Bed {
    config: Rc<Config>,
    worker: Rc<Worker>,
    shared: Rc<FakeShared>,
}

impl Bed {
    fn new(config: Rc<Config>) -> Bed {
        Bed { config, worker: Rc::default(), shared: Rc::default() }
    }

    /// A stream of this worker with these request headers.
    fn proxy(&self, request: &[(&str, &str)]) -> FakeProxy {
        let mut proxy = FakeProxy::new(request, NOW_MS);
        proxy.shared = Rc::clone(&self.shared);
        proxy
    }

    fn flow(&self) -> Flow {
        Flow::new(1, Rc::clone(&self.config), Rc::clone(&self.worker))
    }

    fn count(&self, counter: Counter) -> u64 {
        self.worker.metrics.get(counter)
    }

    /// A cookie value for SID pinned to `upstream`/`instance` in cluster "app".
    fn cookie(&self, upstream: &str, instance: &str, flags: u8) -> String {
        let tag = cookie::cluster_tag("app");
        let claims = NewClaims {
            sid: SID,
            cluster: tag.as_str(),
            upstream,
            instance,
            since: NOW - 100,
            iat: NOW - 10,
            exp: NOW + 3600,
            flags,
        };
        cookie::issue(&claims, &self.config.keys, self.config.cookie.format, &[0; 16]).unwrap()
    }

    /// A request carrying a cookie pinned to `upstream`/`instance`.
    fn pinned(&self, upstream: &str, instance: &str, extra: &[(&str, &str)]) -> FakeProxy {
        let cookie = format!("a=b; {COOKIE}={}", self.cookie(upstream, instance, 0));
        let mut headers = vec![("cookie", cookie.as_str())];
        headers.extend_from_slice(extra);
        self.proxy(&headers)
    }

    /// A pinned request to B1/pod-a, answered by B1 with `response`.
    fn answer_pinned(&self, response: &[(&str, &str)]) -> (Flow, FakeProxy, Action) {
        let mut host = self.pinned(B1, "pod-a", &[]);
        let mut f = self.flow();
        assert_eq!(f.on_request_headers(&mut host), Action::Continue);
        host.respond(B1, response);
        let action = f.on_response_headers(&mut host);
        (f, host, action)
    }
}

/// The calls the worker queued for later go out (as its tick would send
/// them); returns when the worker wants to tick again.
fn tick(bed: &Bed, host: &mut FakeProxy) -> Option<u64> {
    bed.worker.on_tick(host, &bed.config)
}

/// The store answers the flow's latest call.
fn reply(f: &mut Flow, host: &mut FakeProxy, answer: Reply) {
    let (token, status, body) = host.answer(&answer);
    f.on_store_response(host, token, status, &body);
}

/// The value of our cookie in the first Set-Cookie that sets it (response or local reply).
fn set_cookie(host: &FakeProxy) -> Option<String> {
    host.resp_all("set-cookie").into_iter().find_map(|h| Some(h.strip_prefix("sa=")?.split(';').next()?.to_string()))
}

/// The claims of the cookie the filter set.
fn issued(bed: &Bed, host: &FakeProxy) -> cookie::Claims {
    cookie::decode(set_cookie(host).expect("a cookie was set"), &bed.config.keys, NOW).unwrap()
}

fn owner(upstream: &str, instance: &str) -> String {
    format!("{upstream}#{instance}")
}

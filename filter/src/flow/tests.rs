//! The session flow against a fake proxy: every path of DESIGN.md's flows.

use std::rc::Rc;

use super::*;
use crate::config::Config;
use crate::gone::tests::FakeShared;

const NOW_MS: u64 = 1_800_000_000_000;
const SECRET: &str = "0123456789abcdef0123456789abcdef";
const B1: &str = "10.0.0.1:8080";
const B2: &str = "10.0.0.2:8080";

/// A proxy with recorded side effects.
#[derive(Default)]
struct FakeHost {
    request: Vec<(String, String)>,
    response: Vec<(String, String)>,
    upstream: Option<String>,
    flags: u64,
    local_reply: Option<(u32, Vec<(String, String)>)>,
    calls: Vec<(StoreCall, bool)>,
    resumed_request: bool,
    resumed_response: bool,
    shared: FakeShared,
    now_ms: u64,
    no_store: bool,
}

impl SharedData for FakeHost {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.shared.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        self.shared.set(key, value, cas)
    }
}

fn to_map(headers: &[(String, String)]) -> HeaderMap {
    HeaderMap::from_pairs(headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
}

impl HttpHost for FakeHost {
    fn request_headers(&mut self) -> HeaderMap {
        to_map(&self.request)
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        self.request.retain(|(k, _)| k != name);
        self.request.push((name.into(), value.into()));
    }
    fn remove_request_header(&mut self, name: &str) {
        self.request.retain(|(k, _)| k != name);
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
    fn upstream_address(&mut self) -> Option<String> {
        self.upstream.clone()
    }
    fn response_flags(&mut self) -> u64 {
        self.flags
    }
    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], _body: &str) {
        self.local_reply = Some((status, headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()));
    }
    fn dispatch(&mut self, _store: &StoreConfig, call: &StoreCall, detached: bool) -> Option<u32> {
        if self.no_store {
            return None;
        }
        self.calls.push((call.clone(), detached));
        Some(self.calls.len() as u32)
    }
    fn resume_request(&mut self) {
        self.resumed_request = true;
    }
    fn resume_response(&mut self) {
        self.resumed_response = true;
    }
    fn now_ms(&self) -> u64 {
        self.now_ms
    }
    fn random(&mut self) -> Option<[u8; 16]> {
        Some([7; 16])
    }
}

impl FakeHost {
    fn new(request: &[(&str, &str)]) -> FakeHost {
        let mut request: Vec<(String, String)> = request.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if !request.iter().any(|(k, _)| k == ":path") {
            request.push((":path".into(), "/cart?x=1".into()));
        }
        FakeHost { request, now_ms: NOW_MS, ..FakeHost::default() }
    }
    fn req(&self, name: &str) -> Option<&str> {
        self.request.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn resp(&self, name: &str) -> Option<&str> {
        self.response.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn respond(&mut self, upstream: &str, headers: &[(&str, &str)]) {
        self.upstream = Some(upstream.into());
        self.response = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if !self.response.iter().any(|(k, _)| k == ":status") {
            self.response.push((":status".into(), "200".into()));
        }
    }
    fn last_call(&self) -> String {
        self.calls.last().map(|(c, _)| String::from_utf8_lossy(&c.body).into_owned()).unwrap_or_default()
    }
    fn set_cookie_value(&self) -> Option<String> {
        let header = self.resp("set-cookie").or_else(|| {
            self.local_reply.as_ref().and_then(|(_, h)| h.iter().find(|(k, _)| k == "set-cookie").map(|(_, v)| v.as_str()))
        })?;
        Some(header.strip_prefix("sa=")?.split(';').next()?.to_string())
    }
}

fn config(extra: &str) -> Rc<Config> {
    let json = format!(r#"{{"keys":[{{"id":"k1","secret":"{SECRET}"}}],"skip":{{"prefixes":["/static/"],"suffixes":[".css"]}}{extra}}}"#);
    Rc::new(Config::parse(json.as_bytes(), &|_| None).unwrap())
}

fn with_store(write: &str) -> Rc<Config> {
    config(&format!(r#","store":{{"cluster":"store","write":"{write}"}}"#))
}

fn flow(config: &Rc<Config>, worker: &Rc<Worker>) -> Flow {
    Flow::new(1, Rc::clone(config), Rc::clone(worker))
}

fn cookie_for(config: &Config, host: &str, instance: &str, flags: u8) -> String {
    let claims = NewClaims { sid: "AAAAAAAAAAAAAAAAAAAAAA", host, instance, iat: NOW_MS / 1000 - 10, exp: NOW_MS / 1000 + 3600, flags };
    cookie::encode(&claims, &config.keys).unwrap()
}

fn pinned_request(config: &Config, host: &str, instance: &str) -> FakeHost {
    FakeHost::new(&[("cookie", &format!("a=b; sa={}", cookie_for(config, host, instance, 0)))])
}

/// A pinned request to B1/pod-a, answered by B1 with `response` headers.
fn answer_pinned(config: &Rc<Config>, worker: &Rc<Worker>, response: &[(&str, &str)]) -> (Flow, FakeHost, Action) {
    let mut host = pinned_request(config, B1, "pod-a");
    let mut f = flow(config, worker);
    f.on_request_headers(&mut host);
    host.respond(B1, response);
    let action = f.on_response_headers(&mut host);
    (f, host, action)
}

#[test]
fn new_session_gets_an_id_and_a_cookie_pinned_to_the_upstream_and_instance() {
    let (config, worker) = (config(""), Rc::<Worker>::default());
    let mut host = FakeHost::new(&[]);
    let mut f = flow(&config, &worker);
    assert_eq!(f.on_request_headers(&mut host), Action::Continue);
    let sid = host.req("x-session-id").unwrap().to_string();
    assert!(cookie::is_sid(&sid));
    assert_eq!(host.req("x-session-new"), Some("1"));
    assert_eq!(host.req("x-session-route"), None);
    assert_eq!(host.req("x-envoy-retry-on"), Some(RETRY_ON_UNREACHED));
    host.respond(B1, &[("x-instance-id", "pod-a")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    let value = host.set_cookie_value().unwrap();
    let claims = cookie::decode(value, &config.keys, NOW_MS / 1000).unwrap();
    assert_eq!((claims.sid(), claims.host(), claims.instance()), (sid.as_str(), B1, "pod-a"));
    assert!(host.resp("set-cookie").unwrap().ends_with("; Path=/; Max-Age=86400; Secure; HttpOnly; SameSite=Lax"));
    assert_eq!(worker.metrics.get(Counter::SessionsCreated), 1);
}

#[test]
fn pinned_request_sets_the_override_and_makes_no_store_call() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let mut host = pinned_request(&config, B1, "pod-a");
    let mut f = flow(&config, &worker);
    assert_eq!(f.on_request_headers(&mut host), Action::Continue);
    assert_eq!(host.req("x-session-route"), Some(STANDARD.encode(B1).as_str()));
    assert_eq!(host.req("x-session-id"), Some("AAAAAAAAAAAAAAAAAAAAAA"));
    assert_eq!(host.req("x-envoy-retry-on"), None, "a retry would ignore the override");
    host.respond(B1, &[("x-instance-id", "pod-a"), ("x-session-route", "echo")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    assert!(host.calls.is_empty());
    assert_eq!(host.resp("set-cookie"), None, "young cookies are not re-issued");
    assert_eq!(host.resp("x-session-route"), None, "the echoed routing header stays internal");
    assert_eq!(worker.metrics.get(Counter::Pinned), 1);
}

#[test]
fn client_sent_internal_headers_never_pass() {
    let (config, worker) = (config(""), Rc::<Worker>::default());
    let forged = [("x-session-route", "MTAuMC4wLjk6ODA="), ("x-session-id", "victim"), ("x-session-new", "1"), ("x-session-state", "evil")];
    for cookie in [None, Some(cookie_for(&config, B1, "pod-a", 0))] {
        let mut headers = forged.to_vec();
        let cookie_header = cookie.map(|c| format!("sa={c}"));
        if let Some(c) = &cookie_header {
            headers.push(("cookie", c));
        }
        let mut host = FakeHost::new(&headers);
        flow(&config, &worker).on_request_headers(&mut host);
        assert_ne!(host.req("x-session-id"), Some("victim"));
        assert_ne!(host.req("x-session-route"), Some("MTAuMC4wLjk6ODA="));
        assert_eq!(host.req("x-session-state"), None);
        assert_eq!(host.req("x-session-new"), if cookie_header.is_some() { None } else { Some("1") });
    }
    let mut host = FakeHost::new(&[(":path", "/static/app.js"), ("x-session-route", "x"), ("x-session-id", "victim")]);
    flow(&config, &worker).on_request_headers(&mut host);
    assert_eq!((host.req("x-session-route"), host.req("x-session-id")), (None, None));
}

#[test]
fn static_paths_neither_get_nor_need_a_cookie() {
    let (config, worker) = (config(""), Rc::<Worker>::default());
    for path in ["/static/a.png", "/site.css?v=3"] {
        let mut host = FakeHost::new(&[(":path", path)]);
        let mut f = flow(&config, &worker);
        f.on_request_headers(&mut host);
        host.respond(B1, &[("x-instance-id", "pod-a")]);
        f.on_response_headers(&mut host);
        assert_eq!(host.resp("set-cookie"), None, "{path}");
        assert_eq!(host.req("x-session-id"), None);
    }
    assert_eq!(worker.metrics.get(Counter::Skipped), 2);
}

#[test]
fn bad_cookies_start_a_new_session_and_count_their_reason() {
    let (config, worker) = (config(""), Rc::<Worker>::default());
    let good = cookie_for(&config, B1, "pod-a", 0);
    let other_key = Config::parse(br#"{"keys":[{"id":"k9","secret":"ffffffffffffffffffffffffffffffffffff"}]}"#, &|_| None).unwrap();
    let expired = cookie::encode(&NewClaims { sid: "AAAAAAAAAAAAAAAAAAAAAA", host: B1, instance: "", iat: 1, exp: 2, flags: 0 }, &config.keys).unwrap();
    let cases = [
        ("garbage", Counter::RejectedMalformed),
        (&good[..good.len() - 3], Counter::RejectedMalformed),
        (&good.replace("10.0.0.1", "10.0.0.9"), Counter::RejectedBadSignature),
        (&cookie_for(&other_key, B1, "", 0), Counter::RejectedUnknownKey),
        (&expired, Counter::RejectedExpired),
    ];
    for (value, counter) in cases {
        let before = worker.metrics.get(counter);
        let mut host = FakeHost::new(&[("cookie", &format!("sa={value}"))]);
        flow(&config, &worker).on_request_headers(&mut host);
        assert_eq!(host.req("x-session-new"), Some("1"), "{value}");
        assert_eq!(host.req("x-session-route"), None);
        assert_eq!(worker.metrics.get(counter), before + 1, "{value}");
    }
}

#[test]
fn a_valid_cookie_among_several_with_our_name_wins() {
    let (config, worker) = (config(""), Rc::<Worker>::default());
    let header = format!("sa=stale; sa={}", cookie_for(&config, B1, "pod-a", 0));
    let mut host = FakeHost::new(&[("cookie", &header)]);
    flow(&config, &worker).on_request_headers(&mut host);
    assert_eq!(host.req("x-session-route"), Some(STANDARD.encode(B1).as_str()));
    assert_eq!(worker.metrics.get(Counter::RejectedMalformed), 0);
}

#[test]
fn old_cookies_are_refreshed_and_old_keys_are_moved_to_the_signing_key() {
    let worker = Rc::default();
    let old_ring = config("");
    let rotated = Rc::new(
        Config::parse(format!(r#"{{"keys":[{{"id":"k2","secret":"{SECRET}x"}},{{"id":"k1","secret":"{SECRET}"}}]}}"#).as_bytes(), &|_| None).unwrap(),
    );
    let mut host = pinned_request(&old_ring, B1, "pod-a");
    let mut f = flow(&rotated, &worker);
    f.on_request_headers(&mut host);
    host.respond(B1, &[("x-instance-id", "pod-a")]);
    f.on_response_headers(&mut host);
    let claims = cookie::decode(host.set_cookie_value().unwrap(), &rotated.keys, NOW_MS / 1000).unwrap();
    assert_eq!(claims.kid(), "k2");

    // Past refresh_after (half its life), a cookie is re-issued with a fresh expiry.
    let mut host = pinned_request(&old_ring, B1, "pod-a");
    host.now_ms = NOW_MS + 1_800_000;
    let mut f = flow(&old_ring, &worker);
    f.on_request_headers(&mut host);
    host.respond(B1, &[("x-instance-id", "pod-a")]);
    f.on_response_headers(&mut host);
    let claims = cookie::decode(host.set_cookie_value().unwrap(), &old_ring.keys, host.now_ms / 1000).unwrap();
    assert_eq!(claims.exp, host.now_ms / 1000 + 86_400);
}

#[test]
fn a_503_uf_for_the_pinned_host_marks_it_gone_and_replays_with_a_moving_cookie() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let mut host = pinned_request(&config, B1, "pod-a");
    let mut f = flow(&config, &worker);
    f.on_request_headers(&mut host);
    host.respond(B1, &[(":status", "503")]);
    host.flags = FLAG_UPSTREAM_CONNECTION_FAILURE;
    assert_eq!(f.on_response_headers(&mut host), Action::Pause);
    let (status, headers) = host.local_reply.clone().unwrap();
    assert_eq!(status, 307);
    assert!(headers.contains(&("location".into(), "/cart?x=1".into())));
    let moving = cookie::decode(host.set_cookie_value().unwrap(), &config.keys, NOW_MS / 1000).unwrap();
    assert!(moving.is_moving());
    assert!(worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS));
    assert_eq!(worker.metrics.get(Counter::FailoversReplayed), 1);
    assert!(host.calls.is_empty(), "no store call before the replay");
}

#[test]
fn an_app_error_that_is_not_uh_or_uf_is_never_replayed() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let mut host = pinned_request(&config, B1, "pod-a");
    let mut f = flow(&config, &worker);
    f.on_request_headers(&mut host);
    host.respond(B1, &[(":status", "503"), ("x-instance-id", "pod-a")]);
    host.flags = 0x10; // UC: the connection broke after the request was sent
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    assert!(host.local_reply.is_none());
    assert!(!worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS));
}

/// Drives a request whose cookie must fail over until the begin call is out.
fn failover_request(config: &Rc<Config>, worker: &Rc<Worker>, flags: u8) -> (Flow, FakeHost) {
    let mut host = FakeHost::new(&[("cookie", &format!("sa={}", cookie_for(config, B1, "pod-a", flags)))]);
    let mut f = flow(config, worker);
    assert_eq!(f.on_request_headers(&mut host), Action::Pause);
    assert!(host.last_call().starts_with("EVAL/local%20owner%20%3D%20redis"), "{}", host.last_call());
    assert!(f.holds_request_body() && !f.holds_response_body());
    (f, host)
}

fn reply(f: &mut Flow, host: &mut FakeHost, body: &str) {
    let token = host.calls.len() as u32;
    f.on_store_response(host, token, Some(200), body.as_bytes());
}

#[test]
fn known_gone_restores_state_then_commits_the_new_owner() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    worker.gone.borrow_mut().mark(&FakeShared::default(), B1, Sighting::Down, NOW_MS, 30_000);
    let (mut f, mut host) = failover_request(&config, &worker, 0);
    assert_eq!(worker.metrics.get(Counter::FailoversKnown), 1);
    reply(&mut f, &mut host, r#"{"EVAL":["acquired","c3RhdGU"]}"#);
    assert!(host.resumed_request);
    assert_eq!(host.req("x-session-state"), Some("c3RhdGU"));
    assert_eq!(host.req("x-session-new"), None);
    assert_eq!(host.req("x-session-route"), None, "the load balancer picks a live host");
    assert_eq!(host.req("x-session-id"), Some("AAAAAAAAAAAAAAAAAAAAAA"));
    assert_eq!(host.req("x-envoy-retry-on"), Some(RETRY_ON_UNREACHED), "a dead pick is retried by the router");
    assert_eq!(worker.metrics.get(Counter::StateRestored), 0, "counted when an app took the state");

    host.respond(B2, &[("x-instance-id", "pod-b"), ("x-session-state", "bmV3")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Pause, "sync: wait for the commit");
    assert!(host.last_call().starts_with("EVAL/if%20redis%2Ecall%28%27GET%27"), "commit: {}", host.last_call());
    assert!(host.last_call().contains("10%2E0%2E0%2E2%3A8080%23pod%2Db/1/bmV3/86400000"));
    assert_eq!(host.resp("x-session-state"), None, "state never reaches the client");
    assert_eq!(worker.metrics.get(Counter::StateRestored), 1);
    let claims = cookie::decode(host.set_cookie_value().unwrap(), &config.keys, NOW_MS / 1000).unwrap();
    assert_eq!((claims.host(), claims.instance(), claims.is_moving()), (B2, "pod-b", false));
    reply(&mut f, &mut host, r#"{"EVAL":["stored"]}"#);
    assert!(host.resumed_response);
}

#[test]
fn nothing_stored_yet_asks_the_app_to_create_the_session() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (mut f, mut host) = failover_request(&config, &worker, FLAG_MOVING);
    reply(&mut f, &mut host, r#"{"EVAL":["acquired"]}"#);
    assert_eq!(host.req("x-session-new"), Some("1"));
    assert_eq!(worker.metrics.get(Counter::FailoversKnown), 0, "a moving cookie was counted at its 307");
}

#[test]
fn a_session_another_proxy_moved_joins_its_owner() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (mut f, mut host) = failover_request(&config, &worker, FLAG_MOVING);
    reply(&mut f, &mut host, &format!(r#"{{"EVAL":["moved","{B2}#pod-b"]}}"#));
    assert_eq!(host.req("x-session-route"), Some(STANDARD.encode(B2).as_str()));
    assert_eq!(host.req("x-session-state"), None);
    host.respond(B2, &[("x-instance-id", "pod-b")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    let claims = cookie::decode(host.set_cookie_value().unwrap(), &config.keys, NOW_MS / 1000).unwrap();
    assert_eq!((claims.host(), claims.instance()), (B2, "pod-b"));
    assert_eq!(worker.metrics.get(Counter::FailoversJoined), 1);
}

#[test]
fn a_busy_lease_is_polled_then_refused_with_retry_after() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (mut f, mut host) = failover_request(&config, &worker, FLAG_MOVING);
    for _ in 0..MAX_BUSY_POLLS {
        reply(&mut f, &mut host, r#"{"EVAL":["busy"]}"#);
        assert!(host.local_reply.is_none());
    }
    assert_eq!(host.calls.len() as u32, MAX_BUSY_POLLS + 1);
    reply(&mut f, &mut host, r#"{"EVAL":["busy"]}"#);
    assert_eq!(host.local_reply.as_ref().map(|r| r.0), Some(503));
    assert!(!host.resumed_request);
}

#[test]
fn store_outage_follows_the_policy() {
    let worker = Rc::<Worker>::default();
    // fresh: a new session on a live host, counted.
    let fresh = with_store("sync");
    let (mut f, mut host) = failover_request(&fresh, &worker, FLAG_MOVING);
    f.on_store_response(&mut host, 1, None, b"");
    assert!(host.resumed_request);
    assert_eq!(host.req("x-session-new"), Some("1"));
    assert_ne!(host.req("x-session-id"), Some("AAAAAAAAAAAAAAAAAAAAAA"));
    assert_eq!(worker.metrics.get(Counter::FailoversFresh), 1);
    assert_eq!(worker.metrics.get(Counter::StoreErrors), 1);

    // reject: 503 with Retry-After, the request never goes upstream.
    let reject = config(r#","store":{"cluster":"store","on_outage":"reject","retry_after":"3s"}"#);
    let (mut f, mut host) = failover_request(&reject, &worker, FLAG_MOVING);
    f.on_store_response(&mut host, 1, Some(503), b"");
    let (status, headers) = host.local_reply.clone().unwrap();
    assert_eq!(status, 503);
    assert!(headers.contains(&("retry-after".into(), "3".into())));
    assert!(!host.resumed_request);
    assert_eq!(worker.metrics.get(Counter::OutageRejected), 1);
}

#[test]
fn a_store_that_cannot_be_called_is_an_outage_too() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let mut host = FakeHost::new(&[("cookie", &format!("sa={}", cookie_for(&config, B1, "pod-a", FLAG_MOVING)))]);
    host.no_store = true;
    assert_eq!(flow(&config, &worker).on_request_headers(&mut host), Action::Continue);
    assert_eq!(host.req("x-session-new"), Some("1"));
}

#[test]
fn pinned_state_writes_are_fenced_on_the_owner_and_held_in_sync_mode() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (mut f, mut host, action) = answer_pinned(&config, &worker, &[("x-instance-id", "pod-a"), ("x-session-state", "s2")]);
    assert_eq!(action, Action::Pause);
    assert!(f.holds_response_body() && !f.holds_request_body());
    assert!(host.last_call().ends_with("/10%2E0%2E0%2E1%3A8080%23pod%2Da/10%2E0%2E0%2E1%3A8080%23pod%2Da/s2/86400000"), "{}", host.last_call());
    assert!(!host.calls.last().unwrap().1, "sync writes belong to the stream");
    reply(&mut f, &mut host, r#"{"EVAL":["stored"]}"#);
    assert!(host.resumed_response);
    assert_eq!(worker.metrics.get(Counter::StoreWrites), 1);
}

#[test]
fn a_write_from_a_host_that_lost_the_session_is_refused_and_repinned() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (mut f, mut host, _) = answer_pinned(&config, &worker, &[("x-instance-id", "pod-a"), ("x-session-state", "stale")]);
    reply(&mut f, &mut host, &format!(r#"{{"EVAL":["conflict","{B2}#pod-b"]}}"#));
    assert!(!host.resumed_response);
    assert_eq!(host.local_reply.as_ref().map(|r| r.0), Some(503));
    let claims = cookie::decode(host.set_cookie_value().unwrap(), &config.keys, NOW_MS / 1000).unwrap();
    assert_eq!(claims.host(), B2);
    assert_eq!(worker.metrics.get(Counter::StoreWritesRejected), 1);
}

#[test]
fn async_writes_are_detached_and_do_not_hold_the_response() {
    let (config, worker) = (with_store("async"), Rc::<Worker>::default());
    let (mut f, mut host, action) = answer_pinned(&config, &worker, &[("x-instance-id", "pod-a"), ("x-session-state", "s2")]);
    assert_eq!(action, Action::Continue);
    assert!(host.calls.last().unwrap().1);
    assert!(!f.holds_response_body(), "the body streams on while the write is out");
    reply(&mut f, &mut host, r#"{"EVAL":["conflict",""]}"#);
    assert!(host.local_reply.is_none());
    assert_eq!(worker.metrics.get(Counter::StoreWritesRejected), 1);
}

#[test]
fn a_failed_write_never_breaks_the_pinned_path() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (mut f, mut host, _) = answer_pinned(&config, &worker, &[("x-instance-id", "pod-a"), ("x-session-state", "s2")]);
    f.on_store_response(&mut host, 1, None, b"");
    assert!(host.resumed_response);
    assert!(host.local_reply.is_none());
}

#[test]
fn an_unknown_session_at_a_restarted_instance_is_replayed_and_counted_as_restart() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (_, host, action) = answer_pinned(&config, &worker, &[(":status", "409"), ("x-instance-id", "pod-a2"), ("x-session-unknown", "1")]);
    assert_eq!(action, Action::Pause);
    assert_eq!(host.local_reply.as_ref().map(|r| r.0), Some(307));
    assert!(worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS));
    assert!(!worker.gone.borrow().is_gone(B1, "pod-a2", NOW_MS));
    assert_eq!(worker.metrics.get(Counter::FailoversRestart), 1);
}

#[test]
fn an_app_without_the_contract_that_restarted_is_repinned_to_the_new_instance() {
    let (config, worker) = (config(""), Rc::<Worker>::default());
    let (_, host, action) = answer_pinned(&config, &worker, &[("x-instance-id", "pod-a2")]);
    assert_eq!(action, Action::Continue);
    assert!(host.local_reply.is_none());
    let claims = cookie::decode(host.set_cookie_value().unwrap(), &config.keys, NOW_MS / 1000).unwrap();
    assert_eq!(claims.instance(), "pod-a2");
    assert_eq!(worker.metrics.get(Counter::FailoversRestart), 1);
}

#[test]
fn a_failover_attempt_that_hit_a_dead_host_releases_its_lease_and_replays() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (mut f, mut host) = failover_request(&config, &worker, FLAG_MOVING);
    reply(&mut f, &mut host, r#"{"EVAL":["acquired","c3RhdGU"]}"#);
    host.respond(B2, &[(":status", "503")]);
    host.flags = FLAG_UPSTREAM_CONNECTION_FAILURE;
    assert_eq!(f.on_response_headers(&mut host), Action::Pause);
    assert_eq!(host.local_reply.as_ref().map(|r| r.0), Some(307));
    assert_eq!(worker.metrics.get(Counter::FailoversReplayed), 0, "the session's failover was counted at its first 307");
    assert_eq!(worker.metrics.get(Counter::StateRestored), 0);
    let (release, detached) = host.calls.last().unwrap();
    assert!(String::from_utf8_lossy(&release.body).starts_with("EVAL/if%20redis%2Ecall%28%27GET%27%2C%20KEYS%5B2%5D%29%20%3D%3D"));
    assert!(detached);
    assert!(host.set_cookie_value().map(|v| cookie::decode(v, &config.keys, NOW_MS / 1000).unwrap().is_moving()).unwrap());
}

#[test]
fn without_a_store_a_gone_host_starts_the_session_fresh() {
    let (config, worker) = (config(""), Rc::<Worker>::default());
    let mut host = FakeHost::new(&[("cookie", &format!("sa={}", cookie_for(&config, B1, "pod-a", FLAG_MOVING)))]);
    assert_eq!(flow(&config, &worker).on_request_headers(&mut host), Action::Continue);
    assert_eq!(host.req("x-session-new"), Some("1"));
    assert_eq!(worker.metrics.get(Counter::FailoversFresh), 1);
}

#[test]
fn a_new_session_whose_request_reached_no_app_is_not_pinned() {
    let (config, worker) = (config(""), Rc::<Worker>::default());
    let mut host = FakeHost::new(&[]);
    let mut f = flow(&config, &worker);
    f.on_request_headers(&mut host);
    host.respond(B1, &[(":status", "503")]);
    host.flags = FLAG_NO_HEALTHY_UPSTREAM;
    f.on_response_headers(&mut host);
    assert_eq!(host.resp("set-cookie"), None);
}

#[test]
fn store_replies_with_a_stale_token_are_ignored() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (mut f, mut host) = failover_request(&config, &worker, FLAG_MOVING);
    f.on_store_response(&mut host, 99, Some(200), br#"{"EVAL":["acquired"]}"#);
    assert!(!host.resumed_request);
    assert!(f.holds_request_body() && !f.holds_response_body());
}

#[test]
fn the_replay_never_redirects_off_site() {
    assert_eq!(same_site_location("/cart?x=1"), "/cart?x=1");
    for path in ["//evil.example/x", "/\\evil.example", "", "evil", "https://evil.example/"] {
        assert_eq!(same_site_location(path), "/", "{path}");
    }
}

#[test]
fn unreadable_state_never_reaches_the_client() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (_, host, action) = answer_pinned(&config, &worker, &[("x-instance-id", "pod-a"), ("x-session-state", "bad\u{1}value")]);
    assert_eq!(action, Action::Continue);
    assert_eq!(host.resp("x-session-state"), None);
    assert!(host.calls.is_empty());
}

#[test]
fn an_empty_instance_id_is_not_a_restart() {
    let (config, worker) = (config(""), Rc::<Worker>::default());
    answer_pinned(&config, &worker, &[("x-instance-id", "")]);
    assert_eq!(worker.metrics.get(Counter::FailoversRestart), 0);
    assert!(!worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS));
}

#[test]
fn stored_state_that_is_not_a_header_value_is_a_store_error() {
    let (config, worker) = (with_store("sync"), Rc::<Worker>::default());
    let (mut f, mut host) = failover_request(&config, &worker, FLAG_MOVING);
    reply(&mut f, &mut host, r#"{"EVAL":["acquired","r\u0000\r\n"]}"#);
    assert_eq!(host.req("x-session-state"), None);
    assert_eq!(host.req("x-session-new"), Some("1"), "the outage policy (fresh) applies");
    assert_eq!(worker.metrics.get(Counter::StoreErrors), 1);
}

#[test]
fn the_route_header_fits_the_longest_host_a_cookie_carries() {
    use base64::Engine;
    let longest = "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%eth0]:65535";
    let mut buffer = [0u8; super::ROUTE_LEN_MAX];
    for host in ["10.0.0.7:8080", longest, &"x".repeat(crate::cookie::MAX_HOST_LEN)] {
        let route = super::route_header(host, &mut buffer).unwrap();
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(route).unwrap(), host.as_bytes());
    }
}

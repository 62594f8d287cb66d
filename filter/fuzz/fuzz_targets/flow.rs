//! The session flow against a fake proxy that plays Envoy's part strictly.
//!
//! Each input is a config pick and a few streams run one after another on one
//! worker (so the gone table and shared data carry over). A stream is a set of
//! request headers (paths, cookies built from valid or forged claims, raw
//! cookies, client copies of the internal headers) and then any sequence of:
//! the upstream response (status, x-instance-id, x-session-state,
//! x-session-unknown, the echoed routing header, upstream address, Envoy
//! response flags), request and response body chunks, store replies for any
//! outstanding call (well-formed answers, owners, errors, garbage, timeouts),
//! clock jumps, a CSPRNG that fails, a store that cannot be reached, lost CAS
//! races, and garbage in the shared gone table. At the end every outstanding
//! store call times out, as Envoy guarantees.
//!
//! Properties (besides no panic):
//! - request headers leave upstream without any client copy of the internal
//!   headers, and with well-formed values (route = base64 of "ip:port", a
//!   session id, "1");
//! - every Set-Cookie the filter writes (response or local reply) is
//!   `name=value` plus the configured attributes, with a value of cookie-octets
//!   that verifies now;
//! - a response leaves without the internal response headers;
//! - lifecycle: header or body callbacks that pause always have a store call
//!   in flight or a local reply sent (no stream waits forever); resume is only
//!   called on a paused direction; at most one local reply, and only while the
//!   response headers have not left; no resume after a local reply; headers are
//!   only changed while they can still change;
//! - a replay's Location stays on this origin (a path, not "//host").
//!
//! Set SA_FUZZ_ALLOW to a comma-separated list of finding names (printed in the
//! panic message as [name]) to keep fuzzing past known ones.
#![no_main]

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{ensure, is_cookie_octet, CookieSpec, Text, HOSTS, INSTANCES, NOW_MS, SECRET_K0, SECRET_K1};
use session_affinity::config::{Config, StoreConfig};
use session_affinity::cookie;
use session_affinity::headers::HeaderMap;
use session_affinity::flow::{Action, Flow, HttpHost, Worker};
use session_affinity::gone::{SharedData, SHARED_KEY};
use session_affinity::store::StoreCall;

// ---------------------------------------------------------------- configs

fn config_json(i: usize) -> String {
    let k1 = std::str::from_utf8(SECRET_K1).unwrap_or_default();
    let k0 = std::str::from_utf8(SECRET_K0).unwrap_or_default();
    let keys = format!(r#""keys":[{{"id":"k1","secret":"{k1}"}},{{"id":"k0","secret":"{k0}"}}]"#);
    let skip = r#""skip":{"prefixes":["/static/"],"suffixes":[".css"]}"#;
    match i {
        0 => format!("{{{keys},{skip}}}"),
        1 => format!(r#"{{{keys},{skip},"store":{{"cluster":"store","write":"sync","on_outage":"fresh"}}}}"#),
        2 => format!(r#"{{{keys},"store":{{"cluster":"store","write":"async","on_outage":"reject","lease":"1s","retry_after":"2s"}}}}"#),
        3 => format!(
            r#"{{{keys},"cookie":{{"name":"route","ttl":"1m","refresh_after":1.0,"path":"/app","domain":"example.com","same_site":"none"}},
               "headers":{{"route":"x-r","session_id":"x-i","session_new":"x-n","session_state":"x-s","instance_id":"x-inst","session_unknown":"x-u"}},
               "store":{{"cluster":"store","write":"sync","on_outage":"reject","key_prefix":"%x:","timeout":"1ms","lease":"1s"}},
               "failover":{{"gone_ttl":"1s"}}}}"#
        ),
        4 => format!(
            r#"{{{keys},{skip},"cookie":{{"refresh_after":0.0001}},"store":{{"cluster":"store","write":"async","on_outage":"fresh"}}}}"#
        ),
        // Rotation the other way: k0 signs, k1 only verifies.
        _ => format!(
            r#"{{"keys":[{{"id":"k0","secret":"{k0}"}},{{"id":"k1","secret":"{k1}"}}],"store":{{"cluster":"store","write":"sync","on_outage":"fresh"}}}}"#
        ),
    }
}

const CONFIGS: usize = 6;

fn configs() -> &'static [String] {
    static JSON: OnceLock<Vec<String>> = OnceLock::new();
    JSON.get_or_init(|| (0..CONFIGS).map(config_json).collect())
}

/// A freshly compiled config: it carries state (the verified-cookie cache), so
/// each input gets its own and runs the same way alone or after others.
fn config(i: u8) -> Rc<Config> {
    let json = &configs()[i as usize % CONFIGS];
    Rc::new(Config::parse(json.as_bytes(), &|_| None).unwrap_or_else(|e| panic!("harness config: {e}")))
}

// ---------------------------------------------------------------- inputs

const PATHS: &[&str] =
    &["/cart?x=1", "/", "/static/app.js", "/a/b.css?v=1", "/cart?file=.css", "", "//evil.example/x", "/\\evil.example", "*", "/app/x"];

#[derive(Arbitrary, Debug)]
enum CookiePart {
    /// Our cookie name with a built value.
    Ours(CookieSpec),
    /// Another name with a built value.
    Named(String, CookieSpec),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum ReqHeader {
    Path(Text),
    RawPath(Vec<u8>),
    /// Parts joined with "; " (or ";" when `tight`).
    Cookie {
        parts: Vec<CookiePart>,
        tight: bool,
    },
    /// A client copy of one of the configured header names (by index).
    Internal(u8, Vec<u8>),
    Other(String, Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Status {
    S200,
    S503,
    S500,
    S307,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum RespHeader {
    Status(Status),
    Instance(Text),
    State(Vec<u8>),
    Unknown(Vec<u8>),
    Route(Vec<u8>),
    Other(String, Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Flags {
    None,
    NoHealthyUpstream,
    ConnectFailure,
    Both,
    /// UC: the connection broke after the request was sent.
    Reset,
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct Response {
    headers: Vec<RespHeader>,
    upstream: Option<Text>,
    flags: Flags,
}

#[derive(Arbitrary, Debug)]
enum Owner {
    Parts(Text, Text),
    Raw(String),
}

impl Owner {
    fn text(&self) -> String {
        match self {
            Owner::Parts(h, i) => format!("{}#{}", h.get(HOSTS), i.get(INSTANCES)),
            Owner::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Body {
    Acquired,
    AcquiredWith(String),
    Moved(Owner),
    Busy,
    Stored,
    Conflict,
    ConflictWith(Owner),
    RedisError,
    Json(Vec<String>),
    Raw(Vec<u8>),
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        let eval = |items: serde_json::Value| serde_json::json!({ "EVAL": items }).to_string().into_bytes();
        match self {
            Body::Acquired => eval(serde_json::json!(["acquired"])),
            Body::AcquiredWith(s) => eval(serde_json::json!(["acquired", s])),
            Body::Moved(o) => eval(serde_json::json!(["moved", o.text()])),
            Body::Busy => eval(serde_json::json!(["busy"])),
            Body::Stored => eval(serde_json::json!(["stored"])),
            Body::Conflict => eval(serde_json::json!(["conflict", ""])),
            Body::ConflictWith(o) => eval(serde_json::json!(["conflict", o.text()])),
            Body::RedisError => eval(serde_json::json!([false, "ERR something"])),
            Body::Json(items) => eval(serde_json::json!(items)),
            Body::Raw(b) => b.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum ReplyStatus {
    Ok,
    /// The call failed or timed out.
    Failed,
    Code(u32),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Response(Response),
    RequestBody,
    ResponseBody,
    /// The answer to one of the stream's outstanding store calls (by index).
    StoreReply {
        pick: u8,
        status: ReplyStatus,
        body: Body,
    },
    AdvanceMs(u32),
    AdvanceSecs(u32),
    Random(Option<[u8; 16]>),
    StoreDown(bool),
    LoseRaces(bool),
    /// The worker's tick re-reads the gone table and drains the metrics.
    Tick,
    /// The store answers "busy" to the newest outstanding call, 2n+2 times in a row.
    BusyStorm(u8),
    /// Another worker (or a buggy one) writes the gone table.
    SharedGarbage(Vec<u8>),
    SharedLines(Vec<(Text, i32, Text)>),
}

#[derive(Arbitrary, Debug)]
struct Stream {
    request: Vec<ReqHeader>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    config: u8,
    /// Start time relative to NOW_MS, seconds.
    start: i32,
    streams: Vec<Stream>,
}

// ---------------------------------------------------------------- the fake proxy

/// What every stream of the worker shares.
#[derive(Default)]
struct World {
    shared: RefCell<Option<(Vec<u8>, u32)>>,
    lose_races: Cell<bool>,
    next_token: Cell<u32>,
    now_ms: Cell<u64>,
    random: Cell<Option<[u8; 16]>>,
    store_down: Cell<bool>,
}

impl World {
    fn put_shared(&self, bytes: Vec<u8>) {
        let mut entry = self.shared.borrow_mut();
        let cas = entry.as_ref().map_or(1, |(_, c)| c.wrapping_add(1));
        *entry = Some((bytes, cas));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Callback {
    None,
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    StoreResponse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Headers not seen yet.
    Before,
    /// Headers paused by the filter.
    Paused,
    /// Headers went on (upstream for the request, downstream for the response).
    Gone,
}

struct Host<'w> {
    world: &'w World,
    config: Rc<Config>,
    request: Vec<(String, Vec<u8>, bool)>,
    response: Vec<(String, Vec<u8>)>,
    upstream: Option<String>,
    flags: u64,
    outstanding: Vec<u32>,
    callback: Callback,
    req: Dir,
    req_body_paused: bool,
    /// The request body was paused after the response had started (an early response).
    req_body_paused_late: bool,
    resp: Dir,
    resp_body_paused: bool,
    /// Status and headers of the local reply, and whether the response headers had been seen.
    local_reply: Option<(u32, Vec<(String, String)>)>,
    skipped: bool,
}

impl SharedData for Host<'_> {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        assert_eq!(key, SHARED_KEY);
        match &*self.world.shared.borrow() {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        assert_eq!(key, SHARED_KEY);
        let mut entry = self.world.shared.borrow_mut();
        let current = entry.as_ref().map(|(_, c)| *c);
        if self.world.lose_races.get() || (cas.is_some() && cas != current) {
            return false;
        }
        *entry = Some((value.to_vec(), current.unwrap_or(0).wrapping_add(1)));
        true
    }
}

impl HttpHost for Host<'_> {
    fn request_headers(&mut self) -> HeaderMap {
        HeaderMap::from_pairs(self.request.iter().map(|(k, v, _)| (k.as_str(), v.as_slice())))
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        ensure!(self.req != Dir::Gone, "late-header", "request header {name} set after the request went upstream");
        ensure!(valid_field_value(value.as_bytes()), "header-value", "request header {name}: {value:?} is not a valid field value");
        self.request.retain(|(k, _, _)| k != name);
        self.request.push((name.into(), value.into(), false));
    }
    fn remove_request_header(&mut self, name: &str) {
        ensure!(self.req != Dir::Gone, "late-header", "request header {name} removed after the request went upstream");
        self.request.retain(|(k, _, _)| k != name);
    }
    fn response_headers(&mut self) -> HeaderMap {
        HeaderMap::from_pairs(self.response.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }
    fn add_response_header(&mut self, name: &str, value: &str) {
        ensure!(
            self.callback == Callback::ResponseHeaders || self.resp == Dir::Paused,
            "late-header",
            "response header {name} added outside the response headers ({:?}, {:?})",
            self.callback,
            self.resp
        );
        ensure!(valid_field_value(value.as_bytes()), "header-value", "response header {name}: {value:?}");
        if name == "set-cookie" {
            check_set_cookie(&self.config, value, self.world.now_ms.get() / 1000, "response");
        }
        self.response.push((name.into(), value.into()));
    }
    fn remove_response_header(&mut self, name: &str) {
        ensure!(
            self.callback == Callback::ResponseHeaders || self.resp == Dir::Paused,
            "late-header",
            "response header {name} removed outside the response headers"
        );
        self.response.retain(|(k, _)| k != name);
    }
    fn upstream_address(&mut self) -> Option<String> {
        self.upstream.clone()
    }
    fn response_flags(&mut self) -> u64 {
        self.flags
    }
    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], _body: &str) {
        ensure!(self.local_reply.is_none(), "double-reply", "a second local reply ({status}) after {:?}", self.local_reply);
        ensure!(self.resp != Dir::Gone, "late-reply", "local reply {status} after the response headers went downstream");
        let now_s = self.world.now_ms.get() / 1000;
        for (name, value) in headers {
            ensure!(valid_field_value(value.as_bytes()), "header-value", "local reply header {name}: {value:?}");
            match *name {
                "set-cookie" => check_set_cookie(&self.config, value, now_s, "local reply"),
                "location" => {
                    let v = value.as_bytes();
                    let same_origin = v.first() == Some(&b'/') && !matches!(v.get(1), Some(b'/' | b'\\'));
                    ensure!(same_origin, "open-redirect", "{status} Location {value:?} leaves the origin (the client's :path is echoed)");
                }
                _ => {}
            }
        }
        self.local_reply = Some((status, headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()));
    }
    fn dispatch(&mut self, store: &StoreConfig, call: &StoreCall, _detached: bool) -> Option<u32> {
        assert_eq!(store.cluster, self.config.store.as_ref().map(|s| s.cluster.clone()).unwrap_or_default());
        assert!(call.body.iter().all(|b| b.is_ascii_graphic()), "store call body {:?}", String::from_utf8_lossy(&call.body));
        if self.world.store_down.get() {
            return None;
        }
        let token = self.world.next_token.get().wrapping_add(1);
        self.world.next_token.set(token);
        self.outstanding.push(token);
        Some(token)
    }
    fn resume_request(&mut self) {
        ensure!(self.callback == Callback::StoreResponse, "bad-resume", "resume_request from {:?}", self.callback);
        ensure!(self.req == Dir::Paused || self.req_body_paused, "bad-resume", "resume_request while the request is not paused");
        ensure!(self.local_reply.is_none(), "bad-resume", "resume_request after a local reply {:?}", self.local_reply);
        self.release_request();
        self.req_body_paused = false;
        self.req_body_paused_late = false;
    }
    fn resume_response(&mut self) {
        ensure!(self.callback == Callback::StoreResponse, "bad-resume", "resume_response from {:?}", self.callback);
        ensure!(self.resp == Dir::Paused || self.resp_body_paused, "bad-resume", "resume_response while the response is not paused");
        ensure!(self.local_reply.is_none(), "bad-resume", "resume_response after a local reply {:?}", self.local_reply);
        self.release_response();
        self.resp_body_paused = false;
    }
    fn now_ms(&self) -> u64 {
        self.world.now_ms.get()
    }
    fn random(&mut self) -> Option<[u8; 16]> {
        self.world.random.get()
    }
}

fn valid_field_value(v: &[u8]) -> bool {
    !v.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0)
}

fn check_set_cookie(config: &Config, header: &str, now_s: u64, place: &str) {
    let name = &config.cookie.name;
    let Some(rest) = header.strip_prefix(name.as_str()).and_then(|r| r.strip_prefix('=')) else {
        panic!("[set-cookie] {place} Set-Cookie {header:?} does not start with {name}=");
    };
    let (value, attributes) = rest.split_at(rest.find(';').unwrap_or(rest.len()));
    assert_eq!(attributes, config.cookie.attributes, "[set-cookie] {place} Set-Cookie {header:?}");
    assert!(value.bytes().all(is_cookie_octet), "[set-cookie] {place} cookie value {value:?}");
    if let Err(e) = cookie::decode(value.to_string(), &config.keys, now_s) {
        panic!("[set-cookie] {place} sets a cookie that does not verify now ({e:?}): {value:?}");
    }
}

impl Host<'_> {
    fn internal_request_names(&self) -> [String; 4] {
        let h = &self.config.headers;
        [h.route.clone(), h.session_id.clone(), h.session_new.clone(), h.session_state.clone()]
    }

    /// The request headers leave for the upstream.
    fn release_request(&mut self) {
        self.req = Dir::Gone;
        let [route, session_id, session_new, session_state] = self.internal_request_names();
        for name in [&route, &session_id, &session_new, &session_state] {
            let copies: Vec<_> = self.request.iter().filter(|(k, _, _)| k == name).collect();
            ensure!(copies.len() <= 1, "internal-header", "{} copies of {name} go upstream", copies.len());
            for (_, value, from_client) in copies {
                ensure!(!from_client, "internal-header", "the client's {name}: {:?} goes upstream", String::from_utf8_lossy(value));
                let text = String::from_utf8_lossy(value);
                if *name == route {
                    let decoded = STANDARD.decode(value).ok().and_then(|b| String::from_utf8(b).ok()).unwrap_or_default();
                    assert!(cookie::is_host(&decoded), "[internal-header] route header {text:?} is not base64 of ip:port");
                } else if *name == session_id {
                    assert!(cookie::is_sid(&text), "[internal-header] session id {text:?}");
                } else if *name == session_new {
                    assert_eq!(text, "1", "[internal-header] {name}");
                }
            }
        }
    }

    /// The response headers leave for the client.
    fn release_response(&mut self) {
        self.resp = Dir::Gone;
        if self.skipped || self.local_reply.is_some() {
            return;
        }
        let h = &self.config.headers;
        for name in [&h.session_state, &h.session_unknown, &h.route] {
            ensure!(
                !self.response.iter().any(|(k, _)| k == name),
                "response-internal-header",
                "response leaves with the internal header {name}: {:?}",
                self.response.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v))
            );
        }
    }

    /// No direction may wait without something that will wake it.
    fn check_live(&self, flow: &Flow, when: &str) {
        if self.local_reply.is_some() {
            return;
        }
        if self.req == Dir::Paused || self.req_body_paused {
            let pending = flow.holds_request_body();
            let name = if self.req == Dir::Gone && self.req_body_paused_late { "hang-late-request-body" } else { "hang-request" };
            ensure!(
                pending,
                name,
                "after {when} the request is paused (headers {:?}, body {}) with no store call in flight",
                self.req,
                self.req_body_paused
            );
        }
        if self.resp == Dir::Paused || self.resp_body_paused {
            let pending = flow.holds_response_body();
            ensure!(
                pending,
                "hang-response",
                "after {when} the response is paused (headers {:?}, body {}) with no store call in flight and no resume to come",
                self.resp,
                self.resp_body_paused
            );
        }
    }
}

// ---------------------------------------------------------------- driving

fn build_request(headers: &[ReqHeader], config: &Config, now_s: u64) -> Vec<(String, Vec<u8>, bool)> {
    let h = &config.headers;
    let names = [&h.route, &h.session_id, &h.session_new, &h.session_state, &h.instance_id, &h.session_unknown];
    let mut out = Vec::new();
    let mut has_path = false;
    for header in headers.iter().take(16) {
        let (name, value) = match header {
            ReqHeader::Path(p) => (":path".to_string(), p.get(PATHS).as_bytes().to_vec()),
            ReqHeader::RawPath(p) => (":path".to_string(), p.clone()),
            ReqHeader::Cookie { parts, tight } => {
                let mut value = Vec::new();
                for (i, part) in parts.iter().take(8).enumerate() {
                    if i > 0 {
                        value.extend_from_slice(if *tight { b";" } else { b"; " });
                    }
                    match part {
                        CookiePart::Ours(spec) => {
                            value.extend_from_slice(config.cookie.name.as_bytes());
                            value.push(b'=');
                            value.extend_from_slice(&spec.build(now_s).bytes);
                        }
                        CookiePart::Named(name, spec) => {
                            value.extend_from_slice(name.as_bytes());
                            value.push(b'=');
                            value.extend_from_slice(&spec.build(now_s).bytes);
                        }
                        CookiePart::Raw(raw) => value.extend_from_slice(raw),
                    }
                }
                ("cookie".to_string(), value)
            }
            ReqHeader::Internal(i, v) => (names[*i as usize % names.len()].clone(), v.clone()),
            ReqHeader::Other(name, v) => (name.clone(), v.clone()),
        };
        has_path |= name == ":path";
        out.push((name, value, true));
    }
    if !has_path {
        out.push((":path".into(), b"/cart?x=1".to_vec(), true));
    }
    out
}

fn response_headers(response: &Response, config: &Config) -> Vec<(String, Vec<u8>)> {
    let h = &config.headers;
    let mut out = Vec::new();
    let mut has_status = false;
    for header in response.headers.iter().take(16) {
        out.push(match header {
            RespHeader::Status(s) => {
                has_status = true;
                let v = match s {
                    Status::S200 => b"200".to_vec(),
                    Status::S503 => b"503".to_vec(),
                    Status::S500 => b"500".to_vec(),
                    Status::S307 => b"307".to_vec(),
                    Status::Raw(v) => v.clone(),
                };
                (":status".to_string(), v)
            }
            RespHeader::Instance(i) => (h.instance_id.clone(), i.get(INSTANCES).as_bytes().to_vec()),
            RespHeader::State(v) => (h.session_state.clone(), v.clone()),
            RespHeader::Unknown(v) => (h.session_unknown.clone(), v.clone()),
            RespHeader::Route(v) => (h.route.clone(), v.clone()),
            RespHeader::Other(name, v) => (name.clone(), v.clone()),
        });
    }
    if !has_status {
        out.push((":status".into(), b"200".to_vec()));
    }
    out
}

fn flags(f: &Flags) -> u64 {
    match f {
        Flags::None => 0,
        Flags::NoHealthyUpstream => 0x2,
        Flags::ConnectFailure => 0x20,
        Flags::Both => 0x22,
        Flags::Reset => 0x10,
        Flags::Raw(v) => *v,
    }
}

fn request_body(flow: &mut Flow, host: &mut Host<'_>) {
    if host.req == Dir::Before || host.local_reply.is_some() || host.req_body_paused {
        return;
    }
    host.callback = Callback::RequestBody;
    if flow.holds_request_body() {
        host.req_body_paused = true;
        host.req_body_paused_late = host.resp != Dir::Before;
    } else if host.req == Dir::Paused {
        // Continuing the body releases headers that were paused.
        host.release_request();
    }
    host.callback = Callback::None;
    host.check_live(flow, "a request body chunk");
}

fn response_body(flow: &mut Flow, host: &mut Host<'_>) {
    if host.resp == Dir::Before || host.local_reply.is_some() || host.resp_body_paused {
        return;
    }
    host.callback = Callback::ResponseBody;
    if flow.holds_response_body() {
        host.resp_body_paused = true;
    } else if host.resp == Dir::Paused {
        host.release_response();
    }
    host.callback = Callback::None;
    host.check_live(flow, "a response body chunk");
}

fn store_reply(flow: &mut Flow, host: &mut Host<'_>, pick: usize, status: Option<u32>, body: &[u8]) {
    if host.outstanding.is_empty() {
        return;
    }
    let token = host.outstanding.remove(pick % host.outstanding.len());
    host.callback = Callback::StoreResponse;
    flow.on_store_response(host, token, status, body);
    host.callback = Callback::None;
    host.check_live(flow, "a store reply");
}

fn run_stream(stream: &Stream, context_id: u32, config: &Rc<Config>, worker: &Rc<Worker>, world: &World) {
    let now_s = world.now_ms.get() / 1000;
    let mut host = Host {
        world,
        config: Rc::clone(config),
        request: build_request(&stream.request, config, now_s),
        response: Vec::new(),
        upstream: None,
        flags: 0,
        outstanding: Vec::new(),
        callback: Callback::RequestHeaders,
        req: Dir::Before,
        req_body_paused: false,
        req_body_paused_late: false,
        resp: Dir::Before,
        resp_body_paused: false,
        local_reply: None,
        skipped: false,
    };
    let path = host.request.iter().rev().find(|(k, _, _)| k == ":path").map(|(_, v, _)| v.clone()).unwrap_or_default();
    host.skipped = config.skips(&String::from_utf8(path).unwrap_or_default().into_bytes());
    let mut flow = Flow::new(context_id, Rc::clone(config), Rc::clone(worker));
    match flow.on_request_headers(&mut host) {
        Action::Continue => {
            ensure!(host.local_reply.is_none(), "reply-continue", "request headers continue after a local reply");
            host.release_request();
        }
        Action::Pause => host.req = Dir::Paused,
    }
    host.callback = Callback::None;
    host.check_live(&flow, "the request headers");

    for op in stream.ops.iter().take(32) {
        match op {
            Op::Response(r) => {
                if host.resp != Dir::Before {
                    continue;
                }
                if let Some((status, headers)) = host.local_reply.clone() {
                    // A local reply sent while the request waited runs through the encoder filters.
                    if host.req == Dir::Gone {
                        continue;
                    }
                    host.response = std::iter::once((":status".to_string(), status.to_string().into_bytes()))
                        .chain(headers.into_iter().map(|(k, v)| (k, v.into_bytes())))
                        .collect();
                    host.upstream = None;
                    host.flags = 0;
                } else if host.req == Dir::Gone {
                    host.response = response_headers(r, config);
                    host.upstream = r.upstream.as_ref().map(|u| u.get(HOSTS).to_string());
                    host.flags = flags(&r.flags);
                } else {
                    continue;
                }
                host.callback = Callback::ResponseHeaders;
                let action = flow.on_response_headers(&mut host);
                host.callback = Callback::None;
                match action {
                    Action::Continue => {
                        ensure!(
                            host.local_reply.is_none() || host.req != Dir::Gone,
                            "reply-continue",
                            "response headers continue after a local reply"
                        );
                        host.release_response();
                    }
                    Action::Pause => host.resp = Dir::Paused,
                }
                host.check_live(&flow, "the response headers");
            }
            Op::RequestBody => request_body(&mut flow, &mut host),
            Op::ResponseBody => response_body(&mut flow, &mut host),
            Op::StoreReply { pick, status, body } => {
                let status = match status {
                    ReplyStatus::Ok => Some(200),
                    ReplyStatus::Failed => None,
                    ReplyStatus::Code(c) => Some(*c),
                };
                store_reply(&mut flow, &mut host, *pick as usize, status, &body.bytes());
            }
            Op::AdvanceMs(ms) => world.now_ms.set(world.now_ms.get().saturating_add(u64::from(*ms))),
            Op::AdvanceSecs(s) => world.now_ms.set(world.now_ms.get().saturating_add(u64::from(*s) * 1000)),
            Op::Random(r) => world.random.set(*r),
            Op::StoreDown(d) => world.store_down.set(*d),
            Op::LoseRaces(l) => world.lose_races.set(*l),
            Op::Tick => {
                worker.gone.borrow_mut().refresh(&host);
                let (counts, latencies) = worker.metrics.drain();
                assert!(counts.iter().all(|(c, n)| *n > 0 && !c.name().is_empty()) && latencies.len() <= 4096);
            }
            Op::BusyStorm(n) => {
                let busy = Body::Busy.bytes();
                for _ in 0..(usize::from(*n) * 2 + 2) {
                    let last = host.outstanding.len().wrapping_sub(1);
                    store_reply(&mut flow, &mut host, last, Some(200), &busy);
                }
            }
            Op::SharedGarbage(bytes) => world.put_shared(bytes.clone()),
            Op::SharedLines(lines) => {
                let now = world.now_ms.get();
                let text: String = lines
                    .iter()
                    .take(16)
                    .map(|(h, until, i)| {
                        format!(
                            "{} {} {}\n",
                            h.get(HOSTS),
                            sa_fuzz::rel(now, *until),
                            if i.get(INSTANCES).is_empty() { "-" } else { i.get(INSTANCES) }
                        )
                    })
                    .collect();
                world.put_shared(text.into_bytes());
            }
        }
    }

    // The rest of the stream: bodies arrive, and every store call ends (Envoy
    // times them out), so nothing may still be waiting afterwards.
    if host.resp == Dir::Before {
        request_body(&mut flow, &mut host);
    }
    response_body(&mut flow, &mut host);
    for _ in 0..1000 {
        if host.outstanding.is_empty() {
            break;
        }
        store_reply(&mut flow, &mut host, 0, None, b"");
    }
    host.check_live(&flow, "every store call ended");
}

fuzz_target!(|input: Input| {
    let config = config(input.config);
    let worker = Rc::new(Worker::default());
    let world = World::default();
    world.now_ms.set(sa_fuzz::rel(NOW_MS, input.start.saturating_mul(1000)));
    world.random.set(Some([7; 16]));
    for (i, stream) in input.streams.iter().take(4).enumerate() {
        run_stream(stream, i as u32 + 2, &config, &worker, &world);
    }
});

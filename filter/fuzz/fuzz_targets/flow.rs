//! The whole session flow, through the `testing` fake proxy, played the way
//! Envoy plays it.
//!
//! An input is a config pick and up to four streams run one after another on
//! one worker (so the gone table, the verified-cookie cache, the worker's
//! queued calls, the breaker and shared data carry over). A stream is its
//! request headers (paths, methods, cookies that are valid, forged, moving,
//! of another cluster, several, or issued earlier in the input; client copies
//! of internal headers in every spelling) and then any sequence of: the
//! upstream response (status, Envoy flags, the answering upstream and its
//! instance id, state, unknown, end, rotate, unreached; trailers), body
//! chunks, store answers (typed replies as webdis renders them, echoing the
//! call or another one; errors, garbage, no answer), stray answers, timers
//! firing, the worker's tick (`on_tick`, the gone table refresh) and
//! answers to the worker's calls, clock jumps, no CSPRNG, calls that cannot
//! start, lost CAS races, and garbage in shared data. At the end every call
//! times out and every timer fires, as they would.
//!
//! The store model: answers are the fuzzer's, except that a store which
//! acknowledged the end of a session (or said it ended) never hands out its
//! state again.
//!
//! Properties (besides no panic), named in panics as `[name]`:
//! - `internal-header`: no client copy of an internal header, in any
//!   spelling, reaches upstream; the filter's own are well-formed;
//! - `set-cookie`: every Set-Cookie is name=value plus the configured
//!   attributes and a Max-Age, the value cookie-octets that verify now, for
//!   the route's cluster, within the session's lifetime (or the expiring form
//!   `name=; ...; Max-Age=0`);
//! - `response-internal-header`: no internal response header (or state
//!   trailer) reaches the client;
//! - `hang-*`: a paused direction always has a store call in flight, a timer
//!   set, or a local reply sent, and nothing is paused once all have ended;
//! - `bad-resume`: resume only from a store answer or timer, only on a paused
//!   direction, never after a local reply;
//! - `double-reply`, `late-reply`: at most one local reply, before the
//!   response headers left; `late-header`: nothing changes headers that left;
//! - `open-redirect`: a replay's Location stays on this origin;
//! - `wrong-echo`: a store answer with a wrong nonce or session id changes
//!   nothing the client or the app gets (the run is replayed with those
//!   answers as failures, and must go exactly the same way);
//! - `stray`: an answer to no call of the stream changes nothing;
//! - `two-calls`: a stream has one store call in flight at most (a second
//!   would race the first, whose answer would go unread);
//! - `begin-bound`: at most 1 + polls + moves Begin calls per request;
//! - `ended-restored`: a session this worker ended never gets state
//!   forwarded again;
//! - `store-call`: store calls go to the store cluster, well-formed.
//!
//! Set SA_FUZZ_ALLOW to a comma-separated list of names to go on past known ones.
#![no_main]

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{ensure, is_cookie_octet, rel, CookieSpec, Text, CLUSTERS, INSTANCES, NOW_MS, SECRET_K0, SECRET_K1, SIDS, UPSTREAMS};
use serde::{Deserialize, Serialize};
use session_affinity::config::{Config, DialectSettings};
use session_affinity::cookie::{self, cluster_tag, NewClaims, FLAG_MOVING};
use session_affinity::flow::failover::POLL_DELAYS_MS;
use session_affinity::flow::{Flow, Worker};
use session_affinity::gone::SHARED_KEY;
use session_affinity::host::{Action, WorkerHost};
use session_affinity::ids::{is_sid, is_upstream};
use session_affinity::metrics::Counter;
use session_affinity::store::{is_header_value, Op, Reply, StoreCall};
use session_affinity::testing::{webdis_reply, FakeProxy, FakeShared};

// ---------------------------------------------------------------- configs

const CONFIGS: usize = 6;

fn config_json(i: usize) -> String {
    let k1 = std::str::from_utf8(SECRET_K1).unwrap();
    let k0 = std::str::from_utf8(SECRET_K0).unwrap();
    let keys = format!(r#""keys":[{{"id":"k1","secret":"{k1}"}},{{"id":"k0","secret":"{k0}"}}]"#);
    let skip = r#""skip":{"prefixes":["/static/"],"suffixes":[".css"]}"#;
    match i {
        // No store; the default cookie name (__Host-sa).
        0 => format!("{{{keys},{skip}}}"),
        1 => format!(
            r#"{{{keys},{skip},"cookie":{{"name":"sa"}},
               "store":{{"cluster":"store","write":"sync","on_outage":"fresh","breaker":{{"failures":1,"cooldown":"100ms"}}}}}}"#
        ),
        2 => format!(
            r#"{{{keys},"cookie":{{"name":"sa","max_lifetime":"2d"}},
               "store":{{"cluster":"store","write":"async","on_outage":"reject","lease":"1s","retry_after":"2s","idle_ttl":"1m"}}}}"#
        ),
        3 => format!(
            r#"{{{keys},"cookie":{{"name":"route","ttl":"1m","max_lifetime":"2m","refresh_after":1.0,"path":"/app","domain":"example.com","same_site":"none"}},
               "headers":{{"route":"x-r","session_id":"x-i","session_new":"x-n","session_state":"x-s","instance_id":"x-inst","session_unknown":"x-u",
                          "session_end":"x-e","session_rotate":"x-rot","unreached":"x-unr"}},
               "store":{{"cluster":"store","write":"sync","on_outage":"reject","key_prefix":"%x:","timeout":"1ms","lease":"1s","idle_ttl":"1m",
                        "auth":{{"username":"filter","password":"an-inline-password"}}}},
               "failover":{{"gone_ttl":"1s"}}}}"#
        ),
        4 => format!(
            r#"{{{keys},{skip},"cookie":{{"name":"sa","refresh_after":0.0001}},
               "store":{{"cluster":"store","write":"async","on_outage":"fresh","auth":{{"username":"filter","password_env":"SA_PASSWORD"}}}}}}"#
        ),
        // Rotation the other way: k0 signs, k1 only verifies.
        _ => format!(
            r#"{{"keys":[{{"id":"k0","secret":"{k0}"}},{{"id":"k1","secret":"{k1}"}}],"cookie":{{"name":"sa"}},
               "store":{{"cluster":"store","write":"sync","on_outage":"fresh","breaker":{{"failures":2,"cooldown":"1s"}}}}}}"#
        ),
    }
}

/// A freshly compiled config: each input gets its own.
fn config(i: u8) -> Rc<Config> {
    static JSON: OnceLock<Vec<String>> = OnceLock::new();
    let json = &JSON.get_or_init(|| (0..CONFIGS).map(config_json).collect())[usize::from(i) % CONFIGS];
    let env = |name: &str| (name == "SA_PASSWORD").then(|| "a-password-from-the-env".to_string());
    Rc::new(Config::parse(json.as_bytes(), &env).unwrap_or_else(|e| panic!("harness config: {e}")))
}

// ---------------------------------------------------------------- inputs

const PATHS: &[&str] =
    &["/cart?x=1", "/", "/static/app.js", "/a/b.css?v=1", "/cart?file=.css", "", "//evil.example/x", "/\\evil.example", "*", "/app/x"];
const METHODS: &[&str] = &["GET", "POST", "HEAD", "OPTIONS", "PUT", "get"];
const STATES: &[&str] = &["s1", "s2", "", "a b\tc", "st\u{7f}", "{\"cart\":[1,2]}", "é"];
const NEW_SIDS: &[&str] = &["BBBBBBBBBBBBBBBBBBBBBB", "CCCCCCCCCCCCCCCCCCCCCC", "1", "", "AAAAAAAAAAAAAAAAAAAAAA"];
/// Envoy's retry headers, internal too.
const ENVOY_RETRY: [&str; 3] = ["x-envoy-retry-on", "x-envoy-max-retries", "x-envoy-retriable-header-names"];
/// Every value a client sends starts with this, so a client copy is known anywhere.
const CLIENT: &str = "client:";

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum CookiePart {
    /// A valid cookie for the route's cluster: a session (of the valid
    /// SIDS) pinned to an upstream and instance (valid ones of UPSTREAMS and
    /// INSTANCES), moving or not.
    Pinned {
        sid: u8,
        upstream: u8,
        instance: u8,
        moving: bool,
    },
    /// Our cookie name with a built value.
    Ours(CookieSpec),
    /// A value the filter issued earlier in this input (by index).
    Issued(u8),
    /// Another name with a built value.
    Named(String, CookieSpec),
    Raw(String),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum ReqHeader {
    Path(Text),
    Method(Text),
    /// Parts joined with "; " (or ";" when `tight`).
    Cookie {
        parts: Vec<CookiePart>,
        tight: bool,
    },
    /// A client copy of an internal header (by index: the config's names,
    /// then Envoy's retry headers), spelled as `spelling` says.
    Internal {
        which: u8,
        spelling: u8,
        value: String,
    },
    Other(String, String),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Status {
    S200,
    S503,
    S500,
    S409,
    Code(u16),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum From {
    /// The upstream the request was routed to (else the first of UPSTREAMS).
    Routed,
    Other(Text),
    Nobody,
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Flags {
    None,
    UH,
    UF,
    UC,
    UR,
    Raw(u64),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum RespHeader {
    Instance(Text),
    State(Text),
    Unknown,
    End,
    Rotate(Text),
    Unreached,
    Route(String),
    Other(String, String),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Response {
    status: Status,
    from: From,
    flags: Flags,
    headers: Vec<RespHeader>,
    trailers: Vec<RespHeader>,
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Owner {
    Parts(Text, Text),
    Raw(String),
}

impl Owner {
    fn text(&self) -> String {
        match self {
            Owner::Parts(u, i) => format!("{}#{}", u.get(UPSTREAMS), i.get(INSTANCES)),
            Owner::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum ReplyPick {
    Acquired(Option<Text>),
    Moved(Owner),
    Busy,
    Ended,
    Stored,
    Conflict(Option<Owner>),
    Taken,
}

impl ReplyPick {
    fn reply(&self) -> Reply {
        match self {
            ReplyPick::Acquired(state) => Reply::Acquired { state: state.as_ref().map(|s| s.get(STATES).to_string()) },
            ReplyPick::Moved(owner) => Reply::Moved { owner: owner.text() },
            ReplyPick::Busy => Reply::Busy,
            ReplyPick::Ended => Reply::Ended,
            ReplyPick::Stored => Reply::Stored,
            ReplyPick::Conflict(owner) => Reply::Conflict { owner: owner.as_ref().map(Owner::text) },
            ReplyPick::Taken => Reply::Taken,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Echo {
    Right,
    WrongNonce,
    WrongSid,
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Answer {
    /// One of the answers that fit the call's operation (by index).
    Fitting(u8),
    Reply(ReplyPick, Echo),
    /// An HTTP status other than 200 (504: Envoy's timeout).
    Status(u16),
    /// No answer at all (failed or timed out).
    Failed,
    Raw(String),
}

/// Answers a store gives to an operation, for `Answer::Fitting`.
fn fitting(op: &Op) -> Vec<Reply> {
    let owner = "10.0.0.2:8080#pod-b".to_string();
    let other = Some(owner.clone());
    match op {
        Op::Begin { .. } => {
            vec![
                Reply::Acquired { state: Some("s1".into()) },
                Reply::Acquired { state: None },
                Reply::Busy,
                Reply::Moved { owner },
                Reply::Ended,
            ]
        }
        Op::Write { .. } => vec![Reply::Stored, Reply::Conflict { owner: other }, Reply::Ended],
        Op::Rotate { .. } => vec![Reply::Stored, Reply::Taken, Reply::Conflict { owner: other }],
        Op::Commit { .. } | Op::End { .. } => vec![Reply::Stored, Reply::Conflict { owner: other }],
        Op::Touch { .. } | Op::Release { .. } => vec![Reply::Stored],
    }
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Part {
    RequestBody,
    ResponseBody,
    /// The response's trailers.
    Trailers,
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum WorkerStep {
    /// The worker's tick: queued calls go out, the gone table is re-read.
    Tick,
    /// The answer to one of the worker's calls in flight (by index).
    Answer { pick: u8, answer: Answer },
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Event {
    /// An answer with a token the stream is not waiting for.
    Stray(u32),
    Clock(i32),
    ClockSecs(i32),
    NoRandom(bool),
    /// Store calls cannot start.
    StoreDown(bool),
    LoseRaces(bool),
    /// Another writer puts bytes in the gone table or the breaker.
    Garbage {
        breaker: bool,
        bytes: Vec<u8>,
    },
    /// Another worker's gone table lines: upstream, instance (none: down), marked ms ago.
    GoneLines(Vec<(Text, Option<Text>, u16)>),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Step {
    Respond(Response),
    /// The answer to one of the stream's calls in flight (by index).
    Answer {
        pick: u8,
        answer: Answer,
    },
    /// The stream's next timer fires.
    Timer,
    Body(Part),
    Worker(WorkerStep),
    World(Event),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stream {
    /// The route's cluster: "app" (0 to 5), "other" (6), unknown to the proxy (7).
    cluster: u8,
    request: Vec<ReqHeader>,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    config: u8,
    /// Start time relative to NOW_MS, seconds.
    start: i32,
    streams: Vec<Stream>,
}

// ---------------------------------------------------------------- the world

/// What the streams of one worker share, and what the checks remember.
struct World {
    config: Rc<Config>,
    worker: Rc<Worker>,
    shared: Rc<FakeShared>,
    /// The worker's own context (its tick sends the queued calls).
    root: FakeProxy,
    root_answered: HashSet<usize>,
    now_ms: u64,
    no_random: bool,
    store_down: bool,
    /// Cookie values the filter issued, for later requests.
    issued: Vec<String>,
    /// Sessions this worker's filter ended.
    ended_here: HashSet<String>,
    /// Sessions the store acknowledged as ended: it never hands out their state.
    ended_in_store: HashSet<String>,
    /// Play answers with a wrong echo as failures (the replay of `wrong-echo`).
    wrong_echo_fails: bool,
    wrong_echo_used: bool,
    /// What the client and the app get, for `wrong-echo`.
    transcript: Vec<String>,
}

fn internal_names(config: &Config) -> Vec<String> {
    let mut names: Vec<String> = config.headers.named().iter().map(|(_, n)| n.to_string()).collect();
    names.extend(ENVOY_RETRY.iter().map(|n| n.to_string()));
    names
}

/// Internal response headers: every name of the contract but the request-only ones.
fn response_internal(config: &Config) -> Vec<&str> {
    let h = &config.headers;
    vec![&h.route, &h.instance_id, &h.session_state, &h.session_unknown, &h.session_end, &h.session_rotate, &h.unreached]
}

fn spelled(name: &str, spelling: u8) -> String {
    let mut out = String::new();
    let mut word_start = true;
    for (i, c) in name.chars().enumerate() {
        let c = match c {
            '-' if spelling & 1 != 0 || (spelling & 8 != 0 && i % 2 == 0) => '_',
            c if spelling & 2 != 0 => c.to_ascii_uppercase(),
            c if spelling & 4 != 0 && word_start => c.to_ascii_uppercase(),
            c => c,
        };
        word_start = c == '-' || c == '_';
        out.push(c);
    }
    out
}

fn valid_field_value(v: &str) -> bool {
    !v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

impl World {
    fn answer_body(&mut self, call: &StoreCall, answer: &Answer) -> (Option<u32>, Vec<u8>) {
        let (mut reply, echo) = match answer {
            Answer::Fitting(i) => {
                let replies = fitting(&call.op);
                (replies[usize::from(*i) % replies.len()].clone(), Echo::Right)
            }
            Answer::Reply(pick, echo) => (pick.reply(), *echo),
            Answer::Status(status) => return (Some(u32::from(*status)), Vec::new()),
            Answer::Failed => return (None, Vec::new()),
            Answer::Raw(body) => return (Some(200), body.as_bytes().to_vec()),
        };
        let sid = call.op.sid();
        if echo != Echo::Right {
            self.wrong_echo_used = true;
            if self.wrong_echo_fails {
                return (None, Vec::new());
            }
        } else {
            // A consistent store: a tombstone answers every begin with "ended".
            if matches!(call.op, Op::Begin { .. }) && self.ended_in_store.contains(sid) {
                reply = Reply::Ended;
            }
            let acknowledged_end = matches!((&call.op, &reply), (Op::End { .. } | Op::Rotate { .. }, Reply::Stored));
            if acknowledged_end || reply == Reply::Ended {
                self.ended_in_store.insert(sid.to_string());
            }
        }
        let (nonce, sid) = match echo {
            Echo::Right => (call.nonce.clone(), sid.to_string()),
            Echo::WrongNonce => (format!("x{}", call.nonce), sid.to_string()),
            Echo::WrongSid => (call.nonce.clone(), "ZZZZZZZZZZZZZZZZZZZZZZ".to_string()),
        };
        (Some(200), webdis_reply(&nonce, &sid, &reply))
    }

    /// A store call is addressed to the store, well-formed.
    fn check_call(&self, call: &StoreCall) {
        let store = self.config.store.as_ref();
        ensure!(store.is_some_and(|s| s.cluster == call.cluster), "store-call", "a call to {:?} without that store", call.cluster);
        ensure!(call.body.iter().all(|b| b.is_ascii_graphic()), "store-call", "call body {:?}", String::from_utf8_lossy(&call.body));
        ensure!(call.headers.iter().all(|(_, v)| valid_field_value(v)), "store-call", "call headers {:?}", call.headers);
        let authorized = call.headers.iter().any(|(n, _)| *n == "authorization");
        let has_credentials = store.is_some_and(|s| matches!(s.dialect, DialectSettings::Webdis { authorization: Some(_) }));
        ensure!(authorized == has_credentials, "store-call", "authorization {authorized}");
        ensure!(is_sid(call.op.sid()), "store-call", "a call for session {:?}: {:?}", call.op.sid(), call.op);
    }

    fn worker_tick(&mut self) {
        self.root.now_ms = self.now_ms;
        self.root.no_random = self.no_random;
        self.root.no_store = self.store_down;
        let before = self.root.calls.len();
        self.worker.on_tick(&mut self.root, &self.config);
        self.worker.gone.borrow_mut().refresh(&self.root);
        for call in &self.root.calls[before..] {
            self.check_call(call);
            self.transcript.push(format!("worker call {:?}", call.op));
        }
    }

    fn worker_answer(&mut self, pick: u8, answer: &Answer) {
        let open: Vec<usize> = (0..self.root.calls.len()).filter(|i| !self.root_answered.contains(i)).collect();
        if open.is_empty() {
            return;
        }
        let i = open[usize::from(pick) % open.len()];
        self.root_answered.insert(i);
        let call = self.root.calls[i].clone();
        let (status, body) = self.answer_body(&call, answer);
        let token = u64::try_from(i + 1).unwrap();
        let now_ms = self.now_ms;
        self.worker.on_reply(&mut self.root, &self.config, token, status, &body, now_ms);
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        let mut data = self.shared.data.borrow_mut();
        let cas = data.get(key).map_or(1, |(_, c)| c.wrapping_add(1));
        data.insert(key.to_string(), (bytes, cas));
    }
}

// ---------------------------------------------------------------- one stream

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Headers not seen yet.
    Before,
    /// Headers paused by the filter.
    Paused,
    /// Headers went on (upstream for the request, downstream for the response).
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Callback {
    Headers,
    Body,
    Async,
}

struct Run<'w> {
    w: &'w mut World,
    flow: Flow,
    proxy: FakeProxy,
    /// The route's cluster tag.
    cluster: String,
    req: Dir,
    req_body_paused: bool,
    resp: Dir,
    resp_body_paused: bool,
    trailers: Dir,
    trailers_given: Vec<(String, String)>,
    answered: HashSet<usize>,
    timers_fired: usize,
    resumed: (u32, u32),
    local_replies: u32,
    cookies_checked: usize,
    calls_checked: usize,
    timers_logged: usize,
    /// Trailers that went on while the response headers or body waited: they leave with them.
    trailers_behind: bool,
    sent_request: Option<Vec<(String, String)>>,
    sent_response: Option<Vec<(String, String)>>,
    ended_counted: u64,
}

impl Run<'_> {
    fn outstanding(&self) -> Vec<usize> {
        (0..self.proxy.calls.len()).filter(|i| !self.answered.contains(i)).collect()
    }

    fn timers_armed(&self) -> usize {
        self.proxy.timers.len() - self.timers_fired
    }

    fn now_s(&self) -> u64 {
        self.w.now_ms / 1000
    }

    /// The request leaves for the upstream.
    fn release_request(&mut self) {
        self.req = Dir::Gone;
        self.req_body_paused = false;
        let config = Rc::clone(&self.w.config);
        let h = &config.headers;
        let internal = internal_names(&config);
        let mut headers = self.proxy.request.clone();
        for (name, value) in &headers {
            if !config.internal.matches(name.as_bytes()) {
                continue;
            }
            ensure!(!value.starts_with(CLIENT), "internal-header", "the client's {name}: {value:?} goes upstream");
            ensure!(internal.contains(name), "internal-header", "{name} is not a name the filter sets");
            ensure!(headers.iter().filter(|(n, _)| n == name).count() == 1, "internal-header", "{name} twice");
            let well_formed = if *name == h.session_id {
                is_sid(value)
            } else if *name == h.session_new {
                value == "1"
            } else if *name == h.session_state {
                !value.is_empty() && is_header_value(value.as_bytes())
            } else if *name == h.route {
                STANDARD.decode(value).ok().and_then(|b| String::from_utf8(b).ok()).is_some_and(|u| is_upstream(&u))
            } else {
                !value.is_empty() && valid_field_value(value)
            };
            ensure!(well_formed, "internal-header", "{name}: {value:?} is not well-formed");
        }
        let sid = self.proxy.req(&h.session_id).map(str::to_string);
        if let (Some(sid), Some(_)) = (&sid, self.proxy.req(&h.session_state)) {
            ensure!(!self.w.ended_here.contains(sid), "ended-restored", "state of session {sid}, which this worker ended, is forwarded");
        }
        if let Some(routed) = &self.proxy.routed_to {
            ensure!(is_upstream(routed), "internal-header", "routed to {routed:?}");
        }
        headers.sort();
        self.w.transcript.push(format!("request {headers:?} to {:?}", self.proxy.routed_to));
        self.sent_request = Some(self.proxy.request.clone());
    }

    /// The response leaves for the client.
    fn release_response(&mut self) {
        self.resp = Dir::Gone;
        self.resp_body_paused = false;
        if self.local_replies == 0 {
            let config = Rc::clone(&self.w.config);
            for name in response_internal(&config) {
                let leaked = self.proxy.response.iter().find(|(k, _)| k == name);
                ensure!(leaked.is_none(), "response-internal-header", "the response leaves with {leaked:?}");
            }
        }
        self.w.transcript.push(format!("response {:?}", self.proxy.response));
        self.sent_response = Some(self.proxy.response.clone());
        if self.trailers_behind {
            self.release_trailers();
        }
    }

    fn release_trailers(&mut self) {
        self.trailers = Dir::Gone;
        self.trailers_behind = false;
        let state = &self.w.config.headers.session_state;
        let leaked = self.proxy.trailers.iter().find(|(k, _)| k == state);
        ensure!(leaked.is_none(), "response-internal-header", "the trailers leave with {leaked:?}");
        self.w.transcript.push(format!("trailers {:?}", self.proxy.trailers));
    }

    fn check_set_cookie(&mut self, header: &str, place: &str) {
        let config = Rc::clone(&self.w.config);
        let c = &config.cookie;
        let now = self.now_s();
        let rest = header.strip_prefix(c.name.as_str()).and_then(|r| r.strip_prefix('='));
        let Some(rest) = rest else { panic!("[set-cookie] {place} Set-Cookie {header:?} does not start with {}=", c.name) };
        let (value, tail) = rest.split_at(rest.find(';').unwrap_or(rest.len()));
        let max_age =
            tail.strip_prefix(c.attributes.as_str()).and_then(|t| t.strip_prefix("; Max-Age=")).and_then(|n| n.parse::<u64>().ok());
        let Some(max_age) = max_age else {
            panic!("[set-cookie] {place} Set-Cookie {header:?}: not the attributes {:?} and a Max-Age", c.attributes)
        };
        if value.is_empty() {
            ensure!(max_age == 0, "set-cookie", "{place} sets an empty cookie for {max_age} s");
            return;
        }
        ensure!(value.bytes().all(is_cookie_octet), "set-cookie", "{place} cookie value {value:?}");
        let claims = match cookie::decode(value, &config.keys, now) {
            Ok(claims) => claims,
            Err(e) => panic!("[set-cookie] {place} sets a cookie that does not verify now ({e:?}): {value:?}"),
        };
        ensure!(claims.exp == now + max_age && max_age <= c.ttl_secs, "set-cookie", "{place}: Max-Age {max_age} for {claims:?} at {now}");
        ensure!(claims.exp <= claims.since.saturating_add(c.max_lifetime_secs), "set-cookie", "{place}: {claims:?} outlives the session");
        ensure!(
            claims.cluster() == self.cluster,
            "set-cookie",
            "{place}: a cookie for cluster {:?} on a route to {:?}",
            claims.cluster(),
            self.cluster
        );
        if claims.flags & FLAG_MOVING != 0 {
            let lease_secs = config.store.as_ref().map_or(0, |s| s.lease_ms / 1000);
            ensure!(max_age <= 60.max(2 * lease_secs), "set-cookie", "{place}: a moving cookie for {max_age} s");
        }
        self.w.issued.push(value.to_string());
    }

    /// What a callback did, checked against how Envoy works.
    fn after(&mut self, callback: Callback, what: &str) {
        // Local replies.
        let replies = self.proxy.local_replies;
        if replies != self.local_replies {
            ensure!(replies == 1 && self.local_replies == 0, "double-reply", "{replies} local replies after {what}");
            ensure!(self.resp != Dir::Gone, "late-reply", "a local reply after the response headers left ({what})");
            self.local_replies = replies;
            let (status, headers) = self.proxy.local_reply.clone().unwrap_or_default();
            self.w.transcript.push(format!("local reply {status} {headers:?}"));
            let config = Rc::clone(&self.w.config);
            for (name, value) in &headers {
                ensure!(valid_field_value(value), "header-value", "local reply {name}: {value:?}");
                ensure!(!response_internal(&config).contains(&name.as_str()), "response-internal-header", "local reply with {name}");
                match name.as_str() {
                    "set-cookie" => self.check_set_cookie(value, "local reply"),
                    "location" => {
                        let v = value.as_bytes();
                        let same_origin = v.first() == Some(&b'/') && !matches!(v.get(1), Some(b'/' | b'\\'));
                        ensure!(same_origin, "open-redirect", "{status} Location {value:?} leaves the origin");
                    }
                    _ => {}
                }
            }
        }
        // New Set-Cookie headers on the response.
        let set_cookies: Vec<String> =
            self.proxy.response.iter().filter(|(k, _)| k == "set-cookie").map(|(_, v)| v.clone()).skip(self.cookies_checked).collect();
        self.cookies_checked += set_cookies.len();
        for value in set_cookies {
            ensure!(valid_field_value(&value), "header-value", "set-cookie {value:?}");
            self.check_set_cookie(&value, "response");
        }
        // Resumes.
        let (req, resp) = (self.proxy.resumed_request, self.proxy.resumed_response);
        if req != self.resumed.0 {
            let paused = self.req == Dir::Paused || self.req_body_paused;
            ensure!(callback == Callback::Async, "bad-resume", "resume_request from {what}");
            ensure!(req == self.resumed.0 + 1 && paused, "bad-resume", "resume_request while the request is not paused ({what})");
            ensure!(self.local_replies == 0, "bad-resume", "resume_request after a local reply ({what})");
            self.release_request();
        }
        if resp != self.resumed.1 {
            let paused = self.resp == Dir::Paused || self.resp_body_paused || self.trailers == Dir::Paused;
            ensure!(callback == Callback::Async, "bad-resume", "resume_response from {what}");
            ensure!(resp == self.resumed.1 + 1 && paused, "bad-resume", "resume_response while the response is not paused ({what})");
            ensure!(self.local_replies == 0, "bad-resume", "resume_response after a local reply ({what})");
            if self.resp != Dir::Gone {
                self.release_response();
            } else if self.resp_body_paused {
                self.resp_body_paused = false;
                if self.trailers_behind {
                    self.release_trailers();
                }
            }
            if self.trailers == Dir::Paused {
                self.release_trailers();
            }
        }
        self.resumed = (req, resp);
        // New store calls.
        for call in self.proxy.calls.iter().skip(self.calls_checked) {
            self.w.check_call(call);
            self.w.transcript.push(format!("stream call {:?}", call.op));
        }
        self.calls_checked = self.proxy.calls.len();
        let in_flight = self.outstanding().len();
        ensure!(
            in_flight <= 1,
            "two-calls",
            "{in_flight} store calls of one stream in flight after {what}: only the last one's answer is read"
        );
        let begins = self.proxy.calls.iter().filter(|c| matches!(c.op, Op::Begin { .. })).count();
        let bound = 1 + POLL_DELAYS_MS.len() + 3;
        ensure!(begins <= bound, "begin-bound", "{begins} Begin calls for one request (at most {bound})");
        // Headers that left do not change.
        if let Some(sent) = &self.sent_request {
            ensure!(*sent == self.proxy.request, "late-header", "request headers changed after they left ({what})");
        }
        if let (Some(sent), 0) = (&self.sent_response, self.local_replies) {
            ensure!(*sent == self.proxy.response, "late-header", "response headers changed after they left ({what})");
        }
        // Sessions ended here.
        let ended = self.w.worker.metrics.get(Counter::SessionsEnded);
        if ended != self.ended_counted {
            let sid = self
                .sent_request
                .as_ref()
                .and_then(|r| r.iter().find(|(k, _)| *k == self.w.config.headers.session_id))
                .map(|(_, v)| v.clone());
            self.w.ended_here.extend(sid);
            self.ended_counted = ended;
        }
        self.timers_log();
        self.check_live(what);
    }

    fn timers_log(&mut self) {
        for after in self.proxy.timers.iter().skip(self.timers_logged) {
            self.w.transcript.push(format!("timer {after}"));
        }
        self.timers_logged = self.proxy.timers.len();
    }

    /// No direction waits without something that will wake it.
    fn check_live(&self, what: &str) {
        if self.local_replies > 0 {
            return;
        }
        let waiting = !self.outstanding().is_empty() || self.timers_armed() > 0;
        for (paused, name) in [
            (self.req == Dir::Paused, "hang-request"),
            (self.req_body_paused, "hang-request-body"),
            (self.resp == Dir::Paused, "hang-response"),
            (self.resp_body_paused, "hang-response-body"),
            (self.trailers == Dir::Paused && !self.trailers_behind, "hang-trailers"),
        ] {
            ensure!(!paused || waiting, name, "after {what}: paused with no store call in flight, no timer and no local reply");
        }
    }

    fn sync_world(&mut self) {
        self.proxy.now_ms = self.w.now_ms;
        self.proxy.no_random = self.w.no_random;
        self.proxy.no_store = self.w.store_down;
    }

    fn respond(&mut self, r: &Response) {
        if self.resp != Dir::Before {
            return;
        }
        if let Some((status, headers)) = self.proxy.local_reply.clone() {
            // A local reply sent while the request waited runs through the encoder filters.
            if self.req == Dir::Gone {
                return;
            }
            self.proxy.response = std::iter::once((":status".to_string(), status.to_string())).chain(headers).collect();
            self.proxy.upstream = None;
            self.proxy.flags = 0;
        } else if self.req == Dir::Gone {
            let config = Rc::clone(&self.w.config);
            let status = match r.status {
                Status::S200 => 200,
                Status::S503 => 503,
                Status::S500 => 500,
                Status::S409 => 409,
                Status::Code(c) => c,
            };
            let mut headers = vec![(":status".to_string(), status.to_string())];
            headers.extend(r.headers.iter().take(12).map(|h| response_header(h, &config)));
            self.proxy.response = headers;
            self.trailers_given = r.trailers.iter().take(4).map(|h| response_header(h, &config)).collect();
            self.proxy.upstream = match &r.from {
                From::Routed => Some(self.proxy.routed_to.clone().unwrap_or_else(|| UPSTREAMS[0].to_string())),
                From::Other(u) => Some(u.get(UPSTREAMS).to_string()),
                From::Nobody => None,
            };
            self.proxy.flags = match r.flags {
                Flags::None => 0,
                Flags::UH => 0x2,
                Flags::UF => 0x20,
                Flags::UC => 0x40,
                Flags::UR => 0x10,
                Flags::Raw(f) => f,
            };
        } else {
            return;
        }
        self.sync_world();
        let action = self.flow.on_response_headers(&mut self.proxy);
        self.w.transcript.push(format!("response headers: {action:?}"));
        match action {
            Action::Continue => {
                ensure!(self.local_replies == self.proxy.local_replies, "reply-continue", "response headers continue after a local reply");
                self.release_response();
            }
            Action::Pause => self.resp = Dir::Paused,
        }
        self.after(Callback::Headers, "the response headers");
    }

    fn request_body(&mut self) {
        if self.req == Dir::Before || self.proxy.local_replies > 0 || self.req_body_paused {
            return;
        }
        if self.flow.holds_request_body() {
            self.req_body_paused = true;
        } else if self.req == Dir::Paused {
            // Continuing the body releases headers that were paused.
            self.release_request();
        }
        self.after(Callback::Body, "a request body chunk");
    }

    fn response_body(&mut self) {
        let ended = self.trailers != Dir::Before; // trailers come last
        if self.resp == Dir::Before || self.proxy.local_replies > 0 || self.resp_body_paused || ended {
            return;
        }
        if self.flow.holds_response_body() {
            self.resp_body_paused = true;
        } else if self.resp == Dir::Paused {
            self.release_response();
        }
        self.after(Callback::Body, "a response body chunk");
    }

    fn response_trailers(&mut self) {
        if self.resp == Dir::Before || self.trailers != Dir::Before || self.proxy.local_replies > 0 || self.trailers_given.is_empty() {
            return;
        }
        self.proxy.trailers = std::mem::take(&mut self.trailers_given);
        self.sync_world();
        let action = self.flow.on_response_trailers(&mut self.proxy);
        self.w.transcript.push(format!("trailers: {action:?}"));
        match action {
            Action::Continue if self.resp == Dir::Gone && !self.resp_body_paused => self.release_trailers(),
            // They wait behind paused headers or body, and leave with them.
            Action::Continue => {
                self.trailers = Dir::Paused;
                self.trailers_behind = true;
            }
            Action::Pause => self.trailers = Dir::Paused,
        }
        self.after(Callback::Headers, "the response trailers");
    }

    fn answer(&mut self, pick: u8, answer: &Answer) {
        let open = self.outstanding();
        if open.is_empty() {
            return;
        }
        let i = open[usize::from(pick) % open.len()];
        self.answered.insert(i);
        let call = self.proxy.calls[i].clone();
        let (status, body) = self.w.answer_body(&call, answer);
        self.sync_world();
        let token = u64::try_from(i + 1).unwrap();
        self.flow.on_store_response(&mut self.proxy, token, status, &body);
        self.after(Callback::Async, "a store answer");
    }

    fn stray(&mut self, token: u32) {
        let token = u64::from(token).max(u64::try_from(self.proxy.calls.len()).unwrap() + 1);
        let state = |p: &FakeProxy| {
            (
                p.request.clone(),
                p.response.clone(),
                p.trailers.clone(),
                p.local_replies,
                p.resumed_request,
                p.resumed_response,
                p.calls.len(),
                p.timers.len(),
            )
        };
        let before = state(&self.proxy);
        let body = webdis_reply("stray", "AAAAAAAAAAAAAAAAAAAAAA", &Reply::Acquired { state: Some("stray-state".into()) });
        self.sync_world();
        self.flow.on_store_response(&mut self.proxy, token, Some(200), &body);
        ensure!(before == state(&self.proxy), "stray", "an answer with token {token}, which no call of the stream has, changed the stream");
        self.after(Callback::Async, "a stray answer");
    }

    fn timer(&mut self) {
        let Some(&after) = self.proxy.timers.get(self.timers_fired) else { return };
        self.timers_fired += 1;
        self.w.now_ms = self.w.now_ms.saturating_add(after);
        self.sync_world();
        self.flow.on_timer(&mut self.proxy);
        self.after(Callback::Async, "a timer");
    }
}

fn response_header(header: &RespHeader, config: &Config) -> (String, String) {
    let h = &config.headers;
    match header {
        RespHeader::Instance(i) => (h.instance_id.clone(), i.get(INSTANCES).to_string()),
        RespHeader::State(s) => (h.session_state.clone(), s.get(STATES).to_string()),
        RespHeader::Unknown => (h.session_unknown.clone(), "1".into()),
        RespHeader::End => (h.session_end.clone(), "1".into()),
        RespHeader::Rotate(s) => (h.session_rotate.clone(), s.get(NEW_SIDS).to_string()),
        RespHeader::Unreached => (h.unreached.clone(), "1".into()),
        RespHeader::Route(v) => (h.route.clone(), v.clone()),
        RespHeader::Other(n, v) => (n.to_ascii_lowercase(), v.clone()),
    }
}

/// A valid cookie value: see `CookiePart::Pinned`.
fn pinned(w: &World, cluster: &str, (sid, upstream, instance, moving): (u8, u8, u8, bool)) -> String {
    let pick = |vocab: &[&'static str], valid: usize, i: u8| vocab[usize::from(i) % valid];
    let now = w.now_ms / 1000;
    let claims = NewClaims {
        sid: pick(SIDS, 3, sid),
        cluster,
        upstream: pick(UPSTREAMS, 7, upstream),
        instance: pick(INSTANCES, 7, instance),
        since: now.saturating_sub(100),
        iat: now.saturating_sub(10),
        exp: now + 600,
        flags: if moving { FLAG_MOVING } else { 0 },
    };
    cookie::encode(&claims, &w.config.keys).expect("a valid cookie")
}

fn build_request(headers: &[ReqHeader], w: &World, cluster: &str) -> Vec<(String, String)> {
    let config = &w.config;
    let internal = internal_names(config);
    let now_s = w.now_ms / 1000;
    let mut out = Vec::new();
    for header in headers.iter().take(16) {
        let (name, value) = match header {
            ReqHeader::Path(p) => (":path".to_string(), p.get(PATHS).to_string()),
            ReqHeader::Method(m) => (":method".to_string(), m.get(METHODS).to_string()),
            ReqHeader::Cookie { parts, tight } => {
                let mut value = String::new();
                for (i, part) in parts.iter().take(6).enumerate() {
                    if i > 0 {
                        value.push_str(if *tight { ";" } else { "; " });
                    }
                    let lossy = |spec: &CookieSpec| String::from_utf8_lossy(&spec.build(now_s).bytes).into_owned();
                    match part {
                        CookiePart::Pinned { sid, upstream, instance, moving } => {
                            value.push_str(&format!(
                                "{}={}",
                                config.cookie.name,
                                pinned(w, cluster, (*sid, *upstream, *instance, *moving))
                            ));
                        }
                        CookiePart::Ours(spec) => value.push_str(&format!("{}={}", config.cookie.name, lossy(spec))),
                        CookiePart::Issued(i) if !w.issued.is_empty() => {
                            let issued = &w.issued[usize::from(*i) % w.issued.len()];
                            value.push_str(&format!("{}={issued}", config.cookie.name));
                        }
                        CookiePart::Issued(_) => {}
                        CookiePart::Named(name, spec) => value.push_str(&format!("{name}={}", lossy(spec))),
                        CookiePart::Raw(raw) => value.push_str(raw),
                    }
                }
                ("cookie".to_string(), value)
            }
            ReqHeader::Internal { which, spelling, value } => {
                (spelled(&internal[usize::from(*which) % internal.len()], *spelling), format!("{CLIENT}{value}"))
            }
            ReqHeader::Other(name, value) => (name.clone(), format!("{CLIENT}{value}")),
        };
        // Envoy refuses requests with these in a header value.
        if valid_field_value(&value) && valid_field_value(&name) {
            out.push((name, value));
        }
    }
    out
}

fn run_stream(w: &mut World, stream: &Stream, index: u32) {
    let cluster_name = CLUSTERS[usize::from(stream.cluster % 8).saturating_sub(5)];
    let cluster = cluster_tag(cluster_name).as_str().to_string();
    let request = build_request(&stream.request, w, &cluster);
    let pairs: Vec<(&str, &str)> = request.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut proxy = FakeProxy::new(&pairs, w.now_ms);
    proxy.shared = Rc::clone(&w.shared);
    proxy.cluster = cluster_name.to_string();
    // Each stream its own random bytes (the fake counts from 1 per proxy).
    for _ in 0..index * 40 {
        let _ = proxy.random();
    }
    let flow = Flow::new(index + 2, Rc::clone(&w.config), Rc::clone(&w.worker));
    let ended_counted = w.worker.metrics.get(Counter::SessionsEnded);
    let mut run = Run {
        w,
        flow,
        proxy,
        cluster,
        req: Dir::Before,
        req_body_paused: false,
        resp: Dir::Before,
        resp_body_paused: false,
        trailers: Dir::Before,
        trailers_given: Vec::new(),
        answered: HashSet::new(),
        timers_fired: 0,
        resumed: (0, 0),
        local_replies: 0,
        cookies_checked: 0,
        calls_checked: 0,
        timers_logged: 0,
        trailers_behind: false,
        sent_request: None,
        sent_response: None,
        ended_counted,
    };
    run.sync_world();
    let action = run.flow.on_request_headers(&mut run.proxy);
    run.w.transcript.push(format!("stream {index} request headers: {action:?}"));
    match action {
        Action::Continue => {
            ensure!(run.proxy.local_replies == 0, "reply-continue", "request headers continue after a local reply");
            run.release_request();
        }
        Action::Pause => run.req = Dir::Paused,
    }
    run.after(Callback::Headers, "the request headers");

    for step in stream.steps.iter().take(32) {
        match step {
            Step::Respond(r) => run.respond(r),
            Step::Answer { pick, answer } => run.answer(*pick, answer),
            Step::Timer => run.timer(),
            Step::Body(Part::RequestBody) => run.request_body(),
            Step::Body(Part::ResponseBody) => run.response_body(),
            Step::Body(Part::Trailers) => run.response_trailers(),
            Step::Worker(WorkerStep::Tick) => run.w.worker_tick(),
            Step::Worker(WorkerStep::Answer { pick, answer }) => run.w.worker_answer(*pick, answer),
            Step::World(Event::Stray(token)) => run.stray(*token),
            Step::World(Event::Clock(ms)) => run.w.now_ms = rel(run.w.now_ms, i64::from(*ms)),
            Step::World(Event::ClockSecs(s)) => run.w.now_ms = rel(run.w.now_ms, i64::from(*s) * 1000),
            Step::World(Event::NoRandom(b)) => run.w.no_random = *b,
            Step::World(Event::StoreDown(b)) => run.w.store_down = *b,
            Step::World(Event::LoseRaces(b)) => run.w.shared.lose_races.set(*b),
            Step::World(Event::Garbage { breaker, bytes }) => {
                let key = if *breaker { "session_affinity.breaker.store" } else { SHARED_KEY };
                run.w.put(key, bytes.clone());
            }
            Step::World(Event::GoneLines(lines)) => {
                let now = run.w.now_ms;
                let text: String = lines
                    .iter()
                    .take(8)
                    .map(|(u, i, ago)| {
                        let marked = now.saturating_sub(u64::from(*ago));
                        let instance = i.as_ref().map(|i| format!(" {}", i.get(INSTANCES))).unwrap_or_default();
                        format!("{} {} {marked}{instance}\n", u.get(UPSTREAMS), marked + 30_000)
                    })
                    .collect();
                run.w.put(SHARED_KEY, text.into_bytes());
            }
        }
    }

    // The rest of the stream: the response ends, every call ends (Envoy
    // times them out), every timer fires, and nothing may still be waiting.
    run.response_body();
    run.response_trailers();
    for _ in 0..64 {
        if !run.outstanding().is_empty() {
            run.answer(0, &Answer::Failed);
        } else if run.timers_armed() > 0 {
            run.timer();
        } else {
            break;
        }
    }
    let what = "every call and timer ended";
    if run.local_replies == 0 {
        for (paused, name) in [
            (run.req == Dir::Paused || run.req_body_paused, "hang-request"),
            (run.resp == Dir::Paused || run.resp_body_paused, "hang-response"),
            (run.trailers == Dir::Paused && !(run.resp == Dir::Paused || run.resp_body_paused), "hang-trailers"),
        ] {
            ensure!(!paused, name, "after {what}: still paused");
        }
    }
}

/// Runs the input; returns the transcript and whether a wrong echo was used.
fn run(input: &Input, wrong_echo_fails: bool) -> (Vec<String>, bool) {
    let config = config(input.config);
    let shared: Rc<FakeShared> = Rc::default();
    let mut root = FakeProxy::new(&[], NOW_MS);
    root.shared = Rc::clone(&shared);
    for _ in 0..200 {
        let _ = root.random();
    }
    let mut w = World {
        config,
        worker: Rc::default(),
        shared,
        root,
        root_answered: HashSet::new(),
        now_ms: rel(NOW_MS, i64::from(input.start) * 1000),
        no_random: false,
        store_down: false,
        issued: Vec::new(),
        ended_here: HashSet::new(),
        ended_in_store: HashSet::new(),
        wrong_echo_fails,
        wrong_echo_used: false,
        transcript: Vec::new(),
    };
    for (i, stream) in input.streams.iter().take(4).enumerate() {
        run_stream(&mut w, stream, u32::try_from(i).unwrap());
    }
    (w.transcript, w.wrong_echo_used)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = sa_fuzz::read::<Input>(data) else { return };
    let (transcript, wrong_echo_used) = run(&input, false);
    if sa_fuzz::show() {
        transcript.iter().for_each(|line| eprintln!("  {line}"));
    }
    if wrong_echo_used {
        let (replayed, _) = run(&input, true);
        let diverged = transcript.iter().zip(&replayed).position(|(a, b)| a != b).unwrap_or(transcript.len().min(replayed.len()));
        ensure!(
            transcript == replayed,
            "wrong-echo",
            "answers with a wrong nonce or session id changed what happened: with them {:?}, as failures {:?}",
            transcript.get(diverged),
            replayed.get(diverged)
        );
    }
});

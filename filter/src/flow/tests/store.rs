//! State writes, their fencing, and a store that fails.

use super::*;
use crate::flow::background::BUSY_TICK_MS;

#[test]
fn pinned_state_writes_are_fenced_on_the_owner_and_held_in_sync_mode() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    assert_eq!(action, Action::Pause);
    assert!(f.holds_response_body());
    assert_eq!(host.ops(), [&Op::Write { sid: SID.into(), from: owner(B1, "pod-a"), to: owner(B1, "pod-a"), state: Some("s1".into()), ttl_ms: 30 * 60_000 }]);
    assert_eq!(host.resp("x-session-state"), None);
    reply(&mut f, &mut host, Reply::Stored);
    assert_eq!(host.resumed_response, 1);
    assert_eq!(bed.count(Counter::StoreWrites), 1);
}

#[test]
fn a_write_from_a_host_that_lost_the_session_is_refused_and_repinned() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    reply(&mut f, &mut host, Reply::Conflict { owner: Some(owner(B2, "pod-b")) });
    let (status, headers) = host.local_reply.clone().unwrap();
    assert_eq!(status, 503);
    assert!(headers.iter().any(|(k, _)| k == "retry-after"));
    let claims = issued(&bed, &host);
    assert_eq!((claims.upstream(), claims.instance()), (B2, "pod-b"));
    assert_eq!(host.resumed_response, 0);
    assert_eq!(bed.count(Counter::StoreWritesRejected), 1);
}

#[test]
fn async_writes_are_detached_and_their_refusals_counted_on_the_worker() {
    let bed = Bed::new(with_store("async"));
    let (f, mut host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    assert_eq!(action, Action::Continue);
    assert!(!f.holds_response_body());
    assert!(host.calls.is_empty(), "the worker sends it, so it outlives the stream");
    drop(f);
    tick(&bed, &mut host);
    assert!(matches!(host.ops()[..], [Op::Write { .. }]));
    let (token, status, body) = host.answer(&Reply::Conflict { owner: Some(owner(B2, "pod-b")) });
    bed.worker.on_reply(&mut host, &bed.config, token, status, &body, NOW_MS);
    assert_eq!(bed.count(Counter::StoreWritesRejected), 1);
}

#[test]
fn a_failed_write_never_breaks_the_pinned_path() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    f.on_store_response(&mut host, 1, Some(500), b"");
    assert_eq!(host.resumed_response, 1);
    assert!(host.local_reply.is_none());
    assert_eq!((bed.count(Counter::StoreErrors), bed.count(Counter::StoreWritesUnprotected)), (1, 1));
}

#[test]
fn replies_for_another_call_or_session_are_never_used() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    // A stale token is not this stream's answer at all.
    f.on_store_response(&mut host, 99, Some(200), b"");
    assert_eq!(host.resumed_response, 0);
    // Right token, but the body answers some other call.
    let other = crate::testing::webdis_reply("other-nonce", SID, &Reply::Conflict { owner: Some(owner(B2, "x")) });
    f.on_store_response(&mut host, 1, Some(200), &other);
    assert!(host.local_reply.is_none(), "a conflict that was not ours must not re-pin anyone");
    assert_eq!(host.resumed_response, 1);
    assert_eq!(bed.count(Counter::StoreMismatched), 1);
}

#[test]
fn an_open_breaker_lets_responses_go_at_once_and_counts_the_unprotected_changes() {
    let bed = Bed::new(config(r#","store":{"cluster":"store","breaker":{"failures":2,"cooldown":"5s"}}"#));
    for _ in 0..2 {
        let (mut f, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
        f.on_store_response(&mut host, 1, Some(504), b"");
    }
    assert_eq!(bed.count(Counter::StoreBreakerOpened), 1);
    let (_, host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s2")]);
    assert_eq!(action, Action::Continue, "no wait for a store that is failing");
    assert!(host.calls.is_empty());
    assert_eq!(bed.count(Counter::StoreBreakerRejected), 1);
    assert_eq!(bed.count(Counter::StoreWritesUnprotected), 3);
    // A failover during the outage follows the policy at once.
    let cookie = format!("{COOKIE}={}", bed.cookie(B1, "pod-a", cookie::FLAG_MOVING));
    let mut host = bed.proxy(&[("cookie", &cookie)]);
    assert_eq!(bed.flow().on_request_headers(&mut host), Action::Continue);
    assert!(host.calls.is_empty());
    assert_eq!(host.req("x-session-new"), Some("1"));
}

#[test]
fn store_calls_carry_credentials_and_the_configured_timeout() {
    let bed = Bed::new(config(r#","store":{"cluster":"store","timeout":"250ms","auth":{"username":"proxy","password":"pw"}}"#));
    let (_, host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    let call = &host.calls[0];
    assert_eq!((call.cluster.as_str(), call.timeout), ("store", std::time::Duration::from_millis(250)));
    assert!(call.headers.contains(&("authorization", "Basic cHJveHk6cHc=".to_string())));
}

#[test]
fn async_writes_of_one_session_land_in_order() {
    let bed = Bed::new(with_store("async"));
    let (_, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    let (_, mut second, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s2")]);
    second.calls.clear();
    // Both queued before the worker's tick: only the newer state goes out.
    assert_eq!(tick(&bed, &mut host), None, "nothing else waits: the tick idles");
    assert!(matches!(host.ops()[..], [Op::Write { state: Some(s), .. }] if s == "s2"));
    // A third waits while the second is in flight, then follows it.
    let (_, _, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s3")]);
    assert_eq!(tick(&bed, &mut host), Some(BUSY_TICK_MS), "s3 waits: the worker ticks fast");
    assert_eq!(host.calls.len(), 1, "s3 waits for s2's answer");
    let (token, status, body) = host.answer(&Reply::Stored);
    bed.worker.on_reply(&mut host, &bed.config, token, status, &body, NOW_MS);
    assert_eq!(tick(&bed, &mut host), None);
    assert!(matches!(host.ops()[..], [_, Op::Write { state: Some(s), .. }] if s == "s3"));
}

/// A store on etcd with auth, as the flow tests use it.
fn with_etcd(write: &str) -> Rc<Config> {
    config(&format!(r#","store":{{"cluster":"store","dialect":"etcd","write":"{write}","auth":{{"username":"proxy","password":"pw"}}}}"#))
}

/// etcd's answer to the flow's latest call, which must be `path`: a login,
/// a grant or a txn meaning `reply`.
fn etcd_answer(host: &FakeProxy, path: &str, reply: Option<&Reply>) -> (u64, Option<u32>, Vec<u8>) {
    let token = u64::try_from(host.calls.len()).unwrap();
    let call = host.calls.last().unwrap();
    assert!(call.headers.contains(&(":path", path.to_string())), "{:?}", call.headers);
    let body = match reply {
        None if path.ends_with("authenticate") => br#"{"header":{},"token":"tok"}"#.to_vec(),
        None => br#"{"header":{},"ID":"7","TTL":"100"}"#.to_vec(),
        Some(reply) => crate::store::Etcd::new("sa:", 60_000, None).answer(&call.op, &call.nonce, None, reply).unwrap(),
    };
    (token, Some(200), body)
}

#[test]
fn an_etcd_failover_waits_for_the_workers_login_and_lease_then_begins() {
    let bed = Bed::new(with_etcd("sync"));
    let cookie = format!("{COOKIE}={}", bed.cookie(B1, "pod-a", cookie::FLAG_MOVING));
    let mut host = bed.proxy(&[("cookie", &cookie)]);
    let mut f = bed.flow();
    assert_eq!(f.on_request_headers(&mut host), Action::Pause);
    for path in ["/v3/auth/authenticate", "/v3/lease/grant"] {
        let (token, status, body) = etcd_answer(&host, path, None);
        f.on_store_response(&mut host, token, status, &body);
        assert_eq!(host.resumed_request, 0, "still waiting after {path}");
        assert!(f.holds_request_body());
    }
    assert!(matches!(host.ops()[..], [Op::Begin { .. }, Op::Begin { .. }, Op::Begin { .. }]), "one operation, three calls");
    assert!(host.calls[2].headers.contains(&("authorization", "tok".to_string())));
    let (token, status, body) = etcd_answer(&host, "/v3/kv/txn", Some(&Reply::Acquired { state: Some("st1".into()) }));
    f.on_store_response(&mut host, token, status, &body);
    assert_eq!((host.resumed_request, host.req("x-session-state")), (1, Some("st1")));

    // The worker kept the token: a write needs no login, only the lease of
    // its own (longer) TTL bucket.
    let (_, host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s2")]);
    let (_, status, _) = etcd_answer(&host, "/v3/lease/grant", None);
    assert_eq!((host.calls.len(), status), (1, Some(200)));
    assert!(host.calls[0].headers.contains(&("authorization", "tok".to_string())));
}

#[test]
fn a_failed_etcd_call_is_made_again_after_a_pause_and_only_the_operations_outcome_feeds_the_breaker() {
    let bed = Bed::new(config(r#","store":{"cluster":"store","dialect":"etcd","breaker":{"failures":1,"cooldown":"5s"}}"#));
    let (mut f, mut host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    assert_eq!(action, Action::Pause);
    let (token, status, body) = etcd_answer(&host, "/v3/lease/grant", None);
    f.on_store_response(&mut host, token, status, &body);
    // The txn reaches a member without quorum: no answer in time. It goes out
    // again once the stream's timer fires, the response still held.
    f.on_store_response(&mut host, 2, None, b"");
    assert_eq!((host.calls.len(), host.timers.last()), (2, Some(&crate::store::FIRST_RETRY_PAUSE_MS)));
    assert!(f.holds_response_body());
    f.on_timer(&mut host);
    assert_eq!(host.calls.len(), 2, "not before the pause is over");
    host.now_ms += crate::store::FIRST_RETRY_PAUSE_MS;
    f.on_timer(&mut host);
    assert_eq!((host.calls.len(), host.calls[2].calls, host.calls[2].retries, host.resumed_response), (3, 3, 1, 0));
    assert_eq!((bed.count(Counter::StoreErrors), bed.count(Counter::StoreBreakerOpened)), (1, 0));
    let (token, status, body) = etcd_answer(&host, "/v3/kv/txn", Some(&Reply::Stored));
    f.on_store_response(&mut host, token, status, &body);
    assert_eq!(host.resumed_response, 1);
    assert_eq!((bed.count(Counter::StoreWritesUnprotected), bed.count(Counter::StoreBreakerOpened)), (0, 0));
}

#[test]
fn an_etcd_operation_gives_up_within_its_retry_window_and_call_bound() {
    let bed = Bed::new(config(r#","store":{"cluster":"store","dialect":"etcd"}"#));
    let (mut f, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    let mut pauses = Vec::new();
    while host.resumed_response == 0 {
        let token = u64::try_from(host.calls.len()).unwrap();
        let timers = host.timers.len();
        f.on_store_response(&mut host, token, Some(503), b"no healthy upstream");
        if let Some(&pause) = host.timers.get(timers) {
            pauses.push(pause);
            host.now_ms += pause;
            f.on_timer(&mut host);
        }
        assert!(host.calls.len() <= usize::from(crate::store::MAX_CALLS));
    }
    assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000], "doubling pauses, each at most 1 s, within the 3 s window");
    assert_eq!(host.calls.len(), 7);
    assert_eq!((bed.count(Counter::StoreErrors), bed.count(Counter::StoreWritesUnprotected)), (7, 1));
}

#[test]
fn a_detached_etcd_write_follows_its_calls_from_the_worker() {
    let bed = Bed::new(config(r#","store":{"cluster":"store","dialect":"etcd","write":"async"}"#));
    let (f, mut host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    assert_eq!(action, Action::Continue);
    drop(f);
    tick(&bed, &mut host);
    let (token, status, body) = etcd_answer(&host, "/v3/lease/grant", None);
    bed.worker.on_reply(&mut host, &bed.config, token, status, &body, NOW_MS);
    let (token, status, body) = etcd_answer(&host, "/v3/kv/txn", Some(&Reply::Conflict { owner: Some(owner(B2, "pod-b")) }));
    bed.worker.on_reply(&mut host, &bed.config, token, status, &body, NOW_MS);
    assert_eq!((bed.count(Counter::StoreWritesRejected), bed.count(Counter::StoreErrors)), (1, 0));
}

#[test]
fn a_detached_etcd_call_that_failed_goes_out_again_from_the_workers_tick() {
    let bed = Bed::new(config(r#","store":{"cluster":"store","dialect":"etcd","write":"async"}"#));
    let (_, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    tick(&bed, &mut host);
    bed.worker.on_reply(&mut host, &bed.config, 1, None, b"", NOW_MS);
    assert_eq!(tick(&bed, &mut host), Some(BUSY_TICK_MS), "the retry keeps the worker's tick fast");
    assert_eq!(host.calls.len(), 1, "not before its pause is over");
    host.now_ms += crate::store::FIRST_RETRY_PAUSE_MS;
    assert_eq!(tick(&bed, &mut host), None, "nothing waits any more");
    assert_eq!((host.calls.len(), host.calls[1].retries), (2, 1));
}

#[test]
fn a_new_sessions_entry_is_short_lived_until_its_cookie_comes_back() {
    let bed = Bed::new(with_store("sync"));
    let mut host = bed.proxy(&[]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Pause);
    assert!(matches!(host.ops()[..], [Op::Write { ttl_ms: 60_000, .. }]), "store.new_session_ttl: {:?}", host.ops());
    let first = issued(&bed, &host);
    assert!(first.is_new());
    // The cookie comes back: re-issued without the flag, and the entry now lives store.idle_ttl.
    let value = format!("{COOKIE}={}", set_cookie(&host).unwrap());
    let mut back = bed.proxy(&[("cookie", &value)]);
    let mut g = bed.flow();
    g.on_request_headers(&mut back);
    back.respond(B1, &[("x-instance-id", "pod-a")]);
    g.on_response_headers(&mut back);
    tick(&bed, &mut back);
    assert!(matches!(back.ops()[..], [Op::Touch { ttl_ms: 1_800_000, .. }]), "{:?}", back.ops());
    assert!(!issued(&bed, &back).is_new());
}

#[test]
fn worker_calls_beyond_the_queue_bound_are_counted_when_forgotten() {
    let bed = Bed::new(with_store("async"));
    let store = bed.config.store.as_ref().unwrap();
    for i in 0..1_025 {
        let op = Op::Write { sid: format!("sid{i}"), from: owner(B1, "pod-a"), to: owner(B1, "pod-a"), state: Some("s".into()), ttl_ms: 1 };
        bed.worker.enqueue(crate::store::Client::new(store).call(op, format!("n{i}"), &crate::store::Memory::default(), NOW_MS));
    }
    assert_eq!((bed.count(Counter::StoreCallsDropped), bed.count(Counter::StoreWritesUnprotected)), (1, 1));
}

#[test]
fn new_sessions_first_writes_are_bounded_per_worker_per_second() {
    let bed = Bed::new(config(r#","store":{"cluster":"store","write":"async","new_session_writes_per_second":2}"#));
    for _ in 0..3 {
        let mut host = bed.proxy(&[]);
        let mut f = bed.flow();
        f.on_request_headers(&mut host);
        host.respond(B1, &[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
        f.on_response_headers(&mut host);
        assert!(set_cookie(&host).is_some(), "every new session gets its cookie");
    }
    assert_eq!((bed.count(Counter::StoreWrites), bed.count(Counter::StoreNewSessionsDeferred)), (2, 1));
}

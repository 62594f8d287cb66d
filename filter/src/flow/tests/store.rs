//! State writes, their fencing, and a store that fails.

use super::*;

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
    send_queued(&bed, &mut host);
    assert!(matches!(host.ops()[..], [Op::Write { .. }]));
    let (token, status, body) = host.answer(&Reply::Conflict { owner: Some(owner(B2, "pod-b")) });
    bed.worker.on_detached_reply(&mut host, &bed.config, token, status, &body, NOW_MS);
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
    send_queued(&bed, &mut host);
    assert!(matches!(host.ops()[..], [Op::Write { state: Some(s), .. }] if s == "s2"));
    // A third waits while the second is in flight, then follows it.
    let (_, _, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s3")]);
    send_queued(&bed, &mut host);
    assert_eq!(host.calls.len(), 1, "s3 waits for s2's answer");
    let (token, status, body) = host.answer(&Reply::Stored);
    bed.worker.on_detached_reply(&mut host, &bed.config, token, status, &body, NOW_MS);
    send_queued(&bed, &mut host);
    assert!(matches!(host.ops()[..], [_, Op::Write { state: Some(s), .. }] if s == "s3"));
}

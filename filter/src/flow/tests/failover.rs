//! The failover state machine: lease, polls, restore, commit, join, outage.

use super::*;
use crate::cookie::FLAG_MOVING;
use crate::flow::failover::POLL_DELAYS_MS;
use crate::flow::response::FLAG_UF;
use crate::gone::Sighting;

/// A request whose cookie is flagged moving (B1/pod-a), up to the Begin call.
fn failover_request(bed: &Bed) -> (Flow, FakeProxy) {
    let cookie = format!("{COOKIE}={}", bed.cookie(B1, "pod-a", FLAG_MOVING));
    let mut host = bed.proxy(&[("cookie", &cookie)]);
    let mut f = bed.flow();
    assert_eq!(f.on_request_headers(&mut host), Action::Pause);
    (f, host)
}

fn begin_lease(host: &FakeProxy) -> String {
    match host.ops().last() {
        Some(Op::Begin { lease, .. }) => lease.clone(),
        other => panic!("expected a Begin, got {other:?}"),
    }
}

#[test]
fn a_known_gone_host_restores_state_then_commits_the_new_owner() {
    let bed = Bed::new(with_store("sync"));
    bed.worker.gone.borrow_mut().mark(&*bed.shared, B1, Sighting::down(""), NOW_MS, 30_000);
    let mut host = bed.pinned(B1, "pod-a", &[]);
    let mut f = bed.flow();
    assert_eq!(f.on_request_headers(&mut host), Action::Pause);
    assert!(f.holds_request_body());
    let lease = begin_lease(&host);
    assert_eq!(host.ops(), [&Op::Begin { sid: SID.into(), from: owner(B1, "pod-a"), lease: lease.clone(), lease_ms: 10_000 }]);
    reply(&mut f, &mut host, Reply::Acquired { state: Some("st1".into()) });
    assert_eq!(host.resumed_request, 1);
    assert_eq!((host.req("x-session-state"), host.req("x-session-id"), host.req("x-session-new")), (Some("st1"), Some(SID), None));
    assert_eq!(host.routed_to, None, "the load balancer picks a live host");
    assert_eq!(host.req("x-envoy-retry-on"), Some(RETRY_ON_UNREACHED_SAFE));
    assert_eq!(host.added_twice, Vec::<String>::new());

    host.respond(B2, &[("x-instance-id", "pod-b"), ("x-session-state", "st2")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Pause, "sync: the commit holds the response");
    assert_eq!(
        host.ops()[1],
        &Op::Commit { sid: SID.into(), lease, to: owner(B2, "pod-b"), state: Some("st2".into()), ttl_ms: 30 * 60_000 }
    );
    let claims = issued(&bed, &host);
    assert_eq!((claims.upstream(), claims.instance(), claims.is_moving(), claims.since), (B2, "pod-b", false, NOW - 100));
    reply(&mut f, &mut host, Reply::Stored);
    assert_eq!(host.resumed_response, 1);
    assert_eq!((bed.count(Counter::FailoversKnown), bed.count(Counter::FailoversRestored)), (1, 1));
}

#[test]
fn nothing_stored_yet_asks_the_app_to_create_the_session() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host) = failover_request(&bed);
    reply(&mut f, &mut host, Reply::Acquired { state: None });
    assert_eq!((host.req("x-session-new"), host.req("x-session-state")), (Some("1"), None));
    host.respond(B2, &[("x-instance-id", "pod-b")]);
    f.on_response_headers(&mut host);
    assert!(matches!(host.ops()[1], Op::Commit { state: None, .. }));
    assert_eq!((bed.count(Counter::FailoversRestored), bed.count(Counter::FailoversFresh)), (0, 1));
}

#[test]
fn a_session_another_proxy_moved_joins_its_owner() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host) = failover_request(&bed);
    reply(&mut f, &mut host, Reply::Moved { owner: owner(B2, "pod-b") });
    assert_eq!(host.resumed_request, 1);
    assert_eq!((host.routed_to.as_deref(), host.req("x-session-id")), (Some(B2), Some(SID)));
    assert_eq!(host.added_twice, Vec::<String>::new());
    host.respond(B2, &[("x-instance-id", "pod-b")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    let claims = issued(&bed, &host);
    assert_eq!((claims.upstream(), claims.instance(), claims.is_moving()), (B2, "pod-b", false));
    assert_eq!(bed.count(Counter::FailoversJoined), 1);
}

/// A failover told "moved to B2 (pod-b)" by a proxy that saw `seen_down`
/// die at B2 (an empty instance: one it did not know).
fn moved_to_b2_after_seeing_down(seen_down: &str) -> (Bed, Flow, FakeProxy) {
    let bed = Bed::new(with_store("sync"));
    bed.worker.gone.borrow_mut().mark(&*bed.shared, B2, Sighting::down(seen_down), NOW_MS, 30_000);
    let (mut f, mut host) = failover_request(&bed);
    reply(&mut f, &mut host, Reply::Moved { owner: owner(B2, "pod-b") });
    (bed, f, host)
}

#[test]
fn an_owner_that_restarted_where_this_proxy_saw_its_old_instance_die_is_joined() {
    // Two proxies race one failover. The other one won and restored the
    // session on B2's new instance; this proxy saw B2's old instance die.
    let (bed, _, host) = moved_to_b2_after_seeing_down("pod-b-old");
    assert_eq!(host.calls.len(), 1, "no second move: the new instance is not gone");
    assert_eq!(host.routed_to.as_deref(), Some(B2));
    assert_eq!(bed.count(Counter::FailoversJoined), 1);
}

#[test]
fn an_owner_that_is_gone_too_is_followed_a_bounded_number_of_times() {
    let (_bed, mut f, mut host) = moved_to_b2_after_seeing_down("");
    assert!(matches!(host.ops()[1], Op::Begin { from, .. } if *from == owner(B2, "pod-b")));
    for _ in 0..3 {
        reply(&mut f, &mut host, Reply::Moved { owner: owner(B2, "pod-b") });
    }
    assert_eq!(host.calls.len(), 4, "three moves, then it joins");
    assert_eq!(host.routed_to.as_deref(), Some(B2));
}

#[test]
fn a_busy_lease_is_polled_a_few_times_with_pauses_then_refused_with_retry_after() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host) = failover_request(&bed);
    for (i, delay) in POLL_DELAYS_MS.iter().enumerate() {
        reply(&mut f, &mut host, Reply::Busy);
        assert_eq!(host.timers.last(), Some(delay), "poll {i}");
        assert_eq!(host.calls.len(), i + 1, "no call until the timer fires");
        assert!(f.holds_request_body());
        f.on_timer(&mut host);
        assert!(matches!(host.ops().last(), Some(Op::Begin { .. })));
    }
    reply(&mut f, &mut host, Reply::Busy);
    let (status, headers) = host.local_reply.clone().unwrap();
    assert_eq!(status, 503);
    assert!(headers.contains(&("retry-after".into(), "1".into())));
    assert_eq!(host.calls.len(), 1 + POLL_DELAYS_MS.len());
    assert_eq!(bed.count(Counter::FailoversBusy), 1);
    assert_eq!(host.resumed_request, 0);
}

#[test]
fn a_session_that_ended_elsewhere_starts_over() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host) = failover_request(&bed);
    reply(&mut f, &mut host, Reply::Ended);
    assert_eq!(host.resumed_request, 1);
    assert_ne!(host.req("x-session-id"), Some(SID));
    assert_eq!(host.req("x-session-new"), Some("1"));
}

#[test]
fn a_store_outage_follows_the_policy() {
    for (policy, status) in [("fresh", None), ("reject", Some(503))] {
        let bed = Bed::new(config(&format!(r#","store":{{"cluster":"store","on_outage":"{policy}"}}"#)));
        let (mut f, mut host) = failover_request(&bed);
        f.on_store_response(&mut host, 1, None, b"");
        assert_eq!(host.local_reply.as_ref().map(|r| r.0), status, "{policy}");
        if status.is_none() {
            assert_eq!(host.resumed_request, 1);
            assert_eq!(host.req("x-session-new"), Some("1"));
            assert_ne!(host.req("x-session-id"), Some(SID), "a new session, not the old id");
            assert_eq!(host.added_twice, Vec::<String>::new());
            assert_eq!(bed.count(Counter::FailoversFresh), 1);
        } else {
            assert_eq!(set_cookie(&host), None, "reject keeps the cookie for a later retry");
            assert_eq!(bed.count(Counter::FailoversRejected), 1);
        }
        assert_eq!(bed.count(Counter::StoreErrors), 1);
    }
}

#[test]
fn a_store_call_that_cannot_start_is_an_outage_too() {
    let bed = Bed::new(with_store("sync"));
    let cookie = format!("{COOKIE}={}", bed.cookie(B1, "pod-a", FLAG_MOVING));
    let mut host = bed.proxy(&[("cookie", &cookie)]);
    host.no_store = true;
    assert_eq!(bed.flow().on_request_headers(&mut host), Action::Continue);
    assert_eq!(host.req("x-session-new"), Some("1"));
    assert_eq!((bed.count(Counter::StoreErrors), bed.count(Counter::FailoversFresh)), (1, 1));
}

#[test]
fn store_timeouts_are_counted_as_timeouts() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host) = failover_request(&bed);
    f.on_store_response(&mut host, 1, Some(504), b"upstream request timeout");
    assert_eq!((bed.count(Counter::StoreTimeouts), bed.count(Counter::StoreErrors)), (1, 0));
}

#[test]
fn a_failover_that_found_no_live_host_releases_its_lease_and_replays() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host) = failover_request(&bed);
    let lease = begin_lease(&host);
    reply(&mut f, &mut host, Reply::Acquired { state: Some("st".into()) });
    host.respond(B2, &[(":status", "503")]);
    host.flags = FLAG_UF;
    assert_eq!(f.on_response_headers(&mut host), Action::Pause);
    assert_eq!(host.calls.len(), 1, "the release is the worker's, not the stream's");
    assert_eq!(host.worker_wakes, 1);
    tick(&bed, &mut host);
    assert_eq!(host.ops()[1], &Op::Release { sid: SID.into(), lease });
    assert_eq!(host.local_reply.as_ref().map(|r| r.0), Some(307));
    assert!(issued(&bed, &host).is_moving());
}

#[test]
fn an_app_server_error_without_an_instance_id_moves_nothing_and_stands() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host) = failover_request(&bed);
    reply(&mut f, &mut host, Reply::Acquired { state: Some("st".into()) });
    host.respond(B2, &[(":status", "400")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Continue, "the error goes to the client");
    tick(&bed, &mut host);
    assert!(matches!(host.ops()[1], Op::Release { .. }), "no commit: no app took the session");
    assert!(host.local_reply.is_none());
    assert_eq!(set_cookie(&host), None, "the cookie still says moving");
}

#[test]
fn stored_state_that_is_not_a_header_value_releases_the_lease_and_is_an_outage() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host) = failover_request(&bed);
    reply(&mut f, &mut host, Reply::Acquired { state: Some("a\r\nb".into()) });
    tick(&bed, &mut host);
    assert!(matches!(host.ops()[1], Op::Release { .. }));
    assert_eq!(host.req("x-session-state"), None);
    assert_eq!(host.req("x-session-new"), Some("1"));
}

#[test]
fn a_state_the_live_app_refuses_starts_a_new_session() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host) = failover_request(&bed);
    reply(&mut f, &mut host, Reply::Acquired { state: Some("tampered".into()) });
    host.respond(B2, &[(":status", "409"), ("x-instance-id", "pod-b"), ("x-session-unknown", "1")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Pause);
    tick(&bed, &mut host);
    assert!(matches!(host.ops()[1], Op::Release { .. }));
    let (status, headers) = host.local_reply.clone().unwrap();
    assert_eq!(status, 307);
    assert!(headers.iter().any(|(k, v)| k == "set-cookie" && v.starts_with("sa=;") && v.ends_with("Max-Age=0")));
    assert_eq!(bed.count(Counter::FailoversRefused), 1);
}

#[test]
fn without_a_store_a_gone_host_starts_the_session_fresh() {
    let bed = Bed::new(config(""));
    let cookie = format!("{COOKIE}={}", bed.cookie(B1, "pod-a", FLAG_MOVING));
    let mut host = bed.proxy(&[("cookie", &cookie)]);
    assert_eq!(bed.flow().on_request_headers(&mut host), Action::Continue);
    assert_eq!(host.req("x-session-new"), Some("1"));
    assert_eq!(bed.count(Counter::FailoversFresh), 1);
}

#[test]
fn a_commit_refused_because_the_lease_was_lost_repins_to_the_owner() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host) = failover_request(&bed);
    reply(&mut f, &mut host, Reply::Acquired { state: None });
    host.respond(B2, &[("x-instance-id", "pod-b")]);
    f.on_response_headers(&mut host);
    reply(&mut f, &mut host, Reply::Conflict { owner: Some(owner(B1, "pod-c")) });
    let (status, _) = host.local_reply.clone().unwrap();
    assert_eq!(status, 503);
    let claims = issued(&bed, &host);
    assert_eq!((claims.upstream(), claims.instance()), (B1, "pod-c"));
    assert_eq!(bed.count(Counter::StoreWritesRejected), 1);
}

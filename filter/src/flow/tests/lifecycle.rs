//! The session lifecycle: ended is not lost; rotation; restarts; trailers.

use super::*;

fn expires_the_cookie(value: &str) -> bool {
    value.starts_with("sa=;") && value.ends_with("Max-Age=0")
}

#[test]
fn the_app_ending_a_session_tombstones_it_and_drops_the_cookie() {
    for mode in ["sync", "async"] {
        let bed = Bed::new(with_store(mode));
        let (mut f, mut host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-end", "1")]);
        assert_eq!(action, Action::Pause, "{mode}: the response waits for the tombstone");
        assert_eq!(host.ops(), [&Op::End { sid: SID.into(), owner: owner(B1, "pod-a"), lease: None, tombstone_ms: 30 * 60_000 }]);
        assert!(host.resp_all("set-cookie").iter().any(|v| expires_the_cookie(v)));
        assert_eq!(host.resp("x-session-end"), None);
        reply(&mut f, &mut host, Reply::Stored);
        assert_eq!(host.resumed_response, 1);
        assert_eq!((bed.count(Counter::SessionsEnded), bed.count(Counter::SessionsEndedUnconfirmed)), (1, 0));
    }
}

#[test]
fn an_end_the_store_cannot_confirm_still_answers_and_no_worker_restores_the_session() {
    for mode in ["sync", "async"] {
        let bed = Bed::new(with_store(mode));
        let (mut f, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-end", "1")]);
        f.on_store_response(&mut host, 1, None, b"");
        assert_eq!(host.resumed_response, 1, "{mode}: the app's answer still goes");
        assert!(host.resp_all("set-cookie").iter().any(|v| expires_the_cookie(v)));
        assert_eq!(bed.count(Counter::SessionsEndedUnconfirmed), 1);
        // Another worker of the proxy (same shared data), long after the
        // failover lease, within store.idle_ttl.
        let other = Bed { config: Rc::clone(&bed.config), worker: Rc::default(), shared: Rc::clone(&bed.shared) };
        let mut later = moving(&other);
        later.now_ms = NOW_MS + 29 * 60_000;
        assert_eq!(other.flow().on_request_headers(&mut later), Action::Continue);
        assert!(later.calls.is_empty(), "the store is not asked for its state");
        assert_eq!((later.req("x-session-new"), later.req("x-session-state")), (Some("1"), None));
    }
}

#[test]
fn a_new_session_the_app_ends_at_once_costs_no_store_call_and_pins_nothing() {
    let bed = Bed::new(with_store("sync"));
    let mut host = bed.proxy(&[]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[("x-instance-id", "pod-a"), ("x-session-end", "1")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    tick(&bed, &mut host);
    assert!(host.calls.is_empty());
    assert_eq!(set_cookie(&host), None);
    assert_eq!(bed.count(Counter::SessionsEnded), 0);
}

#[test]
fn unknown_from_the_very_instance_the_cookie_names_means_ended_not_lost() {
    let bed = Bed::new(with_store("sync"));
    let mut host = bed.pinned(B1, "pod-a", &[(":method", "POST"), (":path", "/cart")]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[(":status", "409"), ("x-instance-id", "pod-a"), ("x-session-unknown", "1")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Pause);
    tick(&bed, &mut host);
    assert!(matches!(host.ops()[..], [Op::End { .. }]), "the stored copy is deleted");
    let (status, headers) = host.local_reply.clone().unwrap();
    assert_eq!(status, 307, "the app did nothing: the request is repeated as a new session");
    assert!(headers.iter().any(|(k, v)| k == "set-cookie" && expires_the_cookie(v)));
    assert!(headers.contains(&("location".into(), "/cart".into())));
    assert!(!bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1), "nothing is marked");
    assert_eq!((bed.count(Counter::SessionsEnded), bed.count(Counter::FailoversRestart)), (1, 0));
}

#[test]
fn unknown_from_a_restarted_instance_is_a_loss_replayed_to_restore_it() {
    let bed = Bed::new(with_store("sync"));
    let (_, host, action) = bed.answer_pinned(&[(":status", "409"), ("x-instance-id", "pod-new"), ("x-session-unknown", "1")]);
    assert_eq!(action, Action::Pause);
    assert!(host.calls.is_empty(), "nothing ends");
    assert!(issued(&bed, &host).is_moving());
    let gone = bed.worker.gone.borrow();
    assert!(gone.is_gone(B1, "pod-a", NOW_MS + 1) && !gone.is_gone(B1, "pod-new", NOW_MS + 1));
    assert_eq!(bed.count(Counter::FailoversRestart), 1);
}

#[test]
fn an_app_without_the_contract_that_restarted_is_repinned_and_the_owner_moves() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host, action) = bed.answer_pinned(&[("x-instance-id", "pod-new")]);
    assert_eq!(action, Action::Pause, "the owner move is held in sync mode");
    assert_eq!(
        host.ops(),
        [&Op::Write { sid: SID.into(), from: owner(B1, "pod-a"), to: owner(B1, "pod-new"), state: None, ttl_ms: 30 * 60_000 }],
        "the stale stored state is dropped with the move"
    );
    assert_eq!(issued(&bed, &host).instance(), "pod-new");
    reply(&mut f, &mut host, Reply::Stored);
    assert_eq!(host.resumed_response, 1);
    assert_eq!((bed.count(Counter::FailoversRestart), bed.count(Counter::FailoversFresh)), (1, 1));
}

#[test]
fn rotation_moves_the_stored_session_to_the_apps_new_id_and_reissues_the_cookie() {
    let bed = Bed::new(with_store("sync"));
    let new_sid = "BBBBBBBBBBBBBBBBBBBBBB";
    let (mut f, mut host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-rotate", new_sid), ("x-session-state", "s2")]);
    assert_eq!(action, Action::Pause);
    assert_eq!(
        host.ops(),
        [&Op::Rotate {
            sid: SID.into(),
            new_sid: new_sid.into(),
            from: owner(B1, "pod-a"),
            lease: None,
            to: owner(B1, "pod-a"),
            state: Some("s2".into()),
            ttl_ms: 30 * 60_000,
            tombstone_ms: 30 * 60_000,
        }]
    );
    assert_eq!(set_cookie(&host), None, "the cookie waits for the store");
    assert_eq!(host.resp("x-session-rotate"), None);
    reply(&mut f, &mut host, Reply::Stored);
    let claims = issued(&bed, &host);
    assert_eq!((claims.sid(), claims.since), (new_sid, NOW - 100), "a new id, the same session lifetime");
    assert_eq!(bed.count(Counter::SessionsRotated), 1);
}

#[test]
fn a_rotation_to_an_id_in_use_drops_the_cookie_instead_of_handing_that_session_over() {
    let bed = Bed::new(with_store("async"));
    let taken = "BBBBBBBBBBBBBBBBBBBBBB";
    let (mut f, mut host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-rotate", taken)]);
    assert_eq!(action, Action::Pause, "a rotation waits for the store in every mode");
    reply(&mut f, &mut host, Reply::Taken);
    let cookies = host.resp_all("set-cookie");
    assert!(cookies.iter().all(|v| expires_the_cookie(v)) && !cookies.is_empty(), "{cookies:?}");
    assert_eq!(host.resumed_response, 1);
}

#[test]
fn a_new_session_under_an_id_in_use_gets_no_cookie_for_it() {
    let bed = Bed::new(with_store("sync"));
    let taken = "BBBBBBBBBBBBBBBBBBBBBB";
    let mut host = bed.proxy(&[]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[("x-instance-id", "pod-a"), ("x-session-rotate", taken), ("x-session-state", "s")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Pause);
    reply(&mut f, &mut host, Reply::Conflict { owner: Some(owner(B2, "pod-b")) });
    let (status, headers) = host.local_reply.clone().unwrap();
    assert_eq!(status, 503);
    let cookies: Vec<_> = headers.iter().filter(|(k, _)| k == "set-cookie").map(|(_, v)| v.clone()).collect();
    assert!(cookies.iter().all(|v| expires_the_cookie(v)) && !cookies.is_empty(), "never pinned to the victim's host: {cookies:?}");
}


#[test]
fn a_rotation_without_a_valid_new_id_is_ignored() {
    let bed = Bed::new(with_store("sync"));
    let (_, host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-rotate", "1"), ("x-session-state", "s2")]);
    assert!(matches!(host.ops()[..], [Op::Write { .. }]));
    assert_eq!(bed.count(Counter::SessionsRotated), 0);
}

#[test]
fn a_new_session_the_app_rotates_at_once_is_pinned_under_the_new_id() {
    let bed = Bed::new(with_store("sync"));
    let mut host = bed.proxy(&[]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[("x-instance-id", "pod-a"), ("x-session-rotate", "BBBBBBBBBBBBBBBBBBBBBB"), ("x-session-state", "s")]);
    f.on_response_headers(&mut host);
    assert_eq!(issued(&bed, &host).sid(), "BBBBBBBBBBBBBBBBBBBBBB");
    assert!(matches!(host.ops()[..], [Op::Write { sid, .. }] if sid == "BBBBBBBBBBBBBBBBBBBBBB"));
}

#[test]
fn ending_a_session_during_its_failover_is_fenced_on_the_lease() {
    let bed = Bed::new(with_store("sync"));
    let cookie = format!("{COOKIE}={}", bed.cookie(B1, "pod-a", cookie::FLAG_MOVING));
    let mut host = bed.proxy(&[("cookie", &cookie)]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    let Some(Op::Begin { lease, .. }) = host.ops().first().cloned().cloned() else { panic!("no begin") };
    reply(&mut f, &mut host, Reply::Acquired { state: Some("s".into()) });
    host.respond(B2, &[("x-instance-id", "pod-b"), ("x-session-end", "1")]);
    f.on_response_headers(&mut host);
    tick(&bed, &mut host);
    assert_eq!(host.ops()[1], &Op::End { sid: SID.into(), owner: owner(B1, "pod-a"), lease: Some(lease), tombstone_ms: 30 * 60_000 });
    assert!(host.resp_all("set-cookie").iter().any(|v| expires_the_cookie(v)));
}

#[test]
fn state_sent_as_a_trailer_is_stored_and_stripped() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a")]);
    assert_eq!(action, Action::Continue);
    host.trailers = vec![("x-session-state".into(), "late".into()), ("x-other".into(), "kept".into())];
    assert_eq!(f.on_response_trailers(&mut host), Action::Pause, "sync: the end of the response waits");
    assert!(matches!(host.ops()[..], [Op::Write { state: Some(s), .. }] if s == "late"));
    assert_eq!(host.trailers, [("x-other".to_string(), "kept".to_string())]);
    reply(&mut f, &mut host, Reply::Stored);
    assert_eq!(host.resumed_response, 1);
}

/// A failover request for SID, pinned to B1/pod-a with the moving flag.
fn moving(bed: &Bed) -> FakeProxy {
    let cookie = format!("{COOKIE}={}", bed.cookie(B1, "pod-a", cookie::FLAG_MOVING));
    bed.proxy(&[("cookie", &cookie)])
}

#[test]
fn a_session_ended_here_is_not_restored_while_its_tombstone_is_on_its_way() {
    let bed = Bed::new(with_store("sync"));
    let (_, _, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-end", "1")]);
    assert_eq!(action, Action::Pause, "the tombstone is still on its way");
    let mut host = moving(&bed);
    assert_eq!(bed.flow().on_request_headers(&mut host), Action::Continue);
    assert!(host.calls.is_empty(), "the store is not asked for its state");
    assert_eq!((host.req("x-session-new"), host.req("x-session-state")), (Some("1"), None));
    assert_ne!(host.req("x-session-id"), Some(SID));
}

#[test]
fn a_session_ended_while_its_failover_asks_the_store_is_not_restored() {
    let bed = Bed::new(with_store("sync"));
    let mut host = moving(&bed);
    let mut f = bed.flow();
    assert_eq!(f.on_request_headers(&mut host), Action::Pause);
    bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-end", "1")]);
    reply(&mut f, &mut host, Reply::Acquired { state: Some("s".into()) });
    assert_eq!(host.resumed_request, 1);
    assert_eq!((host.req("x-session-new"), host.req("x-session-state")), (Some("1"), None));
    tick(&bed, &mut host);
    assert!(matches!(host.ops()[..], [Op::Begin { .. }, Op::Release { .. }]), "the lease goes back: {:?}", host.ops());
}

#[test]
fn a_state_trailer_never_reaches_the_client_even_when_it_is_not_stored() {
    let bed = Bed::new(with_store("sync"));
    // A skipped path, and a new session whose response names no upstream.
    for request in [&[(":path", "/static/app.js")][..], &[]] {
        let mut host = bed.proxy(request);
        let mut f = bed.flow();
        f.on_request_headers(&mut host);
        host.response = vec![(":status".into(), "200".into())];
        assert_eq!(f.on_response_headers(&mut host), Action::Continue);
        host.trailers = vec![("x-session-state".into(), "s".into())];
        assert_eq!(f.on_response_trailers(&mut host), Action::Continue);
        assert!(host.trailers.is_empty(), "{request:?}");
        assert!(host.calls.is_empty());
    }
}

#[test]
fn a_state_trailer_during_a_held_write_follows_it_in_order() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    assert_eq!(action, Action::Pause);
    host.trailers = vec![("x-session-state".into(), "s2".into())];
    assert_eq!(f.on_response_trailers(&mut host), Action::Pause);
    assert!(host.trailers.is_empty());
    assert_eq!(host.calls.len(), 1, "the trailer's write waits for the headers' one");
    reply(&mut f, &mut host, Reply::Stored);
    assert_eq!(host.resumed_response, 0);
    let states: Vec<_> = host.ops().iter().map(|op| if let Op::Write { state, .. } = op { state.clone() } else { None }).collect();
    assert_eq!(states, [Some("s1".to_string()), Some("s2".to_string())]);
    reply(&mut f, &mut host, Reply::Stored);
    assert_eq!(host.resumed_response, 1);
    assert_eq!(bed.count(Counter::StoreWrites), 2);
}

#[test]
fn a_state_trailer_after_a_refused_write_is_not_sent() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s1")]);
    host.trailers = vec![("x-session-state".into(), "s2".into())];
    f.on_response_trailers(&mut host);
    reply(&mut f, &mut host, Reply::Conflict { owner: Some(owner(B2, "pod-b")) });
    assert_eq!(host.local_reply.as_ref().map(|(status, _)| *status), Some(503));
    assert_eq!(host.calls.len(), 1, "the host does not own the session: nothing more is written");
}

#[test]
fn a_state_trailer_never_reaches_the_client_even_with_nothing_to_store_it_for() {
    let bed = Bed::new(with_store("sync"));
    // The app ends the session and still sends state in a trailer (found by
    // the native module's fuzzer); and a path the filter does not manage.
    let (mut ended, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-end", "1")]);
    let mut skipped = bed.flow();
    let mut static_host = bed.proxy(&[(":path", "/static/app.js")]);
    skipped.on_request_headers(&mut static_host);
    static_host.respond(B1, &[]);
    skipped.on_response_headers(&mut static_host);
    for (flow, host) in [(&mut ended, &mut host), (&mut skipped, &mut static_host)] {
        host.trailers = vec![("x-session-state".into(), "secret".into())];
        assert_eq!(flow.on_response_trailers(host), Action::Continue);
        assert_eq!(host.trailers, []);
    }
    assert!(!host.ops().iter().any(|op| matches!(op, Op::Write { .. })), "nothing is stored for an ended session");
}

#[test]
fn a_write_to_a_session_that_ended_elsewhere_drops_the_cookie() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "s")]);
    reply(&mut f, &mut host, Reply::Ended);
    assert!(host.resp_all("set-cookie").iter().any(|v| expires_the_cookie(v)));
    assert_eq!(host.resumed_response, 1);
}

#[test]
fn an_end_sent_as_a_trailer_tombstones_the_session() {
    let bed = Bed::new(with_store("sync"));
    let (mut f, mut host, _) = bed.answer_pinned(&[("x-instance-id", "pod-a")]);
    host.trailers = vec![("x-session-end".into(), "1".into()), ("x-session-state".into(), "ignored".into())];
    assert_eq!(f.on_response_trailers(&mut host), Action::Pause, "the end of the response waits for the tombstone");
    assert!(host.trailers.is_empty(), "both internal trailers are stripped");
    assert!(matches!(host.ops()[..], [Op::End { sid, .. }] if sid == SID));
    reply(&mut f, &mut host, Reply::Stored);
    assert_eq!(host.resumed_response, 1);
    assert_eq!(bed.count(Counter::SessionsEnded), 1);
}

//! New sessions, the pinned path, cookies, and the internal headers.

use super::*;
use crate::flow::response::{FLAG_UC, FLAG_UF, FLAG_UH};
use crate::flow::session::UNSEEN_HOST_GRACE_SECS;
use crate::gone::Sighting;

#[test]
fn a_new_session_gets_an_id_and_a_cookie_pinned_to_the_cluster_upstream_and_instance() {
    let bed = Bed::new(config(""));
    let mut host = bed.proxy(&[]);
    let mut f = bed.flow();
    assert_eq!(f.on_request_headers(&mut host), Action::Continue);
    let sid = host.req("x-session-id").unwrap().to_string();
    assert!(crate::ids::is_sid(&sid));
    assert_eq!(host.req("x-session-new"), Some("1"));
    assert_eq!(host.routed_to, None, "the load balancer picks");
    assert_eq!(host.req("x-envoy-retry-on"), Some(RETRY_ON_UNREACHED_SAFE));
    assert_eq!(host.req("x-envoy-retriable-header-names"), Some("x-session-unreached"));
    host.respond(B1, &[("x-instance-id", "pod-a")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    let claims = issued(&bed, &host);
    assert_eq!((claims.sid(), claims.upstream(), claims.instance()), (sid.as_str(), B1, "pod-a"));
    assert_eq!(claims.cluster(), cookie::cluster_tag("app").as_str());
    assert_eq!((claims.since, claims.iat, claims.exp), (NOW, NOW, NOW + 86_400));
    assert!(host.resp("set-cookie").unwrap().ends_with("; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=86400"));
    assert_eq!(host.resp("x-instance-id"), None, "the instance id stays internal");
    assert_eq!(bed.count(Counter::SessionsCreated), 1);
}

#[test]
fn the_pinned_path_routes_to_the_pinned_host_and_makes_no_store_call() {
    let bed = Bed::new(with_store("sync"));
    let mut host = bed.pinned(B1, "pod-a", &[]);
    let mut f = bed.flow();
    assert_eq!(f.on_request_headers(&mut host), Action::Continue);
    assert_eq!(host.routed_to.as_deref(), Some(B1));
    assert_eq!(host.req("x-session-id"), Some(SID));
    assert_eq!(host.req("x-envoy-retry-on"), None, "a retry would ignore the override");
    host.respond(B1, &[("x-instance-id", "pod-a"), ("x-session-route", "echo"), ("x-session-id", SID), ("x-session-new", "1")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    assert!(host.calls.is_empty());
    assert_eq!(host.resp("set-cookie"), None, "young cookies are not re-issued");
    for name in ["x-session-route", "x-session-id", "x-session-new"] {
        assert_eq!(host.resp(name), None, "the echoed {name} stays internal");
    }
    assert_eq!(bed.count(Counter::SessionsPinned), 1);
}

#[test]
fn client_copies_of_internal_headers_never_pass_in_any_spelling() {
    let bed = Bed::new(config(""));
    let forged = [
        ("x-session-route", "MTAuMC4wLjk6ODA="),
        ("x-session-id", "victim"),
        ("x_session_id", "victim"),
        ("x-session-new", "1"),
        ("x_session_state", "evil"),
        ("X-Session-State", "evil"),
        ("x_instance_id", "x"),
        ("x-envoy-retry-on", "5xx"),
        ("x_envoy_max_retries", "9"),
    ];
    for cookie in [None, Some(bed.cookie(B1, "pod-a", 0))] {
        let mut headers = forged.to_vec();
        let cookie_header = cookie.map(|c| format!("{COOKIE}={c}"));
        if let Some(c) = &cookie_header {
            headers.push(("cookie", c));
        }
        let mut host = bed.proxy(&headers);
        bed.flow().on_request_headers(&mut host);
        // (x-session-new is checked below: the filter sets its own on new sessions.)
        for (name, value) in forged.iter().filter(|(name, _)| *name != "x-session-new") {
            let sent = host.request.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
            assert!(!sent.contains(value), "{name}: {value} passed ({sent:?})");
        }
        assert_eq!(host.req("x-session-new"), if cookie_header.is_some() { None } else { Some("1") });
        assert_eq!(host.added_twice, Vec::<String>::new(), "the client's copies go before the filter adds its own");
    }
    let mut host = bed.proxy(&[(":path", "/static/app.js"), ("x-session-route", "x"), ("x_session_id", "victim")]);
    bed.flow().on_request_headers(&mut host);
    assert_eq!((host.req("x-session-route"), host.req("x_session_id"), host.req("x-session-id")), (None, None, None));
}

#[test]
fn static_paths_get_no_cookie_and_leak_no_internal_header() {
    let bed = Bed::new(config(""));
    for path in ["/static/a.png", "/site.css?v=3"] {
        let mut host = bed.proxy(&[(":path", path)]);
        let mut f = bed.flow();
        f.on_request_headers(&mut host);
        host.respond(B1, &[("x-instance-id", "pod-a"), ("x-session-route", "MTAu"), ("x-session-state", "s")]);
        f.on_response_headers(&mut host);
        assert_eq!(host.resp("set-cookie"), None, "{path}");
        assert_eq!(host.req("x-session-id"), None);
        for name in ["x-instance-id", "x-session-route", "x-session-state"] {
            assert_eq!(host.resp(name), None, "{path}: {name}");
        }
    }
    assert_eq!(bed.count(Counter::SessionsSkipped), 2);
}

#[test]
fn bad_cookies_start_a_new_session_and_count_their_reason() {
    let bed = Bed::new(config(""));
    let good = bed.cookie(B1, "pod-a", 0);
    let other_key = Config::parse(br#"{"keys":[{"id":"k9","secret":"ffffffffffffffffffffffffffffffffffff"}]}"#, &|_| None).unwrap();
    let foreign = cookie::encode(&NewClaims { sid: SID, cluster: "", upstream: B1, instance: "", since: NOW, iat: NOW, exp: NOW + 60, flags: 0 }, &other_key.keys).unwrap();
    let expired = cookie::encode(&NewClaims { sid: SID, cluster: "", upstream: B1, instance: "", since: 1, iat: 1, exp: 2, flags: 0 }, &bed.config.keys).unwrap();
    let cases = [
        ("garbage".to_string(), Counter::RejectedMalformed),
        (good[..good.len() - 3].to_string(), Counter::RejectedMalformed),
        (tampered(&good), Counter::RejectedBadSignature),
        (foreign, Counter::RejectedUnknownKey),
        (expired, Counter::RejectedExpired),
    ];
    for (value, counter) in cases {
        let before = bed.count(counter);
        let mut host = bed.proxy(&[("cookie", &format!("{COOKIE}={value}"))]);
        bed.flow().on_request_headers(&mut host);
        assert_eq!(host.req("x-session-new"), Some("1"), "{value}");
        assert_eq!(host.routed_to, None);
        assert_eq!(bed.count(counter), before + 1, "{value}");
    }
}

/// `value` with one character of its sealed part changed.
fn tampered(value: &str) -> String {
    let at = value.len() / 2;
    let swap = if value.get(at..=at) == Some("A") { "B" } else { "A" };
    format!("{}{swap}{}", &value[..at], &value[at + 1..])
}

#[test]
fn cookies_for_different_sessions_are_ambiguous_and_none_wins() {
    let bed = Bed::new(config(""));
    let mine = bed.cookie(B1, "pod-a", 0);
    let planted = cookie::encode(
        &NewClaims { sid: "BBBBBBBBBBBBBBBBBBBBBB", cluster: cookie::cluster_tag("app").as_str(), upstream: B2, instance: "x", since: NOW, iat: NOW, exp: NOW + 60, flags: 0 },
        &bed.config.keys,
    )
    .unwrap();
    for order in [format!("{COOKIE}={planted}; {COOKIE}={mine}"), format!("{COOKIE}={mine}; {COOKIE}={planted}")] {
        let mut host = bed.proxy(&[("cookie", &order)]);
        bed.flow().on_request_headers(&mut host);
        assert_eq!((host.routed_to.as_deref(), host.req("x-session-new")), (None, Some("1")), "{order}");
    }
    assert_eq!(bed.count(Counter::RejectedAmbiguous), 2);
    // More copies than are ever looked at: ambiguous without checking them all.
    let many = vec![format!("{COOKIE}={mine}"); 4].join("; ");
    let mut host = bed.proxy(&[("cookie", &many)]);
    bed.flow().on_request_headers(&mut host);
    assert_eq!(host.routed_to, None);
    assert_eq!(bed.count(Counter::RejectedAmbiguous), 3);
}

#[test]
fn copies_of_one_session_are_fine_and_a_bad_one_beside_a_good_one_is_ignored() {
    let bed = Bed::new(config(""));
    let good = bed.cookie(B1, "pod-a", 0);
    for cookies in [format!("{COOKIE}=garbage; {COOKIE}={good}"), format!("{COOKIE}={good}; {COOKIE}={good}")] {
        let mut host = bed.proxy(&[("cookie", &cookies)]);
        bed.flow().on_request_headers(&mut host);
        assert_eq!(host.routed_to.as_deref(), Some(B1), "{cookies}");
    }
}

#[test]
fn a_cookie_for_another_clusters_route_steers_nothing_and_marks_nothing() {
    let bed = Bed::new(with_store("sync"));
    let mut host = bed.pinned(B1, "pod-a", &[]);
    host.cluster = "another".into();
    let mut f = bed.flow();
    assert_eq!(f.on_request_headers(&mut host), Action::Continue);
    assert_eq!((host.routed_to.as_deref(), host.req("x-session-id"), host.req("x-session-new")), (None, None, None));
    host.respond(B2, &[(":status", "503")]);
    host.flags = FLAG_UH;
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    assert!(host.local_reply.is_none() && host.resp("set-cookie").is_none() && host.calls.is_empty());
    assert!(!bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1));
    assert_eq!(bed.count(Counter::SessionsOtherCluster), 1);
}

/// A pinned request to pod-a with a cookie issued at `iat`, answered by pod-a.
fn served_from_an_older_cookie(bed: &Bed, since: u64, iat: u64, exp: u64) -> FakeProxy {
    let old = cookie::encode(
        &NewClaims { sid: SID, cluster: cookie::cluster_tag("app").as_str(), upstream: B1, instance: "pod-a", since, iat, exp, flags: 0 },
        &bed.config.keys,
    )
    .unwrap();
    let mut host = bed.proxy(&[("cookie", &format!("{COOKIE}={old}"))]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[("x-instance-id", "pod-a")]);
    f.on_response_headers(&mut host);
    host
}

#[test]
fn old_cookies_are_refreshed_and_old_keys_are_moved_to_the_signing_key() {
    let bed = Bed::new(config(r#","cookie":{"name":"sa","ttl":"1h","refresh_after":0.5}"#));
    let host = served_from_an_older_cookie(&bed, NOW - 7000, NOW - 2000, NOW + 1600);
    let claims = issued(&bed, &host);
    assert_eq!((claims.since, claims.iat, claims.exp), (NOW - 7000, NOW, NOW + 3600), "the session start is kept");
    assert_eq!(bed.count(Counter::CookiesRefreshed), 1);
}

#[test]
fn no_refresh_extends_a_session_past_its_absolute_lifetime() {
    let bed = Bed::new(config(r#","cookie":{"name":"sa","ttl":"1h","max_lifetime":"2h","refresh_after":0.1}"#));
    let since = NOW - 7000; // 200 s of its 2 h left
    let host = served_from_an_older_cookie(&bed, since, NOW - 1000, NOW + 200);
    assert_eq!(issued(&bed, &host).exp, since + 7200);
    assert!(host.resp("set-cookie").unwrap().ends_with("Max-Age=200"));
}

#[test]
fn a_session_past_its_absolute_lifetime_starts_over_whatever_its_cookie_says() {
    let bed = Bed::new(config(r#","cookie":{"name":"sa","ttl":"1h","max_lifetime":"2h"}"#));
    let tag = cookie::cluster_tag("app");
    let old = cookie::encode(
        &NewClaims { sid: SID, cluster: tag.as_str(), upstream: B1, instance: "pod-a", since: NOW - 7200, iat: NOW - 10, exp: NOW + 3000, flags: 0 },
        &bed.config.keys,
    )
    .unwrap();
    let mut host = bed.proxy(&[("cookie", &format!("{COOKIE}={old}"))]);
    bed.flow().on_request_headers(&mut host);
    assert_eq!((host.routed_to.as_deref(), host.req("x-session-new")), (None, Some("1")));
    assert_eq!(bed.count(Counter::RejectedExpired), 1);
}

#[test]
fn a_503_uf_for_the_pinned_host_marks_it_gone_and_replays_with_a_moving_cookie() {
    for flags in [FLAG_UF, FLAG_UF | FLAG_UH] {
        let bed = Bed::new(config(""));
        let mut host = bed.pinned(B1, "pod-a", &[(":path", "/cart?item=3")]);
        let mut f = bed.flow();
        f.on_request_headers(&mut host);
        host.respond(B1, &[(":status", "503")]);
        host.flags = flags;
        assert_eq!(f.on_response_headers(&mut host), Action::Pause);
        let (status, headers) = host.local_reply.clone().unwrap();
        assert_eq!(status, 307);
        assert!(headers.contains(&("location".into(), "/cart?item=3".into())));
        let claims = issued(&bed, &host);
        assert!(claims.is_moving());
        assert!(claims.exp <= NOW + 60, "a moving cookie is short-lived");
        assert!(bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1));
        assert_eq!((bed.count(Counter::FailoversReplayed), bed.count(Counter::GoneMarked)), (1, 1));
    }
}

/// A pinned request to B1/pod-a with a cookie issued `age` seconds ago,
/// answered by Envoy's local 503 UH.
fn no_healthy_host(bed: &Bed, age: u64) -> (FakeProxy, Action) {
    let tag = cookie::cluster_tag("app");
    let claims = NewClaims { sid: SID, cluster: tag.as_str(), upstream: B1, instance: "pod-a", since: NOW - 100, iat: NOW - age, exp: NOW + 3600, flags: 0 };
    let value = cookie::encode(&claims, &bed.config.keys).unwrap();
    let mut host = bed.proxy(&[("cookie", &format!("{COOKIE}={value}"))]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[(":status", "503")]);
    host.flags = FLAG_UH;
    let action = f.on_response_headers(&mut host);
    (host, action)
}

#[test]
fn a_503_uh_moves_only_its_own_session_and_marks_nothing() {
    let bed = Bed::new(config(""));
    bed.worker.seen.with(|seen| seen.saw(&*bed.shared, B1));
    let (host, action) = no_healthy_host(&bed, 1);
    assert_eq!((action, host.local_reply.as_ref().map(|r| r.0)), (Action::Pause, Some(307)));
    assert!(issued(&bed, &host).is_moving());
    assert!(!bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1), "other sessions there stay");
    assert_eq!((bed.count(Counter::FailoversReplayed), bed.count(Counter::GoneMarked)), (1, 0));
}

#[test]
fn a_host_this_proxy_never_saw_is_not_gone_while_its_cookie_is_seconds_old() {
    let bed = Bed::new(config(""));
    let (host, action) = no_healthy_host(&bed, 2);
    let (status, headers) = host.local_reply.clone().unwrap();
    assert_eq!((action, status), (Action::Pause, 503));
    assert!(headers.iter().any(|(n, _)| n == "retry-after"));
    assert!(!headers.iter().any(|(n, _)| n == "set-cookie"), "the cookie stays as it is");
    assert!(!bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1));
    assert_eq!((bed.count(Counter::FailoversDeferred), bed.count(Counter::FailoversReplayed)), (1, 0));
    // Past the grace, an unknown host is gone for this session.
    let (host, _) = no_healthy_host(&bed, UNSEEN_HOST_GRACE_SECS);
    assert_eq!(host.local_reply.as_ref().map(|r| r.0), Some(307));
}

#[test]
fn a_mesh_sidecars_unreached_answer_counts_as_a_connection_failure() {
    let bed = Bed::new(config(""));
    let (_, host, action) = bed.answer_pinned(&[(":status", "503"), ("x-session-unreached", "UF")]);
    assert_eq!(action, Action::Pause);
    assert_eq!(host.local_reply.as_ref().map(|r| r.0), Some(307));
    assert!(bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1));
    // The app itself cannot fake it: an answer that names an instance is the app's.
    let bed = Bed::new(config(""));
    let (_, host, _) = bed.answer_pinned(&[(":status", "503"), ("x-session-unreached", "UF"), ("x-instance-id", "pod-a")]);
    assert!(host.local_reply.is_none());
    assert_eq!(host.resp("x-session-unreached"), None, "stripped either way");
    // The sidecar lost its connection to the app mid-request (UC; "URX" is not "UR"):
    // a safe method is replayed, nothing is marked.
    for (flags, marked) in [("UC", false), ("UR", false), ("URX,UF", true), ("UH", true)] {
        let bed = Bed::new(config(""));
        let (_, host, action) = bed.answer_pinned(&[(":status", "503"), ("x-session-unreached", flags)]);
        assert_eq!((action, host.local_reply.as_ref().map(|r| r.0)), (Action::Pause, Some(307)), "{flags}");
        assert_eq!(bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1), marked, "{flags}");
    }
}

#[test]
fn an_overloaded_or_unrouted_sidecar_moves_no_session() {
    for flags in ["UO", "NR", "DC"] {
        let bed = Bed::new(config(""));
        let (_, host, action) = bed.answer_pinned(&[(":status", "503"), ("x-session-unreached", flags)]);
        assert_eq!((action, host.local_reply.as_ref().map(|r| r.0)), (Action::Continue, None), "{flags}");
        assert!(!bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1), "{flags}");
    }
}

#[test]
fn unsafe_requests_the_load_balancer_places_retry_only_what_no_app_saw() {
    let bed = Bed::new(config(""));
    let mut host = bed.proxy(&[(":method", "POST")]);
    bed.flow().on_request_headers(&mut host);
    assert_eq!(host.req("x-envoy-retry-on"), Some(RETRY_ON_UNREACHED));
    assert_eq!(host.req("x-envoy-retriable-header-names"), None, "a sidecar's reply may follow a lost connection");
}

#[test]
fn a_lost_connection_replays_a_get_without_marking_the_host_and_never_a_post() {
    let bed = Bed::new(config(""));
    let mut host = bed.pinned(B1, "pod-a", &[]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[(":status", "503")]);
    host.flags = FLAG_UC;
    assert_eq!(f.on_response_headers(&mut host), Action::Pause);
    assert_eq!(host.local_reply.as_ref().map(|r| r.0), Some(307));
    assert!(issued(&bed, &host).is_moving());
    assert!(!bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1));
    assert_eq!(bed.count(Counter::FailoversReset), 1);

    let mut host = bed.pinned(B1, "pod-a", &[(":method", "POST")]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[(":status", "503")]);
    host.flags = FLAG_UC;
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    assert!(host.local_reply.is_none(), "a POST that may have reached the app is never replayed");
}

#[test]
fn an_app_server_error_around_an_app_that_marks_its_answers_replays_a_get_only() {
    for status in ["400", "404", "503"] {
        let bed = Bed::new(config(""));
        let (_, host, action) = bed.answer_pinned(&[(":status", status)]);
        assert_eq!((action, host.local_reply.as_ref().map(|r| r.0)), (Action::Pause, Some(307)), "{status}");
        assert!(issued(&bed, &host).is_moving(), "{status}");
        assert!(!bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1), "{status}: the replay finds out");
        assert_eq!(bed.count(Counter::FailoversReset), 1, "{status}");
    }
    let bed = Bed::new(config(""));
    let mut host = bed.pinned(B1, "pod-a", &[(":method", "POST")]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[(":status", "404")]);
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    assert!(host.local_reply.is_none(), "a POST the app may have seen is never replayed");
    // Envoy's own reply (flags set), a sidecar's, or an app without instance ids: its answer stands.
    for (instance, headers, flags) in [("pod-a", &[(":status", "504")][..], FLAG_UC), ("pod-a", &[(":status", "404"), ("x-session-unreached", "NR")][..], 0),
                                       ("", &[(":status", "404")][..], 0)] {
        let bed = Bed::new(config(""));
        let mut host = bed.pinned(B1, instance, &[]);
        let mut f = bed.flow();
        f.on_request_headers(&mut host);
        host.respond(B1, headers);
        host.flags = flags;
        let action = f.on_response_headers(&mut host);
        assert_eq!((action, host.local_reply.as_ref().map(|r| r.0)), (Action::Continue, None), "{instance:?} {headers:?}");
        assert_eq!(bed.count(Counter::FailoversReset), 0, "{instance:?} {headers:?}");
    }
}

#[test]
fn an_app_error_that_is_not_uh_or_uf_is_never_replayed() {
    let bed = Bed::new(config(""));
    for status in ["500", "502", "503", "504"] {
        let (_, host, action) = bed.answer_pinned(&[(":status", status), ("x-instance-id", "pod-a")]);
        assert_eq!(action, Action::Continue, "{status}");
        assert!(host.local_reply.is_none(), "{status}");
    }
    assert!(!bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1));
}

#[test]
fn a_host_that_answers_again_is_cleared_for_its_new_sessions() {
    let bed = Bed::new(config(""));
    bed.worker.gone.borrow_mut().mark(&*bed.shared, B1, Sighting::down(""), NOW_MS - 5000, 30_000);
    // A session this proxy knew nothing of is served by the host (say, one
    // another proxy pinned there after the host came back).
    let mut host = bed.proxy(&[]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[("x-instance-id", "pod-a")]);
    f.on_response_headers(&mut host);
    let gone = bed.worker.gone.borrow();
    assert!(!gone.is_gone(B1, "pod-a", NOW_MS + 1));
    assert!(gone.is_gone(B1, "pod-old", NOW_MS + 1), "only the instance that answered is back");
    assert_eq!(bed.count(Counter::GoneCleared), 1);
}

#[test]
fn the_replay_never_redirects_off_site() {
    for (path, location) in [("//evil.example/x", "/"), ("/\\evil.example", "/"), ("/ok?a=//b", "/ok?a=//b"), ("*", "/")] {
        assert_eq!(super::super::issue::same_site_location(path), location, "{path}");
    }
}

#[test]
fn unreadable_state_never_reaches_the_client_and_is_not_stored() {
    let bed = Bed::new(with_store("sync"));
    let (_, host, action) = bed.answer_pinned(&[("x-instance-id", "pod-a"), ("x-session-state", "caf\u{e9}")]);
    assert_eq!(action, Action::Continue);
    assert_eq!(host.resp("x-session-state"), None);
    assert!(host.calls.is_empty());
}

#[test]
fn an_empty_or_unusable_instance_id_is_not_a_restart() {
    let bed = Bed::new(config(""));
    for instance in ["", "pod a", "x|y"] {
        let (_, host, _) = bed.answer_pinned(&[("x-instance-id", instance)]);
        assert!(host.local_reply.is_none() && host.resp("set-cookie").is_none(), "{instance:?}");
    }
    assert_eq!(bed.count(Counter::FailoversRestart), 0);
}

#[test]
fn a_new_session_whose_request_reached_no_app_is_not_pinned() {
    let bed = Bed::new(config(""));
    let mut host = bed.proxy(&[]);
    let mut f = bed.flow();
    f.on_request_headers(&mut host);
    host.respond(B1, &[(":status", "503")]);
    host.flags = FLAG_UF;
    assert_eq!(f.on_response_headers(&mut host), Action::Continue);
    assert_eq!(host.resp("set-cookie"), None);
    assert_eq!(bed.count(Counter::SessionsCreated), 0);
}

#[test]
fn without_a_csprng_ids_are_still_unguessable_and_distinct() {
    let bed = Bed::new(config(""));
    let mut ids = std::collections::HashSet::new();
    for _ in 0..3 {
        let mut host = bed.proxy(&[]);
        host.no_random = true;
        bed.flow().on_request_headers(&mut host);
        assert!(ids.insert(host.req("x-session-id").unwrap().to_string()));
    }
}

#[test]
fn internal_names_in_request_trailers_never_reach_the_app() {
    let bed = Bed::new(with_store("sync"));
    for cookie in [None, Some(format!("{COOKIE}={}", bed.cookie(B1, "pod-a", 0)))] {
        let mut host = match &cookie {
            Some(c) => bed.proxy(&[("cookie", c)]),
            None => bed.proxy(&[]),
        };
        let mut f = bed.flow();
        f.on_request_headers(&mut host);
        host.request_trailers = ["x-session-state", "X-Session-Id", "x_session_new", "x-instance-id", "x-session-route", "x-checksum"]
            .iter()
            .map(|name| (name.to_string(), "forged".to_string()))
            .collect();
        assert_eq!(f.on_request_trailers(&mut host), Action::Continue);
        assert_eq!(host.request_trailers, [("x-checksum".to_string(), "forged".to_string())], "cookie: {cookie:?}");
    }
}

#[test]
fn issued_cookies_are_sealed_with_a_nonce_from_the_hosts_randomness() {
    let bed = Bed::new(config(""));
    let signed = Bed::new(config(r#","cookie":{"name":"sa","format":"signed"}"#)).cookie(B1, "pod-a", 0);
    let mut values = Vec::new();
    for earlier_draws in [0, 0, 1] {
        let mut host = bed.proxy(&[("cookie", &format!("{COOKIE}={signed}"))]);
        for _ in 0..earlier_draws {
            crate::host::WorkerHost::random(&mut host);
        }
        let mut f = bed.flow();
        f.on_request_headers(&mut host);
        host.respond(B1, &[("x-instance-id", "pod-a")]);
        f.on_response_headers(&mut host);
        let value = set_cookie(&host).unwrap();
        assert!(value.starts_with("3|k1|") && !value.contains("10.0.0") && !value.contains("pod-a"), "{value}");
        values.push(value);
    }
    assert_eq!(values[0], values[1], "the same claims and random bytes");
    assert_ne!(values[0], values[2], "the same claims, other random bytes");
}

#[test]
fn a_cookie_in_the_other_format_is_accepted_and_re_issued_in_the_configured_one() {
    let signed = config(r#","cookie":{"name":"sa","format":"signed"}"#);
    for (from, to) in [(config(""), Bed::new(signed.clone())), (signed, Bed::new(config("")))] {
        let old = Bed::new(from).cookie(B1, "pod-a", 0);
        let mut host = to.proxy(&[("cookie", &format!("{COOKIE}={old}"))]);
        let mut f = to.flow();
        f.on_request_headers(&mut host);
        assert_eq!(host.routed_to.as_deref(), Some(B1), "{old}");
        host.respond(B1, &[("x-instance-id", "pod-a")]);
        f.on_response_headers(&mut host);
        let claims = issued(&to, &host);
        assert_eq!((claims.format(), claims.sid(), claims.upstream(), claims.since), (to.config.cookie.format, SID, B1, NOW - 100));
        assert_eq!(to.count(Counter::CookiesRefreshed), 1);
    }
}

#[test]
fn a_worker_rereads_the_gone_table_each_time_or_when_the_hosts_generation_moves() {
    let bed = Bed::new(config(""));
    let other = Worker::default();
    other.gone.borrow_mut().mark(&*bed.shared, B1, Sighting::down(""), NOW_MS, 30_000);
    bed.worker.refresh_gone(&*bed.shared, Some(1));
    assert!(bed.worker.gone.borrow().is_gone(B1, "pod-a", NOW_MS + 1));
    other.gone.borrow_mut().mark(&*bed.shared, B2, Sighting::down(""), NOW_MS, 30_000);
    bed.worker.refresh_gone(&*bed.shared, Some(1));
    assert!(!bed.worker.gone.borrow().is_gone(B2, "pod-b", NOW_MS + 1), "no write since generation 1: not re-read");
    bed.worker.refresh_gone(&*bed.shared, Some(2));
    assert!(bed.worker.gone.borrow().is_gone(B2, "pod-b", NOW_MS + 1));
    let host = FakeProxy::new(&[], NOW_MS);
    other.gone.borrow_mut().mark(&*host.shared, B1, Sighting::down(""), NOW_MS, 30_000);
    bed.worker.refresh_gone(&*host.shared, None);
    assert!(!bed.worker.gone.borrow().is_gone(B2, "pod-b", NOW_MS + 1), "no generation: read every time");
}

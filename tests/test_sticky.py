"""Signed sticky sessions through a real Envoy with the built filter."""

from __future__ import annotations

import time
from collections import Counter as Tally

from harness import Counters, expect, expect_equal, verify_cookie


def test_first_request_gets_a_signed_cookie(client, testbed, filter_config):
    reply = client.new_session()
    body = reply.body
    claims = verify_cookie(reply.cookie, filter_config)
    served_by = testbed.backend_named(body["backend"])
    now = time.time()
    expect_equal(claims.kid, filter_config["keys"][0]["id"], "key id (the first key signs)")
    expect_equal((claims.host, claims.instance), (served_by.address, served_by.instance),
                 "pinned host and instance (the backend that served the request)")
    expect_equal(len(claims.sid), 22, "session id length (16 random bytes, base64url)")
    expect(abs(claims.iat - now) < 60, "iat is now", now, claims.iat)
    expect_equal(claims.exp - claims.iat, 3600, "lifetime (cookie.ttl 1h)")
    expect_equal(claims.flags, 2, "flags: a new session's (its store entry lives store.new_session_ttl until the "
                 "cookie comes back)")
    expect_equal(body["session"], claims.sid, "session id the backend saw")
    expect_equal(body["received"].get("x-session-new"), "1", "x-session-new on the first request")
    expect_equal(body["count"], 1, "count")
    attributes = reply.cookie_attributes
    expect_equal(attributes, {"path": "/", "max-age": "3600", "httponly": "", "samesite": "Lax"},
                 "Set-Cookie attributes (testbed: secure false)")
    for header in ("x-session-state", "x-session-unknown"):
        expect(header not in reply.headers, f"{header} is stripped from the response", "absent",
               reply.headers.get(header))
    back = client.get(cookie=reply.cookie)
    expect(back.cookie, "the cookie's first return re-issues it", "Set-Cookie", back.describe())
    expect_equal(verify_cookie(back.cookie, filter_config).flags, 0, "flags once the cookie came back")


def test_hundred_requests_stay_on_one_backend(client):
    first = client.new_session()
    cookie = first.cookie
    backend, instance = first.body["backend"], first.body["instance"]
    for expected in range(2, 101):
        reply = client.get(cookie=cookie)
        body = reply.body
        expect_equal((body["backend"], body["instance"], body["count"], body["session"]),
                     (backend, instance, expected, first.body["session"]), f"request {expected} of the session")
        expect("x-session-new" not in body["received"], "x-session-new only on the first request", "absent",
               body["received"])
        cookie = reply.cookie or cookie  # a refreshed cookie replaces the old one, as in a browser


def test_requests_without_cookie_spread_over_all_backends(client, testbed):
    # A loaded machine can fail a health check or eject a host for a moment;
    # the load balancer spreads over the hosts it sees healthy.
    for backend in testbed.backends:
        testbed.envoy.wait_host_health(backend.address, True)
    served = Tally()
    sessions = set()
    for _ in range(30):
        body = client.new_session().body
        served[body["backend"]] += 1
        sessions.add(body["session"])
        expect_equal(body["count"], 1, "count of a new session")
    expect_equal(sorted(served), sorted(b.name for b in testbed.backends), "backends that served 30 new sessions")
    expect_equal(len(sessions), 30, "distinct session ids for 30 new sessions")


def test_pinned_requests_are_counted(client, testbed):
    cookie = client.new_session().cookie
    counters = Counters(testbed.envoy)
    for _ in range(5):
        client.get(cookie=cookie)
    counters.expect({"sessions.pinned": 5, "sessions.created": 0, "cookies.rejected.malformed": 0})

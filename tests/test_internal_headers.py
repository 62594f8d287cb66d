"""Clients cannot set internal headers: routing, session id, new-session flag
and session state sent by a client have no effect, and the app never sees them.
"""

from __future__ import annotations

import base64
import json
from collections import Counter as Tally

from harness import expect, expect_equal, verify_cookie


def route_header(address: str) -> str:
    """What the filter writes for Envoy's header session state: base64("ip:port")."""
    return base64.b64encode(address.encode()).decode()


def forged_state(count: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"count": count}).encode()).decode().rstrip("=")


def test_client_session_id_is_replaced(client):
    reply = client.get(headers={"x-session-id": "attacker-chosen-session"})
    body = reply.body
    expect(body["session"] != "attacker-chosen-session", "the app sees the filter's session id",
           "a fresh id", body["session"])
    expect_equal(body["received"].get("x-session-new"), "1", "it is a new session")
    expect(reply.cookie, "a cookie for the new session", "Set-Cookie", reply.describe())
    expect_equal(verify_cookie(reply.cookie, client.envoy.filter_config).sid, body["session"],
                 "the cookie carries the filter's id")


def test_client_session_id_cannot_switch_session(client):
    victim = client.new_session().body["session"]
    mine = client.new_session()
    body = client.get(cookie=mine.cookie, headers={"x-session-id": victim}).body
    expect_equal((body["session"], body["count"]), (mine.body["session"], 2),
                 "with a valid cookie, the app sees the cookie's session (session, count)")


def test_client_new_flag_is_removed(client):
    first = client.new_session()
    body = client.get(cookie=first.cookie, headers={"x-session-new": "1"}).body
    expect("x-session-new" not in body["received"], "x-session-new from a client never reaches the app",
           "absent", body["received"])
    expect_equal(body["count"], 2, "the session continues")


def test_client_state_is_removed(client):
    first = client.new_session()
    body = client.get(cookie=first.cookie, headers={"x-session-state": forged_state(1000)}).body
    expect("x-session-state" not in body["received"], "x-session-state from a client never reaches the app",
           "absent", body["received"])
    expect_equal(body["count"], 2, "the session continues with its own state, not the forged one")
    body = client.get(headers={"x-session-state": forged_state(1000)}).body
    expect("x-session-state" not in body["received"], "not on a new session either", "absent", body["received"])
    expect_equal(body["count"], 1, "a new session starts at 1")


def test_client_route_header_does_not_move_a_session(client, testbed):
    first = client.new_session()
    home = testbed.backend_named(first.body["backend"])
    elsewhere = next(b for b in testbed.backends if b is not home)
    # The wasm build steers through stateful_session with its own route
    # header; the native module overrides the host without one.
    filters_own = route_header(home.address) if testbed.module == "wasm" else None
    for expected in range(2, 12):
        body = client.get(cookie=first.cookie, headers={"x-session-route": route_header(elsewhere.address)}).body
        expect_equal((body["backend"], body["count"]), (home.name, expected),
                     f"request {expected} with a client route header to {elsewhere.name}")
        expect_equal(body["received"].get("x-session-route"), filters_own,
                     "the only route header upstream is the filter's own")


def test_client_route_header_does_not_steer_new_sessions(client, testbed):
    target = testbed.backends[0]
    served = Tally()
    for _ in range(15):
        body = client.get(headers={"x-session-route": route_header(target.address)}).body
        served[body["backend"]] += 1
        expect("x-session-route" not in body["received"], "a client's route header is removed", "absent",
               body["received"])
    expect_equal(sorted(served), sorted(b.name for b in testbed.backends),
                 f"backends that served 15 new sessions asking for {target.name}")

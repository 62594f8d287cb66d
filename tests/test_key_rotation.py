"""Key rotation across Envoy restarts: cookies signed with a key that is still
listed keep working; cookies signed with a removed key start a new session."""

from __future__ import annotations

import copy

from harness import Counters, User, expect_equal, verify_cookie

OLD = {"id": "old", "secret": "rotation-test-old-key-0123456789abcdef"}
NEW = {"id": "new", "secret": "rotation-test-new-key-0123456789abcdef"}
REASONS = ("malformed", "unknown_key", "bad_signature", "expired")


def with_keys(config: dict, *keys: dict) -> dict:
    changed = copy.deepcopy(config)
    changed["keys"] = list(keys)
    return changed


def test_rotation_keeps_cookies_of_listed_keys(own_testbed):
    envoy = own_testbed.envoy
    base = envoy.filter_config
    envoy.restart(with_keys(base, OLD))
    client = User(envoy=envoy, jar=False)
    first = client.new_session()
    old_cookie = first.cookie
    expect_equal(verify_cookie(old_cookie, envoy.filter_config).kid, "old", "key id before rotation")

    envoy.restart(with_keys(base, NEW, OLD))
    counters = Counters(envoy)
    body = client.get(cookie=old_cookie).body
    expect_equal((body["backend"], body["session"], body["count"]),
                 (first.body["backend"], first.body["session"], 2),
                 "an old-key cookie after rotation to [new, old] (backend, session, count)")
    counters.expect({"sessions.pinned": 1, "sessions.created": 0} | {f"cookies.rejected.{r}": 0 for r in REASONS})
    fresh = client.new_session()
    expect_equal(verify_cookie(fresh.cookie, envoy.filter_config).kid, "new", "new sessions are signed by the new key")

    envoy.restart(with_keys(base, NEW))
    counters = Counters(envoy)
    body = client.get(cookie=fresh.cookie).body
    expect_equal((body["session"], body["count"]), (fresh.body["session"], 2),
                 "a new-key cookie survives the restart that removes the old key")
    rejected = client.get(cookie=old_cookie)
    expect_equal((rejected.body["count"], rejected.body["received"].get("x-session-new")), (1, "1"),
                 "an old-key cookie after the old key was removed starts a new session (count, x-session-new)")
    expect_equal(verify_cookie(rejected.cookie or "", envoy.filter_config).kid, "new", "its new cookie's key id")
    counters.expect({"cookies.rejected.unknown_key": 1, "sessions.created": 1, "sessions.pinned": 1})


def test_cookies_work_across_envoy_replicas(own_testbed):
    """Two Envoys with the same keys accept each other's cookies."""
    client = User(envoy=own_testbed.envoy, jar=False)
    first = client.new_session()
    replica = own_testbed.start_envoy("envoy-replica")
    body = User(envoy=replica, jar=False).get(cookie=first.cookie).body
    expect_equal((body["backend"], body["session"], body["count"]),
                 (first.body["backend"], first.body["session"], 2), "the session through the other replica")

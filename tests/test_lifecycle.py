"""Sessions that end stay ended: the session lifecycle through the real Envoy,
the real store and the demo backend.

Ended is not lost. The filter restores a session's stored state only on
evidence that the state was lost (its host is gone, or its instance
restarted). When the app ends a session (logout answers x-session-end; an
expired session is "unknown" to the very instance the cookie names), the
stored copy becomes a tombstone and the cookie is dropped, so an old cookie,
stolen or kept, never brings the old state back: not after its host dies, and
not through another proxy replica.
"""

from __future__ import annotations

import time

import pytest

import cookie_signer
from harness import Counters, expect, expect_equal, keyring, settle_load_balancer, tb, verify_cookie
from harness import User, json_body, describe, stored, with_config


def session_on(bed, user: User, requests: int) -> dict:
    """`requests` requests of a new session for user; the last answer's body."""
    for expected in range(1, requests + 1):
        reply = user.send(bed.envoy.url)
        body = json_body(reply)
        expect(reply.status_code == 200 and body and body["count"] == expected, f"{user.name}: request {expected}",
               f"200 with count {expected}", describe(reply))
    return body


def record(bed, sid: str) -> dict:
    """The raw store entry of a session (a hash), {} when there is none."""
    flat = bed.redis_command("HGETALL", f"{bed.envoy.filter_config['store']['key_prefix']}{sid}") or []
    return dict(zip(flat[::2], flat[1::2]))


def expect_tombstone(bed, sid: str, what: str):
    entry = record(bed, sid)
    expect(entry == {"ended": "1"}, f"{what}: the store keeps only a tombstone for {sid}", {"ended": "1"}, entry)


def expect_fresh_session(reply, old_sid: str, what: str):
    body = json_body(reply)
    expect(reply.status_code == 200 and body and body["count"] == 1 and body["session"] != old_sid,
           f"{what}: a new, empty session (never the old state)", f"200, count 1, not session {old_sid}",
           describe(reply))


def kill_home(bed, body: dict):
    bed.kill_backend(bed.backends.index(bed.backend_named(body["backend"])))


def holder_of(cookie: str, name: str) -> User:
    """A client that sends this cookie value (kept, copied or stolen)."""
    holder = User(name)
    # As the testbed's server set it: host-only for 127.0.0.1, path /.
    holder.http.cookies.set("sa", cookie, domain="127.0.0.1", path="/")
    return holder


def restart_backends_with(bed: "tb.Testbed", args: list[str]):
    """Every backend restarted with these demo-app options; returns once Envoy sees them healthy."""
    bed.backend_args = args
    for index in range(len(bed.backends)):
        bed.restart_backend(index)
    for backend in bed.backends:
        bed.envoy.wait_host_health(backend.address, healthy=True)


def test_logout_is_never_undone_even_by_a_kept_cookie(own_testbed):
    bed = own_testbed
    user = User("user")
    body = session_on(bed, user, 3)
    sid = body["session"]
    kept = user.cookie  # a copy of the cookie from before the logout
    counters = Counters(bed.envoy)

    reply = user.send(bed.envoy.url, "/logout", method="POST")
    expect(reply.status_code == 200 and json_body(reply).get("ended"), "logout", "200, ended", describe(reply))
    set_cookie = reply.headers.get("set-cookie", "")
    expect(set_cookie.startswith("sa=;") and "Max-Age=0" in set_cookie, "the logout drops the cookie",
           "sa=; ...; Max-Age=0", set_cookie)
    expect_equal(user.cookie, None, "the browser's cookie after the logout")
    counters.expect({"sessions.ended": 1})
    expect_tombstone(bed, sid, "after the logout")

    # The kept cookie reaches the very instance that ended the session: it is
    # unknown there, so the request is repeated as a new session.
    expect_fresh_session(holder_of(kept, "thief").send(bed.envoy.url), sid, "the kept cookie on the live instance")
    # The host dies; the kept cookie fails over on this proxy and on a replica
    # that never saw the session: the tombstone wins everywhere.
    replica = bed.start_envoy("envoy-replica")
    kill_home(bed, body)
    for envoy in (bed.envoy, replica):
        reply = holder_of(kept, f"thief-via-{envoy.name}").send(envoy.url)
        expect_fresh_session(reply, sid, f"the kept cookie through {envoy.name} after the kill")
    expect_tombstone(bed, sid, "after the failovers")


LOGOUT_ROUNDS = 20
LOGOUT_DEADLINE = 300.0


def kept_cookie_after_the_kill(bed, kept: str, body: dict, name: str) -> str | None:
    """Sends a cookie kept from before a logout, its host just killed. Returns
    what went wrong, or None for a new, empty session on a live backend after
    at most one 307 (the new session's retries skip the dead host)."""
    reply = holder_of(kept, name).send(bed.envoy.url)
    after = json_body(reply) or {}
    if after.get("session") == body["session"] or (reply.status_code == 200 and after.get("count") != 1):
        return f"undone: {describe(reply)}"
    if reply.status_code != 200 or after.get("backend") == body["backend"] or len(reply.history) > 1:
        return f"{describe(reply)} after {len(reply.history)} redirects"
    return None


@pytest.mark.stores
def test_a_logout_is_durable_before_its_answer_over_repeated_kills(own_testbed):
    """Logout, then at once kill the host and send the cookie from before the
    logout, round after round, in async write mode: the logout's answer
    leaves only once the tombstone stands, so no failover restores it."""
    bed = own_testbed
    bed.envoy.restart(with_config(bed.envoy.filter_config, store={"write": "async"}))
    settle_load_balancer(bed.envoy)
    counters = Counters(bed.envoy)
    faults = []
    deadline = time.monotonic() + LOGOUT_DEADLINE
    for round_number in range(LOGOUT_ROUNDS):
        expect(time.monotonic() < deadline, f"{LOGOUT_ROUNDS} rounds within {LOGOUT_DEADLINE:g}s",
               LOGOUT_ROUNDS, round_number)
        user = User(f"user{round_number}")
        body = session_on(bed, user, 2)
        kept = user.cookie
        reply = user.send(bed.envoy.url, "/logout", method="POST")
        expect(reply.status_code == 200 and (json_body(reply) or {}).get("ended") and user.cookie is None,
               f"round {round_number}: logout", "200, ended, cookie dropped", describe(reply))
        index = bed.backends.index(bed.backend_named(body["backend"]))
        bed.kill_backend(index)
        fault = kept_cookie_after_the_kill(bed, kept, body, f"thief{round_number}")
        if fault:
            faults.append(f"round {round_number}: {fault}")
        bed.start_backend(index)
        bed.envoy.wait_host_health(bed.backends[index].address, healthy=True, timeout=15)
    print(f"{LOGOUT_ROUNDS} rounds: faults {faults}, counters {counters.deltas()}")
    expect_equal(faults, [], "rounds whose logout a failover undid, or that cost an error or a second 307")
    counters.expect({"sessions.ended_unconfirmed": 0})


def test_an_end_the_store_cannot_confirm_is_still_never_undone_on_this_proxy(own_testbed):
    """webdis is down while the app ends a session: the client still gets the
    app's answer with the cookie dropped, the end is counted, and after the
    store is back and the host dies, the kept cookie restores nothing
    through any worker of this proxy (the store still has the old state)."""
    bed = own_testbed
    user = User("user")
    body = session_on(bed, user, 3)
    sid, kept = body["session"], user.cookie
    counters = Counters(bed.envoy)
    bed.stop_webdis()
    reply = user.send(bed.envoy.url, "/logout", method="POST")
    bed.start_webdis()
    expect(reply.status_code == 200 and (json_body(reply) or {}).get("ended") and user.cookie is None,
           "logout while the store is down", "200, ended, cookie dropped", describe(reply))
    counters.expect({"sessions.ended": 1, "sessions.ended_unconfirmed": 1})
    expect(record(bed, sid).get("ended") is None, "the store never got the tombstone", "the old entry", record(bed, sid))
    kill_home(bed, body)
    # New connections, so both workers (concurrency 2) see the cookie.
    for attempt in range(6):
        expect_fresh_session(holder_of(kept, f"thief{attempt}").send(bed.envoy.url), sid,
                             f"the kept cookie after the kill, attempt {attempt}")


def test_a_session_the_app_expired_is_ended_not_restored(own_testbed):
    bed = own_testbed
    restart_backends_with(bed, ["--idle-timeout", "1.5"])
    user = User("user")
    body = session_on(bed, user, 3)
    sid = body["session"]
    kept = user.cookie
    time.sleep(2.0)  # idle past the app's session timeout
    counters = Counters(bed.envoy)

    reply = user.send(bed.envoy.url)
    expect_fresh_session(reply, sid, "the request after the app expired the session")
    counters.expect({"sessions.ended": 1, "failovers.known": 0, "failovers.replayed": 0, "failovers.restored": 0})
    expect_tombstone(bed, sid, "after the app expired it")
    # The pod dies later: its old cookie must not bring the old state back.
    kill_home(bed, body)
    expect_fresh_session(holder_of(kept, "thief").send(bed.envoy.url), sid, "the expired session's cookie after the kill")


def test_login_rotates_the_id_and_the_old_one_restores_nothing(own_testbed):
    bed = own_testbed
    user = User("user")
    body = session_on(bed, user, 2)
    old_sid = body["session"]
    old_cookie = user.cookie
    counters = Counters(bed.envoy)

    reply = user.send(bed.envoy.url, "/login?user=ann", method="POST")
    body = json_body(reply)
    new_sid = body["session"]
    expect(reply.status_code == 200 and new_sid != old_sid and body["user"] == "ann" and body["count"] == 3,
           "login", "200, a new id, user ann, count 3", describe(reply))
    claims = verify_cookie(user.cookie, bed.envoy.filter_config)
    expect_equal(claims.sid, new_sid, "the re-issued cookie names the new id")
    counters.expect({"sessions.rotated": 1})
    expect_tombstone(bed, old_sid, "the old id after the rotation")
    moved = stored(bed, new_sid)
    expect_equal(moved["count"], 3, "the stored state moved to the new id")
    # The old cookie: unknown to the instance (it renamed the session) -> a new session.
    expect_fresh_session(holder_of(old_cookie, "attacker").send(bed.envoy.url), old_sid, "the pre-login cookie")
    # The pod dies: the logged-in session survives under its new id, the old one restores nothing.
    kill_home(bed, body)
    reply = user.send(bed.envoy.url)
    after = json_body(reply)
    expect(reply.status_code == 200 and after and (after["session"], after["count"], after["user"]) == (new_sid, 4, "ann"),
           "the logged-in session after the kill", f"session {new_sid}, count 4, user ann", describe(reply))
    expect_fresh_session(holder_of(old_cookie, "attacker-after-kill").send(bed.envoy.url), old_sid,
                         "the pre-login cookie after the kill")


def test_no_session_outlives_its_absolute_lifetime(own_testbed):
    bed = own_testbed
    envoy = bed.envoy
    envoy.restart(with_config(envoy.filter_config, cookie={"ttl": "1h", "max_lifetime": "2h", "refresh_after": 0.001}))
    user = User("user")
    session_on(bed, user, 1)
    claims = verify_cookie(user.cookie, envoy.filter_config)
    keys = keyring(envoy.filter_config)
    now = int(time.time())

    # The same session, started 2 h - 100 s ago (the keys are the testbed's public ones).
    old = claims.but(since=now - 7100, iat=now - 60, exp=now + 3000)
    user.http.cookies.set("sa", cookie_signer.sign(old, keys[old.kid]), domain="127.0.0.1", path="/")
    reply = user.send(envoy.url)
    expect_equal(json_body(reply)["count"], 2, "the old session still works")
    refreshed = verify_cookie(user.cookie, envoy.filter_config)
    expect_equal(refreshed.exp, old.since + 7200, "a refresh never extends the cookie past since + max_lifetime")
    ttl_ms = bed.redis_command("PTTL", f"sa:{claims.sid}")
    expect(0 < ttl_ms <= 100_000, "the store entry expires with the session", "at most 100 s", f"{ttl_ms} ms")

    # Past the lifetime: a new session, whatever exp the cookie carries.
    counters = Counters(envoy)
    older = claims.but(since=now - 7201, iat=now - 60, exp=now + 3000)
    user.http.cookies.set("sa", cookie_signer.sign(older, keys[older.kid]), domain="127.0.0.1", path="/")
    expect_fresh_session(user.send(envoy.url), claims.sid, "a cookie past the session's lifetime")
    counters.expect({"cookies.rejected.expired": 1, "sessions.created": 1})


def test_a_restart_of_an_app_without_unknown_moves_the_owner(own_testbed):
    """Found in review: re-pinning to a restarted instance without a lease and
    without state left the old owner in the store, so the next write was
    refused (503) and the client re-pinned to the dead instance."""
    bed = own_testbed
    restart_backends_with(bed, ["--without-unknown"])
    user = User("user")
    body = session_on(bed, user, 2)
    sid = body["session"]
    index = bed.backends.index(bed.backend_named(body["backend"]))
    restarted = bed.restart_backend(index)
    bed.envoy.wait_host_health(restarted.address, healthy=True)
    counters = Counters(bed.envoy)

    for expected in (1, 2, 3):  # the restarted app started the session over, as such apps do
        reply = user.send(bed.envoy.url)
        body = json_body(reply)
        expect(reply.status_code == 200 and body and body["count"] == expected and not reply.history,
               f"request {expected} after the restart", f"200, count {expected}, no redirect", describe(reply))
    expect_equal(verify_cookie(user.cookie, bed.envoy.filter_config).instance, restarted.instance,
                 "the cookie follows the new instance")
    expect_equal((stored(bed, sid)["owner"], stored(bed, sid)["count"]), (f"{restarted.address}#{restarted.instance}", 3),
                 "the store's owner and state follow the new instance")
    counters.expect({"failovers.restart": 1, "store.writes_rejected": 0})


def test_a_failover_that_cannot_use_the_stored_state_gives_its_lease_back(own_testbed):
    """Found in review: with unusable stored state the lease was left to expire."""
    bed = own_testbed
    user = User("user")
    body = session_on(bed, user, 2)
    sid = body["session"]
    bed.redis_command("HSET", f"sa:{sid}", "state", "not\na header value")
    kill_home(bed, body)
    reply = user.send(bed.envoy.url)
    expect_fresh_session(reply, sid, "a failover whose stored state is unusable (on_outage: fresh)")
    # The worker gives the lease back right after the response (not the stream: it may be gone).
    tb.wait_until(lambda: bed.redis_command("GET", f"sa:{sid}:lease") is None, 3.0, "the lease given back")

"""What one client can and cannot do to other users' sessions.

Real Envoy with the built filter (wasm or native), the demo backends, Redis
behind webdis (Debian's webdis 0.1.9) or three etcd members; all on
127.0.0.1. Each test plays a hostile client's move and checks that the
other users' sessions keep their state through a failover, and that the
store's circuit breaker, which every user shares, stays closed.
"""

from __future__ import annotations

import socket
import time

import pytest
import requests

from harness import (Checks, User, changes, describe, drive, expect, expect_equal, in_parallel, json_body, settle_load_balancer,
                     settled_counters, tb, with_config)

# State sizes (the x-session-state value) tried; the last is over the
# default store.max_state_bytes (32 KiB).
SIZES_KIB = [1, 4, 16, 64]
MAX_STATE_BYTES = 32 * 1024
VICTIMS = 6


def user_name_for(kib: int) -> str:
    """A user name that makes the demo app's state about `kib` KiB: the state
    is base64url of {"sid", "count", "user"} (4 characters per 3 bytes)."""
    return "u" * (kib * 1024 * 3 // 4 - 60)


def large_app_headers(bootstrap: dict):
    """The app cluster accepts response headers up to 128 KiB (Envoy's
    default is 60), so a 64 KiB state reaches the filter."""
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["name"] == tb.APP_CLUSTER:
            options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            options["common_http_protocol_options"] = {"max_response_headers_kb": 128}


@pytest.mark.stores
def test_a_large_session_state_costs_no_one_else(own_testbed):
    """Sessions whose states are 1, 4, 16 and 64 KiB, and small victims; then
    every backend restarts (its sessions are lost in memory). Every state up to
    the cap comes back whole; the 64 KiB one was never stored (counted); the victims keep
    theirs; no store call times out and the breaker never opens."""
    bed, envoy = own_testbed, own_testbed.envoy
    bed.bootstrap_patches.append(large_app_headers)
    envoy.restart(with_config(envoy.filter_config, store={"breaker": {"failures": 3, "cooldown": "5s"}}))
    settle_load_balancer(envoy)
    checks = Checks()
    before = settled_counters(envoy)
    large = {}
    for kib in SIZES_KIB:
        user = User(f"state{kib}k")
        checks.expect_equal(drive(user, envoy.url, 1, 1), [], f"{user.name}: a new session")
        reply = user.send(envoy.url, "/login", "POST", data={"user": user_name_for(kib)})
        body = json_body(reply) or {}
        checks.expect(reply.status_code == 200 and body.get("count") == 2, f"{user.name}: login",
                      "200 with count 2", describe(reply)[:300])
        large[kib] = user
    victims = [User(f"victim{i}") for i in range(VICTIMS)]
    for victim in victims:
        checks.expect_equal(drive(victim, envoy.url, 1, 2), [], f"{victim.name}: a session with stored state")

    for index in range(len(bed.backends)):
        bed.restart_backend(index)
    for backend in bed.backends:
        envoy.wait_host_health(backend.address, healthy=True, timeout=15)

    for kib, user in large.items():
        reply = user.send(envoy.url)
        body = json_body(reply) or {}
        kept = kib * 1024 <= MAX_STATE_BYTES
        # Over the cap: the login's state was not stored. The store still
        # has the state from before the login, which names the id before
        # the rotation: the app refuses it, and the session starts afresh.
        expected = (200, 3, True) if kept else (200, 1, False)
        checks.expect_equal((reply.status_code, body.get("count"), body.get("user") == user_name_for(kib)), expected,
                            f"{user.name}: after the restart (status, count, the user name is its own)")
    for victim in victims:
        checks.expect_equal(drive(victim, envoy.url, 3, 1), [], f"{victim.name}: its state after the restart")
    delta = changes(before, settled_counters(envoy))
    checks.expect_equal({name: delta.get(name, 0) for name in
                         ("store.timeouts", "store.errors", "store.breaker_opened", "store.breaker_rejected",
                          "store.writes_unprotected")},
                        {"store.timeouts": 0, "store.errors": 0, "store.breaker_opened": 0,
                         "store.breaker_rejected": 0, "store.writes_unprotected": 0},
                        f"store trouble ({delta})")
    checks.expect_equal(delta.get("store.states_oversize", 0), 1, f"states over the cap ({delta})")
    checks.done()


LIVE_SESSIONS = 50
# Redis may use this much more memory than it did before the flood: room
# for about a thousand of the flood's entries.
FLOOD_HEADROOM_BYTES = 600_000
FLOOD_REQUESTS = 4_000
FLOOD_DEADLINE = 120.0


def redis_info(bed, field: str) -> int:
    section = bed.redis_command("INFO", "memory" if field.startswith("used_memory") else "stats")
    return int(next(line.split(":", 1)[1] for line in section.splitlines() if line.startswith(field + ":")))


def test_a_cookieless_flood_evicts_no_live_session(own_testbed):
    """50 sessions in use; Redis gets little room above what it holds; a
    flood of cookieless requests (each a new session the app gives state)
    fills it, so Redis evicts. Every live session keeps its state through
    a restart of every backend: the flood's entries, short-lived until
    their cookie comes back, are the ones evicted."""
    bed, envoy = own_testbed, own_testbed.envoy
    settle_load_balancer(envoy)
    live = [User(f"live{i}") for i in range(LIVE_SESSIONS)]
    problems = sum(in_parallel(lambda user: drive(user, envoy.url, 1, 2), live), [])
    expect_equal(problems, [], "live sessions with stored state")
    bed.redis_command("CONFIG", "SET", "maxmemory", str(redis_info(bed, "used_memory") + FLOOD_HEADROOM_BYTES))
    evicted_before = redis_info(bed, "evicted_keys")
    deadline = time.monotonic() + FLOOD_DEADLINE

    def flood(batch: int) -> int:
        answered = 0
        with requests.Session() as http:
            for _ in range(FLOOD_REQUESTS // 8):
                if time.monotonic() > deadline:
                    break
                http.cookies.clear()
                answered += http.get(envoy.url, timeout=10).status_code == 200
        return answered

    try:
        answered = sum(in_parallel(flood, range(8), workers=8, timeout=FLOOD_DEADLINE + 30))
        evicted = redis_info(bed, "evicted_keys") - evicted_before
    finally:
        bed.redis_command("CONFIG", "SET", "maxmemory", "64mb")
    checks = Checks()
    checks.expect(evicted > 0, f"the flood filled the store ({answered} answered)", "keys evicted", evicted)
    for index in range(len(bed.backends)):
        bed.restart_backend(index)
    for backend in bed.backends:
        envoy.wait_host_health(backend.address, healthy=True, timeout=15)
    lost = [p for p in in_parallel(lambda user: drive(user, envoy.url, 3, 1), live) if p]
    checks.expect_equal(lost, [], f"live sessions that lost their state to the flood ({evicted} keys evicted)")
    checks.done()


HEADERS_TIMEOUT = 10.0  # request_headers_timeout in envoy/testbed.yaml
SLOW_CLIENTS = 20


def shipped_request_headers_timeout() -> float:
    hcm = tb.load_bootstrap()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return float(hcm["request_headers_timeout"].rstrip("s"))


def test_a_client_that_never_finishes_its_headers_is_cut_off(own_testbed):
    """Slowloris: connections that send part of their headers and then
    nothing are closed by the proxy after request_headers_timeout (the
    shipped config's), and a normal client is served meanwhile."""
    envoy = own_testbed.envoy
    expect_equal(shipped_request_headers_timeout(), HEADERS_TIMEOUT, "the shipped request_headers_timeout")
    slow = []
    for _ in range(SLOW_CLIENTS):
        sock = socket.create_connection(("127.0.0.1", envoy.listener), timeout=HEADERS_TIMEOUT * 3)
        sock.sendall(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nx-partial: ")
        slow.append(sock)
    try:
        expect_equal(drive(User("normal"), envoy.url, 1, 1), [], "a normal client while the slow ones hang")
        started = time.monotonic()
        closed = 0
        for sock in slow:
            try:
                while sock.recv(65536):
                    pass  # Envoy's 408, then the close
                closed += 1
            except OSError:
                pass
        waited = time.monotonic() - started
    finally:
        for sock in slow:
            sock.close()
    expect_equal(closed, SLOW_CLIENTS, f"slow connections the proxy closed (within {waited:.1f}s)")
    timeouts = envoy.stats("http.app.downstream_rq_header_timeout").get("http.app.downstream_rq_header_timeout", 0)
    expect_equal(timeouts, SLOW_CLIENTS, "http.app.downstream_rq_header_timeout")


CONNECTION_LIMIT = 20


def limit_connections(bootstrap: dict):
    for monitor in bootstrap["overload_manager"]["resource_monitors"]:
        if monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections":
            monitor["typed_config"]["max_active_downstream_connections"] = CONNECTION_LIMIT


def test_downstream_connections_are_capped(own_testbed):
    """The overload manager's connection cap (lowered here to 20) refuses
    connections beyond it; those within it are served."""
    bed, envoy = own_testbed, own_testbed.envoy
    bed.bootstrap_patches.append(limit_connections)
    envoy.restart()
    held = []
    try:
        for _ in range(CONNECTION_LIMIT * 2):
            held.append(socket.create_connection(("127.0.0.1", envoy.listener), timeout=5))
        refused = 0
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        for sock in held:
            try:
                refused += not sock.recv(65536)
            except OSError:
                refused += 1
    finally:
        for sock in held:
            sock.close()
    overflow = sum(v for k, v in envoy.stats("listener.").items() if k.endswith("downstream_global_cx_overflow"))
    expect(refused >= CONNECTION_LIMIT - 2 and overflow >= CONNECTION_LIMIT - 2,
           "connections over the cap refused (a few may be the admin's or the health checker's)",
           f"about {CONNECTION_LIMIT}", f"{refused} refused, downstream_global_cx_overflow {overflow}")


CONCURRENT_CLIENTS = 600


def test_a_cookieless_flood_never_opens_the_breaker(own_testbed):
    """600 concurrent cookieless requests (each a new session whose state the
    filter writes): the store calls queue in Envoy instead of overflowing its
    limits, the breaker stays closed, and victims whose hosts restart right
    after the flood get their state back."""
    bed, envoy = own_testbed, own_testbed.envoy
    settle_load_balancer(envoy)
    victims = [User(f"victim{i}") for i in range(6)]
    for victim in victims:
        expect_equal(drive(victim, envoy.url, 1, 2), [], f"{victim.name}: a session with stored state")
    before = settled_counters(envoy)
    request = f"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode()
    sockets = []
    try:
        for _ in range(CONCURRENT_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", envoy.listener), timeout=30)
            sockets.append(sock)
        for sock in sockets:
            sock.sendall(request)
        answered = 0
        for sock in sockets:
            try:
                answered += sock.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                pass
    finally:
        for sock in sockets:
            sock.close()
    for index in range(len(bed.backends)):
        bed.restart_backend(index)
    for backend in bed.backends:
        envoy.wait_host_health(backend.address, healthy=True, timeout=15)
    lost = [p for p in (drive(user, envoy.url, 3, 1) for user in victims) if p]
    delta = changes(before, settled_counters(envoy))
    overflow = envoy.stats(f"cluster.{tb.STORE_CLUSTER}.upstream_rq_pending_overflow")
    checks = Checks()
    checks.expect(answered >= CONCURRENT_CLIENTS * 0.9, "the flood was served", f">= 90% of {CONCURRENT_CLIENTS}",
                  answered)
    checks.expect_equal((delta.get("store.breaker_opened", 0), delta.get("store.breaker_rejected", 0)), (0, 0),
                        f"the breaker never opened ({delta}; {overflow})")
    checks.expect_equal(lost, [], "victims that lost their state")
    checks.done()

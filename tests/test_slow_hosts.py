"""Slow and frozen hosts.

A client's own slow requests (each runs past the route timeout: 504 UT) must
not move anyone else's session: Envoy counts a timeout as a local-origin
failure, like a refused connection, so outlier ejection on those would let one
client eject a live host and fail over every session pinned there (issue 24,
finding 4). The shipped configs eject nothing; dead hosts are found by the
health checks and by the request that meets them.

A frozen backend (SIGSTOP: the kernel still accepts connections, nothing
answers) costs its sessions a bounded delay, the route timeout, and then a
failover with their state, once the health checks have taken it out: reached
directly, and through sidecars (`--mesh`), where the app freezes behind its
live sidecar (issue 21, section 2.2). FROZEN_SESSIONS sessions are pinned
there, and each one's timeouts and redirects are counted.

Both use a 1 s route timeout (the testbed's is 15 s) to keep the test short.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from harness import User, describe, expect, health, in_parallel, json_body, start_sessions

ROUTE_TIMEOUT = "1s"
SLOW_MS = 2500
SLOW_REQUESTS = 12
FROZEN_SESSIONS = 20
# Route timeouts a session may meet before its failover: health checks take
# the frozen host out after a few of their own timeouts.
MAX_TIMEOUTS = 8


def short_route_timeout(bootstrap: dict):
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        route["route"]["timeout"] = ROUTE_TIMEOUT


def with_short_route_timeout(bed):
    bed.bootstrap_patches.append(short_route_timeout)
    bed.envoy.restart()


def test_slow_requests_move_no_one_elses_session(own_testbed):
    bed, envoy = own_testbed, own_testbed.envoy
    with_short_route_timeout(bed)
    by_backend = start_sessions(bed, envoy.url, 9, min_each=3)
    target = bed.backends[0].name
    attacker, *victims = by_backend[target]
    others = [u for name, group in by_backend.items() if name != target for u in group]
    counts = {u.name: json_body(u.replies[-1])["count"] for u in victims + others}
    stop = threading.Event()
    problems: list[str] = []

    def click(user: User):
        while not stop.is_set():
            try:
                reply = user.send(envoy.url)
            except requests.RequestException as err:
                problems.append(f"{user.name}: {err!r}")
                return
            body = json_body(reply) or {}
            home = target if user in victims else body.get("backend")
            if (reply.status_code, body.get("count"), body.get("backend"), len(reply.history)) != (
                    200, counts[user.name] + 1, home, 0):
                problems.append(f"{user.name}: expected 200, count {counts[user.name] + 1} on {home}, no 307; "
                                f"got {describe(reply)}")
                return
            counts[user.name] += 1
            time.sleep(0.05)

    def slow(index: int) -> int:
        time.sleep(index * 0.3)  # staggered, as an attacker keeps a host busy
        return attacker.with_cookie(f"slow{index}").send(envoy.url, f"/slow?ms={SLOW_MS}", "POST").status_code

    clickers = [threading.Thread(target=click, args=(u,)) for u in victims + others]
    for thread in clickers:
        thread.start()
    try:
        statuses = in_parallel(slow, range(SLOW_REQUESTS), workers=SLOW_REQUESTS, timeout=60)
    finally:
        stop.set()
        for thread in clickers:
            thread.join(15)
    ejections = envoy.stats("cluster.app.outlier_detection.").get("cluster.app.outlier_detection.ejections_enforced_total", 0)
    expect(not problems and ejections == 0,
           f"{len(victims)} sessions on {target} and {len(others)} elsewhere, clicking meanwhile",
           "every answer 200 from the session's own host, counts continuing, no 307, no ejection",
           f"{problems[:5]}, {ejections} ejections; {health(envoy)}")
    expect(statuses.count(504) == SLOW_REQUESTS, f"{SLOW_REQUESTS} requests past the route timeout on {target}",
           "504 each", statuses)


@pytest.mark.mesh
def test_a_frozen_backend_costs_a_bounded_delay_then_a_failover_with_state(own_testbed):
    bed, envoy = own_testbed, own_testbed.envoy
    with_short_route_timeout(bed)
    by_backend = start_sessions(bed, envoy.url, FROZEN_SESSIONS * len(bed.backends), min_each=FROZEN_SESSIONS)
    frozen = bed.backends[0]
    # In mesh mode the process is the app: its sidecar stays up and answering.
    users = by_backend[frozen.name][:FROZEN_SESSIONS]
    counts = {u.name: json_body(u.replies[-1])["count"] for u in users}
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        def until_served(user: User) -> tuple[int, float, dict, int, str]:
            started, timeouts = time.monotonic(), 0
            while time.monotonic() - started < 30:
                reply = user.send(envoy.url)
                if reply.status_code != 504:
                    return timeouts, time.monotonic() - started, json_body(reply) or {}, len(reply.history), describe(reply)
                timeouts += 1
            return timeouts, time.monotonic() - started, {}, 0, "still 504 after 30 s"

        results = in_parallel(until_served, users, workers=len(users), timeout=90)
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    print(f"{len(users)} sessions on the frozen {frozen.name}: route timeouts {[r[0] for r in results]}, "
          f"redirects {[r[3] for r in results]}, seconds {[round(r[1], 1) for r in results]}")
    failed = [f"{user.name}: {timeouts} timeouts, {took:.1f}s: {what}"
              for user, (timeouts, took, body, redirects, what) in zip(users, results)
              if not (body.get("count") == counts[user.name] + 1 and body.get("backend") != frozen.name
                      and redirects <= 1 and timeouts <= MAX_TIMEOUTS)]
    expect(not failed, f"{len(users)} sessions pinned to the frozen {frozen.name}",
           f"each one's state on a live host after at most {MAX_TIMEOUTS} route timeouts and one 307",
           f"{len(failed)} did not: {failed[:5]}; {health(envoy)}")

"""A pod killed under continuous traffic: no client sees an error, no session
loses its state, and a failover costs at most one 307.

Each session keeps sending GETs (like a user clicking around) while the
backend that holds the most sessions is SIGKILLed. A GET that was riding a
pooled connection at the instant of the kill gets Envoy's 503 UC: GET is safe
to repeat (RFC 9110 section 9.2.2), so the filter answers it with the replay
307 instead of the error. The replay, and any request found gone, fails over
once: the router's retries skip a host they already tried, so a failover
never lands on the dead host twice. Five rounds in a row, each with a fresh
kill.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import requests

from harness import expect
from harness import User, describe, health, json_body, start_sessions

ROUNDS = 5
SESSIONS = 15
RUN_BEFORE_KILL = 1.0
RUN_AFTER_KILL = 2.5


def keep_clicking(user: User, url: str, stop: threading.Event, log: list):
    """GETs with a short think time until stop; logs (status, count, redirects, description)."""
    while not stop.is_set():
        try:
            reply = user.send(url)
        except requests.RequestException as err:
            log.append((None, None, 0, repr(err)))
            continue
        body = json_body(reply)
        log.append((reply.status_code, body.get("count") if body else None, len(reply.history), describe(reply)))
        time.sleep(random.uniform(0.01, 0.03))


@pytest.mark.mesh
def test_killing_a_backend_under_continuous_gets_shows_no_error_and_loses_nothing(own_testbed):
    bed, envoy = own_testbed, own_testbed.envoy
    by_backend = start_sessions(bed, envoy.url, SESSIONS, min_each=3)
    users = [u for group in by_backend.values() for u in group]
    counts = {u.name: json_body(u.replies[-1])["count"] for u in users}
    for round_number in range(1, ROUNDS + 1):
        homes = {u.name: json_body(u.replies[-1])["backend"] for u in users}
        victim = max(bed.backends, key=lambda b: sum(h == b.name for h in homes.values()))
        logs = {u.name: [] for u in users}
        stop = threading.Event()
        threads = [threading.Thread(target=keep_clicking, args=(u, envoy.url, stop, logs[u.name])) for u in users]
        for thread in threads:
            thread.start()
        time.sleep(RUN_BEFORE_KILL)
        bed.kill_backend(bed.backends.index(victim))
        time.sleep(RUN_AFTER_KILL)
        stop.set()
        for thread in threads:
            thread.join(15)
        expect(not any(t.is_alive() for t in threads), f"round {round_number}: clients stop", "all stopped",
               "some still running")

        problems = []
        for user in users:
            for status, count, redirects, what in logs[user.name]:
                if status != 200 or count != counts[user.name] + 1:
                    problems.append(f"{user.name}: expected 200 with count {counts[user.name] + 1}, got {what}")
                    break
                if redirects > 1:
                    problems.append(f"{user.name}: {redirects} redirects in one failover: {what}")
                counts[user.name] = count
        moved = sum(1 for u in users if homes[u.name] == victim.name)
        expect(not problems, f"round {round_number}: {victim.name} killed under {len(users)} clicking sessions "
               f"({moved} of them on it)", "every answer 200, every count continuing, at most one 307",
               "\n".join(problems) + f"\n{health(envoy)}")
        bed.start_backend(bed.backends.index(victim))
        envoy.wait_host_health(victim.address, healthy=True, timeout=15)

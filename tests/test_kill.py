"""A pod killed under continuous traffic: no client sees an error, no session
loses its state, and a failover costs at most one 307.

Each session keeps sending GETs (like a user clicking around) while the
backend that holds the most sessions is SIGKILLed. A GET that was riding a
pooled connection at the instant of the kill gets Envoy's 503 UC: GET is safe
to repeat (RFC 9110 section 9.2.2), so the filter answers it with the replay
307 instead of the error. The replay, and any request found gone, fails over
once: the router's retries skip a host they already tried, so a failover
never lands on the dead host twice. Twenty rounds in a row, each with a
fresh kill, counting the answers, 307s and errors of every round.
"""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest
import requests

from harness import User, demo_state, describe, expect, health, json_body, start_sessions

ROUNDS = 20
SESSIONS = 15
RUN_BEFORE_KILL = 1.0
RUN_AFTER_KILL = 1.5


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
               "\n".join(problems) + f"\n{health(envoy)}; {envoy.stats('cluster.app.upstream_rq_retry')}")
        bed.start_backend(bed.backends.index(victim))
        envoy.wait_host_health(victim.address, healthy=True, timeout=15)


class DiesMidResponse:
    """An app that keeps sessions but dies in the middle of every response:
    it sends the headers (new state included, as the demo app would: the
    change is made) and closes before the body, like a pod killed between
    two writes of a response. It answers /healthz and speaks as `instance`,
    so the filter takes it for the pinned instance."""

    def __init__(self, port: int, instance: str, count: int):
        self.instance = instance
        self.count = count
        self.listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self):
        # close() alone leaves the socket listening while the serving thread
        # is blocked in accept(): the next connection would still reach it.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                conn.sendall(self._answer(head))

    def _answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].startswith("GET /healthz "):
            body = b'{"status": "ok"}'
            return (f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nx-instance-id: {self.instance}\r\n"
                    "connection: close\r\n\r\n").encode() + body
        sid = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("x-session-id:")), "")
        self.count += 1
        state = demo_state(sid, self.count)
        return (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 200\r\n"
                f"x-instance-id: {self.instance}\r\nx-session-state: {state}\r\n\r\n").encode()


def test_a_response_cut_by_the_apps_death_is_an_error_and_its_change_is_kept(own_testbed):
    """The filter holds a response's headers until the store has its state
    (sync writes). When the app dies before the body, Envoy answers 502 (its
    "reset before headers ... protocol error") instead of a 200 cut short;
    the filter never sees that answer. The session is not lost: the failover
    restores either the cut answer's change (the app made it; the wasm build's
    store calls belong to the worker, so the write completes without the
    stream) or the last state the client saw (the native module's store calls
    belong to the stream, and Envoy cancels them with it, so the change is kept
    only if the store had already applied it). Either way the state is never
    older than what the client saw. The cut reaches the client either as that
    502 or, when the store answered before Envoy read the close, as the
    app's headers with a body cut short: an error either way."""
    bed, envoy = own_testbed, own_testbed.envoy
    user = User("cut")
    first = json_body(user.send(envoy.url))
    expect(first is not None and first.get("count") == 1, "a new session", "count 1", describe(user.replies[-1]))
    home = bed.backend_named(first["backend"])
    bed.kill_backend(bed.backends.index(home))
    dying = DiesMidResponse(int(home.address.rsplit(":", 1)[1]), home.instance, count=1)
    try:
        try:
            cut = user.send(envoy.url)
            expect(cut.status_code == 502 and "protocol error" in cut.text, "the answer whose body never came",
                   "502 (protocol error), or its headers and a body cut short", describe(cut))
        except requests.exceptions.ChunkedEncodingError:
            pass  # the headers went out, the body never came
    finally:
        dying.close()
    after = user.send(envoy.url)
    body = json_body(after) or {}
    expect(after.status_code == 200 and body.get("count") in (2, 3) and len(after.history) == 1,
           "the next request, after the app is gone",
           "200 with count 3 (the cut answer's change kept) or 2 (the last one seen), after one 307",
           describe(after))

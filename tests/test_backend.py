"""The demo backend keeps the app contract the filter relies on.

The e2e tests read the backend's answers to decide where a request went and
what reached the app, so the backend itself is checked first, directly.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time

import pytest
import requests

from harness import demo_state, expect, expect_equal, read_demo_state, tb


def start_backend(tmp_path, *extra):
    port = tb.free_ports(1)[0]
    argv = [sys.executable, "-u", str(tb.BACKEND_APP), "--name", "t", "--port", str(port), *extra]
    process = tb.Process("backend-t", argv, tmp_path / f"backend-{port}.log")
    process.start()
    url = f"http://127.0.0.1:{port}"
    tb.wait_until(lambda: process.ensure_alive() or tb.http_get(f"{url}/healthz")[0] == 200, 10, "demo backend")
    return process, url


@pytest.fixture
def backend(tmp_path):
    process, url = start_backend(tmp_path, "--instance", "t-1")
    yield url
    process.stop()


def test_health_and_identity(backend):
    reply = requests.get(f"{backend}/healthz", timeout=5)
    expect_equal(reply.status_code, 200, "GET /healthz")
    expect_equal(reply.headers.get("x-instance-id"), "t-1", "x-instance-id on every response")


def test_without_session_every_request_counts_one(backend):
    for _ in range(3):
        reply = requests.get(f"{backend}/", timeout=5)
        expect_equal(reply.json()["count"], 1, "count without x-session-id")
        expect("x-session-state" not in reply.headers, "no state without a session", "no x-session-state",
               dict(reply.headers))


def test_unknown_session_is_refused_and_changes_nothing(backend):
    for _ in range(2):
        reply = requests.get(f"{backend}/", headers={"x-session-id": "s1"}, timeout=5)
        expect_equal(reply.status_code, 409, "status for an unknown session")
        expect_equal(reply.headers.get("x-session-unknown"), "1", "x-session-unknown")
        expect("x-session-state" not in reply.headers, "no state change", "no x-session-state", dict(reply.headers))
    reply = requests.get(f"{backend}/", headers={"x-session-id": "s1", "x-session-new": "1"}, timeout=5)
    expect_equal(reply.json()["count"], 1, "first count after x-session-new (the 409s did nothing)")


def test_session_counts_and_emits_state(backend):
    headers = {"x-session-id": "s2", "x-session-new": "1"}
    for expected in (1, 2, 3):
        reply = requests.post(f"{backend}/", headers=headers, data=b"body", timeout=5)
        headers = {"x-session-id": "s2"}
        body = reply.json()
        expect_equal((body["session"], body["count"], body["instance"]), ("s2", expected, "t-1"), "session answer")
        expect_equal(read_demo_state(reply.headers["x-session-state"]),
                     {"sid": "s2", "count": expected, "user": None}, "x-session-state (bound to its session)")


def test_restore_replaces_local_state(backend):
    restored = demo_state("s3", 41)
    reply = requests.get(f"{backend}/", headers={"x-session-id": "s3", "x-session-state": restored}, timeout=5)
    expect_equal(reply.json()["count"], 42, "count after restoring {count: 41}")
    expect_equal(reply.json()["received"]["x-session-state"], restored, "restore state reported as received")
    bad = requests.get(f"{backend}/", headers={"x-session-id": "s3", "x-session-state": "%%"}, timeout=5)
    expect_equal(bad.status_code, 400, "status for undecodable state")


def test_another_sessions_state_is_refused_and_counted(backend):
    foreign = demo_state("s7", 9)
    reply = requests.get(f"{backend}/", headers={"x-session-id": "s6", "x-session-state": foreign}, timeout=5)
    expect_equal((reply.status_code, reply.headers.get("x-session-unknown")), (409, "1"),
                 "a state made for another session is answered as unknown")
    expect_equal(requests.get(f"{backend}/stats", timeout=5).json()["foreign_states"], 1, "foreign states seen")


def test_login_rotates_the_id_and_logout_ends_the_session(backend):
    requests.get(f"{backend}/", headers={"x-session-id": "s8", "x-session-new": "1"}, timeout=5)
    login = requests.post(f"{backend}/login?user=ann", headers={"x-session-id": "s8"}, timeout=5)
    new_sid = login.headers["x-session-rotate"]
    expect_equal((len(new_sid), login.json()["session"], login.json()["user"]), (22, new_sid, "ann"),
                 "login answers the new id (length, session, user)")
    expect_equal(read_demo_state(login.headers["x-session-state"])["sid"], new_sid, "the state is made for the new id")
    old = requests.get(f"{backend}/", headers={"x-session-id": "s8"}, timeout=5)
    expect_equal(old.status_code, 409, "the old id is unknown after the rotation")
    kept = requests.get(f"{backend}/", headers={"x-session-id": new_sid}, timeout=5).json()
    expect_equal((kept["count"], kept["user"]), (3, "ann"), "the session continues under the new id")
    logout = requests.post(f"{backend}/logout", headers={"x-session-id": new_sid}, timeout=5)
    expect_equal((logout.status_code, logout.headers.get("x-session-end")), (200, "1"), "logout ends the session")
    after = requests.get(f"{backend}/", headers={"x-session-id": new_sid}, timeout=5)
    expect_equal(after.status_code, 409, "an ended session is unknown")


def test_idle_sessions_end_and_apps_without_unknown_serve_them_fresh(tmp_path):
    process, url = start_backend(tmp_path, "--idle-timeout", "0.3")
    try:
        requests.get(f"{url}/", headers={"x-session-id": "s9", "x-session-new": "1"}, timeout=5)
        time.sleep(0.5)
        expect_equal(requests.get(f"{url}/", headers={"x-session-id": "s9"}, timeout=5).status_code, 409,
                     "an idle session ended")
    finally:
        process.stop()
    process, url = start_backend(tmp_path, "--without-unknown")
    try:
        reply = requests.get(f"{url}/", headers={"x-session-id": "s10"}, timeout=5)
        expect_equal((reply.status_code, reply.json()["count"]), (200, 1), "an unknown session served fresh")
    finally:
        process.stop()


def test_slow_counts_before_it_waits(backend):
    new = requests.get(f"{backend}/", headers={"x-session-id": "s4", "x-session-new": "1"}, timeout=5)
    expect_equal(new.json()["count"], 1, "first count")
    slow = {}
    thread = threading.Thread(target=lambda: slow.update(reply=requests.post(
        f"{backend}/slow?ms=1500", headers={"x-session-id": "s4"}, timeout=10)))
    started = time.monotonic()
    thread.start()
    time.sleep(0.5)
    during = requests.get(f"{backend}/", headers={"x-session-id": "s4"}, timeout=5)
    expect_equal(during.json()["count"], 3, "count while /slow is still waiting (it counted first)")
    thread.join(10)
    expect(time.monotonic() - started >= 1.4, "/slow waited", ">= 1.5 s", f"{time.monotonic() - started:.2f} s")
    expect_equal(slow["reply"].json()["count"], 2, "count answered by /slow")


def test_static_has_no_session(backend):
    reply = requests.get(f"{backend}/static/app.css", headers={"x-session-id": "s5"}, timeout=5)
    expect_equal((reply.status_code, reply.headers["content-type"]), (200, "text/css"), "static answer")
    expect("x-session-state" not in reply.headers and "x-session-unknown" not in reply.headers,
           "static paths carry no session", "no session headers", dict(reply.headers))


def test_keep_alive(backend):
    port = int(backend.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for method in ("GET", "POST", "GET"):
            connection.request(method, "/", body=b"x" * 10 if method == "POST" else None)
            response = connection.getresponse()
            response.read()
            expect_equal((response.status, response.version), (200, 11), f"{method} on one kept-alive connection")
            expect(not response.will_close, "connection kept alive", "keep-alive", response.getheaders())
    finally:
        connection.close()


def test_new_instance_id_on_every_start(tmp_path):
    instances = []
    for _ in range(2):
        process, url = start_backend(tmp_path)
        instances.append(requests.get(f"{url}/healthz", timeout=5).headers["x-instance-id"])
        process.stop()
        expect_equal(process.popen.returncode, 0, "exit code after SIGTERM")
    expect(instances[0] != instances[1] and all(i.startswith("t-") for i in instances),
           "default instance id: name plus random hex, new each start", "two different t-<hex>", instances)

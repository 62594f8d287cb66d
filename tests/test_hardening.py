"""No client can bend the filter: the red-team findings, each tried as an
attacker would against the real Envoy, store and backends.

- Internal headers in any spelling (underscores, case) never reach an app,
  even a CGI-style one (wsgiref) that reads `x_session_state` as
  HTTP_X_SESSION_STATE; the testbed refuses such header names outright.
- A valid cookie sent to a route of another cluster marks no host gone and
  moves no session (it used to mark healthy hosts gone for everyone).
- A request waiting on another proxy's lease makes a small, fixed number of
  store calls, spaced in time, then gets 503 with Retry-After.
- The store answers nobody without credentials.
- A second, planted cookie never takes a request over.
- Store entries live for store.idle_ttl, not the cookie's lifetime.
- No internal header reaches a client, on any path.
- An async write the store refuses is still counted.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time

import requests

from harness import Counters, expect, expect_equal, tb, verify_cookie
from harness import Paused, User, describe, in_parallel, json_body, settle_load_balancer, with_config

APP_ROOT = tb.REPO / "tests" / "apps"
INTERNAL_RESPONSE_HEADERS = ("x-session-route", "x-session-id", "x-session-new", "x-session-state", "x-instance-id",
                             "x-session-unknown", "x-session-end", "x-session-rotate", "x-session-unreached")


def hcm(bootstrap: dict) -> dict:
    return bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def allow_underscores(bootstrap: dict):
    hcm(bootstrap)["common_http_protocol_options"]["headers_with_underscores_action"] = "ALLOW"


def extra_route(prefix: str, cluster: str, ports: list[int]):
    """A bootstrap patch: a route for `prefix` to a new STATIC cluster."""
    def patch(bootstrap: dict):
        routes = hcm(bootstrap)["route_config"]["virtual_hosts"][0]["routes"]
        routes.insert(0, {"match": {"prefix": prefix}, "route": {"cluster": cluster}})
        bootstrap["static_resources"]["clusters"].append({
            "name": cluster, "type": "STATIC", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                for port in ports]}]}})
    return patch


def test_header_names_with_underscores_are_refused(client):
    for name in ("x_session_state", "x_session_id", "X_Session_New", "x_session_route"):
        reply = client.get(headers={name: "forged"})
        expect_equal(reply.status, 400, f"a request with a {name} header")


def test_no_spelling_of_an_internal_header_reaches_a_cgi_style_app(own_testbed, tmp_path):
    """Even where the proxy lets underscores through, the filter strips them."""
    bed = own_testbed
    port = tb.free_ports(1)[0]
    app = tb.Process("wsgi", [sys.executable, "-u", str(APP_ROOT / "wsgi_echo.py"), str(port)], tmp_path / "wsgi.log")
    app.start()
    try:
        tb.wait_until(lambda: app.ensure_alive() or tb.accepts(port), 10, "the wsgiref app")
        bed.bootstrap_patches += [allow_underscores, extra_route("/wsgi/", "wsgi", [port])]
        bed.envoy.restart()
        forged = {"x_session_state": "forged-state", "x_session_id": "victim", "X-Session-Id": "victim2",
                  "x_session_new": "1", "x-session_route": "MTI3LjAuMC4xOjE=", "x_instance_id": "forged",
                  "x_envoy_retry_on": "5xx"}
        client = User(envoy=bed.envoy, jar=False)
        for cookie in (None, client.new_session("/wsgi/x").cookie):
            reply = client.get("/wsgi/x", cookie=cookie, headers=forged)
            received = reply.body["received"]
            # A CGI gateway's name for each header the client sent.
            leaked = {name: value for name, value in forged.items()
                      if received.get("HTTP_" + name.upper().replace("-", "_")) == value}
            if cookie is None:
                leaked.pop("x_session_new", None)  # the filter's own "1" on a new session
            expect_equal(leaked, {}, f"client values the app saw (cookie {'yes' if cookie else 'no'}); all: {received}")
            expect(received.get("HTTP_X_SESSION_ID", "") not in ("victim", "victim2"), "the session id is the filter's",
                   "the filter's id", received.get("HTTP_X_SESSION_ID"))
            # The app echoes the filter's session id (and new flag) back: the client never sees them.
            leaked = sorted(h for h in reply.headers if h.lower() in INTERNAL_RESPONSE_HEADERS)
            expect_equal(leaked, [], f"internal headers an echoing app sent back (cookie {'yes' if cookie else 'no'})")
    finally:
        app.stop()


class Recorder:
    """A bare HTTP/1.1 upstream that keeps each request's raw bytes (chunked
    trailers included, which no stock test app shows) and answers with
    `answers` in turn (the last one again and again)."""

    OK = b"HTTP/1.1 200 OK\r\nx-instance-id: recorder\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"

    def __init__(self, answers: list[bytes] | None = None):
        self.answers = list(answers or [self.OK])
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def complete(data: bytes) -> bool:
        head, found, rest = data.partition(b"\r\n\r\n")
        if not found:
            return False
        if b"transfer-encoding: chunked" in head.lower():
            return rest.endswith(b"\r\n\r\n") and (rest.startswith(b"0\r\n") or b"\r\n0\r\n" in rest)
        return True

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while not self.complete(data):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data)
                    conn.sendall(self.answers[0] if len(self.answers) == 1 else self.answers.pop(0))
                except OSError:
                    pass

    def close(self):
        self.server.close()


def h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(name: str, value: str) -> bytes:
    """A header as an HPACK literal without indexing, no Huffman (short strings only)."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def h2_post_with_trailers(port: int, path: str, trailers: dict[str, str]):
    """An HTTP/2 (prior knowledge) POST with a body and request trailers."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b""))
        # Acknowledge the server's SETTINGS before the request.
        buffer = b""
        while True:
            while len(buffer) < 9:
                buffer += sock.recv(65536)
            length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
            while len(buffer) < 9 + length:
                buffer += sock.recv(65536)
            buffer = buffer[9 + length:]
            if kind == 4 and not flags & 1:
                sock.sendall(h2_frame(4, 1, 0, b""))
                break
        headers = b"".join(hpack_literal(n, v) for n, v in
                           [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "127.0.0.1")])
        trailer_block = b"".join(hpack_literal(n, v) for n, v in trailers.items())
        sock.sendall(h2_frame(1, 0x4, 1, headers) + h2_frame(0, 0, 1, b"body")
                     + h2_frame(1, 0x5, 1, trailer_block))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    break
            except OSError:
                break


def enable_upstream_trailers(cluster: str):
    def patch(bootstrap: dict):
        for c in bootstrap["static_resources"]["clusters"]:
            if c["name"] == cluster:
                c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}}}}
    return patch


def test_request_trailers_carry_no_internal_header_to_the_app(own_testbed):
    """An HTTP/2 client's request trailers reach an HTTP/1.1 app as chunked
    trailers: none of the internal names does."""
    bed = own_testbed
    recorder = Recorder()
    try:
        bed.bootstrap_patches += [extra_route("/trailers/", "recorder", [recorder.port]),
                                  enable_upstream_trailers("recorder")]
        bed.envoy.restart()
        forged = {"x-session-state": "forged", "x-session-id": "victim", "x-session-new": "1",
                  "x-instance-id": "forged", "x-session-route": "MTI3LjAuMC4xOjE=", "x-checksum": "kept"}
        h2_post_with_trailers(bed.envoy.listener, "/trailers/x", forged)
        tb.wait_until(lambda: recorder.requests, 10, "the request at the app")
        raw = recorder.requests[0].decode("latin-1").lower()
        trailer_part = raw.rsplit("\r\n0\r\n", 1)[-1]
        expect("x-checksum: kept" in trailer_part, "the app got the client's trailers (the check can see them)",
               "x-checksum: kept", trailer_part)
        leaked = [name for name in forged if name != "x-checksum" and f"{name}: " in trailer_part]
        expect_equal(leaked, [], f"internal names in the request trailers the app got: {trailer_part!r}")
    finally:
        recorder.close()


def test_a_rotation_to_an_id_in_use_never_hands_that_session_over(own_testbed):
    """An app (here a bare responder on its own route) renames a session to
    the id of another user's stored session, on a new session and on a
    pinned one: the store refuses, and the client gets no cookie naming
    that id (the cookie is dropped), never one that routes to the victim."""
    bed = own_testbed
    victim = User("victim")
    for _ in range(2):
        victim.send(bed.envoy.url)
    victim_sid = verify_cookie(victim.cookie, bed.envoy.filter_config).sid
    rotate = (b"HTTP/1.1 200 OK\r\nx-instance-id: rotator\r\nx-session-rotate: " + victim_sid.encode()
              + b"\r\nx-session-state: stolen\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
    plain = Recorder.OK.replace(b"x-instance-id: recorder", b"x-instance-id: rotator")
    # A new session renamed at once; then a session that is pinned first.
    rotator = Recorder([rotate, plain, rotate])
    try:
        bed.bootstrap_patches.append(extra_route("/rot/", "rotator", [rotator.port]))
        bed.envoy.restart()
        named = []
        for attempt in ("new session", "pinned session"):
            user = User(attempt)
            if attempt == "pinned session":
                first = user.send(bed.envoy.url, "/rot/x")
                expect(first.status_code == 200 and user.cookie, "a session on the responder's route", "200, a cookie",
                       describe(first))
            reply = user.send(bed.envoy.url, "/rot/x")
            for hop in [*reply.history, reply]:
                for value in hop.headers.get("set-cookie", "").split(","):
                    cookie = value.strip().split(";")[0].partition("=")[2]
                    if cookie and verify_cookie(cookie, bed.envoy.filter_config).sid == victim_sid:
                        named.append(f"{attempt}: {hop.status_code} {value.strip()[:80]}")
            expect(user.cookie is None, f"{attempt}: the cookie is dropped", "no cookie", user.cookie)
        expect_equal(named, [], "cookies issued for the victim's session id")
    finally:
        rotator.close()
    expect_equal(drive_count(victim, bed.envoy.url), 3, "the victim's session carries on")


def drive_count(user: User, url: str) -> int:
    return (json_body(user.send(url)) or {}).get("count")


def test_a_cookie_on_another_clusters_route_marks_nothing(own_testbed):
    """Found by red-teaming: the pinned host is not in the other route's
    cluster, so Envoy answered 503 UH and the filter marked a healthy host gone
    for everyone, again and again."""
    bed = own_testbed
    user = User("user")
    for _ in range(2):
        reply = user.send(bed.envoy.url)
    home = bed.backend_named(json_body(reply)["backend"])
    others = [b.port for b in bed.backends if b is not home]
    bed.bootstrap_patches.append(extra_route("/other/", "other", others))
    bed.envoy.restart()
    settle_load_balancer(bed.envoy)
    counters = Counters(bed.envoy)
    for _ in range(10):
        reply = user.send(bed.envoy.url, "/other/page")
        body = json_body(reply)
        expect(reply.status_code == 200 and not reply.history and body["backend"] != home.name and body["session"] is None,
               "the other route serves the request without the session", "200 from another backend, no session",
               describe(reply))
    counters.expect({"sessions.other_cluster": 10, "gone.marked": 0, "failovers.known": 0, "failovers.replayed": 0})
    reply = user.send(bed.envoy.url)
    expect(reply.status_code == 200 and json_body(reply)["backend"] == home.name and json_body(reply)["count"] == 3
           and not reply.history, "the session on its own route", f"200 from {home.name}, count 3, no redirect",
           describe(reply))


def eval_calls(bed) -> int:
    stats = bed.redis_command("INFO", "commandstats") or ""
    for line in stats.splitlines():
        if line.startswith("cmdstat_eval:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0


def test_waiting_on_a_held_lease_is_a_few_spaced_store_calls_then_503(own_testbed):
    bed = own_testbed
    user = User("user")
    for _ in range(2):
        reply = user.send(bed.envoy.url)
    body = json_body(reply)
    sid = body["session"]
    # Another proxy holds the session's lease (and does not let go).
    bed.redis_command("SET", f"sa:{sid}:lease", "another-proxy", "PX", "60000")
    bed.kill_backend(bed.backends.index(bed.backend_named(body["backend"])))
    clients = [user.with_cookie(f"client{i}") for i in range(20)]
    counters = Counters(bed.envoy)
    before = eval_calls(bed)
    started = time.monotonic()
    replies = in_parallel(lambda c: c.send(bed.envoy.url), clients, workers=20)
    took = time.monotonic() - started
    calls = eval_calls(bed) - before
    for client, reply in zip(clients, replies):
        expect(reply.status_code == 503 and reply.headers.get("retry-after"), f"{client.name}: the answer",
               "503 with Retry-After", describe(reply))
        moving = [h.headers.get("set-cookie", "") for h in reply.history]
        expect(all("Max-Age=" in c and int(c.rsplit("Max-Age=", 1)[1]) <= 60 for c in moving),
               f"{client.name}: the moving cookie is short-lived", "Max-Age <= 60", moving)
    expect(calls <= 20 * 4, "store calls for 20 requests waiting on one lease", "at most 1 + 3 polls each (80)",
           f"{calls} EVALs in {took:.1f}s")
    expect(took >= 0.5, "the polls are spaced in time", ">= 0.5 s for 3 polls", f"{took:.2f} s")
    counters.expect({"failovers.busy": 20})


def test_the_store_answers_no_one_without_credentials(testbed):
    base = f"http://127.0.0.1:{testbed.ports.webdis}"
    evaluate = {"data": "EVAL/return%201/0", "timeout": 5}
    expect_equal(requests.post(f"{base}/", **evaluate).status_code, 403, "EVAL without credentials")
    expect_equal(requests.post(f"{base}/", auth=("session-affinity", "guess"), **evaluate).status_code, 403,
                 "EVAL with a wrong password")
    expect_equal(requests.post(f"{base}/", auth=("session-affinity", tb.store_password()), **evaluate).status_code,
                 200, "EVAL with the filter's credentials")
    for command in ("GET/sa:x", "KEYS/*", "FLUSHALL", "CONFIG/GET/*"):
        expect_equal(requests.get(f"{base}/{command}", auth=("session-affinity", tb.store_password()), timeout=5)
                     .status_code, 403, f"{command} even with the credentials")
    outside = requests.post(f"{base}/", auth=("session-affinity", tb.store_password()), timeout=5,
                            data="EVAL/return%20redis.call('GET'%2CKEYS%5B1%5D)/1/other").json()
    expect(outside["EVAL"][0] is False and "NOPERM" in outside["EVAL"][1], "Redis confines scripts to session keys",
           "NOPERM", outside)


def test_a_planted_cookie_never_takes_a_request_over(client, testbed):
    victim = client.new_session()
    planted = client.new_session()  # the attacker's own, validly signed session
    counters = Counters(testbed.envoy)
    for cookies in (f"sa={planted.cookie}; sa={victim.cookie}", f"sa={victim.cookie}; sa={planted.cookie}"):
        body = client.get(headers={"cookie": cookies}).body
        expect(body["session"] not in (victim.body["session"], planted.body["session"]) and body["count"] == 1,
               "two sessions' cookies in one request", "a new session, neither of them", body)
    counters.expect({"cookies.rejected.ambiguous": 2, "sessions.created": 2})


def test_secure_cookies_are_host_prefixed_by_default(own_testbed):
    envoy = own_testbed.envoy
    config = with_config(envoy.filter_config, cookie={"secure": True})
    del config["cookie"]["name"]
    envoy.restart(config)
    reply = requests.get(envoy.url, timeout=5)
    set_cookie = reply.headers.get("set-cookie", "")
    attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")[1:]}
    expect(set_cookie.startswith("__Host-sa=") and {"secure", "path"} <= attributes and "domain" not in attributes,
           "the default name with cookie.secure", "__Host-sa=...; Path=/; Secure, no Domain", set_cookie)


def test_store_entries_live_for_the_idle_ttl_not_the_cookies_lifetime(client, testbed):
    session = client.new_session()
    ttl_ms = testbed.redis_command("PTTL", f"sa:{session.body['session']}")
    expect(0 < ttl_ms <= 30 * 60_000, "the store entry of a new session", "store.idle_ttl (30m) at most",
           f"{ttl_ms} ms (the cookie lives 1h)")


def test_no_internal_header_reaches_a_client_on_any_path(own_testbed):
    bed = own_testbed
    replies = []
    user = User("user")
    replies += [user.send(bed.envoy.url) for _ in range(2)]                       # new, pinned
    replies.append(user.send(bed.envoy.url, "/static/site.css"))                  # skipped path
    replies.append(user.send(bed.envoy.url, "/site.js"))                          # skipped suffix
    other = User("other")
    replies.append(other.send(bed.envoy.url))
    replies.append(other.send(bed.envoy.url, "/logout", method="POST"))           # ended
    bed.kill_backend(bed.backends.index(bed.backend_named(json_body(replies[0])["backend"])))
    replies.append(user.send(bed.envoy.url))                                      # 307 and failover
    for reply in replies:
        for hop in [*reply.history, reply]:
            leaked = sorted(h for h in hop.headers if h.lower() in INTERNAL_RESPONSE_HEADERS)
            expect_equal(leaked, [], f"internal headers in {hop.request.method} {hop.url} ({hop.status_code})")


def test_an_async_write_the_store_refuses_is_still_counted(own_testbed):
    """Found by review: async writes belong to the worker, whose answers were
    never read, so refusals went uncounted."""
    bed = own_testbed
    envoy = bed.envoy
    envoy.restart(with_config(envoy.filter_config, store={"write": "async"}, failover={"gone_ttl": "2s"}))
    settle_load_balancer(envoy)
    user = User("user")
    for _ in range(3):
        reply = user.send(envoy.url)
    old = bed.backend_named(json_body(reply)["backend"])
    old_cookie = user.with_cookie("old-cookie")
    with Paused(old.process):
        envoy.wait_host_health(old.address, healthy=False, timeout=10)
        moved = user.send(envoy.url)
        expect(json_body(moved)["backend"] != old.name, "the session moved off the paused host", "another backend",
               describe(moved))
    envoy.wait_host_health(old.address, healthy=True, timeout=10)
    time.sleep(2.5)  # this proxy forgets it saw the old host gone (gone_ttl 2s)
    counters = Counters(envoy)
    zombie = old_cookie.send(envoy.url)
    expect(zombie.status_code == 200 and json_body(zombie)["backend"] == old.name, "the zombie request (async mode)",
           f"200 from {old.name}: async mode cannot take the answer back", describe(zombie))
    counters.expect({"store.writes_rejected": 1})

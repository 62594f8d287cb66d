"""Helpers shared by the e2e tests: one client model (User: browser-like with
a cookie jar, or sending exactly the cookies a test names), assertions that print
what was expected next to what was received, counter probes that cope with
the filter flushing metrics once a second, the store's record of a session,
and processes paused with SIGSTOP.

Fixtures live in conftest.py; the processes themselves in envoy/rig.
"""

from __future__ import annotations

import base64
import copy
import http.cookiejar
import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait as wait_futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import requests

import rig as tb  # envoy/rig, the testbed's parts (pytest.ini puts envoy/ on the path)

import cookie_signer

REPO = Path(__file__).resolve().parent.parent

# The wasm build's workers flush their counters once a second.
FLUSH_PERIOD = 1.0
COUNTER_TIMEOUT = 6.0
# How long settled_counters waits for two equal reads.
SETTLE_TIMEOUT = 8.0
REQUEST_TIMEOUT = 10.0
# The three counters that each count one moved session.
FAILOVER_COUNTERS = ("failovers.known", "failovers.replayed", "failovers.restart")
INTERNAL_HEADERS = ("x-session-route", "x-session-id", "x-session-new", "x-session-state")


def require_tool(name: str) -> str:
    """Path of a tool the test needs. Missing: fail under CI, skip elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (`.ci/setup tests` installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def expect(condition: bool, what: str, expected, received):
    """Fail with what was expected next to what was received."""
    if not condition:
        pytest.fail(f"{what}\n  expected: {expected}\n  received: {received}", pytrace=False)


def expect_equal(received, expected, what: str):
    expect(received == expected, what, expected, received)


@dataclass
class Reply:
    """One response, with the parts the tests look at."""

    response: requests.Response
    cookie_name: str

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def headers(self):
        return self.response.headers

    @property
    def body(self) -> dict:
        """The demo backend's JSON; fails the test with the raw body otherwise."""
        try:
            return self.response.json()
        except ValueError:
            pytest.fail(f"expected the backend's JSON, received {self.status}: {self.response.text[:300]!r}")

    @property
    def set_cookies(self) -> list[str]:
        return self.response.raw.headers.getlist("set-cookie")

    @property
    def cookie(self) -> str | None:
        """The value of our cookie in Set-Cookie, if the response set it."""
        for header in self.set_cookies:
            name, _, rest = header.partition("=")
            if name.strip() == self.cookie_name:
                return rest.split(";", 1)[0]
        return None

    @property
    def cookie_attributes(self) -> dict[str, str]:
        """Attributes of our Set-Cookie, names lower-cased, e.g. {"path": "/", "httponly": ""}."""
        for header in self.set_cookies:
            name, _, rest = header.partition("=")
            if name.strip() == self.cookie_name:
                attributes = {}
                for part in rest.split(";")[1:]:
                    key, _, value = part.strip().partition("=")
                    attributes[key.lower()] = value
                return attributes
        return {}

    def describe(self) -> str:
        return f"{self.status} headers={dict(self.headers)} body={self.response.text[:300]!r}"


def keyring(filter_config: dict) -> dict[str, str]:
    """Key id to secret, from a plugin config (inline secrets only)."""
    return {key["id"]: key["secret"] for key in filter_config["keys"]}


def verify_cookie(value: str, filter_config: dict) -> cookie_signer.Claims:
    """Verify a cookie the filter issued, with the config's keys, in Python."""
    try:
        return cookie_signer.verify(value, keyring(filter_config))
    except cookie_signer.CookieRejected as err:
        pytest.fail(f"the filter's cookie does not verify in Python: {err}\n  cookie: {value}", pytrace=False)


class Counters:
    """Deltas of the filter's counters on one Envoy, from a settled baseline.

    Counters reach /stats up to a second after the request (each worker
    flushes on its tick), so the baseline is taken only once two reads a flush
    period apart agree, and expectations are polled for.
    """

    def __init__(self, envoy: "tb.Envoy"):
        self.envoy = envoy
        self.baseline = settled_counters(envoy)

    def deltas(self) -> dict[str, int]:
        return changes(self.baseline, self.envoy.filter_counters())

    def expect(self, wanted: dict[str, int]):
        """Wait until every named counter moved by exactly the given amount.

        Names are without the prefix, e.g. {"cookies.rejected.expired": 1};
        a 0 asserts no change. Counters not named are not checked.
        """
        start = time.monotonic()
        only_zeros = not any(wanted.values())
        while True:
            deltas = self.deltas()
            received = {name: deltas.get(name, 0) for name in wanted}
            # Zero-only expectations mean something only after a flush.
            done = received == wanted and (not only_zeros or time.monotonic() - start > FLUSH_PERIOD + 0.2)
            overshoot = any(received[name] > delta for name, delta in wanted.items())
            if done or overshoot or time.monotonic() - start > COUNTER_TIMEOUT:
                break
            time.sleep(0.1)
        expect(received == wanted, f"counter changes on {self.envoy.name} ({self.envoy.metric_prefix}*)", wanted,
               f"{received}; all changes: {json.dumps(deltas, sort_keys=True)}")


def with_config(base: dict, **sections) -> dict:
    """A copy of a plugin config with some sections' keys replaced."""
    config = copy.deepcopy(base)
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


# -------------------------------------------------------------------- clients

# The filter's default cookie.name (a plugin JSON without a cookie section).
DEFAULT_COOKIE = "sa"


@dataclass
class User:
    """One client of the filter, with its own connection.

    Browser-like by default: a cookie jar, redirects followed (`send`, to any
    Envoy's URL). With `jar=False` it keeps no cookies and every request says
    exactly what it sends (`request`, `get`, `new_session`: to `envoy`, no
    redirects, a Reply). The cookie is the one `envoy`'s plugin JSON names.
    """

    name: str = "client"
    envoy: tb.Envoy | None = None
    jar: bool = True
    cookie_name: str = DEFAULT_COOKIE
    http: requests.Session = field(default_factory=requests.Session)
    replies: list = field(default_factory=list)

    def __post_init__(self):
        if self.envoy is not None:
            self.cookie_name = self.envoy.filter_config.get("cookie", {}).get("name", DEFAULT_COOKIE)
        if not self.jar:
            self.http.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))

    def send(self, url: str, path: str = "/", method: str = "GET", data: bytes | None = None,
             timeout: float = REQUEST_TIMEOUT) -> requests.Response:
        """Like a browser: the jar's cookies sent, redirects followed; the reply is kept in `replies`."""
        reply = self.http.request(method, url + path, data=data, timeout=timeout)
        self.replies.append(reply)
        return reply

    def request(self, path: str = "/", cookie: str | None = None, headers: dict | None = None,
                method: str = "GET", data: bytes | None = None, timeout: float = REQUEST_TIMEOUT) -> Reply:
        """One request to `envoy` with exactly these headers (and this cookie value), no redirects."""
        sent = dict(headers or {})
        if cookie is not None:
            sent["cookie"] = f"{self.cookie_name}={cookie}"
        response = self.http.request(method, f"{self.envoy.url}{path}", headers=sent, data=data,
                                     timeout=timeout, allow_redirects=False)
        return Reply(response, self.cookie_name)

    def get(self, path: str = "/", cookie: str | None = None, headers: dict | None = None) -> Reply:
        return self.request(path, cookie, headers)

    def new_session(self, path: str = "/") -> Reply:
        """A request without a cookie; fails unless it set a cookie."""
        reply = self.get(path)
        expect(reply.status == 200 and reply.cookie, f"GET {path} without a cookie starts a session",
               "200 with a Set-Cookie", reply.describe())
        return reply

    @property
    def cookie(self) -> str | None:
        """The session cookie in the jar, if any."""
        values = [c.value for c in self.http.cookies if c.name == self.cookie_name]
        if len(values) > 1:
            raise AssertionError(f"{self.name} holds {len(values)} cookies named {self.cookie_name}: {values}")
        return values[0] if values else None

    def with_cookie(self, name: str) -> "User":
        """Another client holding a copy of this one's cookies (same session)."""
        other = replace(self, name=name, http=requests.Session(), replies=[])
        other.http.cookies.update(self.http.cookies)
        return other


def json_body(reply: requests.Response) -> dict | None:
    try:
        body = reply.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def describe(reply: requests.Response) -> str:
    hops = " -> ".join(f"{h.status_code} (set-cookie {h.headers.get('set-cookie')!r})" for h in reply.history)
    interesting = {k: v for k, v in reply.headers.items()
                   if k.lower() in ("retry-after", "set-cookie", "location", "x-instance-id")}
    return (f"{reply.request.method} {reply.url}: {reply.status_code} {interesting} body={reply.text[:240]!r}"
            + (f" after {hops}" if hops else ""))


def drive(user: User, url: str, first: int, count: int) -> list[str]:
    """count requests that must answer 200 with counts first, first+1, ...; returns problems."""
    for expected in range(first, first + count):
        try:
            reply = user.send(url)
        except requests.RequestException as err:
            return [f"{user.name}: request with expected count {expected} raised {err!r}"]
        body = json_body(reply)
        if reply.status_code != 200 or body is None or body.get("count") != expected:
            return [f"{user.name}: expected 200 with count {expected}, received {describe(reply)}"]
    return []


class Checks:
    """Collects failed expectations so one run reports every problem it saw."""

    def __init__(self):
        self.failures: list[str] = []

    def expect(self, condition: bool, what: str, expected, received) -> bool:
        if not condition:
            self.failures.append(f"{what}\n  expected: {expected}\n  received: {received}")
        return bool(condition)

    def expect_equal(self, received, expected, what: str) -> bool:
        return self.expect(received == expected, what, expected, received)

    def done(self):
        if self.failures:
            pytest.fail(f"{len(self.failures)} expectation(s) failed:\n" + "\n".join(self.failures), pytrace=False)


def in_parallel(function, items, workers: int = 8, timeout: float = 60.0) -> list:
    """function(item) for every item on a bounded pool; results in order."""
    pool = ThreadPoolExecutor(workers)
    try:
        futures = [pool.submit(function, item) for item in items]
        done, pending = wait_futures(futures, timeout)
        expect(not pending, f"clients finish within {timeout:.0f}s", "all done", f"{len(pending)} still running")
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------- counters

def settled_counters(envoy: "tb.Envoy") -> dict[str, int]:
    """The filter's counters once two reads a flush period apart agree (bounded)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    previous = envoy.filter_counters()
    while True:
        time.sleep(FLUSH_PERIOD + 0.15)
        current = envoy.filter_counters()
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current


def changes(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: value - before.get(name, 0) for name, value in sorted(after.items())
            if value != before.get(name, 0)}


def failovers(delta: dict[str, int]) -> int:
    return sum(delta.get(name, 0) for name in FAILOVER_COUNTERS)


# ------------------------------------------------------------- store, hosts

def demo_state(sid: str, count: int, user: str | None = None) -> str:
    """The demo app's session state as it travels in `x-session-state`:
    unpadded base64url of its JSON."""
    raw = json.dumps({"sid": sid, "count": count, "user": user}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def read_demo_state(value: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))


def stored(bed: "tb.Testbed", sid: str) -> dict:
    """The store's record of a session, whichever the store: {"owner":
    "host#instance", "count": n, "sid": the session its state names, "lease": token|None}."""
    record = bed.session_record(sid)
    state = read_demo_state(record["state"]) if record["state"] is not None else {}
    return {"owner": record["owner"], "count": state.get("count"), "sid": state.get("sid"),
            "lease": record["lease"]}


def health(envoy: "tb.Envoy") -> str:
    """Envoy's view of the app hosts, to tell a filter problem from a host the
    health checker took out (e.g. checks timing out on a loaded machine)."""
    checks = {k.rsplit(".", 1)[-1]: v for k, v in envoy.stats("cluster.app.health_check.").items()
              if k.rsplit(".", 1)[-1] in ("attempt", "success", "failure", "network_failure")}
    return f"[{envoy.name}: hosts {envoy.host_health()}, health checks {checks}]"


def settle_load_balancer(envoy: "tb.Envoy"):
    """See testbed.Envoy.wait_balanced (for an Envoy started without waiting on health)."""
    envoy.wait_balanced()


def owner_of(backend: "tb.Backend") -> str:
    return f"{backend.address}#{backend.instance}"


def backend_at(bed: "tb.Testbed", address: str) -> "tb.Backend":
    return next(b for b in bed.backends if b.address == address)


class Paused:
    """SIGSTOP a process (alive, its state in memory, answering nothing: a
    hung store, a partitioned backend); SIGCONT on exit."""

    def __init__(self, process: "tb.Process"):
        self.pid = process.pid
        self.paused = False

    def pause(self) -> "Paused":
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True
        return self

    def __enter__(self):
        return self.pause()

    def resume(self):
        if self.paused:
            os.kill(self.pid, signal.SIGCONT)
            self.paused = False

    def __exit__(self, *exc):
        self.resume()


def envoy_at(bed: "tb.Testbed", url: str) -> "tb.Envoy":
    return next(e for e in [bed.envoy] + bed.extra_envoys if e.url == url)


def start_sessions(bed: "tb.Testbed", url: str, users: int, requests_each: int = 1,
                   prefix: str = "user", min_each: int = 2) -> dict[str, list[User]]:
    """Create sessions (one request each, sequentially so round robin spreads them),
    then give each requests_each requests in all. Returns users by backend name.

    If the load balancer left a backend with fewer than min_each sessions (its
    health checks can time out on a loaded machine), more sessions are made,
    a bounded number, until each backend has min_each."""
    envoy = envoy_at(bed, url)
    settle_load_balancer(envoy)
    by_backend: dict[str, list[User]] = {b.name: [] for b in bed.backends}
    created = []
    deadline = time.monotonic() + 20
    while len(created) < users or min(len(g) for g in by_backend.values()) < min_each:
        expect(time.monotonic() < deadline and len(created) < 3 * users,
               f"sessions on every backend within 20s and {3 * users} sessions",
               f"{users} sessions, >= {min_each} per backend",
               f"{ {n: len(g) for n, g in by_backend.items()} } {health(envoy)}")
        if len(created) >= users:
            for backend in bed.backends:
                envoy.wait_host_health(backend.address, healthy=True, timeout=10)
            time.sleep(0.2)
        user = User(f"{prefix}{len(created)}")
        reply = user.send(url)
        body = json_body(reply)
        expect(reply.status_code == 200 and body and body.get("count") == 1 and user.cookie,
               f"{user.name}: a new session", "200, count 1 and a cookie", describe(reply))
        by_backend[body["backend"]].append(user)
        created.append(user)
    if requests_each > 1:
        problems = sum(in_parallel(lambda u: drive(u, url, 2, requests_each - 1), created), [])
        expect(not problems, "every session counts its requests before anything fails", "no problems",
               "\n".join(problems) + f"\n{health(envoy)}")
    return by_backend

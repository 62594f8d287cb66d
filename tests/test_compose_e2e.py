"""The docker-compose testbed run for real: `docker-compose up` of
envoy/docker-compose.yaml with envoy/docker-compose.local.yaml (the same
services from images built here: no registry is reachable), then a session
is sticky, survives `docker kill` of its backend with its state (rounds of
kill and start), survives a restart of its backend at the same address, and
ends on logout. Twice: with the demo app, and with Tomcat and the adapter's
valve (envoy/docker-compose.tomcat.yaml, its image from
envoy/docker-compose.tomcat-local.yaml), one stack after the other on the
same ports.

It needs a Docker engine: tests/docker-engine starts Debian's dockerd (root,
docker.io installed by `.ci/setup tests`). Where none can start, the test is
skipped with the reason printed. The stack uses the testbed's fixed ports on
127.0.0.1 (host networking).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pytest
import requests

from harness import REPO, expect, expect_equal, require_tool, tb

import tomcats  # adapters/tomcat/tomcats.py (on pytest.ini's pythonpath): builds the valve jar and the demo app

ENVOY_DIR = REPO / "envoy"
URL = "http://127.0.0.1:10000"
ADMIN = "http://127.0.0.1:9901"
BACKENDS = {"a": 18081, "b": 18082, "c": 18083}
STORE = "127.0.0.1:17379"
PORTS = [10000, 9901, 16379, 17379, *BACKENDS.values()]
KILL_ROUNDS = 20
BUILD_TIMEOUT = 1800  # a cold build: the Debian base, apt and pip in four images
HEALTHY_TIMEOUT = 180  # generous: containers start slowly on a loaded machine


ENGINE = REPO / "tests" / "docker-engine"


@dataclass(frozen=True)
class App:
    """One way to run the stack's backends, and the request that adds one to
    a session's state (the demo app's count, a Tomcat cart's tea)."""
    name: str
    service: str  # compose services <service>-a, -b, -c
    files: tuple[str, ...]  # the compose files, in order
    path: str
    method: str

    def read(self, body: dict) -> tuple[str, int]:
        """Which backend answered (a, b or c), and the session's state."""
        if self.name == "demo":
            return body["backend"], body["count"]
        port = int(body["served_by"].rsplit(":", 1)[1])
        return next(name for name, p in BACKENDS.items() if p == port), body["items"].get("tea", 0)


LOCAL = ("docker-compose.yaml", "docker-compose.local.yaml")
APPS = {
    "demo": App("demo", "backend", LOCAL, "/", "GET"),
    "tomcat": App("tomcat", "tomcat", LOCAL + ("docker-compose.tomcat.yaml", "docker-compose.tomcat-local.yaml"),
                  "/cart/add?item=tea", "POST"),
}


def start_engine() -> tuple[str, bool]:
    """DOCKER_HOST of a running engine, and whether this call started it."""
    started = subprocess.run([str(ENGINE), "start"], capture_output=True, text=True, timeout=180,
                             stdin=subprocess.DEVNULL)
    if started.returncode != 0:
        reason = f"no Docker engine could start here: {started.stderr.strip() or started.stdout.strip()}"
        print(reason)
        pytest.skip(reason)
    lines = started.stdout.split()
    return lines[0], lines[1:] == ["started"]


class Stack:
    def __init__(self, docker_host: str, app: App):
        self.env = {**os.environ, "DOCKER_HOST": docker_host}
        self.compose = require_tool("docker-compose")
        self.app = app
        self.files = [arg for name in app.files for arg in ("-f", str(ENVOY_DIR / name))]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run([self.compose, *self.files, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        expect(done.returncode == 0, f"docker-compose {' '.join(args)}", "exit 0",
               f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def docker(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        expect(done.returncode == 0, f"docker {' '.join(args)}", "exit 0", f"exit {done.returncode}: {done.stderr}")
        return done.stdout

    def healthy_hosts(self) -> set[str]:
        """The hosts Envoy's active health checks call healthy (admin /clusters)."""
        text = requests.get(f"{ADMIN}/clusters", timeout=5).text
        return {line.split("::")[1] for line in text.splitlines()
                if line.split("::")[0] in ("app", "session_store") and line.endswith("::health_flags::healthy")}

    def wait_all_healthy(self):
        """Every backend and the store healthy in Envoy's view, before any
        new session or kill: a failover right after start-up found the store
        not yet healthy in Envoy and took several redirects."""
        wanted = {f"127.0.0.1:{port}" for port in BACKENDS.values()} | {STORE}

        def all_healthy():
            try:
                return self.healthy_hosts() == wanted
            except requests.RequestException:
                return False
        tb.wait_until(all_healthy, HEALTHY_TIMEOUT, "Envoy to see every backend and the store healthy", interval=0.5)

    def wait_ready_to_kill(self, backend: str):
        """The store and the session's backend healthy in Envoy's view, at
        least one other backend up, and Envoy's view of every backend what
        it answers now: a failover then finds a live host without Envoy
        offering it one that is still down. A backend killed in the round
        before may still be starting (a Tomcat takes seconds): the rounds do
        not wait for it."""
        addresses = {name: f"127.0.0.1:{port}" for name, port in BACKENDS.items()}

        def ready():
            try:
                healthy = self.healthy_hosts()
                up = {address for address in addresses.values() if answers(address)}
            except requests.RequestException:
                return False
            return ({STORE, addresses[backend]} <= healthy and healthy - {STORE} == up and len(up) >= 2)
        tb.wait_until(ready, HEALTHY_TIMEOUT, f"Envoy to see the store, backend {backend} and another backend healthy",
                      interval=0.5)

    def container(self, backend: str) -> str:
        return f"session-affinity-testbed_{self.app.service}-{backend}_1"

    def logs(self) -> str:
        done = subprocess.run([self.compose, *self.files, "logs", "--tail", "60"], env=self.env,
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        return done.stdout[-20000:]


def answers(address: str) -> bool:
    """The backend at address answers its health check itself (not through Envoy)."""
    try:
        return requests.get(f"http://{address}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def listening(port: int) -> bool:
    try:
        return tb.accepts(port)
    except OSError:
        return False


@pytest.fixture(scope="module")
def engine():
    """DOCKER_HOST of a running engine with the local base image."""
    require_tool("docker-compose")
    host, started = start_engine()
    try:
        env = {**os.environ, "DOCKER_HOST": host}
        base = subprocess.run([str(REPO / "envoy" / "local-images" / "build-base")], env=env, capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
        expect(base.returncode == 0, "envoy/local-images/build-base", "exit 0", base.stdout + base.stderr)
        yield host
    finally:
        if started:
            subprocess.run([str(ENGINE), "stop"], timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module", params=list(APPS))
def stack(request, engine):
    busy = [port for port in PORTS if listening(port)]
    expect_equal(busy, [], "testbed ports already in use on 127.0.0.1 (another testbed running?)")
    tb.ensure_wasm()
    if request.param == "tomcat":
        require_tool("javac")  # adapters/tomcat/build: the valve jar and the demo app the Tomcats mount
        tomcats.build()
    s = Stack(engine, APPS[request.param])
    s.run("build", timeout=BUILD_TIMEOUT)
    try:
        s.run("up", "-d", timeout=600)
        s.wait_all_healthy()
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        subprocess.run([s.compose, *s.files, "down", "--remove-orphans"], env=s.env, capture_output=True,
                       timeout=300, stdin=subprocess.DEVNULL)


def step(client: requests.Session, path: str, method: str) -> tuple[dict, int]:
    """One request as a browser makes it (cookies kept, redirects followed):
    the app's answer and how many redirects it took."""
    reply = client.request(method, URL + path, timeout=30)
    expect_equal(reply.status_code, 200, f"{method} {path}: status ({[r.status_code for r in reply.history]} before)")
    return reply.json(), len(reply.history)


def test_sessions_survive_kills_restarts_and_end_on_logout(stack):
    try:
        run_scenario(stack)
    except BaseException:
        print(stack.logs())
        raise


def run_scenario(stack: Stack):
    app = stack.app

    def add(client: requests.Session) -> tuple[str, int, int]:
        """One more in the session's state: who answered, the state, redirects taken."""
        body, redirects = step(client, app.path, app.method)
        return (*app.read(body), redirects)

    client = requests.Session()
    backend, count, _ = add(client)
    expect_equal(count, 1, "a new session's first count")
    for _ in range(4):  # sticky
        count += 1
        expect_equal(add(client), (backend, count, 0), "a pinned request: backend, count, redirects")

    # Kill the session's backend (docker kill: SIGKILL, nothing saved): the
    # next request lands on another backend with the count kept, after a
    # redirect; the killed backend starts again (a new instance) while the
    # rounds go on. A second redirect happens when the failover's own request
    # is load balanced onto the dead backend before Envoy has taken it out
    # (the filter then replays once more: "found no live host yet"). The
    # first kill after Envoy started took 2 to 7 redirects in 6 of 8 runs
    # here (later kills: 1 in 60 of 60), so round 0 only bounds them.
    redirects_per_kill = []
    for round_ in range(KILL_ROUNDS + 1):
        stack.wait_ready_to_kill(backend)
        stack.docker("kill", stack.container(backend))
        stack.docker("wait", stack.container(backend))  # stopped, so the `start` below starts it again
        answered, got, redirects = add(client)
        count += 1
        redirects_per_kill.append(redirects)
        allowed = 20 if round_ == 0 else 2
        expect(answered != backend and got == count and 1 <= redirects <= allowed,
               f"{app.name}, round {round_}: the request after killing backend {backend}",
               f"another backend, count {count}, 1 to {allowed} redirects",
               f"backend {answered}, count {got}, {redirects} redirects")
        stack.run("start", f"{app.service}-{backend}")
        backend = answered
    print(f"{app.name}: redirects per kill: {redirects_per_kill}")

    # A restart at the same address: a new instance with no sessions; the
    # session's state comes back from the store.
    stack.wait_all_healthy()
    stack.run("restart", f"{app.service}-{backend}", timeout=120)
    stack.wait_all_healthy()
    _, got, redirects = add(client)
    count += 1
    expect(got == count and redirects <= 1, "the request after a restart of its backend",
           f"count {count}, at most 1 redirect", f"count {got}, {redirects} redirects")

    # Logout ends the session; a copy of the old cookie starts a new one.
    old = requests.Session()
    old.cookies.update(client.cookies)
    step(client, "/logout", "POST")
    _, got, _ = add(old)
    expect_equal(got, 1, "the count of a request with the cookie from before the logout")

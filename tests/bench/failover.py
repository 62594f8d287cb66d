"""Failover figures for tests/bench/run (imported by bench.py).

Uses the demo backend (envoy/backend/app.py), which implements the app
contract: it keeps per-session state, returns it in x-session-state when it
changes, restores it from x-session-state, answers x-session-unknown for a
session it does not know, and reports a per-session request count so a client
can tell whether its session state survived.

The measurements, all on 127.0.0.1 with the store (redis + webdis, and for
the ones marked so a three-member etcd cluster too, same run):

known_gone, known_gone_etcd
    N sessions pinned to one backend; the backend is killed (SIGKILL) and one
    request marks it gone. Then each other session sends its first request
    after the loss: the filter already knows the host is gone, fetches the
    state from the store, lets the load balancer pick a live host, injects the
    state, and re-pins. Client-side latency of that one request, p50/p99.

found_mid_request
    The pinned host is dead but not yet marked gone, so the request goes to
    it, Envoy answers 503 (UH/UF), the filter marks it gone and answers 307,
    and the client replays once (the known-gone path). Latency of the whole
    exchange (both requests), p50/p99. A separate Envoy whose gone marks last
    `failover.gone_ttl: 1s` lets every sample be a first discovery: samples
    are spaced by more than that TTL.

kill_under_load
    S client sessions loop over requests (following at most 3 redirects,
    as browsers and HTTP libraries do) while the backend holding sessions is
    killed mid-run. A session lost state if the count the backend returns ever
    fails to increase by one. Must be 0.

storm, storm_etcd, native_storm, native_storm_etcd
    One backend holding --storm-sessions sessions (1,000 by default) dies
    (SIGKILL); then every one of those sessions sends its next request at once
    (64 clients in parallel, each on a new connection, following redirects).
    Reported: the time from the kill until every session was served again,
    p50/p99 of a failover request (redirects included), the most redirects
    one session took, store calls per failover, errors and lost states (both
    must be 0).

store_footprint (webdis and etcd)
    New sessions through the filter for two seconds (wrk, no cookie: each
    request is a new session whose state the filter writes): store calls per
    write, and the keys and bytes the store holds per session (Redis
    used_memory; etcd's bbolt bytes in use after compacting old revisions and
    defragmenting).

Latency is measured in Python (http.client on a kept-alive connection), so
it includes ~0.1 ms of client overhead; the same client's figure for a
healthy pinned request is reported next to it as the reference.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import running
from running import (NATIVE_SO, ROOT, ROUTER, Bench, Envoy, free_port, log, native_filter, pin, run_wrk,
                     stateful_session_header, wait_port, wasm_filter)
from variants import COOKIE, KID, SECRET, cookie_signer, filter_config, set_cookie_value

DEMO_BACKEND = ROOT / "envoy" / "backend" / "app.py"


def percentile(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def latency_summary(ms: list[float], **extra) -> dict:
    return {"samples": len(ms),
            "p50_ms": round(statistics.median(ms), 3) if ms else None,
            "p90_ms": round(percentile(ms, 90), 3) if ms else None,
            "p99_ms": round(percentile(ms, 99), 3) if ms else None,
            "max_ms": round(max(ms), 3) if ms else None, **extra}


# ------------------------------------------------------------ demo backend --

class Backends:
    """The demo backend, one process per upstream host."""

    def __init__(self, bench: Bench, tag: str, count: int = 3):
        self.bench = bench
        self.tag = tag
        self.ports = [free_port() for _ in range(count)]
        self.procs: dict[int, object] = {}

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def start(self, port: int) -> None:
        script = Path(os.environ.get("SA_BENCH_DEMO_BACKEND", str(DEMO_BACKEND)))
        # The demo backend writes headers and body in two send()s; with Nagle on,
        # the body waits for Envoy's delayed ACK (~40 ms) on a kept-alive
        # connection, which would swamp the filter's own failover latency.
        # So the harness turns Nagle off in the demo backend's handler when it
        # has that knob (TCP_NODELAY, as every production server does).
        launcher = (
            "import sys; sys.argv = sys.argv[1:]; sys.path.insert(0, "
            f"{str(script.parent)!r}); import app; "
            "h = getattr(app, 'Handler', None); "
            "setattr(h, 'disable_nagle_algorithm', True) if h else None; "
            "app.main(sys.argv[1:])")
        cmd = pin(self.bench.load_cpu) + [
            sys.executable, "-c", launcher, str(script), "--host", "127.0.0.1",
            "--port", str(port), "--name", f"{self.tag}{port}"]
        self.procs[port] = self.bench.procs.start(f"backend-{self.tag}-{port}", cmd)

    def start_all(self) -> None:
        for p in self.ports:
            self.start(p)
        for p in self.ports:
            wait_port(p)

    def kill(self, host: str) -> None:
        """SIGKILL: the process dies without closing anything cleanly."""
        port = int(host.rsplit(":", 1)[1])
        proc = self.procs.pop(port)
        self.bench.procs.stop(proc, signal.SIGKILL)  # type: ignore[arg-type]


def filter_envoy(bench: Bench, name: str, hosts: list[str], gone_ttl: str, native: bool = False,
                 store: str = "webdis") -> Envoy:
    """An Envoy with the filter: the wasm build (with stateful_session), or the native module."""
    config = filter_config(write="sync", gone_ttl=gone_ttl, dialect=store)
    if native:
        filters = [native_filter(config), ROUTER]
    else:
        filters = [wasm_filter("session_affinity", bench.wasm("filter"), config),
                   stateful_session_header(), ROUTER]
    env = Envoy(bench.procs, name, filters, hosts, bench.stores(store).hosts, bench.envoy_cpu,
                  hc_interval="1s")
    env.start()
    return env


STORE_CALLS = "cluster.session_store.upstream_rq_total"


def store_calls(env: Envoy) -> int:
    return env.envoy_stats(re.escape(STORE_CALLS)).get(STORE_CALLS, 0)


# ------------------------------------------------------------------ client --

class Client:
    """One session's client: a kept-alive connection and a cookie."""

    def __init__(self, port: int, cookie: str | None = None):
        self.port = port
        self.cookie = cookie
        self.conn: http.client.HTTPConnection | None = None
        self.count: int | None = None

    def _conn(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def get_once(self, path: str = "/") -> tuple[int, dict, dict]:
        """One request; takes the cookie from Set-Cookie. Retries once on a
        connection the server closed while idle (not counted as a failure)."""
        headers = {"cookie": f"{COOKIE}={self.cookie}"} if self.cookie else {}
        for attempt in (0, 1):
            try:
                conn = self._conn()
                conn.request("GET", path, headers=headers)
                r = conn.getresponse()
                body = r.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        hdrs: dict[str, list[str]] = {}
        for k, v in r.getheaders():
            hdrs.setdefault(k.lower(), []).append(v)
        if r.getheader("connection", "").lower() == "close":
            self.close()
        value = set_cookie_value(hdrs, COOKIE)
        if value:
            self.cookie = value
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {"_body": body[:100].decode(errors="replace")}
        return r.status, hdrs, data

    def get(self, path: str = "/", max_redirects: int = 3) -> tuple[int, dict, int]:
        """Follows 307s like a browser; returns (status, body, redirects)."""
        redirects = 0
        status, _, data = self.get_once(path)
        while status in (301, 302, 303, 307, 308) and redirects < max_redirects:
            redirects += 1
            status, _, data = self.get_once(path)
        return status, data, redirects


def instance_of(data: dict, hdr_instance: str | None = None) -> str | None:
    return data.get("instance") or data.get("instance_id") or hdr_instance


def count_of(data: dict) -> int | None:
    for key in ("count", "requests", "hits", "n"):
        v = data.get(key)
        if isinstance(v, int):
            return v
    return None


def cookie_host(cookie: str | None) -> str | None:
    """The host a cookie pins (sealed cookies are opened with the bench's key)."""
    try:
        return cookie_signer.parse(cookie or "", {KID: SECRET}).host
    except ValueError:
        return None


def new_sessions(env: Envoy, want: int, host: str | None, max_tries: int) -> list[Client]:
    """Creates sessions through the filter; keeps those pinned to `host`
    (any host when None). Each gets a second request so the store holds state."""
    out: list[Client] = []
    for _ in range(max_tries):
        if len(out) >= want:
            break
        c = Client(env.port)
        status, _, data = c.get_once("/")
        if status != 200 or not c.cookie:
            raise RuntimeError(f"new session: status {status}, cookie {c.cookie!r}")
        pinned = cookie_host(c.cookie)
        if host is not None and pinned != host:
            c.close()
            continue
        status, _, data = c.get_once("/")
        if status != 200:
            raise RuntimeError(f"second request of a new session: status {status}")
        c.count = count_of(data)
        out.append(c)
    if len(out) < want:
        raise RuntimeError(f"only {len(out)} of {want} sessions pinned to {host}")
    return out


# ------------------------------------------------------------ measurements --

def timed_first_request(c: Client) -> tuple[float, int, int, bool]:
    """(ms, final status, redirects, state kept) of one session's request."""
    before = c.count
    t0 = time.perf_counter()
    status, data, redirects = c.get("/")
    ms = (time.perf_counter() - t0) * 1000
    after = count_of(data)
    kept = before is None or after is None or after == before + 1
    c.count = after
    return ms, status, redirects, kept


def finish(bench: Bench, env: Envoy, backends: Backends) -> dict:
    """Stops the Envoy and the backends of one measurement; returns the Envoy's
    counters, read after the wasm workers flushed them (about once a second)."""
    time.sleep(1.5)
    counters = env.stats()
    bench.procs.stop(env.proc)  # type: ignore[arg-type]
    for port in list(backends.procs):
        bench.procs.stop(backends.procs.pop(port))  # type: ignore[arg-type]
    return counters


def measure_known_gone(bench: Bench, sessions: int, native: bool = False, store: str = "webdis") -> dict:
    backends = Backends(bench, f"known-{store}" + "-native" * native)
    backends.start_all()
    env = filter_envoy(bench, f"failover-known-{store}" + "-native" * native, backends.hosts, gone_ttl="10m",
                       native=native, store=store)
    env.wait_ready()
    victim = backends.hosts[0]
    clients = new_sessions(env, sessions + 1, victim, max_tries=(sessions + 1) * 6)
    # Reference: the same client, healthy pinned requests.
    ref = []
    for c in clients[1:]:
        t0 = time.perf_counter()
        status, data, _ = c.get("/")
        ref.append((time.perf_counter() - t0) * 1000)
        c.count = count_of(data)
    backends.kill(victim)
    trigger_ms, trigger_status, trigger_redirects, _ = timed_first_request(clients[0])
    time.sleep(1.5)  # counters flush; the gone mark is already in shared data
    calls_before = store_calls(env)
    ms, statuses, redirected, lost = [], {}, 0, 0
    for c in clients[1:]:
        t, status, redirects, kept = timed_first_request(c)
        statuses[status] = statuses.get(status, 0) + 1
        lost += 0 if kept else 1
        if redirects:
            redirected += 1
        elif status == 200:
            ms.append(t)
    calls = store_calls(env) - calls_before
    for c in clients:
        c.close()
    counters = finish(bench, env, backends)
    return latency_summary(
        ms, all_ms=[round(x, 3) for x in ms], statuses=statuses, redirected=redirected, lost_state=lost, store=store,
        store_calls_per_failover=round(calls / max(1, len(clients) - 1), 3),
        trigger={"ms": round(trigger_ms, 3), "status": trigger_status,
                 "redirects": trigger_redirects},
        reference_pinned=latency_summary(ref),
        counters={k.removeprefix("session_affinity."): v
                  for k, v in counters.items() if v})


def measure_storm(bench: Bench, sessions: int, native: bool = False, store: str = "webdis",
                  parallel: int = 64) -> dict:
    tag = f"storm-{store}" + "-native" * native
    backends = Backends(bench, tag)
    backends.start_all()
    env = filter_envoy(bench, tag, backends.hosts, gone_ttl="10m", native=native, store=store)
    env.wait_ready()
    victim = backends.hosts[0]
    clients = new_sessions(env, sessions, victim, max_tries=sessions * 8)
    for c in clients:
        c.close()  # a thousand idle kept-alive connections are not what a storm looks like
    calls_before = store_calls(env)
    t0 = time.perf_counter()
    backends.kill(victim)
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(timed_first_request, clients))
    all_served_s = time.perf_counter() - t0
    calls = store_calls(env) - calls_before
    for c in clients:
        c.close()
    statuses: dict[int, int] = {}
    for _, status, _, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    counters = finish(bench, env, backends)
    return latency_summary(
        [ms for ms, *_ in results], store=store, sessions=sessions, parallel=parallel,
        all_served_s=round(all_served_s, 3), statuses=statuses,
        errors=sum(n for status, n in statuses.items() if status != 200),
        lost_state=sum(1 for *_, kept in results if not kept),
        most_redirects=max((redirects for _, _, redirects, _ in results), default=0),
        store_calls_per_failover=round(calls / max(1, sessions), 3),
        counters={k.removeprefix("session_affinity."): v for k, v in counters.items() if v})


def measure_found_mid_request(bench: Bench, sessions: int, gone_ttl_s: float = 1.0) -> dict:
    backends = Backends(bench, "mid")
    backends.start_all()
    env = filter_envoy(bench, "failover-mid", backends.hosts, gone_ttl=f"{int(gone_ttl_s)}s")
    env.wait_ready()
    victim = backends.hosts[0]
    clients = new_sessions(env, sessions, victim, max_tries=sessions * 6)
    backends.kill(victim)
    time.sleep(1.2)  # let the health check see it too (UH rather than UF); both are "found"
    ms, statuses, not_redirected, lost = [], {}, 0, 0
    for c in clients:
        t, status, redirects, kept = timed_first_request(c)
        statuses[status] = statuses.get(status, 0) + 1
        lost += 0 if kept else 1
        if redirects == 1 and status == 200:
            ms.append(t)
        else:
            not_redirected += 1
        time.sleep(gone_ttl_s + 0.2)  # the next session finds the host gone again
    for c in clients:
        c.close()
    counters = env.stats()
    bench.procs.stop(env.proc)  # type: ignore[arg-type]
    for port in list(backends.procs):
        bench.procs.stop(backends.procs.pop(port))  # type: ignore[arg-type]
    note = f"gone_ttl {gone_ttl_s:g}s so that every sample is a first discovery"
    return latency_summary(ms, all_ms=[round(x, 3) for x in ms], statuses=statuses,
                           not_redirected=not_redirected,
                           lost_state=lost, note=note,
                           counters={k.removeprefix("session_affinity."): v
                                     for k, v in counters.items() if v})


def measure_kill_under_load(bench: Bench, sessions: int = 48, seconds: float = 8.0, native: bool = False) -> dict:
    backends = Backends(bench, "kill")
    backends.start_all()
    env = filter_envoy(bench, "failover-kill" + "-native" * native, backends.hosts, gone_ttl="30s", native=native)
    env.wait_ready()
    clients = new_sessions(env, sessions, None, max_tries=sessions * 2)
    victim = backends.hosts[0]
    on_victim = sum(1 for c in clients if cookie_host(c.cookie) == victim)
    stop = threading.Event()
    lock = threading.Lock()
    tally = {"requests": 0, "client_errors": 0, "errors_in_flight_at_kill": 0, "redirects": 0}
    lost: set[int] = set()
    errors: list[str] = []

    def loop(i: int, c: Client) -> None:
        while not stop.is_set():
            try:
                status, data, redirects = c.get("/")
            except OSError as e:
                with lock:
                    tally["client_errors"] += 1
                    errors.append(f"session {i}: {e}")
                c.close()
                time.sleep(0.05)
                continue
            count = count_of(data)
            with lock:
                tally["requests"] += 1
                tally["redirects"] += redirects
                if status != 200:
                    tally["client_errors"] += 1
                    body = data.get("_body", "")
                    # Envoy's reply when the host died with this request in flight:
                    # the app may have processed it, so it is never replayed.
                    if status == 503 and ("termination" in body or "reset" in body):
                        tally["errors_in_flight_at_kill"] += 1
                    errors.append(f"session {i}: status {status}: {data.get('_body', '')[:80]!r}")
                elif c.count is not None and count is not None and count != c.count + 1:
                    lost.add(i)
                    errors.append(f"session {i}: count {c.count} -> {count}")
            if status == 200:
                c.count = count

    threads = [threading.Thread(target=loop, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds / 3)
    backends.kill(victim)
    killed_at = round(seconds / 3, 1)
    time.sleep(seconds - seconds / 3)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    for c in clients:
        c.close()
    time.sleep(1.2)
    counters = env.stats()
    bench.procs.stop(env.proc)  # type: ignore[arg-type]
    for port in list(backends.procs):
        bench.procs.stop(backends.procs.pop(port))  # type: ignore[arg-type]
    return {"sessions": len(clients), "sessions_on_killed_host": on_victim,
            "seconds": seconds, "killed_at_s": killed_at, "lost_sessions": len(lost),
            **tally, "first_errors": errors[:10],
            "counters": {k.removeprefix("session_affinity."): v
                         for k, v in counters.items() if v}}


def measure_store_footprint(bench: Bench, store: str, seconds: float = 2.0) -> dict:
    """New sessions for `seconds`: store calls per write, keys and bytes per session."""
    backends = Backends(bench, f"size-{store}")
    backends.start_all()
    env = filter_envoy(bench, f"footprint-{store}", backends.hosts, gone_ttl="30s", store=store)
    env.wait_ready()
    before, calls_before, counters_before = bench.stores(store).footprint(), store_calls(env), env.stats()
    run_wrk(env.port, path="/", duration=seconds, connections=4, cpu=bench.load_cpu)
    time.sleep(1.5)  # workers flush counters about once a second
    counters = {k: v - counters_before.get(k, 0) for k, v in env.stats().items()}
    created = counters.get("session_affinity.sessions.created", 0)
    writes = counters.get("session_affinity.store.writes", 0)
    calls = store_calls(env) - calls_before
    after = bench.stores(store).footprint()
    bench.procs.stop(env.proc)  # type: ignore[arg-type]
    for port in list(backends.procs):
        bench.procs.stop(backends.procs.pop(port))  # type: ignore[arg-type]
    return {"store": store, "sessions": created, "writes": writes, "store_calls": calls,
            "store_calls_per_write": round(calls / max(1, writes), 3),
            "keys_per_session": round((after["keys"] - before["keys"]) / max(1, created), 2),
            "bytes_per_session": round((after["bytes"] - before["bytes"]) / max(1, created)),
            "state": "the demo backend's (about 70 bytes)"}


def run(bench: Bench, sessions: int) -> dict:
    storm = bench.args.storm_sessions
    script = Path(os.environ.get("SA_BENCH_DEMO_BACKEND", str(DEMO_BACKEND)))
    if not script.exists():
        return {"error": f"demo backend {script} is missing"}
    if "filter_pinned" in bench.unavailable or not bench.wasm("filter").exists():
        return {"error": "the filter does not load: "
                         + bench.unavailable.get("filter_pinned", "no module")[:300]}
    bench.store.start()
    out: dict = {"backend": str(script.relative_to(ROOT)) if script.is_relative_to(ROOT)
                 else str(script),
                 "backend_tcp_nodelay": "set by the harness (see Backends.start)",
                 "client": "Python http.client, kept-alive connection, one request at a time"}
    steps = [("known_gone", lambda: measure_known_gone(bench, sessions)),
             ("known_gone_etcd", lambda: measure_known_gone(bench, sessions, store="etcd")),
             ("found_mid_request", lambda: measure_found_mid_request(bench, max(3, sessions // 10))),
             ("kill_under_load", lambda: measure_kill_under_load(bench)),
             ("store_footprint", lambda: measure_store_footprint(bench, "webdis")),
             ("store_footprint_etcd", lambda: measure_store_footprint(bench, "etcd")),
             ("storm", lambda: measure_storm(bench, storm)),
             ("storm_etcd", lambda: measure_storm(bench, storm, store="etcd"))]
    if (running.NATIVE_DIR / NATIVE_SO).exists():
        steps += [("native_known_gone", lambda: measure_known_gone(bench, sessions, native=True)),
                  ("native_kill_under_load", lambda: measure_kill_under_load(bench, native=True)),
                  ("native_storm", lambda: measure_storm(bench, storm, native=True)),
                  ("native_storm_etcd", lambda: measure_storm(bench, storm, native=True, store="etcd"))]
    steps = [step for step in steps if not bench.args.failover_parts or step[0] in bench.args.failover_parts]
    if any(key.endswith("_etcd") for key, _ in steps):
        if shutil.which("etcd"):
            bench.etcd.start()
        else:
            out.update({key: {"error": "etcd is not installed"} for key, _ in steps if key.endswith("_etcd")})
            steps = [step for step in steps if not step[0].endswith("_etcd")]
    for key, fn in steps:
        try:
            for attempt in (0, 1):
                t0 = time.monotonic()
                waited = bench.wait_quiet() if bench.args.noise_limit < 1 else 0
                log(f"failover: {key}" + (f" (waited {waited:g} s for quiet CPUs)" if waited > 1 else ""))
                s0 = bench.noise.snapshot()
                out[key] = fn()
                f = bench.noise.foreign(s0, bench.noise.snapshot())
                # The client is Python on the load CPU, so only Envoy's CPU is judged.
                out[key]["foreign_cpu"] = f
                out[key]["noisy"] = f.get("envoy_cpu", 0.0) > bench.args.noise_limit
                bench.noise_spent += waited if attempt == 0 else time.monotonic() - t0
                # Latency figures are worth one repeat; the others count events.
                if not out[key]["noisy"] or "known_gone" not in key or not bench.budget_left():
                    break
                log(f"failover: {key}: other programs took {f} of our CPUs; repeating")
            shown = {k: v for k, v in out[key].items()
                     if k not in ("counters", "first_errors", "reference_pinned", "all_ms")}
            log(f"failover: {key}: {json.dumps(shown)}")
        except Exception as e:  # noqa: BLE001 - one part failing must not hide the others
            msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            log(f"failover: {key}: not measured: {msg}")
            out[key] = {"error": msg}
    return out

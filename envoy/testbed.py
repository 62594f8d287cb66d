"""The session-affinity testbed, run natively: Redis, webdis, three demo
backends and Envoy with the filter, all as processes on 127.0.0.1.

Run it with `envoy/testbed` (see envoy/README.md). The tests import this module
and use the same code with a port plan of free ports, so several test runs and
a developer's testbed can run side by side.

envoy/testbed.yaml stays the single source of the topology: it is parsed, its
ports, .wasm path and plugin JSON are rewritten in memory, and the result is
written to a work directory. Tracked files are never edited.

Every process is started in its own session (Ctrl-C reaches only the runner,
which stops the rest in order) and is stopped by its PID. If the runner dies
without cleaning up, the kernel sends its children SIGTERM (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

import mesh as mesh_mode

# Run as a script, this module is __main__: modules beside it that import
# `testbed` (etcd_cluster) must get this one, with the same classes.
sys.modules.setdefault("testbed", sys.modules[__name__])

REPO = Path(__file__).resolve().parent.parent
ENVOY_DIR = REPO / "envoy"
TESTBED_YAML = ENVOY_DIR / "testbed.yaml"
WEBDIS_JSON = ENVOY_DIR / "webdis.json"
REDIS_CONF = ENVOY_DIR / "redis.conf"
# The environment variable that hands Envoy's VM the store password (the
# plugin JSON's store.auth.password_env, listed in host_env_keys).
STORE_PASSWORD_ENV = "SA_STORE_PASSWORD"
BACKEND_APP = ENVOY_DIR / "backend" / "app.py"
WASM = REPO / "target" / "wasm32-unknown-unknown" / "release" / "session_affinity.wasm"
# The same filter as an Envoy dynamic module (filter/native): Envoy loads
# lib<name>.so from ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
NATIVE = REPO / "target" / "native" / "libsession_affinity_native.so"
MODULES = ("wasm", "native")
# Where each build's counters appear in Envoy's /stats.
METRIC_PREFIXES = {"wasm": "wasmcustom.session_affinity.", "native": "dynamicmodulescustom.session_affinity."}
BACKEND_NAMES = ("a", "b", "c")
ENVOY_BIN = os.environ.get("ENVOY_BIN", "envoy")
# The session stores a testbed can run (envoy/testbed --store): webdis in
# front of Redis, or three etcd members (envoy/etcd-store.yaml); the programs
# each needs. .ci/setup testbed installs them.
STORES = ("webdis", "etcd")
STORE_TOOLS = {"webdis": ("redis-server", "webdis"), "etcd": ("etcd",)}
# The programs the default testbed starts.
TOOLS = (ENVOY_BIN, *STORE_TOOLS["webdis"])
WASM_FILTER = "envoy.filters.http.wasm"
APP_CLUSTER = "app"
STORE_CLUSTER = "session_store"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no parent-death signal
    _prctl = None


def _die_with_parent():
    """Runs in the child before exec: SIGTERM it when the runner goes away."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# Free ports are drawn from below the kernel's ephemeral range. A port in that
# range can be taken, between being chosen and being bound, as the local end
# of any outgoing connection (Envoy opens one per store call), and a killed
# backend's port before the backend restarts on it; a connection to a port
# with no listener there can even connect to itself. Above the documented
# fixed ports (PortPlan's defaults), so a running testbed never collides.
PORT_FLOOR = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_floor() -> int:
    """The lowest port the kernel hands out on its own (Linux's default if unknown)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class _PortCursor:
    """Hands out the ports below the ephemeral range in turn, from a random
    start, so a process is given a port again only after going round the
    whole range: a port handed out but not bound yet (a backend starting, a
    killed one waiting to restart, the next of several processes set up one
    by one) is not handed out a second time, as random picks would."""

    def __init__(self):
        self.lock = threading.Lock()
        self.next: int | None = None

    def take(self, count: int) -> list[int]:
        floor, span = PORT_FLOOR, ephemeral_floor() - PORT_FLOOR
        if span < 1000:
            return []
        ports = []
        with self.lock:
            if self.next is None:
                self.next = floor + secrets.randbelow(span)
            for _ in range(min(span, 50 * count)):
                if len(ports) == count:
                    break
                port, self.next = self.next, floor + (self.next + 1 - floor) % span
                with socket.socket() as sock:
                    try:
                        sock.bind(("127.0.0.1", port))
                    except OSError:
                        continue
                ports.append(port)
        return ports


_PORTS = _PortCursor()


def free_ports(count: int) -> list[int]:
    """Ports that are free on 127.0.0.1 now, all distinct and not handed out
    before by this process, from below the ephemeral range where it leaves
    room (else any the kernel picks)."""
    ports = _PORTS.take(count)
    sockets: list[socket.socket] = []
    try:
        # Held open until all are chosen, so the kernel picks distinct ones.
        while len(ports) + len(sockets) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return ports + [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class PortPlan:
    """Where every testbed process listens. The defaults are the documented ones."""

    listener: int = 10000
    admin: int = 9901
    backends: tuple[int, ...] = (18081, 18082, 18083)
    webdis: int = 17379
    redis: int = 16379
    # Client ports of the etcd members, then their peer ports.
    etcd: tuple[int, ...] = (12379, 22379, 32379, 12380, 22380, 32380)

    @classmethod
    def free(cls, backends: int = len(BACKEND_NAMES)) -> "PortPlan":
        """A plan of ports that are free right now."""
        ports = free_ports(10 + backends)
        return cls(listener=ports[0], admin=ports[1], webdis=ports[2], redis=ports[3], etcd=tuple(ports[4:10]),
                   backends=tuple(ports[10:]))


class StartupError(RuntimeError):
    """A process did not become ready in time; the message says which and why."""


def wait_until(check, timeout: float, what: str, interval: float = 0.05):
    """Poll check() until it returns a true value (returned), or raise StartupError.

    check may raise OSError or ValueError while the thing is still starting;
    the last such error is reported if time runs out.
    """
    deadline = time.monotonic() + timeout
    last = "never ready"
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError) as err:
            last = f"{type(err).__name__}: {err}"
        if time.monotonic() >= deadline:
            raise StartupError(f"{what} not ready after {timeout:.0f}s ({last})")
        time.sleep(interval)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, dict, bytes]:
    """GET without following redirects; (status, headers, body) for any status."""
    request = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def accepts(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port."""
    with socket.create_connection(("127.0.0.1", port), 1):
        return True


class Process:
    """One child process, its log file, and nothing else: it is stopped by PID."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path = REPO, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.popen: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self):
        if self.running():
            raise RuntimeError(f"{self.name} is already running as pid {self.pid}")
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            env = {**os.environ, **self.env} if self.env else None
            self.popen = subprocess.Popen(
                self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent, env=env,
            )

    def stop(self, timeout: float = STOP_TIMEOUT):
        """SIGTERM, then SIGKILL if it has not exited within timeout."""
        if not self.running():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        """SIGKILL: the process gets no chance to clean up, like a crashed pod."""
        if self.running():
            self.popen.kill()
            self.popen.wait(STOP_TIMEOUT)

    def ensure_alive(self):
        """Raise with the log tail if the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise StartupError(f"{self.name} exited with code {self.popen.returncode}:\n{self.log_tail(30)}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Backend:
    """A demo backend: fixed name and port, a new instance id on every start.

    In mesh mode `port` is its sidecar's (the pod's address, as the gateway
    and cookies see it) and the app itself listens on `app_port`; the
    sidecar outlives the app, as a pod's istio-proxy outlives a crashed app
    container."""

    name: str
    port: int
    process: Process
    instance: str = ""
    app_port: int = 0
    sidecar: Process | None = None

    @property
    def address(self) -> str:
        """As Envoy reports it in upstream.address, and as cookies record it."""
        return f"127.0.0.1:{self.port}"

    @property
    def app_address(self) -> str:
        return f"127.0.0.1:{self.app_port or self.port}"


def redis_admin() -> tuple[str, str]:
    """The admin user and password envoy/redis.conf defines for looking into the store."""
    for line in REDIS_CONF.read_text().splitlines():
        words = line.split()
        if words[:2] == ["user", "admin"]:
            return "admin", next(w[1:] for w in words if w.startswith(">"))
    raise ValueError(f"{REDIS_CONF} defines no admin user")


def store_password() -> str:
    """The password the filter sends webdis (its ACL's basic auth in envoy/webdis.json)."""
    for rule in json.loads(WEBDIS_JSON.read_text())["acl"]:
        if "http_basic_auth" in rule:
            return rule["http_basic_auth"].partition(":")[2]
    raise ValueError(f"{WEBDIS_JSON} has no http_basic_auth rule")


def envoy_env(module: str = "wasm", store: str = "webdis") -> dict[str, str]:
    """What an Envoy running envoy/testbed.yaml needs in its environment."""
    if store == "etcd":
        from etcd_cluster import store_topology
        env = {STORE_PASSWORD_ENV: store_topology()["password"]}
    else:
        env = {STORE_PASSWORD_ENV: store_password()}
    if module == "native":
        env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(NATIVE.parent)
    return env


def redis_command(port: int, *args: str, timeout: float = 2.0):
    """One Redis command over RESP on 127.0.0.1:port, authenticated as the admin user."""
    def encode(command):
        return f"*{len(command)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in command)

    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall((encode(["AUTH", *redis_admin()]) + encode(list(args))).encode())
        with sock.makefile("rb") as stream:
            _resp(stream)
            return _resp(stream)


def _resp(stream):
    line = stream.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(f"redis error: {rest}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if int(rest) < 0 else stream.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [_resp(stream) for _ in range(int(rest))]
    raise RuntimeError(f"unexpected redis reply {line!r}")


def load_bootstrap() -> dict:
    return yaml.safe_load(TESTBED_YAML.read_text())


def find_wasm_filter(bootstrap: dict) -> dict:
    """The wasm filter's `config` block in the listener's filter chain."""
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] == WASM_FILTER:
                        return http_filter["typed_config"]["config"]
    raise KeyError(f"no {WASM_FILTER} filter in {TESTBED_YAML}")


def default_filter_config(store: str = "webdis") -> dict:
    """The plugin JSON of envoy/testbed.yaml, parsed (tests read keys from it);
    with the etcd store, its store section is envoy/etcd-store.yaml's."""
    config = json.loads(find_wasm_filter(load_bootstrap())["configuration"]["value"])
    if store == "etcd":
        from etcd_cluster import store_topology
        config["store"] = store_topology()["store"]
    return config


def use_native_module(bootstrap: dict):
    """Swaps the wasm filter for the native module with the same plugin JSON,
    and drops stateful_session: the module picks the host itself."""
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                filters = network_filter["typed_config"].get("http_filters", [])
                for index, http_filter in enumerate(filters):
                    if http_filter["name"] == WASM_FILTER:
                        filters[index] = native_filter(http_filter["typed_config"]["config"]["configuration"]["value"])
                filters[:] = [f for f in filters if f["name"] != "envoy.filters.http.stateful_session"]


def native_filter(plugin_json: str) -> dict:
    """The native module's http_filters entry (filter/native/envoy.yaml shows it to users)."""
    return {"name": "envoy.filters.http.dynamic_modules", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": {"name": NATIVE.stem.removeprefix("lib"), "do_not_close": True},
        "filter_name": "session_affinity",
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin_json},
    }}


def _endpoints(port_list) -> list[dict]:
    return [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        for port in port_list
    ]}]


def render_bootstrap(ports: PortPlan, listener: int, admin: int, filter_config: dict, wasm: Path = WASM,
                     module: str = "wasm", store: str = "webdis") -> dict:
    """envoy/testbed.yaml with this plan's ports, this .wasm (or the native module)
    and this plugin JSON (and with the etcd store, envoy/etcd-store.yaml's cluster)."""
    bootstrap = copy.deepcopy(load_bootstrap())
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = admin
    listeners = bootstrap["static_resources"]["listeners"]
    if len(listeners) != 1:
        raise ValueError(f"{TESTBED_YAML} must have exactly one listener, found {len(listeners)}")
    listeners[0]["address"]["socket_address"]["port_value"] = listener
    wasm_config = find_wasm_filter(bootstrap)
    wasm_config["vm_config"]["code"]["local"]["filename"] = str(wasm)
    wasm_config["configuration"]["value"] = json.dumps(filter_config, indent=1)
    clusters = bootstrap["static_resources"]["clusters"]
    for index, cluster in enumerate(clusters):
        if cluster["name"] == APP_CLUSTER:
            cluster["load_assignment"]["endpoints"] = _endpoints(ports.backends)
        elif cluster["name"] == STORE_CLUSTER and store == "etcd":
            from etcd_cluster import store_topology
            clusters[index] = store_topology()["cluster"]
            clusters[index]["load_assignment"]["endpoints"] = _endpoints(ports.etcd[:3])
        elif cluster["name"] == STORE_CLUSTER:
            cluster["load_assignment"]["endpoints"] = _endpoints([ports.webdis])
    if module == "native":
        use_native_module(bootstrap)
    return bootstrap


class Envoy:
    """One Envoy of the testbed, with its own listener, admin port and plugin JSON."""

    def __init__(self, testbed: "Testbed", name: str, listener: int, admin: int, filter_config: dict):
        self.testbed = testbed
        self.name = name
        self.listener = listener
        self.admin = admin
        self.filter_config = filter_config
        self.config_path = testbed.workdir / f"{name}.yaml"
        # The app's endpoints as this Envoy's file-based EDS serves them
        # (address -> EDS health status), or None for the static endpoints.
        self.endpoints: dict[str, str] | None = None
        self.eds_path = testbed.workdir / f"{name}-eds.yaml"
        self.eds_version = 0
        argv = [
            ENVOY_BIN, "-c", str(self.config_path), "--concurrency", str(testbed.concurrency),
            "--disable-hot-restart", "-l", "info",
        ]
        self.process = Process(name, argv, testbed.workdir / f"{name}.log", env=envoy_env(testbed.module, testbed.store))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener}"

    @property
    def metric_prefix(self) -> str:
        """Where the filter's counters appear in /stats."""
        return METRIC_PREFIXES[self.testbed.module]

    def filter_counters(self) -> dict[str, int]:
        """The filter's counters, named without the prefix (e.g. "sessions.pinned")."""
        prefix = self.metric_prefix
        return {name[len(prefix):]: value for name, value in self.stats(prefix).items()}

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def write_config(self) -> Path:
        bootstrap = render_bootstrap(self.testbed.ports, self.listener, self.admin, self.filter_config, self.testbed.wasm,
                                     self.testbed.module, self.testbed.store)
        for patch in self.testbed.bootstrap_patches:
            patch(bootstrap)
        if self.endpoints is not None:
            self._write_eds()
            app = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == APP_CLUSTER)
            del app["load_assignment"]
            app["type"] = "EDS"
            app["eds_cluster_config"] = {"eds_config": {"resource_api_version": "V3",
                                                        "path_config_source": {"path": str(self.eds_path)}}}
            bootstrap.setdefault("node", {"id": self.name, "cluster": "testbed"})  # xDS needs both
        self.config_path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        return self.config_path

    def set_endpoints(self, endpoints: dict[str, str]):
        """Serve the app cluster from a file-based EDS (from the next start on,
        and at once when running), as a control plane would: address -> EDS
        health status ("HEALTHY", "DRAINING", ...). An address left out is
        removed from the cluster."""
        self.endpoints = dict(endpoints)
        if self.process.running():
            self._write_eds()

    def _write_eds(self):
        """The whole file replaced at once (Envoy reloads on the rename)."""
        self.eds_version += 1
        lb_endpoints = [{"endpoint": {"address": {"socket_address": {
            "address": address.rsplit(":", 1)[0], "port_value": int(address.rsplit(":", 1)[1])}}},
            "health_status": status} for address, status in (self.endpoints or {}).items()]
        document = {"version_info": str(self.eds_version), "resources": [{
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": APP_CLUSTER, "endpoints": [{"lb_endpoints": lb_endpoints}]}]}
        staging = self.eds_path.with_name(self.eds_path.name + ".new")
        staging.write_text(yaml.safe_dump(document, sort_keys=False))
        staging.replace(self.eds_path)

    def lists(self, address: str) -> bool:
        """Whether this Envoy's view of the app cluster has the address."""
        return self.endpoints is None or address in self.endpoints

    def start(self, wait_healthy: bool = True):
        self.write_config()
        self.process.start()
        self.wait_ready(wait_healthy)

    def stop(self):
        self.process.stop()

    def restart(self, filter_config: dict | None = None, wait_healthy: bool = True):
        """Stop, then start on the same ports, optionally with new plugin JSON."""
        self.stop()
        if filter_config is not None:
            self.filter_config = filter_config
        self.start(wait_healthy)

    def wait_ready(self, wait_healthy: bool = True, timeout: float = START_TIMEOUT):
        """Admin says LIVE, the listener accepts, and (optionally) all backends are healthy."""

        def live():
            self.process.ensure_alive()
            status, _, body = http_get(f"{self.admin_url}/ready")
            return status == 200 and body.strip() == b"LIVE"

        wait_until(live, timeout, f"{self.name} admin {self.admin_url}/ready")
        wait_until(lambda: accepts(self.listener), timeout, f"{self.name} listener {self.url}")
        if wait_healthy:
            for backend in self.testbed.backends:
                if backend.process.running() and self.lists(backend.address):
                    self.wait_host_health(backend.address, healthy=True, timeout=timeout)
            # Until a store host's health check passes, store calls fail at once.
            for store in self.testbed.running_store_hosts():
                wait_until(lambda: self.host_health(STORE_CLUSTER).get(store) == "healthy", timeout,
                           f"{self.name}: the store {store} healthy")
            self.wait_balanced()

    def wait_balanced(self, timeout: float = 6.0):
        """After health checks failed (they time out while Envoy compiles the
        module at start, more so on a loaded machine), Envoy's workers keep
        sending every new request to one host for about a check interval even
        though /clusters shows all healthy. Wait for two clean rounds of checks
        then (bounded), so new sessions spread and retries find other hosts."""
        def read():
            stats = self.stats("cluster.app.health_check.")
            return (stats.get("cluster.app.health_check.failure", 0), stats.get("cluster.app.health_check.success", 0))

        failures, successes = read()
        if failures == 0:
            return
        hosts = sum(1 for b in self.testbed.backends if b.process.running())
        try:
            wait_until(lambda: read()[0] == failures and read()[1] >= successes + 2 * hosts, timeout,
                       "two clean rounds of health checks")
        except StartupError:
            pass  # a skewed balancer only makes tests that count placements report it

    def host_health(self, cluster: str = APP_CLUSTER) -> dict[str, str]:
        """health_flags of every host of a cluster, e.g. {"127.0.0.1:18081": "healthy"}."""
        _, _, body = http_get(f"{self.admin_url}/clusters")
        flags = {}
        for line in body.decode().splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and parts[2] == "health_flags":
                flags[parts[1]] = parts[3]
        return flags

    def wait_host_health(self, address: str, healthy: bool, timeout: float = 10.0):
        """Wait until Envoy's health checker sees host address as (un)healthy."""
        want = "healthy" if healthy else "unhealthy"
        wait_until(lambda: (self.host_health().get(address) == "healthy") == healthy, timeout,
                   f"{self.name}: host {address} {want}")

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges from /stats (histograms are left out)."""
        _, _, body = http_get(f"{self.admin_url}/stats?filter=^{prefix}")
        values = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                values[name] = int(value)
        return values


class Testbed:
    """All testbed processes for one port plan, in one work directory.

    Use as a context manager, or call start() and stop(). stop() is safe to
    call at any time and stops exactly the processes this object started.
    """

    def __init__(self, ports: PortPlan, workdir: Path, concurrency: int = 2,
                 filter_config: dict | None = None, wasm: Path = WASM, say=None, mesh: bool = False,
                 module: str = "wasm", store: str = "webdis"):
        if module not in MODULES:
            raise ValueError(f"module must be one of {MODULES}, not {module!r}")
        self.module = module
        self.ports = ports
        self.store = store
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.concurrency = concurrency
        self.wasm = Path(wasm)
        self.say = say or (lambda message: None)
        self.redis = Process("redis", [
            "redis-server", str(REDIS_CONF), "--port", str(ports.redis), "--dir", str(self.workdir),
        ], self.workdir / "redis.log")
        self.webdis = Process("webdis", ["webdis", str(self._write_webdis_config())], self.workdir / "webdis.log")
        # The etcd store: three members instead of Redis and webdis.
        self.etcd = None
        if store == "etcd":
            from etcd_cluster import EtcdCluster
            self.etcd = EtcdCluster(self.workdir, ports.etcd[:3], ports.etcd[3:], say=self.say)
        self.backends = [
            Backend(name, port, Process(f"backend-{name}", [], self.workdir / f"backend-{name}.log"))
            for name, port in zip(BACKEND_NAMES, ports.backends)
        ]
        self.envoy = Envoy(self, "envoy", ports.listener, ports.admin,
                           filter_config if filter_config is not None else default_filter_config(store))
        self.extra_envoys: list[Envoy] = []
        # Changes tests make to every Envoy's bootstrap (callables that edit
        # it in place), and extra demo-backend options: applied at each start.
        self.bootstrap_patches: list = []
        self.backend_args: list[str] = []
        self.mesh = mesh
        if mesh:
            self._add_sidecars()

    def _add_sidecars(self):
        """Mesh mode: a sidecar Envoy in front of each backend, reached over mutual TLS."""
        certs = mesh_mode.make_certificates(self.workdir / "mesh")
        self.bootstrap_patches.append(mesh_mode.gateway_patch(certs))
        ports = free_ports(2 * len(self.backends))
        for backend, app_port, admin in zip(self.backends, ports[::2], ports[1::2]):
            backend.app_port = app_port
            config = self.workdir / f"sidecar-{backend.name}.yaml"
            config.write_text(yaml.safe_dump(mesh_mode.render_sidecar(backend.port, admin, app_port, certs), sort_keys=False))
            backend.sidecar = Process(f"sidecar-{backend.name}", [
                ENVOY_BIN, "-c", str(config), "--concurrency", "1", "--disable-hot-restart", "-l", "warning",
            ], self.workdir / f"sidecar-{backend.name}.log")

    def _write_webdis_config(self) -> Path:
        config = json.loads(WEBDIS_JSON.read_text())
        config.update(redis_port=self.ports.redis, http_port=self.ports.webdis, daemonize=False)
        path = self.workdir / "webdis.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def processes(self) -> list[Process]:
        """Every process this testbed manages, in start order."""
        sidecars = [b.sidecar for b in self.backends if b.sidecar]
        store = self.etcd.processes() if self.etcd else [self.redis, self.webdis]
        return (store + [b.process for b in self.backends] + sidecars
                + [self.envoy.process] + [e.process for e in self.extra_envoys])

    def start(self):
        """Start everything and wait until Envoy sees every backend healthy."""
        try:
            if self.etcd:
                self.etcd.start()
            else:
                self.start_redis()
                self.start_webdis()
            self.start_backends()
            for backend in self.backends:
                if backend.sidecar:
                    self._start_sidecar(backend)
            self.envoy.start()
            self.say(f"started envoy pid {self.envoy.process.pid} (listener {self.envoy.url}, admin {self.envoy.admin_url})")
        except StartupError as err:
            self.stop()
            raise StartupError(f"{err}\n{self.log_report(30)}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        """Stop every process this testbed started, newest first."""
        for process in reversed(self.processes()):
            process.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def running_store_hosts(self) -> list[str]:
        """The endpoints of Envoy's store cluster whose process runs."""
        if self.etcd:
            return [m.address for m in self.etcd.live()]
        return [f"127.0.0.1:{self.ports.webdis}"] if self.webdis.running() else []

    def session_record(self, sid: str) -> dict:
        """The stored session, whichever the store: {"owner", "state", "lease"} (None where missing)."""
        if self.etcd:
            return self.etcd.session_record(sid)
        prefix = self.envoy.filter_config["store"]["key_prefix"]
        flat = self.redis_command("HGETALL", f"{prefix}{sid}") or []
        record = dict(zip(flat[::2], flat[1::2]))
        return {"owner": record.get("owner"), "state": record.get("state"),
                "lease": self.redis_command("GET", f"{prefix}{sid}:lease")}

    def start_redis(self):
        self.redis.start()
        wait_until(lambda: self._redis_pong(), START_TIMEOUT, f"redis on port {self.ports.redis}")
        self.say(f"started redis pid {self.redis.pid} (127.0.0.1:{self.ports.redis})")

    def _redis_pong(self) -> bool:
        self.redis.ensure_alive()
        return self.redis_command("PING") == "PONG"

    def redis_command(self, *args: str, timeout: float = 2.0):
        """One Redis command as the testbed's admin user (no client library needed)."""
        return redis_command(self.ports.redis, *args, timeout=timeout)

    def stop_redis(self):
        self.redis.stop()

    def start_webdis(self):
        self.webdis.start()

        def ready():
            self.webdis.ensure_alive()
            return http_get(f"http://127.0.0.1:{self.ports.webdis}/PING")[0] == 200

        wait_until(ready, START_TIMEOUT, f"webdis on port {self.ports.webdis}")
        self.say(f"started webdis pid {self.webdis.pid} (127.0.0.1:{self.ports.webdis})")

    def stop_webdis(self):
        self.webdis.stop()

    def start_backends(self):
        for index in range(len(self.backends)):
            self.start_backend(index)

    def start_backend(self, index: int, instance: str | None = None) -> Backend:
        """Start backend index on its port with a new instance id; wait for /healthz."""
        backend = self.backends[index]
        backend.instance = instance or f"{backend.name}-{secrets.token_hex(4)}"
        backend.process.argv = [
            sys.executable, "-u", str(BACKEND_APP), "--name", backend.name, "--port", str(backend.app_port or backend.port),
            "--host", "127.0.0.1", "--instance", backend.instance, *self.backend_args,
        ]
        backend.process.start()

        def healthy():
            backend.process.ensure_alive()
            status, headers, _ = http_get(f"http://{backend.app_address}/healthz")
            return status == 200 and headers.get("x-instance-id") == backend.instance

        wait_until(healthy, START_TIMEOUT, f"backend {backend.name} on {backend.app_address}")
        self.say(f"started backend {backend.name} pid {backend.process.pid} ({backend.address}, instance {backend.instance})")
        return backend

    def _start_sidecar(self, backend: Backend):
        backend.sidecar.start()
        wait_until(lambda: backend.sidecar.ensure_alive() or accepts(backend.port), START_TIMEOUT,
                   f"sidecar of {backend.name} on {backend.address}")
        self.say(f"started sidecar {backend.name} pid {backend.sidecar.pid} ({backend.address} -> {backend.app_address})")

    def kill_backend(self, index: int) -> Backend:
        """SIGKILL backend index, like a crashed pod (in mesh mode: a crashed
        app container, its sidecar still up); its sessions are lost."""
        backend = self.backends[index]
        backend.process.kill()
        return backend

    def restart_backend(self, index: int) -> Backend:
        """Kill backend index and start it again on the same port as a new instance."""
        self.kill_backend(index)
        return self.start_backend(index)

    def backend_named(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)

    def start_envoy(self, name: str, filter_config: dict | None = None, wait_healthy: bool = True,
                    endpoints: dict[str, str] | None = None) -> Envoy:
        """Another Envoy (free ports) in front of the same backends and store;
        with `endpoints`, its app cluster comes from a file-based EDS (Envoy.set_endpoints)."""
        listener, admin = free_ports(2)
        config = filter_config if filter_config is not None else copy.deepcopy(self.envoy.filter_config)
        envoy = Envoy(self, name, listener, admin, config)
        if endpoints is not None:
            envoy.set_endpoints(endpoints)
        self.extra_envoys.append(envoy)
        envoy.start(wait_healthy)
        return envoy

    def log_report(self, lines: int = 60) -> str:
        """The last lines of every process log, for a failing test's report."""
        parts = []
        for process in self.processes():
            state = "running" if process.running() else "stopped"
            parts.append(f"===== {process.name} (pid {process.pid}, {state}) {process.log_path}\n{process.log_tail(lines)}")
        return "\n".join(parts)


def missing_tools(store: str = "webdis") -> list[str]:
    """The tools a testbed with this store needs that are not on PATH."""
    return [tool for tool in (ENVOY_BIN, *STORE_TOOLS[store]) if shutil.which(tool) is None]


def module_path(module: str = "wasm") -> Path:
    return NATIVE if module == "native" else WASM


def module_is_stale(module: str = "wasm") -> bool:
    """True if the module is missing or older than any of its sources."""
    built_path = module_path(module)
    if not built_path.exists():
        return True
    sources = [*(REPO / "filter" / "src").rglob("*.rs"), REPO / "filter" / "Cargo.toml", REPO / "filter" / "build",
               REPO / "Cargo.toml", REPO / "Cargo.lock"]
    if module == "native":
        sources += [*(REPO / "filter" / "native" / "src").rglob("*.rs"), REPO / "filter" / "native" / "Cargo.toml"]
    built = built_path.stat().st_mtime
    return any(path.exists() and path.stat().st_mtime > built for path in sources)


def ensure_module(module: str = "wasm", rebuild: bool = False, say=print) -> Path:
    """The built module, built with filter/build when missing or stale (or when asked)."""
    if rebuild or module_is_stale(module):
        say("building the filter with filter/build (the first build takes a few minutes)")
        subprocess.run([str(REPO / "filter" / "build")], cwd=REPO, check=True, stdin=subprocess.DEVNULL, timeout=1800)
    built = module_path(module)
    if not built.exists():
        raise FileNotFoundError(f"filter/build did not produce {built}")
    return built


def ensure_wasm(rebuild: bool = False, say=print) -> Path:
    """The .wasm (what the Kubernetes and Istio setups load)."""
    return ensure_module("wasm", rebuild, say)


class _Stop(Exception):
    """Raised by the SIGINT and SIGTERM handlers so the runner unwinds and stops everything."""


def _raise_stop(signum, frame):
    raise _Stop()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="envoy/testbed",
        description="Run Redis, webdis, three demo backends and Envoy with the filter on 127.0.0.1. "
                    "Ctrl-C stops everything.")
    parser.add_argument("--store", choices=STORES, default="webdis",
                        help="the session store: webdis in front of Redis (default), or three etcd members")
    parser.add_argument("--free-ports", action="store_true",
                        help="pick free ports instead of the documented ones (to run beside another testbed)")
    parser.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads (default 2)")
    parser.add_argument("--rebuild", action="store_true", help="run filter/build even if the module exists")
    parser.add_argument("--module", choices=MODULES, default="wasm",
                        help="the filter as proxy-wasm (default), or as the native Envoy dynamic module "
                             "(no stateful_session filter)")
    parser.add_argument("--workdir", type=Path, help="where configs and logs go (default: a new temp dir)")
    parser.add_argument("--mesh", action="store_true",
                        help="put every backend behind its own sidecar Envoy, reached over mutual TLS (like Istio)")
    parser.add_argument("--no-install", action="store_true",
                        help="only check that the tools are there; envoy/testbed passes it to .ci/setup")
    parser.add_argument("--app", choices=("demo", "tomcat"), default="demo",
                        help="the backends: the demo backend (default), or Tomcat 10 with the adapter "
                             "valve and its demo app (adapters/tomcat)")
    return parser.parse_args(argv)


def testbed_class(app: str):
    """The Testbed for --app: tomcat swaps the backends for Tomcats (adapters/tomcat/tomcats.py)."""
    if app == "tomcat":
        sys.path.insert(0, str(REPO / "adapters" / "tomcat"))
        from tomcats import TomcatTestbed
        return TomcatTestbed
    return Testbed


def main(argv=None) -> int:
    args = parse_args(argv)

    def say(message):
        print(f"testbed: {message}", flush=True)

    # Explicit handlers: SIGINT may arrive ignored from a non-interactive parent.
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    missing = missing_tools(args.store)
    if missing:
        say(f"not installed: {', '.join(missing)}; `.ci/setup testbed` installs them (Debian/Ubuntu)")
        return 2
    try:
        ensure_module(args.module, args.rebuild, say)
    except subprocess.CalledProcessError as err:
        say(f"filter/build failed with exit code {err.returncode} (its output is above)")
        return 1
    except (OSError, subprocess.TimeoutExpired) as err:
        say(f"cannot build the filter: {err}")
        return 1
    except _Stop:
        return 130
    ports = PortPlan.free() if args.free_ports else PortPlan()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sa-testbed-"))
    testbed = testbed_class(args.app)(ports, workdir, concurrency=args.concurrency, say=say, mesh=args.mesh,
                                         module=args.module, store=args.store)
    say(f"configs and logs in {workdir}")
    try:
        testbed.start()
        say(f"ready at {testbed.envoy.url}/  (admin {testbed.envoy.admin_url}/, Ctrl-C stops)")
        reported = set()
        while True:
            time.sleep(0.5)
            for process in testbed.processes():
                if not process.running() and process.name not in reported:
                    reported.add(process.name)
                    say(f"{process.name} (pid {process.pid}) exited with code {process.popen.returncode}")
    except _Stop:
        say("stopping")
    except StartupError as err:
        say(f"failed to start: {err}")
        return 1
    finally:
        # A second Ctrl-C must not cut the cleanup short; each stop is bounded.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        testbed.stop()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

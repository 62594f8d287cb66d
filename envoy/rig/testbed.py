"""The testbed: Redis and webdis (or three etcd members), three demo
backends (in mesh mode each behind a sidecar Envoy over mutual TLS) and
Envoy with the filter, all processes on 127.0.0.1 for one port plan, in one
work directory."""

from __future__ import annotations

import copy
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import mesh as mesh_mode
from .bootstrap import default_filter_config
from .envoy import Envoy
from .etcd import EtcdCluster
from .paths import BACKEND_APP, BACKEND_NAMES, ENVOY_BIN, MODULES, REDIS_CONF, WASM, WEBDIS_JSON
from .ports import PortPlan, free_ports
from .probe import START_TIMEOUT, StartupError, accepts, http_get, wait_until
from .process import Process
from .redis_client import redis_command


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


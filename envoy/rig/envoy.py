"""One Envoy of the testbed: its config written from envoy/testbed.yaml (and
optionally a file-based EDS for the app cluster), its process, and the waits
for it to be ready and balanced."""

from __future__ import annotations

from pathlib import Path

import yaml

from .admin import AdminClient
from .bootstrap import envoy_env, render_bootstrap
from .paths import APP_CLUSTER, ENVOY_BIN, METRIC_PREFIXES, STORE_CLUSTER
from .probe import START_TIMEOUT, StartupError, accepts, wait_until
from .process import Process


class Envoy(AdminClient):
    """One Envoy of the testbed, with its own listener, admin port and plugin JSON."""

    def __init__(self, testbed, name: str, listener: int, admin: int, filter_config: dict):
        super().__init__(name, admin)
        # The Testbed this Envoy belongs to: its ports, build, store and backends.
        self.testbed = testbed
        self.listener = listener
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
            return self.is_live()

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

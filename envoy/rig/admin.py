"""A client of one Envoy's admin interface: readiness, /stats, and the
health of each cluster's hosts as /clusters reports them."""

from __future__ import annotations

from .paths import APP_CLUSTER
from .probe import http_get, wait_until


class AdminClient:
    """The admin interface of the Envoy called `name`, on 127.0.0.1:`admin`."""

    def __init__(self, name: str, admin: int):
        self.name = name
        self.admin = admin

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def is_live(self) -> bool:
        """Admin /ready says LIVE."""
        status, _, body = http_get(f"{self.admin_url}/ready")
        return status == 200 and body.strip() == b"LIVE"

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


"""A three-member etcd cluster on 127.0.0.1 for the testbed and the tests.

Each member has its own data directory and ports, and is a `process.Process`
stopped by PID. Every wait is on health (`/health` of each member, which
says true only with a leader and quorum), never on sleeps. With auth, the
cluster gets a root user and a user whose role may only touch the key prefix,
as envoy/etcd-store.yaml describes.
"""

from __future__ import annotations

import base64
import json
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from .paths import ENVOY_DIR
from .probe import START_TIMEOUT, http_get, wait_until
from .process import Process

ETCD_STORE_YAML = ENVOY_DIR / "etcd-store.yaml"


def store_topology() -> dict:
    """envoy/etcd-store.yaml: the plugin's store section, the Envoy cluster, the user."""
    return yaml.safe_load(ETCD_STORE_YAML.read_text())


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    """The end of the key range of `prefix` (its last byte plus one)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    process: Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def address(self) -> str:
        """As Envoy names the endpoint."""
        return f"127.0.0.1:{self.client_port}"


class EtcdCluster:
    """Three members; start() waits until each says it is healthy."""

    def __init__(self, workdir: Path, client_ports: tuple[int, ...], peer_ports: tuple[int, ...],
                 auth: bool = True, key_prefix: str = "sa:", say=None, launcher: tuple[str, ...] = ()):
        """`launcher` goes before each member's command (the benchmark pins them to a CPU)."""
        self.workdir = Path(workdir)
        self.auth = auth
        self.key_prefix = key_prefix
        self.say = say or (lambda message: None)
        topology = store_topology()
        self.user, self.password = topology["user"], topology["password"]
        self.root_password = secrets.token_urlsafe(16)
        token = f"sa-testbed-{secrets.token_hex(4)}"
        initial = ",".join(f"etcd-{i + 1}=http://127.0.0.1:{port}" for i, port in enumerate(peer_ports))
        self.members = []
        for i, (client, peer) in enumerate(zip(client_ports, peer_ports)):
            name = f"etcd-{i + 1}"
            argv = [
                *launcher, "etcd", "--name", name, "--data-dir", str(self.workdir / name),
                "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", initial, "--initial-cluster-token", token, "--initial-cluster-state", "new",
                # A member cut off from the others keeps campaigning; without
                # pre-vote its higher term forces a new election when it is
                # back, a second outage right after the first.
                "--pre-vote",
                # Every store write adds a revision; without compaction etcd
                # keeps them all and fills its quota.
                "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m",
            ]
            self.members.append(Member(name, client, peer, Process(name, argv, self.workdir / f"{name}.log")))
        self._auth_ready = False

    def processes(self) -> list[Process]:
        return [m.process for m in self.members]

    def start(self):
        """Start every member that is not running; wait for each to be healthy."""
        stopped = [m for m in self.members if not m.process.running()]
        for member in stopped:
            member.process.start()
        for member in stopped:
            self.wait_healthy(member)
            self.say(f"started {member.name} pid {member.process.pid} ({member.url})")
        if self.auth and not self._auth_ready:
            self._enable_auth()
            self._auth_ready = True

    def stop(self):
        for member in reversed(self.members):
            member.process.stop()

    def kill(self, index: int) -> Member:
        """SIGKILL a member: no clean shutdown, like a lost node."""
        member = self.members[index]
        member.process.kill()
        return member

    def restart(self, index: int) -> Member:
        """Start a stopped member again on its data; wait until it is healthy."""
        member = self.members[index]
        member.process.start()
        self.wait_healthy(member)
        return member

    # ----------------------------------------------------------------- health

    def health(self, member: Member) -> bool:
        status, _, body = http_get(f"{member.url}/health", timeout=2.0)
        return status == 200 and json.loads(body).get("health") == "true"

    def wait_healthy(self, member: Member, timeout: float = START_TIMEOUT):
        def healthy():
            member.process.ensure_alive()
            return self.health(member)

        wait_until(healthy, timeout, f"etcd member {member.name} on {member.url}")

    def live(self) -> list[Member]:
        return [m for m in self.members if m.process.running()]

    def leader(self) -> int:
        """The index of the current leader, as the live members report it."""
        def find():
            ids, leader = {}, None
            for member in self.live():
                try:
                    status = self.post(member, "/v3/maintenance/status", {}, token=False, timeout=1.0)
                except (OSError, RuntimeError):
                    continue
                ids[status["header"]["member_id"]] = self.members.index(member)
                leader = status.get("leader") or leader
            return (ids[leader],) if leader in ids else None

        return wait_until(find, 10.0, "an etcd leader")[0]

    # ------------------------------------------------------------- the API

    def post(self, member: Member, path: str, body: dict, token: bool = True, timeout: float = 3.0) -> dict:
        """One JSON call to a member; as root when auth is on and `token`."""
        headers = {"content-type": "application/json"}
        if token and self._auth_ready:
            headers["authorization"] = self._root_token(member)
        request = urllib.request.Request(f"{member.url}{path}", data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"etcd {member.name} {path}: {err.code} {err.read()[:200]!r}") from None

    def _root_token(self, member: Member) -> str:
        answer = self.post(member, "/v3/auth/authenticate", {"name": "root", "password": self.root_password}, token=False)
        return answer["token"]

    def _enable_auth(self):
        """A root user, and the filter's user with readwrite on the key prefix only."""
        member = self.live()[0]
        prefix = self.key_prefix
        for path, body in (
            ("/v3/auth/user/add", {"name": "root", "password": self.root_password}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/role/add", {"name": self.user}),
            ("/v3/auth/role/grant", {"name": self.user, "perm": {
                "permType": "READWRITE", "key": b64(prefix), "range_end": b64(prefix_end(prefix))}}),
            ("/v3/auth/user/add", {"name": self.user, "password": self.password}),
            ("/v3/auth/user/grant", {"user": self.user, "role": self.user}),
            ("/v3/auth/enable", {}),
        ):
            self.post(member, path, body, token=False)
        self.say(f"etcd auth on: user {self.user} may use keys {prefix}*")

    def session_record(self, sid: str) -> dict:
        """The stored session: {"owner", "state", "lease"} (None where missing).
        One range call for all three keys: each call as root pays etcd's
        bcrypt check, which a test checking many sessions feels."""
        base = f"{self.key_prefix}{sid}"
        # The session's keys are `base`, `base:state` and `base:lease`; ";" follows ":".
        answer = self.post(self.live()[0], "/v3/kv/range", {"key": b64(base), "range_end": b64(f"{base};")})
        values = {unb64(kv["key"]): unb64(kv.get("value", "")) for kv in answer.get("kvs") or []}
        return {"owner": values.get(base), "state": values.get(f"{base}:state"), "lease": values.get(f"{base}:lease")}

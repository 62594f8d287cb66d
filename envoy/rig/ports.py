"""Free ports on 127.0.0.1, and the plan of which testbed process listens where."""

from __future__ import annotations

import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from .paths import BACKEND_NAMES

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


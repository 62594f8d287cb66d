"""A Redis client over RESP as the admin user envoy/redis.conf defines (no
client library needed), for tests that look into the store."""

from __future__ import annotations

import socket

from .paths import REDIS_CONF

def redis_admin() -> tuple[str, str]:
    """The admin user and password envoy/redis.conf defines for looking into the store."""
    for line in REDIS_CONF.read_text().splitlines():
        words = line.split()
        if words[:2] == ["user", "admin"]:
            return "admin", next(w[1:] for w in words if w.startswith(">"))
    raise ValueError(f"{REDIS_CONF} defines no admin user")


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


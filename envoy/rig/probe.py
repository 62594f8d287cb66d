"""Bounded waits and the small HTTP and TCP probes they poll."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

START_TIMEOUT = 30.0


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


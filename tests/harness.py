"""Helpers shared by the e2e tests: an HTTP client with explicit cookies,
assertions that print what was expected next to what was received, and a
counter probe that copes with the filter flushing metrics once a second.

Fixtures live in conftest.py; the processes themselves in envoy/testbed.py.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "envoy"))

import testbed as tb  # noqa: E402  (envoy/testbed.py, after the path is set)

import cookie_signer  # noqa: E402

# The wasm build's workers flush their counters once a second.
FLUSH_PERIOD = 1.0
COUNTER_TIMEOUT = 6.0
INTERNAL_HEADERS = ("x-session-route", "x-session-id", "x-session-new", "x-session-state")


def require_tool(name: str) -> str:
    """Path of a tool the test needs. Missing: fail under CI, skip elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (`.ci/setup tests` installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def expect(condition: bool, what: str, expected, received):
    """Fail with what was expected next to what was received."""
    if not condition:
        pytest.fail(f"{what}\n  expected: {expected}\n  received: {received}", pytrace=False)


def expect_equal(received, expected, what: str):
    expect(received == expected, what, expected, received)


@dataclass
class Reply:
    """One response, with the parts the tests look at."""

    response: requests.Response
    cookie_name: str

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def headers(self):
        return self.response.headers

    @property
    def body(self) -> dict:
        """The demo backend's JSON; fails the test with the raw body otherwise."""
        try:
            return self.response.json()
        except ValueError:
            pytest.fail(f"expected the backend's JSON, received {self.status}: {self.response.text[:300]!r}")

    @property
    def set_cookies(self) -> list[str]:
        return self.response.raw.headers.getlist("set-cookie")

    @property
    def cookie(self) -> str | None:
        """The value of our cookie in Set-Cookie, if the response set it."""
        for header in self.set_cookies:
            name, _, rest = header.partition("=")
            if name.strip() == self.cookie_name:
                return rest.split(";", 1)[0]
        return None

    @property
    def cookie_attributes(self) -> dict[str, str]:
        """Attributes of our Set-Cookie, names lower-cased, e.g. {"path": "/", "httponly": ""}."""
        for header in self.set_cookies:
            name, _, rest = header.partition("=")
            if name.strip() == self.cookie_name:
                attributes = {}
                for part in rest.split(";")[1:]:
                    key, _, value = part.strip().partition("=")
                    attributes[key.lower()] = value
                return attributes
        return {}

    def describe(self) -> str:
        return f"{self.status} headers={dict(self.headers)} body={self.response.text[:300]!r}"


class Client:
    """HTTP to one Envoy listener. No cookie jar: every test says what it sends."""

    def __init__(self, envoy: "tb.Envoy"):
        self.envoy = envoy
        self.cookie_name = envoy.filter_config.get("cookie", {}).get("name", "sa")
        self.session = requests.Session()
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))

    def request(self, path: str = "/", cookie: str | None = None, headers: dict | None = None,
                method: str = "GET", data: bytes | None = None, timeout: float = 10.0) -> Reply:
        sent = dict(headers or {})
        if cookie is not None:
            sent["cookie"] = f"{self.cookie_name}={cookie}"
        response = self.session.request(method, f"{self.envoy.url}{path}", headers=sent, data=data,
                                        timeout=timeout, allow_redirects=False)
        return Reply(response, self.cookie_name)

    def get(self, path: str = "/", cookie: str | None = None, headers: dict | None = None) -> Reply:
        return self.request(path, cookie, headers)

    def new_session(self, path: str = "/") -> Reply:
        """A request without a cookie; fails unless it set a cookie."""
        reply = self.get(path)
        expect(reply.status == 200 and reply.cookie, f"GET {path} without a cookie starts a session",
               "200 with a Set-Cookie", reply.describe())
        return reply


def keyring(filter_config: dict) -> dict[str, str]:
    """Key id to secret, from a plugin config (inline secrets only)."""
    return {key["id"]: key["secret"] for key in filter_config["keys"]}


def verify_cookie(value: str, filter_config: dict) -> cookie_signer.Claims:
    """Verify a cookie the filter issued, with the config's keys, in Python."""
    try:
        return cookie_signer.verify(value, keyring(filter_config))
    except cookie_signer.CookieRejected as err:
        pytest.fail(f"the filter's cookie does not verify in Python: {err}\n  cookie: {value}", pytrace=False)


class Counters:
    """Deltas of the filter's counters on one Envoy, from a settled baseline.

    Counters reach /stats up to a second after the request (each worker
    flushes on its tick), so the baseline is taken only once two reads a flush
    period apart agree, and expectations are polled for.
    """

    def __init__(self, envoy: "tb.Envoy"):
        self.envoy = envoy
        self.baseline = self._settled()

    def _read(self) -> dict[str, int]:
        return self.envoy.filter_counters()

    def _settled(self) -> dict[str, int]:
        deadline = time.monotonic() + COUNTER_TIMEOUT
        previous = self._read()
        while True:
            time.sleep(FLUSH_PERIOD + 0.1)
            current = self._read()
            if current == previous or time.monotonic() > deadline:
                return current
            previous = current

    def deltas(self) -> dict[str, int]:
        current = self._read()
        return {name: value - self.baseline.get(name, 0) for name, value in current.items()
                if value != self.baseline.get(name, 0)}

    def expect(self, wanted: dict[str, int]):
        """Wait until every named counter moved by exactly the given amount.

        Names are without the prefix, e.g. {"cookies.rejected.expired": 1};
        a 0 asserts no change. Counters not named are not checked.
        """
        start = time.monotonic()
        only_zeros = not any(wanted.values())
        while True:
            deltas = self.deltas()
            received = {name: deltas.get(name, 0) for name in wanted}
            # Zero-only expectations mean something only after a flush.
            done = received == wanted and (not only_zeros or time.monotonic() - start > FLUSH_PERIOD + 0.2)
            overshoot = any(received[name] > delta for name, delta in wanted.items())
            if done or overshoot or time.monotonic() - start > COUNTER_TIMEOUT:
                break
            time.sleep(0.1)
        expect(received == wanted, f"counter changes on {self.envoy.name} ({self.envoy.metric_prefix}*)", wanted,
               f"{received}; all changes: {json.dumps(deltas, sort_keys=True)}")

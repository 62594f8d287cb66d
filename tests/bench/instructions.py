#!/usr/bin/env python3
"""Envoy's instructions per request, counted by callgrind: figures that other
load on the machine cannot move (bench.py's req/s and CPU time can).

    filter/build
    tests/bench/instructions.py [--requests 2000] [--variants router,native_pinned] [--cookie-format signed]

Each variant runs in a fresh Envoy (`--concurrency 1`) under
`valgrind --tool=callgrind`, with nginx upstreams and the same Envoy config
template as bench.py (without health checks, whose work would be counted):

  router         router only
  envoy_cookie   Envoy's stateful_session with the cookie state (strict)
  native_pinned  the filter as the native module, valid cookie (the hot path)
  native_new     the native module, no cookie (a new session every request)
  native_miss    the native module, a valid cookie of another session on every
                 request (each one a miss of the verified-cookie cache)
  wasm_pinned    the wasm build + stateful_session (header, strict), valid
                 cookie (V8 runs under valgrind with --smc-check, slowly)
  wasm_miss      as wasm_pinned, another session's cookie on every request

Counting runs only while the measured requests are sent, one at a time on one
keep-alive connection, after a warm-up. Only user-space instructions are
counted: the kernel's share, the same for every variant, is left out, so the
ratios overstate a filter's share of Envoy's CPU time.

The filter issues, and the pinned variants send, the cookie format of
--cookie-format: sealed (v3, the default) or signed (v2). The verified-cookie
cache answers every measured request, so this is the pinned path's cost on a
cache hit; the cost of one open or check on a miss is measured without a proxy
by filter/examples/pinned_path.rs.

With --by-function, the native variants also report the instructions spent
in the module's hooks (inclusive: what Envoy's callbacks cost the module
included) and in each Envoy callback the module calls.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import running
import variants
from running import (NATIVE_SO, ROUTER, WASM, Procs, Upstreams, _listener, _sock, envoy_binary, free_port, http_get,
                     native_filter, stateful_session_cookie, stateful_session_header, wasm_filter)
from variants import COOKIE, filter_config, new_sid, set_cookie_value, sign_cookie

START_TIMEOUT = 300  # Envoy starts slowly under valgrind
WARMUP_REQUESTS = 250
VARIANTS = ("router", "envoy_cookie", "native_pinned", "native_new", "native_miss", "wasm_pinned", "wasm_miss")


def filters(variant: str) -> list:
    config = filter_config()
    return {
        "router": [ROUTER],
        "envoy_cookie": [stateful_session_cookie(), ROUTER],
        "native_pinned": [native_filter(config), ROUTER],
        "native_new": [native_filter(config), ROUTER],
        "native_miss": [native_filter(config), ROUTER],
        "wasm_pinned": [wasm_filter("session_affinity", running.WASM_DIR / WASM["filter"], config),
                        stateful_session_header(), ROUTER],
        "wasm_miss": [wasm_filter("session_affinity", running.WASM_DIR / WASM["filter"], config),
                      stateful_session_header(), ROUTER],
    }[variant]


def config(listener: int, admin: int, upstreams: list[str], http_filters: list) -> dict:
    endpoints = [{"endpoint": {"address": _sock(int(host.rsplit(":", 1)[1]))}} for host in upstreams]
    route_config = {"virtual_hosts": [{"name": "app", "domains": ["*"],
                                       "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]}]}
    return {
        "admin": {"address": _sock(admin)},
        "static_resources": {
            "listeners": [_listener("bench", listener, route_config, http_filters)],
            "clusters": [{"name": "app", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": endpoints}]}},
                         {"name": "session_store", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "session_store", "endpoints": []}}],
        },
    }


def request_headers(variant: str, connection: http.client.HTTPConnection, upstreams: Upstreams) -> dict:
    """What every measured request of the variant carries (the same cookie each time)."""
    host = upstreams.hosts[1]
    if variant == "envoy_cookie":
        connection.request("GET", "/bench")
        response = connection.getresponse()
        response.read()
        cookie = set_cookie_value({"set-cookie": response.headers.get_all("set-cookie") or []}, "sa-native")
        if not cookie:
            sys.exit("bench: stateful_session set no cookie")
        return {"cookie": f"sa-native={cookie}"}
    if variant == "native_new":
        return {}
    # The router gets the same bytes as the pinned variants; it ignores them.
    return {"cookie": f"{COOKIE}={sign_cookie(new_sid(), host, upstreams.instance_of(host))}"}


def count(workdir: Path, variant: str, upstreams: Upstreams, requests: int) -> Path:
    """Runs the variant under callgrind; returns the dump of the measured requests."""
    listener, admin = free_port(), free_port()
    path = workdir / f"{variant}.json"
    path.write_text(json.dumps(config(listener, admin, upstreams.hosts, filters(variant))))
    out = workdir / f"callgrind.{variant}"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    if variant.startswith("wasm"):
        valgrind.append("--smc-check=all-non-file")  # V8 writes the code it runs
    log = open(workdir / f"{variant}.log", "wb")
    envoy = subprocess.Popen(
        [*valgrind, envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
         "-l", "warning"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(running.NATIVE_DIR)},
    )
    log.close()
    control = ["callgrind_control"]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready(admin):
            if envoy.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench: envoy ({variant}) did not start:\n{(workdir / f'{variant}.log').read_text()[-3000:]}")
            time.sleep(1)
        connection = http.client.HTTPConnection("127.0.0.1", listener, timeout=60)
        headers = request_headers(variant, connection, upstreams)
        send(connection, WARMUP_REQUESTS, headers, variant, upstreams)
        subprocess.run([*control, "--instr=on", str(envoy.pid)], check=True, capture_output=True, timeout=60)
        send(connection, WARMUP_REQUESTS, headers, variant, upstreams)
        subprocess.run([*control, "--zero", str(envoy.pid)], check=True, capture_output=True, timeout=60)
        send(connection, requests, headers, variant, upstreams)
        subprocess.run([*control, "--dump", str(envoy.pid)], check=True, capture_output=True, timeout=60)
    finally:
        envoy.terminate()
        try:
            envoy.wait(60)
        except subprocess.TimeoutExpired:
            envoy.kill()
            envoy.wait(10)
    dumps = sorted(workdir.glob(f"callgrind.{variant}.*"))  # the --dump file, numbered
    if not dumps:
        sys.exit(f"bench: no callgrind dump for {variant}")
    return dumps[0]


def ready(admin: int) -> bool:
    try:
        return http_get(admin, "/ready", timeout=2)[0] == 200
    except OSError:
        return False


def send(connection: http.client.HTTPConnection, requests: int, headers: dict, variant: str,
         upstreams: Upstreams) -> None:
    host = upstreams.hosts[1]
    pinned = upstreams.instance_of(host)
    for _ in range(requests):
        if variant.endswith("miss"):  # a session this worker has not seen
            headers = {"cookie": f"{COOKIE}={sign_cookie(new_sid(), host, pinned)}"}
        connection.request("GET", "/bench", headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            sys.exit(f"bench: {variant}: status {response.status}")
        if variant.endswith(("pinned", "miss")) and response.getheader("x-served-by") != pinned:
            sys.exit(f"bench: {variant}: served by {response.getheader('x-served-by')}, not the pinned {pinned}")


def total(dump: Path) -> int:
    summary = re.search(r"^summary: (\d+)", dump.read_text(), re.M)
    if not summary:
        sys.exit(f"bench: {dump} has no summary line")
    return int(summary.group(1))


def by_function(dump: Path) -> dict[str, int]:
    """Inclusive instructions of the module's hooks and of the Envoy callbacks it calls."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
                         capture_output=True, text=True, timeout=300).stdout
    found: dict[str, int] = {}
    for line in out.splitlines():
        match = re.match(r"\s*([\d,]+) \([^)]*\)\s+\S*:?(envoy_dynamic_module_(?:on|callback)_\w+)", line)
        if match:
            name = match.group(2)
            found[name] = found.get(name, 0) + int(match.group(1).replace(",", ""))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per variant (default 2000)")
    parser.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=list(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--by-function", action="store_true", help="also break the native variants down by function")
    parser.add_argument("--cookie-format", choices=("sealed", "signed"), default="sealed",
                        help="the cookie the filter issues and the pinned variants send (default sealed)")
    args = parser.parse_args()
    variants.COOKIE_FORMAT = args.cookie_format
    if not shutil.which("valgrind") or not (running.NATIVE_DIR / NATIVE_SO).is_file():
        sys.exit("bench: needs valgrind and the modules (filter/build)")
    if "router" not in args.variants:
        args.variants.insert(0, "router")
    per_request: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sa-instructions-") as tmp:
        procs = Procs(Path(tmp))
        try:
            upstreams = Upstreams(procs, "nginx", None, count=3)
            upstreams.start()
            for variant in args.variants:
                dump = count(Path(tmp), variant, upstreams, args.requests)
                per_request[variant] = total(dump) / args.requests
                print(f"{variant:14s} {per_request[variant]:9.0f} instructions/request", flush=True)
                if args.by_function and variant.startswith("native"):
                    for name, instructions in sorted(by_function(dump).items(), key=lambda kv: -kv[1]):
                        print(f"    {instructions / args.requests:9.0f}  {name}", flush=True)
        finally:
            procs.stop_all()
    router = per_request["router"]
    for variant in args.variants[1:]:
        print(f"router-only / {variant}: {router / per_request[variant]:.3f} "
              f"(+{per_request[variant] - router:.0f} instructions/request)")


if __name__ == "__main__":
    main()

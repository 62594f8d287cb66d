#!/usr/bin/env python3
"""Envoy's instructions per request with the native module's pinned path, and
without it, counted by callgrind: a figure that other load on the machine
cannot move (bench_pinned.py measures req/s, which it can).

    cargo build --profile native -p session-affinity-native
    filter/native/demo/bench_instructions.py [--requests 2000]

Variants, each in a fresh Envoy (`--concurrency 1`) under
`valgrind --tool=callgrind`, with nginx upstreams:

  router   router only
  floor    the native module loaded, picking no host
  native   the native module picking the host on every request (`"report": false`)

Every variant gets the same request bytes: `x-demo-route: <host>`, except
that floor's header is named `x-demo-other` (as long, but not the module's).
Counting runs only while the measured requests are sent, one at a time on
one keep-alive connection, after a warm-up. Only user-space instructions are
counted: the kernel's share, the same for every variant, is left out, so the
ratios overstate the module's share of Envoy's CPU time.
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

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "bench"))

import bench as harness  # noqa: E402  (tests/bench/bench.py)
from bench_pinned import MODULE_DIR, NATIVE_FILTER, ROUTE_HEADER  # noqa: E402

START_TIMEOUT = 300  # Envoy starts slowly under valgrind
WARMUP_REQUESTS = 250
VARIANTS = {  # filters, and the name of the header that carries the host
    "router": ([harness.ROUTER], ROUTE_HEADER),
    "floor": ([NATIVE_FILTER, harness.ROUTER], "x-demo-other"),
    "native": ([NATIVE_FILTER, harness.ROUTER], ROUTE_HEADER),
}


def config(listener: int, admin: int, upstreams: list[str], filters: list) -> dict:
    endpoints = [{"endpoint": {"address": harness._sock(int(host.rsplit(":", 1)[1]))}} for host in upstreams]
    route_config = {"virtual_hosts": [{"name": "app", "domains": ["*"],
                                       "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}]}]}
    return {
        "admin": {"address": harness._sock(admin)},
        "static_resources": {
            "listeners": [harness._listener("bench", listener, route_config, filters)],
            "clusters": [{"name": "app", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": endpoints}]}}],
        },
    }


def count(workdir: Path, variant: str, upstreams: list[str], requests: int) -> int:
    """User-space instructions Envoy ran for `requests` requests."""
    filters, header = VARIANTS[variant]
    listener, admin = harness.free_port(), harness.free_port()
    path = workdir / f"{variant}.json"
    path.write_text(json.dumps(config(listener, admin, upstreams, filters)))
    out = workdir / f"callgrind.{variant}"
    envoy = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         harness.envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "-l", "warning"],
        stdin=subprocess.DEVNULL, stdout=open(workdir / f"{variant}.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    control = ["callgrind_control"]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready(admin):
            if envoy.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench: envoy ({variant}) did not start:\n{(workdir / f'{variant}.log').read_text()[-3000:]}")
            time.sleep(1)
        headers = {header: upstreams[1]}
        connection = http.client.HTTPConnection("127.0.0.1", listener, timeout=30)
        send(connection, WARMUP_REQUESTS, headers)
        subprocess.run([*control, "--instr=on", str(envoy.pid)], check=True, capture_output=True, timeout=60)
        send(connection, WARMUP_REQUESTS, headers)
        subprocess.run([*control, "--zero", str(envoy.pid)], check=True, capture_output=True, timeout=60)
        send(connection, requests, headers)
        subprocess.run([*control, "--dump", str(envoy.pid)], check=True, capture_output=True, timeout=60)
    finally:
        envoy.terminate()
        try:
            envoy.wait(60)
        except subprocess.TimeoutExpired:
            envoy.kill()
            envoy.wait(10)
    dumps = sorted(workdir.glob(f"callgrind.{variant}.*"))  # the --dump file, numbered
    summary = re.search(r"^summary: (\d+)", dumps[0].read_text(), re.M) if dumps else None
    if not summary:
        sys.exit(f"bench: no callgrind dump for {variant}")
    return int(summary.group(1))


def ready(admin: int) -> bool:
    try:
        return harness.http_get(admin, "/ready", timeout=2)[0] == 200
    except OSError:
        return False


def send(connection: http.client.HTTPConnection, requests: int, headers: dict) -> None:
    for _ in range(requests):
        connection.request("GET", "/bench", headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            sys.exit(f"bench: status {response.status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per variant (default 2000)")
    args = parser.parse_args()
    if not shutil.which("valgrind") or not (MODULE_DIR / "libsession_affinity_native.so").is_file():
        sys.exit("bench: needs valgrind and cargo build --profile native -p session-affinity-native")
    os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(MODULE_DIR)
    per_request = {}
    with tempfile.TemporaryDirectory(prefix="native-instructions-") as tmp:
        procs = harness.Procs(Path(tmp))
        try:
            upstreams = harness.Upstreams(procs, "nginx", None, count=2)
            upstreams.start()
            for variant in VARIANTS:
                per_request[variant] = count(Path(tmp), variant, upstreams.hosts, args.requests) / args.requests
                print(f"{variant:7s} {per_request[variant]:9.0f} instructions/request", flush=True)
        finally:
            procs.stop_all()
    router = per_request["router"]
    for variant in ("floor", "native"):
        print(f"router-only / {variant}: {router / per_request[variant]:.3f} "
              f"(+{per_request[variant] - router:.0f} instructions/request)")


if __name__ == "__main__":
    main()

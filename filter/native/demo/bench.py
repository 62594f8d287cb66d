#!/usr/bin/env python3
"""How much the native module's pinned path costs: Envoy with the demo filter
picking the upstream host on every request (`/bench` + `x-demo-route`, see
filter/native/src/demo.rs) against Envoy with the router only, same run.

    cargo build --profile native -p session-affinity-native
    filter/native/demo/bench.py [--duration 10] [--rounds 3]

Everything is on 127.0.0.1: Envoy (`--concurrency 1`) pinned to CPU 0; wrk
(1 thread, 16 connections) and two nginx upstreams pinned to CPU 1. The two
variants alternate for `--rounds` rounds; the result is each variant's
median req/s and the ratio native / router-only. Envoy's CPU time per
request (from /proc) shows whether Envoy was the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "envoy"))

import testbed as tb  # noqa: E402  (envoy/testbed.py: processes, ports, waits)

MODULE_DIR = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "native"
ENVOY_CPU, LOAD_CPU = "0", "1"
CONNECTIONS = 16


def get(url: str, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=2) as response:
        return response.status, dict(response.headers.items())


def envoy_config(listener: int, admin: int, upstreams: list[int], native: bool) -> dict:
    filters = [{"name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    if native:
        filters.insert(0, {
            "name": "envoy.filters.http.dynamic_modules",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                "dynamic_module_config": {"name": "session_affinity_native"},
                "filter_name": "demo",
                "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": json.dumps({"callout_cluster": "app"})},
            },
        })
    endpoints = [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                 for p in upstreams]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "bench",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": "app"}}]}]},
                        "http_filters": filters,
                    },
                }]}],
            }],
            "clusters": [{"name": "app", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": endpoints}]}}],
        },
    }


def start_nginx(workdir: Path, ports: list[int]) -> tb.Process:
    servers = "".join(f"""
  server {{
    listen 127.0.0.1:{port};
    location / {{ add_header x-instance {port} always; return 200 "hello from {port}\\n"; }}
  }}""" for port in ports)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
master_process off;
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
{servers}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    process = tb.Process("nginx", ["taskset", "-c", LOAD_CPU, nginx, "-p", str(workdir), "-c", str(conf),
                                   "-e", str(workdir / "nginx-error.log")], workdir / "nginx.log")
    process.start()
    for port in ports:
        tb.wait_until(lambda: tb.accepts(port), 10, f"nginx on {port}")
    return process


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, seconds: float, headers: dict) -> tuple[float, int]:
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{round(seconds)}s", "--timeout", "2s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(f"http://127.0.0.1:{port}/bench")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not rps or not total:
        sys.exit(f"bench: wrk printed no result:\n{out}")
    if bad:
        sys.exit(f"bench: {bad.group(1)} non-2xx responses; the variant is broken:\n{out}")
    return float(rps.group(1)), int(total.group(1))


def measure(workdir: Path, variant: str, listener: int, admin: int, upstreams: list[int], pinned: dict,
            args: argparse.Namespace) -> tuple[float, float]:
    """One load run of one variant in a fresh Envoy: (req/s, Envoy CPU µs per request)."""
    config = workdir / f"{variant}.json"
    config.write_text(json.dumps(envoy_config(listener, admin, upstreams, variant == "native")))
    envoy = tb.Process(variant, ["taskset", "-c", ENVOY_CPU, tb.ENVOY_BIN, "-c", str(config), "--concurrency", "1",
                                 "--disable-hot-restart", "-l", "warning"], workdir / f"{variant}.log")
    envoy.start()
    try:
        tb.wait_until(lambda: tb.http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200, 30, f"envoy ({variant})")
        _, seen = get(f"http://127.0.0.1:{listener}/bench", pinned)
        if variant == "native" and seen.get("x-instance") != str(upstreams[1]):
            sys.exit(f"bench: the native filter did not pin the request to {pinned}: {seen}")
        wrk(listener, args.warmup, pinned)
        cpu_before = cpu_seconds(envoy.pid)
        rps, requests = wrk(listener, args.duration, pinned)
        cpu_us = (cpu_seconds(envoy.pid) - cpu_before) / requests * 1e6
    finally:
        envoy.stop()
    print(f"{variant:7s} {rps:10.0f} req/s  {cpu_us:6.1f} µs Envoy CPU/req", flush=True)
    return rps, cpu_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="seconds per load run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=float, default=2, help="warm-up seconds per run (default 2)")
    args = parser.parse_args()
    module = MODULE_DIR / "libsession_affinity_native.so"
    if not module.is_file():
        sys.exit(f"bench: {module} is missing: cargo build --profile native -p session-affinity-native")
    os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(MODULE_DIR)

    results: dict[str, list[tuple[float, float]]] = {"router": [], "native": []}
    with tempfile.TemporaryDirectory(prefix="native-bench-") as tmp:
        workdir = Path(tmp)
        listener, admin, *upstreams = tb.free_ports(4)
        nginx = start_nginx(workdir, upstreams)
        pinned = {"x-demo-route": f"127.0.0.1:{upstreams[1]}"}
        try:
            for round_number in range(args.rounds):
                order = ["router", "native"] if round_number % 2 == 0 else ["native", "router"]
                for variant in order:
                    results[variant].append(measure(workdir, variant, listener, admin, upstreams, pinned, args))
        finally:
            nginx.stop()

    router_rps = statistics.median(r for r, _ in results["router"])
    native_rps = statistics.median(r for r, _ in results["native"])
    router_cpu = statistics.median(c for _, c in results["router"])
    native_cpu = statistics.median(c for _, c in results["native"])
    print(f"router-only   {router_rps:10.0f} req/s  {router_cpu:6.1f} µs/req")
    print(f"native pinned {native_rps:10.0f} req/s  {native_cpu:6.1f} µs/req")
    print(f"ratio native / router-only: {native_rps / router_rps:.3f} req/s, "
          f"{native_cpu / router_cpu:.3f} CPU per request (+{native_cpu - router_cpu:.2f} µs)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What the native module's pinned path costs: Envoy with the demo filter
picking the upstream host on every request (`x-demo-route`, `"report": false`,
see filter/native/src/demo.rs) against Envoy with the router only, same run.

    cargo build --profile native -p session-affinity-native
    filter/native/demo/bench_pinned.py [--duration 10] [--rounds 3]

It uses the wasm benchmark's harness (tests/bench/bench.py), so the numbers
compare with tests/bench/results.md: the same Envoy config template, Envoy
(`--concurrency 1`) on CPU 0, wrk (1 thread, 16 connections) and nginx
upstreams on CPU 1. The two variants alternate; each figure is the median
over the rounds, and the ratio is native / router-only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "bench"))

import bench as harness  # noqa: E402  (tests/bench/bench.py)

MODULE_DIR = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "native"
ENVOY_CPU, LOAD_CPU = 0, 1
CONNECTIONS = 16
ROUTE_HEADER = "x-demo-route"

NATIVE_FILTER = {
    "name": "envoy.filters.http.dynamic_modules",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": {"name": "session_affinity_native", "do_not_close": True},
        "filter_name": "demo",
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": json.dumps({"callout_cluster": "session_store", "report": False})},
    },
}
VARIANTS = {"router": [harness.ROUTER], "native": [NATIVE_FILTER, harness.ROUTER]}


def measure(procs: harness.Procs, variant: str, upstreams: harness.Upstreams, store_port: int,
            args: argparse.Namespace) -> tuple[float, float]:
    """One load run in a fresh Envoy: (req/s, Envoy CPU µs per request)."""
    pinned_host = upstreams.hosts[1]
    headers = {ROUTE_HEADER: pinned_host}
    envoy = harness.Envoy(procs, variant, VARIANTS[variant], upstreams.hosts, store_port, ENVOY_CPU)
    envoy.start()
    try:
        envoy.wait_ready()
        for _ in range(4):  # round robin would spread these over the hosts
            _, seen, _ = harness.http_get(envoy.port, "/bench", headers)
            if variant == "native" and seen.get("x-instance-id") != [upstreams.instance_of(pinned_host)]:
                sys.exit(f"bench: the native filter did not pin /bench to {pinned_host}: {seen}")
        harness.run_wrk(envoy.port, path="/bench", duration=args.warmup, connections=CONNECTIONS,
                        headers=headers, cpu=LOAD_CPU)
        cpu_before = envoy.cpu_seconds()
        run = harness.run_wrk(envoy.port, path="/bench", duration=args.duration, connections=CONNECTIONS,
                              headers=headers, cpu=LOAD_CPU)
        cpu_us = (envoy.cpu_seconds() - cpu_before) / max(run["requests"], 1) * 1e6
    finally:
        procs.stop(envoy.proc)
    if any(run["errors"].values()):
        sys.exit(f"bench: {variant} had errors {run['errors']}")
    print(f"{variant:7s} {run['rps']:9.0f} req/s  {cpu_us:6.1f} µs Envoy CPU/req", flush=True)
    return run["rps"], cpu_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="seconds per load run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=float, default=2, help="warm-up seconds per run (default 2)")
    parser.add_argument("--nice", type=int, default=-10,
                        help="niceness of every measured process, as tests/bench/run uses (default -10)")
    args = parser.parse_args()
    harness.NICE = args.nice
    if not (MODULE_DIR / "libsession_affinity_native.so").is_file():
        sys.exit(f"bench: no module in {MODULE_DIR}: cargo build --profile native -p session-affinity-native")
    os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(MODULE_DIR)

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="native-bench-") as tmp:
        procs = harness.Procs(Path(tmp))
        try:
            upstreams = harness.Upstreams(procs, "nginx", LOAD_CPU)
            upstreams.start()
            store_port = harness.free_port()  # the template's store cluster; nothing is sent there
            for round_number in range(args.rounds):
                order = list(VARIANTS) if round_number % 2 == 0 else list(reversed(VARIANTS))
                for variant in order:
                    results[variant].append(measure(procs, variant, upstreams, store_port, args))
        finally:
            procs.stop_all()

    rps = {name: statistics.median(r for r, _ in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(c for _, c in runs) for name, runs in results.items()}
    for name in VARIANTS:
        print(f"median {name:7s} {rps[name]:9.0f} req/s  {cpu[name]:6.1f} µs Envoy CPU/req")
    print(f"ratio native / router-only: {rps['native'] / rps['router']:.3f} req/s, "
          f"{cpu['native'] / cpu['router']:.3f} Envoy CPU per request ({cpu['native'] - cpu['router']:+.1f} µs)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""How late a host-set change reaches Envoy's workers, with and without the
app cluster's `update_merge_window: 0s` (the cause of issue 19's failovers
balanced onto a killed host).

    tests/bench/merge_window.py old      # main before the fix: 1 s window, ejection on one refused connection
    tests/bench/merge_window.py merge0   # the same ejection, update_merge_window: 0s

Runs the testbed with `upstream` logs at debug level, kills the backend
holding the most sessions ROUNDS times (default 6) while every session sends
a request, and reads from Envoy's log, for each outlier ejection on the main
thread, how long until both workers logged the cluster update that carries
it. Also counts the requests that took more than one 307 or failed.
"""

from __future__ import annotations

import re
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import requests

# tests/ for the harness, envoy/ for the testbed's parts it imports.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "envoy")]

from harness import in_parallel, json_body, start_sessions, tb  # noqa: E402

EJECTION = {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 1,
            "enforcing_consecutive_local_origin_failure": 100, "enforcing_consecutive_5xx": 0,
            "enforcing_consecutive_gateway_failure": 0, "enforcing_success_rate": 0,
            "enforcing_local_origin_success_rate": 0, "interval": "1s", "base_ejection_time": "5s",
            "max_ejection_percent": 100}
LINE = re.compile(r"\[([0-9-]+ [0-9:.]+)\]\[(\d+)\]")


def delays_ms(log: str) -> list[float]:
    """For each ejection, ms until both worker threads logged a cluster update."""
    events = []
    for line in log.splitlines():
        m = LINE.match(line)
        if m and ("ejected by the outlier" in line or "batch membership update for TLS cluster app" in line):
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            events.append(("eject" if "ejected" in line else "update", at, m.group(2)))
    found = []
    for kind, at, thread in events:
        if kind != "eject":
            continue
        workers: dict[str, float] = {}
        # A worker may log the update a moment before the main thread logs the ejection.
        for kind2, at2, thread2 in events:
            if kind2 == "update" and at2 >= at - 0.005 and thread2 != thread and thread2 not in workers:
                workers[thread2] = max(0.0, (at2 - at) * 1000)
            if len(workers) == 2:
                found.append(max(workers.values()))
                break
    return sorted(found)


def main(variant: str, rounds: int) -> int:
    def patch(bootstrap):
        app = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "app")
        app["outlier_detection"] = dict(EJECTION)
        if variant == "old":
            app["common_lb_config"].pop("update_merge_window", None)

    bed = tb.Testbed(tb.PortPlan.free(), Path(tempfile.mkdtemp(prefix=f"sa-merge-{variant}-")), concurrency=2)
    bed.bootstrap_patches.append(patch)
    with bed:
        bed.envoy.restart()
        requests.post(f"{bed.envoy.admin_url}/logging?upstream=debug", timeout=5)
        users = [u for group in start_sessions(bed, bed.envoy.url, 12, min_each=3).values() for u in group]
        extra = 0
        for _ in range(rounds):
            homes = [json_body(u.replies[-1])["backend"] for u in users]
            victim = max(bed.backends, key=lambda b: homes.count(b.name))
            bed.kill_backend(bed.backends.index(victim))
            replies = in_parallel(lambda u: u.send(bed.envoy.url), users, workers=len(users))
            extra += sum(1 for r in replies if r.status_code != 200 or len(r.history) > 1)
            bed.start_backend(bed.backends.index(victim))
            bed.envoy.wait_host_health(victim.address, healthy=True, timeout=15)
        found = delays_ms(bed.envoy.process.log_path.read_text(errors="replace"))
    if found:
        print(f"{variant}: {len(found)} ejections; ms until both workers had it: min {found[0]:.0f}, "
              f"median {found[len(found) // 2]:.0f}, max {found[-1]:.0f}; "
              f"{extra} requests with a second 307 or an error")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("old", "merge0"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6))

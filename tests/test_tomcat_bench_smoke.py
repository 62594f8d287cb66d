"""Smoke test for the Tomcat adapter's benchmark (tests/bench/tomcat_adapter.py).

Seconds of load, not a benchmark: it proves the script still starts a plain
and a valve Tomcat, makes their sessions, drives every scenario with wrk and
writes its JSON, and that no request failed."""

from __future__ import annotations

import json
import subprocess
import sys

from harness import REPO, require_tool


def test_tomcat_bench_smoke(tmp_path):
    for tool in ("wrk", "taskset", "java"):
        require_tool(tool)
    out = tmp_path / "tomcat.json"
    argv = [sys.executable, str(REPO / "tests" / "bench" / "tomcat_adapter.py"), "--seconds", "1", "--warmup", "1",
            "--rounds", "1", "--out", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, f"{' '.join(argv)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    results = json.loads(out.read_text())
    assert set(results["ratios"]) == {"read", "write", "flush", "none"}, results["ratios"]
    failed = {scenario: [r["non_2xx"] for runs in by_server.values() for r in runs]
              for scenario, by_server in results["runs"].items()}
    assert all(n == 0 for counts in failed.values() for n in counts), f"non-2xx answers: {failed}"
    counters = results["valve_counters"]
    assert counters["statesSent"] > 0 and counters["statesSentInTrailers"] > 0, counters
    assert counters["serializationFailures"] == 0 and counters["sessionsUnknown"] == 0, counters

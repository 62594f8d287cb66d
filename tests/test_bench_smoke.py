"""Smoke test for the benchmark harness (tests/bench/run --smoke).

A few seconds of load, not a benchmark: it proves the harness still builds
the modules, starts every variant from the one Envoy template, drives them
with wrk, and writes results.json / results.md / results.png. The numbers
are only sanity-checked (1 s runs on a shared CI machine are noise).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "bench" / "run"
BASELINES = ["router", "native_cookie", "noop_wasm", "naive_wasm", "floor_wasm"]
FILTER = ["filter_pinned", "filter_new", "native_filter_pinned", "native_filter_new"]


def _missing_tools() -> list[str]:
    return [t for t in ("wrk", "envoy") if not shutil.which(t)]


@pytest.mark.skipif(bool(_missing_tools()), reason=f"not installed: {_missing_tools()}")
def test_bench_smoke(tmp_path: Path) -> None:
    cmd = [str(RUN), "--smoke", "--out", str(tmp_path),
           "--variants", ",".join(BASELINES + FILTER)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"

    results = json.loads((tmp_path / "results.json").read_text())
    summary = results["summary"]
    for name in BASELINES:
        assert name in summary, f"baseline {name} was not measured: {results.get('unavailable')}"
    for name in BASELINES + FILTER:
        if name not in summary and name not in FILTER:
            assert name in results["unavailable"], f"{name} neither measured nor reported"
            continue
        assert name in summary, f"{name} was not measured: {results.get('unavailable', {}).get(name)}"
        s = summary[name]
        assert s["rps"] > 500, f"{name}: {s['rps']} req/s"
        assert s["non_2xx"] == 0, f"{name}: {s['non_2xx']} non-2xx responses"
        assert s["socket_errors"] == 0, f"{name}: {s['socket_errors']} socket errors"
        # The ratio is computed; its value is the full benchmark's business
        # (a few seconds on a shared machine say nothing about it).
        assert s["ratio_rps"] > 0, f"{name}: ratio to router-only {s['ratio_rps']}"
    # Sticky variants really pinned their requests before the load started.
    assert results["checks"]["naive_wasm"]["pinned_to"]
    assert results["checks"]["floor_wasm"]["pinned_to"]
    assert results["checks"]["native_cookie"]["pinned_to"]

    scale = results.get("scale", {})
    measured = {row["variant"] for row in scale.get("summary", [])}
    assert "naive_wasm" in measured, f"scale runs missing: {scale}"

    assert results["wasm_bytes"].get("bench_noop_filter.wasm", 0) > 0
    md = (tmp_path / "results.md").read_text()
    assert "| router only |" in md and "## Module sizes" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "results.png").stat().st_size > 10_000


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))

#!/usr/bin/env python3
"""Benchmarks: what the filter costs and how fast it fails over, side by side.

Run it with `tests/bench/run` (see tests/bench/README.md). Everything runs on
127.0.0.1: one Envoy 1.40 per variant (`--concurrency 1`, pinned to CPU 0),
wrk and the upstreams pinned to CPU 1. Every variant's Envoy config comes from
one template (`envoy_config`); only `http_filters` differ:

  router          router only (the reference: every ratio is to this, same run)
  native_cookie   Envoy's stateful_session with the cookie state (strict)
  noop_wasm       a wasm filter that does nothing (tests/bench/noop-filter)
  naive_wasm      the naive minimal sticky wasm filter (tests/bench/naive-filter)
                  + stateful_session (header, strict)
  floor_wasm      the pinned path's host calls with no logic between them
                  (tests/bench/floor-filter) + stateful_session (header, strict)
  filter_pinned   our filter, valid cookie (the hot path)
  filter_new      our filter, no cookie (new session every request)
  native_filter_pinned / native_filter_new
                  the same filter as a native dynamic module (filter/native):
                  no stateful_session, the module overrides the host itself
  filter_state_sync / filter_state_async
                  our filter, valid cookie, and the upstream returns
                  x-session-state on every response, so every request writes
                  the store (redis behind webdis), sync or async write mode
  filter_state_sync_etcd
                  the same sync writes to a three-member etcd cluster

Variants are interleaved (the order rotates each round) and repeated; each
figure is reported as a ratio to router-only in the same round, and the
summary is the median over rounds. Envoy's CPU time per request (from
/proc) is recorded next to req/s, so a run where Envoy was not the bottleneck
is visible.

The scale part runs the pinned path with 1 and with N distinct session cookies
(wrk cycles through a file). The failover part lives in failover.py.

This file is the command line and the order of a run; the machinery is in
running.py, the variants in variants.py, the report in reporting.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import running
from reporting import evaluate_targets, median, plot, summarize, write_markdown
from running import BENCH, NATIVE_SO, ROOT, WASM, Bench, Variant, envoy_binary, log, run_wrk
from variants import chosen, new_sid, sign_cookie
def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "filter"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty-filter" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def envoy_version() -> str:
    try:
        out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
        # "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        after = out.split("version:", 1)[1].split()[0]
        return after.split("/")[1]
    except (OSError, subprocess.SubprocessError, RuntimeError, IndexError):
        pass
    return "unknown"


def build_wasm(commit: str | None = None) -> str:
    """Runs filter/build; returns "ok" or why it failed (then the modules of an
    earlier build are used, and results.json says so).

    With `commit`, builds that commit's tree (from `git archive`, so the
    working tree and the repository are left alone) into target/bench-commit,
    and the run uses those modules."""
    env = dict(os.environ)
    build = ROOT / "filter" / "build"
    src = None
    if commit:
        src = Path(tempfile.mkdtemp(prefix="sa-bench-src-"))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                                 capture_output=True, timeout=120)
        if archive.returncode != 0:
            raise RuntimeError(f"git archive {commit}: {archive.stderr.decode(errors='replace')}")
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=120)
        target = ROOT / "target" / "bench-commit"
        env["CARGO_TARGET_DIR"] = str(target)
        running.WASM_DIR = target / "wasm32-unknown-unknown" / "release"
        running.NATIVE_DIR = target / "native"
        build = src / "filter" / "build"
    log(f"building the modules ({'filter/build' if not commit else f'filter/build of {commit}'})")
    try:
        out = subprocess.run([str(build)], capture_output=True, text=True, timeout=1800, env=env,
                             cwd=str(src or ROOT))
    finally:
        if src is not None:
            shutil.rmtree(src, ignore_errors=True)
    if out.returncode == 0:
        return "ok"
    if commit:
        raise RuntimeError(f"filter/build of {commit} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error")]
    log("filter/build FAILED; using modules from an earlier build:\n"
        + (out.stdout + out.stderr)[-2000:])
    return "failed: " + (errors[0] if errors else f"exit {out.returncode}")


def wasm_sizes() -> dict[str, int]:
    return {name: (running.WASM_DIR / name).stat().st_size for name in WASM.values()
            if (running.WASM_DIR / name).exists()}


def native_sizes() -> dict[str, int]:
    path = running.NATIVE_DIR / NATIVE_SO
    return {NATIVE_SO: path.stat().st_size} if path.exists() else {}


def run_scale(bench: Bench, by_name: dict[str, Variant], results: dict) -> None:
    """Pinned path with 1 vs N distinct cookies (wrk cycles through a file).

    Router-only runs with the same script and files, so each figure also has
    a ratio to router-only under the same load-generator cost. With N
    cookies no per-worker cache of verified cookies can help: it is the
    worst case, where every request pays for the full check."""
    n = bench.args.scale_sessions
    targets = [name for name in ("router", "filter_pinned", "native_filter_pinned", "naive_wasm")
               if name in by_name and by_name[name].envoy is not None]
    missing = [name for name in ("filter_pinned",) if name not in targets]
    scale: dict = {"sessions": n, "runs": [], "summary": [], "unavailable": missing}
    results["scale"] = scale
    if not targets:
        return
    hosts = bench.upstreams.hosts
    files = {}
    for count in (1, n):
        path = bench.workdir / f"cookies-{count}.txt"
        with path.open("w") as f:
            for i in range(count):
                host = hosts[i % len(hosts)] if count > 1 else hosts[1]
                f.write(sign_cookie(new_sid(), host, bench.upstreams.instance_of(host)) + "\n")
        files[count] = path
    log(f"scale: {', '.join(targets)} with 1 and {n:,} cookies")
    for rnd in range(bench.args.rounds):
        order = [(t, c) for t in targets for c in (1, n)]
        if rnd % 2:
            order.reverse()
        for name, count in order:
            v = by_name[name]
            saved = v.request_headers
            v.request_headers = {}
            try:
                r = bench.load(v, bench.args.duration, cookie_file=files[count])
            finally:
                v.request_headers = saved
            r.update(round=rnd, variant=name, cookies=count)
            scale["runs"].append(r)
            log(f"  scale r{rnd} {name:14s} {count:>7,} cookies {r['rps']:9,.0f} req/s "
                f"p99 {r['latency_us']['p99'] / 1000:.2f} ms")
    def usable(name: str, count: int) -> list[dict]:
        rs = [r for r in scale["runs"] if r["variant"] == name and r["cookies"] == count]
        return [r for r in rs if not r.get("noisy")] or rs

    for name in targets:
        one = median([r["rps"] for r in usable(name, 1)])
        for count in (1, n):
            rs = usable(name, count)
            rps = median([r["rps"] for r in rs])
            base = median([r["rps"] for r in usable("router", count)]) if "router" in targets else None
            every = [r for r in scale["runs"] if r["variant"] == name and r["cookies"] == count]
            scale["summary"].append({
                "variant": name, "cookies": count, "rps": rps,
                "p99_ms": median([r["latency_us"]["p99"] / 1000 for r in rs]),
                "envoy_cpu_us_per_req": median([r.get("envoy_cpu_us_per_req") for r in rs]),
                "ratio_to_1": rps / one if rps and one else None,
                "ratio_to_router": rps / base if rps and base else None,
                "noisy": all(r.get("noisy") for r in rs),
                "non_2xx": sum(r["errors"]["status"] for r in every),
                "rejected": sum(v for r in every for k, v in r.get("counters", {}).items()
                                if "rejected" in k),
            })


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--duration", type=float, default=5, help="seconds per load run (default 5)")
    ap.add_argument("--warmup", type=float, default=2, help="warm-up seconds per variant (default 2)")
    ap.add_argument("--connections", type=int, default=16,
                    help="wrk connections for the saturation runs (default 16)")
    ap.add_argument("--light-duration", type=float, default=2,
                    help="seconds of a 1-connection (light load) run per variant and round, "
                         "for the added latency without queueing; 0 skips (default 2)")
    ap.add_argument("--variants", type=lambda s: [x for x in s.split(",") if x],
                    help="comma-separated subset of variants (router is always added)")
    ap.add_argument("--scale-sessions", type=int, default=100_000,
                    help="distinct cookies for the scale run (default 100000)")
    ap.add_argument("--no-scale", action="store_true", help="skip the scale runs")
    ap.add_argument("--no-failover", action="store_true", help="skip the failover runs")
    ap.add_argument("--failover-sessions", type=int, default=200,
                    help="sessions for the failover latency figures (default 200)")
    ap.add_argument("--failover-parts", type=lambda s: [x for x in s.split(",") if x],
                    help="comma-separated subset of the failover measurements (known_gone, known_gone_etcd, "
                         "found_mid_request, kill_under_load, store_footprint, store_footprint_etcd, storm, "
                         "storm_etcd, and native_ before known_gone, kill_under_load, storm, storm_etcd)")
    ap.add_argument("--storm-sessions", type=int, default=1000,
                    help="sessions on the pod that dies in the storm measurements (default 1000)")
    ap.add_argument("--noise-limit", type=float, default=0.03,
                    help="largest share of Envoy's CPU other programs may take during a run "
                         "(twice that on the load CPU) before the run is repeated; 1 disables "
                         "the check (default 0.03)")
    ap.add_argument("--retries", type=int, default=2,
                    help="repeats of a run spoiled by other programs (default 2)")
    ap.add_argument("--noise-budget", type=float, default=None,
                    help="seconds that waiting for quiet CPUs and repeating runs may add in "
                         "total (default: the nominal load time, so a run at most doubles)")
    ap.add_argument("--max-wait-quiet", type=float, default=10,
                    help="seconds to wait for quiet CPUs before each run (default 10)")
    ap.add_argument("--min-envoy-util", type=float, default=0.95,
                    help="a saturation run where Envoy used less of its CPU than this did not "
                         "measure Envoy and is repeated (default 0.95)")
    ap.add_argument("--nice", type=int, default=-10,
                    help="niceness of Envoy, wrk, upstreams and store, so that other programs "
                         "on a shared machine disturb the runs less (default -10; needs root; "
                         "0 leaves it)")
    ap.add_argument("--no-build", action="store_true", help="do not run filter/build first")
    ap.add_argument("--commit", metavar="REV",
                    help="measure the modules of this commit (built from `git archive REV` into "
                         "target/bench-commit) instead of the working tree; use it for results "
                         "that are committed")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--upstream", choices=["nginx", "envoy"], default=None,
                    help="upstream servers (default nginx when installed, else envoy)")
    ap.add_argument("--out", type=Path, default=BENCH,
                    help="directory for results.json/.md/.png (default tests/bench)")
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds in total: 1 round of 1 s, no warm-up, 1000-cookie scale, no failover")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args(argv)
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if args.smoke:
        args.rounds, args.duration, args.warmup, args.light_duration = 1, 1, 0, 0
        args.scale_sessions = min(args.scale_sessions, 1000)
        args.no_failover = True
        args.noise_limit = 1.0  # no waiting, no repeats: a smoke run proves the harness works
    running.NICE = args.nice if os.geteuid() == 0 else max(0, args.nice)
    if args.variants and "router" not in args.variants:
        args.variants.insert(0, "router")
    if args.upstream is None:
        args.upstream = "nginx" if (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) else "envoy"
    for tool in ("wrk",):
        if not shutil.which(tool):
            print(f"bench: {tool} is not installed (apt-get install -y {tool})", file=sys.stderr)
            return 2

    if args.commit:
        args.commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.commit],
                                     capture_output=True, text=True, timeout=30).stdout.strip() or args.commit
    args.build = "skipped (--no-build)" if args.no_build and not args.commit else build_wasm(args.commit)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sa-bench-"))
    bench = Bench(args, workdir)
    if bench.load_cpu is not None:
        os.sched_setaffinity(0, {bench.load_cpu})  # the harness never runs on Envoy's CPU
    results: dict = {}
    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        results = run(bench)
    finally:
        bench.procs.stop_all()
        bench.etcd.stop()
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not results:
        return 1
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args.out / "results.md")
    why = plot(results, args.out / "results.png")
    if why:
        log(f"no plot: {why}")
    log(f"wrote {args.out / 'results.json'}, results.md" + ("" if why else ", results.png"))
    print((args.out / "results.md").read_text())
    return 0


def run(bench: Bench) -> dict:
    args = bench.args
    results: dict = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git": args.commit or git_rev(), "envoy": envoy_version(), "cpus": bench.ncpus,
            "host": platform.node(), "envoy_cpu": bench.envoy_cpu, "load_cpu": bench.load_cpu,
            "concurrency": 1, "connections": args.connections, "rounds": args.rounds,
            "duration_s": args.duration, "warmup_s": args.warmup,
            "light_duration_s": args.light_duration, "upstream": args.upstream,
            "smoke": args.smoke, "build": args.build, "noise_limit": args.noise_limit,
            "retries": args.retries, "nice": running.NICE, "min_envoy_util": args.min_envoy_util,
            "modules_built": {name: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(
                (running.WASM_DIR / name).stat().st_mtime)) for name in WASM.values()
                if (running.WASM_DIR / name).exists()},
        },
        "wasm_bytes": wasm_sizes(),
        "native_bytes": native_sizes(),
    }
    variants = chosen(bench)
    results["labels"] = {v.name: v.label for v in variants}
    log(f"upstreams: {args.upstream}; work directory {bench.workdir}")
    bench.upstreams.start()
    for name in {v.store for v in variants if v.needs_store}:
        bench.stores(name).start()
    for v in variants:
        bench.start_variant(v)
    live = [v for v in variants if bench.ready_variant(v)]
    if not any(v.name == "router" for v in live):
        raise RuntimeError("router-only variant did not start: " + bench.unavailable.get("router", ""))
    results["unavailable"] = bench.unavailable
    results["checks"] = {v.name: v.notes for v in live}

    if args.warmup > 0:
        log(f"warm-up: {args.warmup:g} s per variant")
        for v in live:
            run_wrk(v.envoy.port, path=v.path, duration=args.warmup,  # type: ignore[union-attr]
                    connections=args.connections, headers=v.request_headers, cpu=bench.load_cpu)

    runs: list[dict] = []
    for rnd in range(args.rounds):
        k = rnd % len(live)
        order = live[k:] + live[:k]  # rotate so no variant always runs first
        for v in order:
            r = bench.load(v, args.duration)
            r.update(round=rnd, variant=v.name, load="saturation")
            runs.append(r)
            log(f"r{rnd} {v.name:20s} {r['rps']:9,.0f} req/s  p50 {r['latency_us']['p50'] / 1000:6.3f} ms"
                f"  p99 {r['latency_us']['p99'] / 1000:6.3f} ms  envoy {r['envoy_cpu_util'] * 100:3.0f}% "
                f"{r['envoy_cpu_us_per_req']} us/req  non2xx {r['errors']['status']}")
            if args.light_duration > 0:
                r = bench.load(v, args.light_duration, connections=1)
                r.update(round=rnd, variant=v.name, load="light")
                runs.append(r)
                log(f"r{rnd} {v.name:20s} 1 connection: p50 {r['latency_us']['p50']} us  "
                    f"p99 {r['latency_us']['p99']} us")
    results["runs"] = runs
    names = [v.name for v in live]
    results["summary"] = summarize([r for r in runs if r["load"] == "saturation"], names)
    results["noise"] = {"spent_s": round(bench.noise_spent, 1), "budget_s": bench.noise_budget,
                        "runs": bench.noise_log}
    if args.light_duration > 0:
        results["summary_light"] = summarize([r for r in runs if r["load"] == "light"], names)

    by_name = {v.name: v for v in live}
    if not args.no_scale:
        run_scale(bench, by_name, results)
    # Stop the load-test Envoys before the failover part.
    for v in live:
        if v.envoy and v.envoy.proc:
            bench.procs.stop(v.envoy.proc)
    if not args.no_failover:
        try:
            import failover  # tests/bench/failover.py
            results["failover"] = failover.run(bench, args.failover_sessions)
        except Exception as e:  # noqa: BLE001 - report, do not lose the other results
            log(f"failover: not measured: {e}")
            results["failover"] = {"error": str(e).strip().splitlines()[0] if str(e).strip() else repr(e)}
    results["targets"] = evaluate_targets(results)
    return results


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

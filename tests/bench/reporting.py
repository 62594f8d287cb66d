"""The benchmark's report: medians and ratios to router-only per variant,
the targets checked, and results.md and results.png written from
results.json's figures."""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

# Targets from the issue; evaluated in summarize().
TARGETS = {
    "pinned_rps_ratio_min": 0.85,
    "pinned_p99_ratio_max": 1.2,
    "native_pinned_rps_ratio_min": 0.92,
    # ... and at most this far below Envoy's own stateful_session cookie.
    "native_pinned_vs_envoy_cookie_max_gap": 0.03,
    "native_new_rps_ratio_min": 0.85,
    "known_gone_p99_ms_max": 3.0,
    "lost_sessions_max": 0,
    "wasm_bytes_max": 250_000,
}


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], names: list[str]) -> dict:
    """Per variant: medians over its runs, and ratios to router-only.

    Only clean runs count (not spoiled by other programs, see Bench.spoiled);
    when a variant or router-only has none, all its runs count and the
    figures are flagged `ratios_from_noisy_rounds`. A ratio is the variant's
    median over router-only's median, both from this invocation; the min-max
    range is over the variant's runs."""
    def usable(name: str) -> tuple[list[dict], bool]:
        every = [r for r in runs if r["variant"] == name]
        clean = [r for r in every if not r.get("noisy")]
        return (clean, True) if clean else (every, False)

    base, base_clean = usable("router")
    naive, naive_clean = usable("naive_wasm")
    out: dict[str, dict] = {}
    if not base:
        return out
    b_rps = median([r["rps"] for r in base])
    b_p50 = median([r["latency_us"]["p50"] for r in base])
    b_p99 = median([r["latency_us"]["p99"] for r in base])
    b_cpu = median([r.get("envoy_cpu_us_per_req") for r in base])
    for name in names:
        mine, clean = usable(name)
        if not mine:
            continue
        every = [r for r in runs if r["variant"] == name]
        rps = median([r["rps"] for r in mine])
        p50 = median([r["latency_us"]["p50"] for r in mine])
        p99 = median([r["latency_us"]["p99"] for r in mine])
        cpu = median([r.get("envoy_cpu_us_per_req") for r in mine])
        per_run = [r["rps"] / b_rps for r in mine]
        out[name] = {
            "runs": len(mine),
            "noisy_runs": sum(1 for r in every if r.get("noisy")),
            "ratios_from_noisy_rounds": name != "router" and not (clean and base_clean),
            "rps": rps,
            "p50_ms": p50 / 1000,
            "p99_ms": p99 / 1000,
            "envoy_cpu_us_per_req": cpu,
            "envoy_cpu_util": median([r.get("envoy_cpu_util") for r in mine]),
            "non_2xx": sum(r["errors"]["status"] for r in every),
            "socket_errors": sum(r["errors"][k] for r in every
                                 for k in ("connect", "read", "write", "timeout")),
            "ratio_rps": rps / b_rps,
            "ratio_rps_min": min(per_run),
            "ratio_rps_max": max(per_run),
            "ratio_p50": p50 / max(1, b_p50),
            "ratio_p99": p99 / max(1, b_p99),
            "ratio_cpu_per_req": cpu / b_cpu if cpu and b_cpu else None,
            "rps_vs_naive": rps / median([r["rps"] for r in naive]) if naive else None,
            "rps_vs_naive_noisy": not (clean and naive_clean),
        }
    return out


def evaluate_targets(results: dict) -> dict:
    """The issue's targets; `pass` is None (inconclusive) when every round
    behind a ratio was spoiled by other programs."""
    s = results.get("summary", {})
    t: dict[str, dict] = {}
    p = s.get("filter_pinned")
    if p and p.get("ratio_rps") is not None:
        noisy = bool(p.get("ratios_from_noisy_rounds"))

        def row(value: float, target: str, ok: bool) -> dict:
            out = {"value": value, "target": target, "pass": None if noisy else ok}
            if noisy:
                out["note"] = "inconclusive: every run was noisy"
            return out
        t["pinned_rps_ratio"] = row(p["ratio_rps"], ">= 0.85",
                                    p["ratio_rps"] >= TARGETS["pinned_rps_ratio_min"])
        if p.get("rps_vs_naive") is not None:
            t["pinned_vs_naive"] = row(p["rps_vs_naive"], ">= 1.0", p["rps_vs_naive"] >= 1.0)
            if p.get("rps_vs_naive_noisy") and not noisy:
                t["pinned_vs_naive"]["pass"] = None
                t["pinned_vs_naive"]["note"] = "inconclusive: the naive filter's runs were noisy"
        t["pinned_p99_ratio"] = row(p["ratio_p99"], "<= 1.2",
                                    p["ratio_p99"] <= TARGETS["pinned_p99_ratio_max"])
    rows = {(r["variant"], r["cookies"]): r for r in (results.get("scale") or {}).get("summary", [])}
    n = (results.get("scale") or {}).get("sessions")
    many, many_naive = rows.get(("filter_pinned", n)), rows.get(("naive_wasm", n))
    if many and many.get("ratio_to_1") is not None:
        t["scale_flat"] = {"value": many["ratio_to_1"], "target": f">= 0.95 ({n:,} vs 1 cookie)",
                           "pass": None if many.get("noisy") else many["ratio_to_1"] >= 0.95}
        if many.get("ratio_to_router") is not None:
            t["pinned_rps_ratio_many_sessions"] = {
                "value": many["ratio_to_router"], "target": f">= 0.85 ({n:,} cookies)",
                "pass": None if many.get("noisy") else many["ratio_to_router"] >= 0.85}
        if many_naive and many_naive.get("rps"):
            v = many["rps"] / many_naive["rps"]
            t["pinned_vs_naive_many_sessions"] = {
                "value": v, "target": f">= 1.0 ({n:,} cookies)",
                "pass": None if many.get("noisy") or many_naive.get("noisy") else v >= 1.0}
    fo = results.get("failover") or {}
    kg = (fo.get("known_gone") or {}).get("p99_ms")
    if kg is not None:
        ok = kg < TARGETS["known_gone_p99_ms_max"]
        t["known_gone_p99_ms"] = {"value": kg, "target": "< 3", "pass": ok}
        if fo["known_gone"].get("noisy") and not ok:
            t["known_gone_p99_ms"].update(note="inconclusive: other programs took "
                                          f"{fo['known_gone'].get('foreign_cpu')} of our CPUs")
            t["known_gone_p99_ms"]["pass"] = None
    lost = (fo.get("kill_under_load") or {}).get("lost_sessions")
    if lost is not None:
        t["lost_sessions"] = {"value": lost, "target": "== 0", "pass": lost == 0}
    t.update(native_targets(s, fo))
    size = (results.get("wasm_bytes") or {}).get("session_affinity.wasm")
    if size and any(n.startswith("filter") for n in s):  # only once the filter loads
        t["wasm_bytes"] = {"value": size, "target": "< 250000",
                           "pass": size < TARGETS["wasm_bytes_max"]}
    return t


def native_targets(s: dict, fo: dict) -> dict:
    """The native module's targets: its pinned path next to router-only and
    to Envoy's own stateful_session cookie, its new-session path, and its
    known-gone failover next to the wasm build's."""
    t: dict[str, dict] = {}

    def row(value: float, target: str, ok: bool, noisy: bool) -> dict:
        out = {"value": value, "target": target, "pass": None if noisy else ok}
        if noisy:
            out["note"] = "inconclusive: every run was noisy"
        return out

    pinned, new, cookie = s.get("native_filter_pinned"), s.get("native_filter_new"), s.get("native_cookie")
    if pinned:
        noisy = bool(pinned.get("ratios_from_noisy_rounds"))
        t["native_pinned_rps_ratio"] = row(pinned["ratio_rps"], ">= 0.92",
                                           pinned["ratio_rps"] >= TARGETS["native_pinned_rps_ratio_min"], noisy)
        if cookie:
            gap = pinned["ratio_rps"] - cookie["ratio_rps"]
            t["native_pinned_vs_envoy_cookie"] = row(
                gap, ">= -0.03 (ratio minus stateful_session cookie's)",
                gap >= -TARGETS["native_pinned_vs_envoy_cookie_max_gap"],
                noisy or bool(cookie.get("ratios_from_noisy_rounds")))
    if new:
        t["native_new_rps_ratio"] = row(new["ratio_rps"], ">= 0.85",
                                        new["ratio_rps"] >= TARGETS["native_new_rps_ratio_min"],
                                        bool(new.get("ratios_from_noisy_rounds")))
    wasm_kg, native_kg = fo.get("known_gone") or {}, fo.get("native_known_gone") or {}
    if wasm_kg.get("p99_ms") is not None and native_kg.get("p99_ms") is not None:
        t["native_known_gone_p99_ms"] = row(
            native_kg["p99_ms"], f"<= the wasm build's ({wasm_kg['p99_ms']:.2f})",
            native_kg["p99_ms"] <= wasm_kg["p99_ms"], bool(native_kg.get("noisy") or wasm_kg.get("noisy")))
    lost = (fo.get("native_kill_under_load") or {}).get("lost_sessions")
    if lost is not None:
        t["native_lost_sessions"] = {"value": lost, "target": "== 0", "pass": lost == 0}
    return t


def builds_side_by_side(summary: dict) -> list[str]:
    """The wasm and native builds of the filter on the same paths, this run."""
    pairs = [("pinned", "filter_pinned", "native_filter_pinned"), ("new session", "filter_new", "native_filter_new")]
    pairs = [p for p in pairs if p[1] in summary and p[2] in summary]
    if not pairs:
        return []
    lines = ["", "## The two builds side by side", "",
             "Envoy CPU µs per request and req/s ratio to router-only; the native module needs no "
             "stateful_session filter.", "",
             "| path | wasm µs/req | native µs/req | native / wasm | wasm ratio | native ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, wasm, native in pairs:
        w, n = summary[wasm], summary[native]
        cpu_ratio = (n["envoy_cpu_us_per_req"] / w["envoy_cpu_us_per_req"]
                     if n["envoy_cpu_us_per_req"] and w["envoy_cpu_us_per_req"] else None)
        lines.append(f"| {label} | {fmt(w['envoy_cpu_us_per_req'], '.1f')} | "
                     f"{fmt(n['envoy_cpu_us_per_req'], '.1f')} | {fmt(cpu_ratio)} | "
                     f"{fmt(w['ratio_rps'])} | {fmt(n['ratio_rps'])} |")
    return lines


def fmt(x, spec: str = ".2f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def cost_breakdown(summary: dict) -> list[str]:
    """Where the pinned path's Envoy CPU per request goes, step by step from
    router-only (medians of this run; empty unless every step was measured)."""
    steps = [("router", "Envoy, router only"),
             ("noop_wasm", "+ a wasm filter that does nothing (V8 entries per stream)"),
             ("floor_wasm", "+ the pinned path's host calls and stateful_session (header)"),
             ("filter_pinned", "+ the filter's own work: cookie, cache, decisions")]
    cpu = [summary.get(name, {}).get("envoy_cpu_us_per_req") for name, _ in steps]
    if any(c is None for c in cpu):
        return []
    lines = ["", "## Where the pinned path's cost goes", "",
             "Envoy CPU µs per request, each step measured as its own variant in this run.", "",
             "| step | µs/req | added µs |", "|---|---:|---:|"]
    for i, (_, label) in enumerate(steps):
        added = "" if i == 0 else f"{cpu[i] - cpu[i - 1]:+.1f}"
        lines.append(f"| {label} | {cpu[i]:.1f} | {added} |")
    return lines


def kill_under_load_line(k: dict | None, label: str) -> list[str]:
    if k and "lost_sessions" in k:
        return [f"- {label}: **{k['lost_sessions']} of {k['sessions']} sessions lost state** "
                f"({k['sessions_on_killed_host']} pinned to the killed host; {k['requests']:,} requests "
                f"in {k['seconds']:g} s, {k['redirects']} replayed via 307; {k['client_errors']} "
                f"client-visible errors, of which {k['errors_in_flight_at_kill']} were requests in "
                "flight on the host when it died (503, never replayed: the app may have processed them))"]
    if k and k.get("error"):
        return [f"- {label}: not measured: {k['error']}"]
    return []


def store_comparison(results: dict) -> list[str]:
    """webdis and etcd side by side, from this run (rows it did not measure are left out)."""
    fo, summary = results.get("failover") or {}, results.get("summary") or {}
    rows = []
    for store, known, write, size in (("webdis (Redis)", "known_gone", "filter_state_sync", "store_footprint"),
                                      ("etcd (3 members)", "known_gone_etcd", "filter_state_sync_etcd",
                                       "store_footprint_etcd")):
        k, w, f = fo.get(known) or {}, summary.get(write) or {}, fo.get(size) or {}
        if not (k.get("samples") or w or f.get("sessions")):
            continue
        rows.append(f"| {store} | {fmt(k.get('p50_ms'))} / {fmt(k.get('p99_ms'))} | "
                    f"{fmt(k.get('store_calls_per_failover'))} | {fmt(w.get('ratio_rps'))} | "
                    f"{fmt(w.get('p50_ms'), '.3f')} / {fmt(w.get('p99_ms'), '.3f')} | "
                    f"{fmt(f.get('store_calls_per_write'))} | {fmt(f.get('keys_per_session'), '.1f')} | "
                    f"{fmt(f.get('bytes_per_session'), ',.0f')} |")
    if not rows:
        return []
    return ["", "## Which store", "",
            "Same run, same machine. Known-gone failover: first request after the host is known gone, "
            "including the store's begin and commit. State write: the `filter_state_sync*` variants "
            "(a sync write on every request). Footprint: new sessions through the filter, the demo "
            "backend's state (about 70 bytes); etcd's bytes are bbolt's in use after compacting old "
            "revisions.", "",
            "| store | known-gone p50 / p99 ms | store calls per failover | state write req/s ratio to "
            "router | state write p50 / p99 ms | store calls per write | keys per session "
            "| bytes per session |", "|---|---:|---:|---:|---:|---:|---:|---:|", *rows]


def write_markdown(results: dict, path: Path) -> None:
    m = results["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `tests/bench/run` on {m['date']} (git {m['git']}), Envoy {m['envoy']}, "
        f"{m['cpus']} CPUs, Envoy pinned to CPU {m['envoy_cpu']} with `--concurrency 1`, "
        f"wrk (1 thread, {m['connections']} connections) and {m['upstream']} upstreams on CPU "
        f"{m['load_cpu']}. {m['rounds']} interleaved rounds of {m['duration_s']} s per variant. "
        "Ratios are to router-only in the same invocation: the variant's median over its clean "
        "runs divided by router-only's (min-max of the variant's runs in brackets). "
        f"A run was repeated (up to {m.get('retries', 0)} times) when other programs took more "
        f"than {m.get('noise_limit', 0) * 100:g}% of Envoy's CPU (twice that of the load CPU), or "
        "when Envoy used less than "
        f"{m.get('min_envoy_util', 0.95) * 100:g}% of its CPU in a saturation run (it was not the "
        "bottleneck); runs still spoiled are marked noisy and left out when clean runs exist.",
        "",
    ]
    if m.get("build", "ok") != "ok":
        lines += [f"**Module build: {m['build']}** (modules from an earlier build were used).", ""]
    lines += [
        "| variant | req/s | ratio req/s | p50 ms | p99 ms | p99 ratio | Envoy CPU µs/req "
        "| CPU ratio | non-2xx | noisy runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results["summary"].items():
        label = results["labels"].get(name, name)
        rng = (f" ({fmt(s['ratio_rps_min'])}-{fmt(s['ratio_rps_max'])})"
               if s["ratio_rps_min"] is not None and s["runs"] > 1 else "")
        lines.append(
            f"| {label} | {fmt(s['rps'], ',.0f')} | {fmt(s['ratio_rps'])}{rng} | "
            f"{fmt(s['p50_ms'], '.3f')} | {fmt(s['p99_ms'], '.3f')} | {fmt(s['ratio_p99'])} | "
            f"{fmt(s['envoy_cpu_us_per_req'], '.1f')} | {fmt(s['ratio_cpu_per_req'])} | "
            f"{s['non_2xx']} | {s['noisy_runs']} |")
    lines += cost_breakdown(results["summary"])
    lines += builds_side_by_side(results["summary"])
    light = results.get("summary_light")
    if light:
        base = light.get("router", {})
        lines += ["", "## Latency at light load (1 connection, no queueing)", "",
                  "| variant | p50 µs | p99 µs | p50 added µs | p50 ratio | p99 ratio |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, s in light.items():
            added = (s["p50_ms"] - base["p50_ms"]) * 1000 if base.get("p50_ms") is not None else None
            lines.append(f"| {results['labels'].get(name, name)} | {fmt(s['p50_ms'] * 1000, '.0f')} | "
                         f"{fmt(s['p99_ms'] * 1000, '.0f')} | {fmt(added, '+.0f')} | "
                         f"{fmt(s['ratio_p50'])} | {fmt(s['ratio_p99'])} |")
    if results.get("unavailable"):
        lines += ["", "Not measured in this run:", ""]
        for name, why in results["unavailable"].items():
            first = why.strip().splitlines()[0] if why.strip() else "unavailable"
            lines.append(f"- `{name}`: {first[:300]}")
    sc = results.get("scale")
    if sc:
        lines += ["", "## Scale: pinned path, 1 vs many distinct session cookies", "",
                  "wrk cycles through a file of cookies (the same Lua script for every row, "
                  "router-only included). With many cookies no per-worker cache of verified "
                  "cookies can help, so every request pays for the full check.", "",
                  "| variant | cookies | req/s | ratio to router-only | p99 ms | Envoy CPU µs/req "
                  "| ratio to 1 cookie |", "|---|---:|---:|---:|---:|---:|---:|"]
        for row in sc.get("summary", []):
            lines.append(f"| {results['labels'].get(row['variant'], row['variant'])} | "
                         f"{row['cookies']:,} | {fmt(row['rps'], ',.0f')} | "
                         f"{fmt(row.get('ratio_to_router'))} | {fmt(row['p99_ms'], '.3f')} | "
                         f"{fmt(row.get('envoy_cpu_us_per_req'), '.1f')} | {fmt(row['ratio_to_1'])}"
                         f"{' (noisy)' if row.get('noisy') else ''} |")
        if sc.get("unavailable"):
            lines.append(f"\nScale not measured for: {', '.join(sc['unavailable'])}")
    fo = results.get("failover")
    if fo:
        lines += ["", "## Failover (demo backend, store: redis + webdis)", ""]
        if fo.get("error"):
            lines.append(f"Not measured: {fo['error']}")
        for key, label in (("known_gone", "known gone (host already marked gone)"),
                           ("native_known_gone", "native module, known gone"),
                           ("known_gone_etcd", "known gone, store on etcd (three members)"),
                           ("found_mid_request", "found mid-request (307 + replay)")):
            f = fo.get(key)
            if f and f.get("samples"):
                ref = f.get("reference_pinned") or {}
                lines.append(f"- {label}: p50 {fmt(f['p50_ms'], '.2f')} ms, "
                             f"p90 {fmt(f.get('p90_ms'), '.2f')} ms, p99 "
                             f"{fmt(f['p99_ms'], '.2f')} ms, max {fmt(f['max_ms'], '.2f')} ms over "
                             f"{f['samples']} sessions; {f['lost_state']} lost state"
                             + (f"; same client, healthy pinned request: p50 {fmt(ref['p50_ms'], '.2f')}"
                                f" ms, p99 {fmt(ref['p99_ms'], '.2f')} ms" if ref.get("samples") else "")
                             + (f" ({f['note']})" if f.get("note") else "")
                             + (f" **noisy: other programs took {f['foreign_cpu']} of our CPUs**"
                                if f.get("noisy") else ""))
            elif f and f.get("error"):
                lines.append(f"- {label}: not measured: {f['error']}")
        for key, label in (("kill_under_load", "kill under load"),
                           ("native_kill_under_load", "native module, kill under load")):
            lines += kill_under_load_line(fo.get(key), label)
    lines += store_comparison(results)
    lines += ["", "## Module sizes", "", "| module | bytes |", "|---|---:|"]
    for name, size in {**results.get("wasm_bytes", {}), **results.get("native_bytes", {})}.items():
        lines.append(f"| {name} | {size:,} |")
    t = results.get("targets")
    if t:
        lines += ["", "## Targets", "", "| target | value | goal | met |", "|---|---:|---|---|"]
        for name, row in t.items():
            v = row["value"]
            met = ("inconclusive (noisy)" if row["pass"] is None
                   else "yes" if row["pass"] else "**no**")
            lines.append(f"| {name} | {fmt(v, ',.3f') if isinstance(v, float) else v} | "
                         f"{row['target']} | {met} |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> str | None:
    """Ratios to router-only and Envoy's CPU per request; returns why not
    when it cannot plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    s = results["summary"]
    names = [n for n in s if n != "router" and s[n]["ratio_rps"] is not None]
    if not names:
        return "nothing to plot"

    short = {"native_cookie": "Envoy native\ncookie", "noop_wasm": "no-op\nwasm",
             "naive_wasm": "naive\nsticky wasm", "floor_wasm": "host-call\nfloor wasm",
             "filter_pinned": "filter:\npinned",
             "filter_new": "filter:\nnew session", "filter_state_sync": "filter:\nwrite sync",
             "filter_state_async": "filter:\nwrite async"}

    def label(n: str) -> str:
        return short.get(n) or textwrap.fill(results["labels"].get(n, n), 12)

    def color(n: str) -> str:
        return "#999999" if n == "router" else "#dd8452" if n.startswith("filter") else "#4c72b0"

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    ax = axes[0]
    vals = [s[n]["ratio_rps"] for n in names]
    lo = [s[n]["ratio_rps"] - (s[n]["ratio_rps_min"] or s[n]["ratio_rps"]) for n in names]
    hi = [(s[n]["ratio_rps_max"] or s[n]["ratio_rps"]) - s[n]["ratio_rps"] for n in names]
    ax.bar(range(len(names)), vals, color=[color(n) for n in names], yerr=[lo, hi], capsize=3)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(TARGETS["pinned_rps_ratio_min"], color="red", ls="--", lw=0.8,
               label="pinned target >= 0.85")
    ax.set_ylabel("req/s, ratio to router-only (higher is better)")
    ax.set_title("Throughput (1 Envoy worker, saturated)")
    ax.set_ylim(0, max(1.15, max(vals) + 0.1))
    for i, v in enumerate(vals):
        ax.text(i, v + hi[i] + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax2 = axes[1]
    vals2 = [s[n]["ratio_p99"] for n in names]
    ax2.bar(range(len(names)), vals2, color=[color(n) for n in names])
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.axhline(TARGETS["pinned_p99_ratio_max"], color="red", ls="--", lw=0.8,
                label="pinned target <= 1.2")
    ax2.set_ylabel("p99 latency, ratio to router-only (lower is better)")
    ax2.set_title("Tail latency (same runs)")
    for i, v in enumerate(vals2):
        ax2.text(i, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    for a in axes[:2]:
        a.set_xticks(range(len(names)))
        a.set_xticklabels([label(n).replace("\n", " ") for n in names], fontsize=7,
                          rotation=35, ha="right", rotation_mode="anchor")
        a.legend(fontsize=8, loc="lower right")
    ax3 = axes[2]
    cpu_names = [n for n in s if s[n].get("envoy_cpu_us_per_req")]
    cpu = [s[n]["envoy_cpu_us_per_req"] for n in cpu_names]
    ax3.barh(range(len(cpu_names)), cpu, color=[color(n) for n in cpu_names])
    ax3.set_yticks(range(len(cpu_names)))
    ax3.set_yticklabels([results["labels"].get(n, n) for n in cpu_names], fontsize=7.5)
    ax3.invert_yaxis()
    ax3.set_xlabel("Envoy CPU time per request, µs (lower is better)")
    ax3.set_title("Cost per request")
    for i, v in enumerate(cpu):
        ax3.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    m = results["meta"]
    noisy = sum(v.get("noisy_runs", 0) for v in s.values())
    fig.suptitle(f"Session affinity filter vs baselines: Envoy {m['envoy']}, {m['rounds']} rounds "
                 f"x {m['duration_s']:g} s, median, bars min-max"
                 + (f"; {noisy} noisy runs" if noisy else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None



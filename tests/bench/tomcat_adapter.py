#!/usr/bin/env python3
"""What the Tomcat adapter costs Tomcat itself: requests/s of the demo app
with and without the SessionAffinityValve, in the same run, on loopback.

Two Tomcats (Debian's Tomcat 10, -Xmx256m, pinned to CPU 0) serve the same
demo app; one has the valve. wrk (pinned to CPU 1, 16 connections, bounded
in time) cycles through 256 sessions, each with a small cart:

  read   GET /cart             the session is read; nothing changes, no state is sent
  write  POST /cart/add        every request changes the cart; the valve serializes,
                               signs and sends the state on every response
  flush  POST /flush           the app commits the response, then changes the cart:
                               the state goes in a trailer after the chunked body
  none   GET /healthz          no session at all (the valve only adds x-instance-id)

Plain Tomcat finds its sessions by JSESSIONID cookie; the valve's by
x-session-id, as the proxy sends it. Both JVMs are warmed up on every
scenario first; then each scenario runs them alternately for several rounds; the ratio is valve / plain of the
median req/s. No Envoy and no store are involved: this is the adapter alone.

    tests/bench/tomcat_adapter.py                # 5 rounds of 4 s per scenario
    tests/bench/tomcat_adapter.py --seconds 2 --rounds 1 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "adapters" / "tomcat"))
import tomcats  # noqa: E402  (adapters/tomcat/tomcats.py)

tb = tomcats.tb
# Thread names (as /proc shows them, cut to 15 characters) whose CPU time is counted.
REQUEST_THREADS = "http-nio-"
GC_THREADS = ("VM Thread", "GC Thread#0")
SESSIONS = 256
CONNECTIONS = 16
SCENARIOS = {
    "read": ("GET", "/cart"),
    "write": ("POST", "/cart/add?item=apple"),
    "flush": ("POST", "/flush?item=apple"),
    "none": ("GET", "/healthz"),
}
WRK_SCRIPT = """
local ids = {%(ids)s}
local i = 0
request = function()
  i = i + 1
  local headers = {}
  if #ids > 0 then headers["%(header)s"] = "%(prefix)s" .. ids[(i %% #ids) + 1] end
  return wrk.format("%(method)s", "%(path)s", headers)
end
"""


def call(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
        return response.status, dict(response.headers.items())


def make_sessions(tomcat: "tomcats.Tomcat", with_valve: bool) -> list[str]:
    """SESSIONS sessions, each with three items in its cart; their ids as the client sends them."""
    ids = []
    for _ in range(SESSIONS):
        if with_valve:
            sid = secrets.token_urlsafe(16)
            headers = {"x-session-id": sid}
            call(f"{tomcat.url}/cart", headers={**headers, "x-session-new": "1"})
        else:
            _, answer = call(f"{tomcat.url}/cart")
            sid = re.search(r"JSESSIONID=([^;]+)", answer["Set-Cookie"]).group(1)
            headers = {"Cookie": f"JSESSIONID={sid}"}
        for item in ("apple", "pear", "plum"):
            call(f"{tomcat.url}/cart/add?item={item}", "POST", headers)
        ids.append(sid)
    return ids


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) that the JVM's request threads and its GC have used so far.

    The JIT compiler threads are left out: on a busy machine C2 goes on
    compiling long after a warm-up, and would bill that to whichever JVM
    happens to be measured."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, _, rest = task.joinpath("stat").read_text().partition(" (")[2].rpartition(") ")
        except FileNotFoundError:
            continue  # the thread ended
        if name.startswith(REQUEST_THREADS) or name in GC_THREADS:
            fields = rest.split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wrk(tomcat: "tomcats.Tomcat", script: Path, seconds: float, cpus: str) -> dict:
    """One bounded wrk run: req/s, latency percentiles (ms), and the CPU time per request (us) of the
    JVM's request threads and GC.

    CPU time per request holds up on a shared machine, where req/s moves with
    whatever else runs."""
    argv = ["taskset", "-c", cpus, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency",
            "-s", str(script), tomcat.url]
    cpu_before = cpu_seconds(tomcat.process.pid)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    cpu = cpu_seconds(tomcat.process.pid) - cpu_before
    done = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latency = {p: re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out) for p in ("50", "99")}
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {"rps": rps, "cpu_us": cpu * 1e6 / max(done, 1), "non_2xx": int(errors.group(1)) if errors else 0,
            **{f"p{p}_ms": float(m.group(1)) * scale[m.group(2)] for p, m in latency.items() if m}}


def script_for(workdir: Path, name: str, scenario: str, ids: list[str], with_valve: bool) -> Path:
    method, path = SCENARIOS[scenario]
    header, prefix = ("x-session-id", "") if with_valve else ("Cookie", "JSESSIONID=")
    ids = [] if scenario == "none" else ids
    path_file = workdir / f"{name}-{scenario}.lua"
    path_file.write_text(WRK_SCRIPT % {"ids": ",".join(f'"{i}"' for i in ids), "header": header,
                                       "prefix": prefix, "method": method, "path": path})
    return path_file


def state_bytes(tomcat: "tomcats.Tomcat", sid: str) -> int:
    """Size of the x-session-state one cart change sends (what the write scenario carries)."""
    _, headers = call(f"{tomcat.url}/cart/add?item=size", "POST", {"x-session-id": sid})
    return len(headers.get("x-session-state", ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measured wrk run")
    parser.add_argument("--warmup", type=float, default=10.0, help="JIT warm-up per JVM and scenario, before any run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--valve", default="", help="extra valve attributes, e.g. bufferSize=0,trailers=false")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    for tool in ("wrk", "taskset", "java"):
        if not shutil.which(tool):
            print(f"tomcat_adapter: {tool} is not installed", file=sys.stderr)
            return 2
    tomcats.build()
    extra = dict(pair.split("=", 1) for pair in args.valve.split(",") if pair)
    workdir = Path(tempfile.mkdtemp(prefix="sa-bench-tomcat-"))
    plain_port, valve_port = tb.free_ports(2)
    # -Xbatch: the JIT compiles in the request threads, so the warm-up ends with the code compiled; in the
    # background, C2 is still compiling minutes later on a busy machine and the runs measure half-compiled code.
    tomcats.JAVA_OPTS += " -Xbatch"
    servers = {
        "plain": tomcats.Tomcat("plain", plain_port, workdir / "plain", valve=None, cpus="0"),
        "valve": tomcats.Tomcat("valve", valve_port, workdir / "valve", valve=tomcats.demo_valve(**extra), cpus="0"),
    }
    revision = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    results = {"revision": revision.stdout.strip(), "load_before": os.getloadavg(), "sessions": SESSIONS,
               "connections": CONNECTIONS, "seconds": args.seconds, "rounds": args.rounds, "runs": {}, "ratios": {}}
    try:
        tomcats.start_all(list(servers.values()))
        ids = {name: make_sessions(t, name == "valve") for name, t in servers.items()}
        results["state_bytes"] = state_bytes(servers["valve"], ids["valve"][0])
        scenarios = args.scenarios.split(",")
        scripts = {(scenario, name): script_for(workdir, name, scenario, ids[name], name == "valve")
                   for scenario in scenarios for name in servers}
        # Every code path the runs take is compiled before any run is measured.
        for (scenario, name), script in scripts.items():
            wrk(servers[name], script, args.warmup, "1")
        for scenario in scenarios:
            runs = {name: [] for name in servers}
            for round_number in range(args.rounds):
                order = list(servers) if round_number % 2 == 0 else list(reversed(servers))
                for name in order:
                    runs[name].append(wrk(servers[name], scripts[scenario, name], args.seconds, "1"))
            results["runs"][scenario] = runs
            rps = {name: statistics.median(r["rps"] for r in runs[name]) for name in servers}
            cpu = {name: min(r["cpu_us"] for r in runs[name]) for name in servers}
            results["ratios"][scenario] = {"rps_median": rps["valve"] / rps["plain"],
                                           "cpu_per_request_best": cpu["valve"] / cpu["plain"]}
            print(f"{scenario:6} req/s (median) plain {rps['plain']:7.0f} valve {rps['valve']:7.0f} "
                  f"x{rps['valve'] / rps['plain']:.2f}   CPU us/request (best run) plain {cpu['plain']:6.1f} "
                  f"valve {cpu['valve']:6.1f} x{cpu['valve'] / cpu['plain']:.2f} (+{cpu['valve'] - cpu['plain']:.1f} us)   "
                  f"non-2xx {sum(r['non_2xx'] for rs in runs.values() for r in rs)}", flush=True)
        counters = json.loads(urllib.request.urlopen(f"{servers['valve'].url}/counters", timeout=10).read())
        results["valve_counters"] = counters
        print(f"state per write: {results['state_bytes']} bytes; valve counters: statesSent {counters['statesSent']}, "
              f"statesSentInTrailers {counters['statesSentInTrailers']}, "
              f"serializationFailures {counters['serializationFailures']}", flush=True)
    finally:
        for tomcat in servers.values():
            tomcat.stop()
    results["load_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

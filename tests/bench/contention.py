#!/usr/bin/env python3
"""Do the native module's two Envoy workers contend for its shared data?

    filter/build
    tests/bench/contention.py [--seconds 10]

The module keeps the gone table and the store breaker in one process-wide map
behind a mutex (filter/native/src/shell/shared_data.rs). A pinned request
never locks it; a store call locks it to read the breaker, and its answer
locks it again when the breaker moves. An uncontended lock is an atomic
instruction; a contended one puts a thread to sleep with a `futex` system
call. So each variant runs in Envoy with two workers under wrk (two
threads), and `perf stat` counts Envoy's `futex` calls during the load:

  router             router only (Envoy's own futex calls: the baseline)
  native_pinned      the module, valid cookie (no lock at all)
  native_state_sync  the module, a state write per request (sync): two
                     store calls' worth of breaker reads per request, and
                     webdis on the load CPU

Needs perf (with the syscalls tracepoints, so root), wrk, nginx, redis and
webdis. The figures are Envoy's futex calls during the load next to its
requests: a variant that contends makes many more than router-only's
(Envoy's own timers and flushes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import running
from running import ROUTER, Envoy, Procs, Store, Upstreams, envoy_binary, http_get, native_filter, run_wrk
from variants import COOKIE, filter_config, set_cookie_value

WORKERS = 2


def variants() -> dict[str, tuple[list, str]]:
    sync = filter_config(write="sync")
    return {
        "router": ([ROUTER], "/"),
        "native_pinned": ([native_filter(sync), ROUTER], "/"),
        "native_state_sync": ([native_filter(sync), ROUTER], "/state/"),
    }


def start_envoy(procs: Procs, name: str, http_filters: list, upstreams: Upstreams,
                store_port: int) -> Envoy:
    envoy = Envoy(procs, name, http_filters, upstreams.hosts, store_port, None)
    path = procs.workdir / f"envoy-{name}.yaml"
    path.write_text(json.dumps(envoy.config))
    envoy.proc = procs.start(f"envoy-{name}", [
        envoy_binary(), "-c", str(path), "--concurrency", str(WORKERS), "--disable-hot-restart",
        "-l", "warning"], env={**os.environ, "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(running.NATIVE_DIR)})
    envoy.wait_ready()
    return envoy


def session_cookie(envoy: Envoy, path: str) -> dict:
    """A cookie the filter issued (so the store holds the session's owner)."""
    for _ in range(9):
        _, headers, _ = http_get(envoy.port, path)
        value = set_cookie_value(headers, COOKIE)
        if value:
            return {"cookie": f"{COOKIE}={value}"}
    raise RuntimeError("the filter set no cookie")


def futex_calls(pid: int, load) -> tuple[int, dict]:
    """Envoy's futex system calls while `load()` runs."""
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "syscalls:sys_enter_futex", "-p", str(pid)],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(0.5)
    try:
        result = load()
    finally:
        perf.send_signal(2)  # SIGINT: perf prints its counts
        _, err = perf.communicate(timeout=30)
    match = re.search(r"^(\d+),,syscalls:sys_enter_futex", err, re.M)
    if not match:
        raise RuntimeError(f"perf counted nothing: {err[-500:]}")
    return int(match.group(1)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="seconds of load per variant (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sa-contention-") as tmp:
        procs = Procs(Path(tmp))
        try:
            upstreams = Upstreams(procs, "nginx", None)
            upstreams.start()
            store = Store(procs, None)
            store.start()
            for name, (http_filters, path) in variants().items():
                envoy = start_envoy(procs, name, http_filters, upstreams, store.port)
                headers = {} if name == "router" else session_cookie(envoy, path)

                def load():
                    return run_wrk(envoy.port, path=path, duration=args.seconds, connections=32,
                                           headers=headers)
                run_wrk(envoy.port, path=path, duration=2, connections=32, headers=headers)
                calls, run = futex_calls(envoy.proc.pid, load)
                print(f"{name:18s} {run['requests']:8,d} requests ({run['rps']:7,.0f} req/s)  "
                      f"{calls:6d} futex calls  non-2xx {run['errors']['status']}", flush=True)
                procs.stop(envoy.proc)
        finally:
            procs.stop_all()


if __name__ == "__main__":
    main()

"""Rolling restarts under load: every backend replaced in turn by a new
instance at the same address, while browser-like sessions keep sending GETs
and POSTs to the app (the demo backend, or Tomcat with the valve). Used by
tests/test_rolling.py (in CI) and by `tests/rolling.py --losses N` (the long
run, by hand).

A pod loss is one of two kinds, alternating:
- graceful: the endpoint turns DRAINING in Envoy's file-based EDS, the pod
  gets SIGTERM after a drain period, and SIGKILL if it has not exited;
- abrupt: SIGKILL, with the endpoint still HEALTHY in EDS (a crash).
The new instance starts at the same address and its endpoint turns HEALTHY
again; then the next backend goes.

Judged per session: its progress (the demo app's count, the items in a
Tomcat cart) never goes back or skips (no session lost), GETs never
get an error, and no request takes more than one 307, nor a session more than
one 307 per pod loss. A POST that meets a dying pod may get an error (an app
may have processed it: it is never replayed), and then its change may or may
not have been made.
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "envoy")]

from harness import User, describe, json_body, start_sessions, tb  # noqa: E402

DRAIN_SECONDS = 1.0
SETTLE_SECONDS = 0.5


@dataclass(frozen=True)
class App:
    """How the load talks to an app, and how far a session has got."""
    get: str
    post: str
    progress: Callable[[dict], object]
    # Whether a GET moves the session on too (the demo app counts every request).
    get_counts: bool


DEMO = App("/", "/", lambda body: body.get("count"), get_counts=True)
TOMCAT = App("/cart", "/cart/add?item=apple",
             lambda body: sum(body["items"].values()) if isinstance(body.get("items"), dict) else None,
             get_counts=False)


@dataclass
class Outcome:
    """What the sessions saw, and the pod losses they lived through."""
    losses: int = 0
    requests: int = 0
    problems: list[str] = field(default_factory=list)
    post_errors: int = 0
    # (latency in s, 307s taken) of every answered request
    latencies: list[tuple[float, int]] = field(default_factory=list)
    # the answers that took 307s, per session and pod loss
    redirects: dict[tuple[str, int], list[str]] = field(default_factory=dict)

    def figures(self) -> dict:
        plain = sorted(t for t, r in self.latencies if r == 0)
        moved = sorted(t for t, r in self.latencies if r > 0)

        def pct(values, p):
            return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else 0.0

        return {"pod losses": self.losses, "requests": self.requests, "failovers (307)": len(moved),
                "POST errors": self.post_errors, "p50 ms": round(pct(plain, 0.5), 1),
                "p99 ms": round(pct(plain, 0.99), 1), "failover p50 ms": round(pct(moved, 0.5), 1),
                "failover p99 ms": round(pct(moved, 0.99), 1),
                "p99 added by a failover ms": round(max(0.0, pct(moved, 0.99) - statistics.median(plain) * 1000), 1)
                if plain and moved else 0.0}


def browse(app: App, user: User, url: str, count: int, outcome: Outcome, loss: list[int], stop: threading.Event,
           lock):
    """GETs with a POST now and then, until stop; records into outcome."""
    uncertain = False  # a POST failed: its change may or may not have been made
    while not stop.is_set():
        method = "POST" if random.random() < 0.2 else "GET"
        started = time.monotonic()
        try:
            reply = user.send(url, app.post if method == "POST" else app.get, method=method)
        except requests.RequestException as err:
            reply, error = None, repr(err)
        took = time.monotonic() - started
        current = loss[0]  # a redirect belongs to the pod loss under way when it came back
        body = json_body(reply) if reply is not None else None
        with lock:
            outcome.requests += 1
            if reply is None or reply.status_code != 200 or body is None:
                what = error if reply is None else f"{reply.status_code} {reply.text[:120]!r}"
                if method == "POST":
                    outcome.post_errors += 1
                    uncertain = True
                else:
                    outcome.problems.append(f"{user.name}: GET failed: {what}")
                    return
                continue
            hops = len(reply.history)
            outcome.latencies.append((took, hops))
            if hops:
                key = (user.name, current)
                outcome.redirects.setdefault(key, []).append(f"{time.strftime('%H:%M:%S')} {describe(reply)}")
                if hops > 1 or len(outcome.redirects[key]) > 1:
                    outcome.problems.append(f"{user.name}: more than one 307 in pod loss {current}: "
                                            + " | ".join(outcome.redirects[key]))
            got = app.progress(body)
            step = 1 if method == "POST" or app.get_counts else 0
            if got not in ((count + step, count + step + 1) if uncertain else (count + step,)):
                before = " | ".join(describe(r) for r in user.replies[-3:-1])
                outcome.problems.append(f"{user.name}: count {got} after {count} ({method}): session lost or skipped: "
                                        f"{describe(reply)}; the replies before: {before}")
                return
            count, uncertain = got, False
        time.sleep(random.uniform(0.01, 0.05))


def replace(bed: "tb.Testbed", index: int, graceful: bool):
    """One pod loss: backend index replaced by a new instance at the same address."""
    envoy, backend = bed.envoy, bed.backends[index]
    everyone = {b.address: "HEALTHY" for b in bed.backends}
    if graceful:
        envoy.set_endpoints({**everyone, backend.address: "DRAINING"})
        time.sleep(DRAIN_SECONDS)
        backend.process.stop(timeout=2.0)  # SIGTERM, then SIGKILL
    else:
        bed.kill_backend(index)
    bed.start_backend(index)
    envoy.set_endpoints(everyone)
    envoy.wait_host_health(backend.address, healthy=True, timeout=20)
    time.sleep(SETTLE_SECONDS)


def run(bed: "tb.Testbed", sessions: int, losses: int, app: App = DEMO, say=lambda m: None) -> Outcome:
    """`losses` pod losses in turn (graceful and abrupt alternating) under
    `sessions` sessions' load. The bed's Envoy must serve its app cluster
    from EDS (Envoy.set_endpoints)."""
    if app is DEMO:
        users = [u for group in start_sessions(bed, bed.envoy.url, sessions, min_each=2).values() for u in group]
    else:
        users = [User(f"user{i}") for i in range(sessions)]
        for user in users:
            reply = user.send(bed.envoy.url, app.get)
            if reply.status_code != 200 or app.progress(json_body(reply) or {}) is None:
                raise AssertionError(f"{user.name}: a new session: {describe(reply)}")
    outcome, lock, stop, loss = Outcome(), threading.Lock(), threading.Event(), [0]
    threads = [threading.Thread(target=browse, args=(app, u, bed.envoy.url, app.progress(json_body(u.replies[-1])),
                                                     outcome, loss, stop, lock)) for u in users]
    for thread in threads:
        thread.start()
    try:
        for n in range(losses):
            loss[0] = n
            graceful = n % 2 == 0
            say(f"pod loss {n + 1}/{losses}: {bed.backends[n % len(bed.backends)].name} "
                f"({'SIGTERM after draining' if graceful else 'SIGKILL'})")
            replace(bed, n % len(bed.backends), graceful)
            outcome.losses += 1
            if outcome.problems:
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        outcome.problems.append(f"{len(stuck)} sessions still running after stop")
    if outcome.problems:
        counters = {k: v for k, v in bed.envoy.filter_counters().items() if v and not k.startswith("sessions.pinned")}
        outcome.problems.append(f"the filter's counters: {counters}")
    return outcome


def main(argv=None) -> int:
    import argparse
    import json
    import tempfile
    parser = argparse.ArgumentParser(prog="tests/rolling.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", type=int, default=60, help="pod losses (default 60)")
    parser.add_argument("--sessions", type=int, default=30, help="sessions under load (default 30)")
    parser.add_argument("--module", choices=list(tb.MODULES), default="wasm")
    parser.add_argument("--app", choices=["demo", "tomcat"], default="demo")
    args = parser.parse_args(argv)
    tb.ensure_module(args.module)
    workdir = Path(tempfile.mkdtemp(prefix="sa-rolling-"))
    testbed, app = tb.Testbed, DEMO
    if args.app == "tomcat":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "adapters" / "tomcat"))
        import tomcats
        tomcats.build()
        testbed, app = tomcats.TomcatTestbed, TOMCAT
    with testbed(tb.PortPlan.free(), workdir, concurrency=2, module=args.module) as bed:
        bed.envoy.set_endpoints({b.address: "HEALTHY" for b in bed.backends})
        bed.envoy.restart()
        outcome = run(bed, args.sessions, args.losses, app, say=lambda m: print(f"rolling: {m}", flush=True))
    print("figures " + json.dumps(outcome.figures()))
    print(f"{len(outcome.problems)} problem(s)" + "".join(f"\n  {p}" for p in outcome.problems[:50]))
    return 1 if outcome.problems else 0


if __name__ == "__main__":
    sys.exit(main())

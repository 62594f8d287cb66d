"""The session store on a three-member etcd cluster: what only etcd has.

test_failover.py runs every failover scenario on etcd too (`--store etcd`);
this module adds what a replicated store must survive:
- the leader SIGKILLed while 30+ sessions fail over and write state, through
  two Envoys: no session loses a request, each ends with exactly one owner,
  and clients see nothing but what the outage policy ("reject": 503 with
  Retry-After, retried) promises;
- then a second member killed (no quorum): the outage policy applies to
  failovers and the pinned path is untouched; both members restarted:
  everything recovers, nothing restarted but etcd;
- `envoy/testbed --store etcd` prints the same "ready at" line;
- TLS to etcd belongs to the Envoy cluster: envoy/etcd-store.yaml's TLS
  transport socket validates with the real Envoy.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
import requests
import yaml

from harness import REPO, expect, expect_equal, require_tool, tb
from test_failover import (Checks, User, changes, describe, in_parallel, json_body, owner_of, settle_load_balancer,
                           settled_counters, start_sessions, stored)
from test_readme_testbed import READY, Output, interrupt

# How long a careful client keeps retrying a 503 that carries Retry-After.
PATIENCE = 25.0
REQUESTS_IN_STORM = 6


@pytest.fixture
def etcd_testbed(wasm, tmp_path):
    """A testbed on etcd whose outage policy is "reject": nothing is lost, clients retry."""
    require_tool("etcd")
    config = tb.default_filter_config("etcd")
    config["store"]["on_outage"] = "reject"
    with tb.Testbed(tb.PortPlan.free(), tmp_path / "testbed", filter_config=config, store="etcd") as bed:
        yield bed


class Seen:
    """Every answer a client got that was not a 2xx, by kind."""

    def __init__(self):
        self.lock = threading.Lock()
        self.retried: list[str] = []
        self.errors: list[str] = []

    def note(self, reply: requests.Response):
        with self.lock:
            if reply.status_code == 503 and reply.headers.get("retry-after"):
                self.retried.append(reply.text.strip())
            else:
                self.errors.append(describe(reply))


def patient(user: User, url: str, seen: Seen) -> requests.Response:
    """One request as a careful client sends it: a 503 with Retry-After is
    sent again after the pause it asks for (at most 1 s), for a while."""
    deadline = time.monotonic() + PATIENCE
    while True:
        reply = user.send(url)
        if reply.status_code == 200 or time.monotonic() > deadline:
            return reply
        seen.note(reply)
        if reply.status_code != 503 or not reply.headers.get("retry-after"):
            return reply
        time.sleep(min(float(reply.headers["retry-after"]), 1.0))


def counts_continue(user: User, first: int, count: int, urls: list[str], seen: Seen, started=None) -> list[str]:
    """`count` requests (alternating Envoys) that must answer 200 with counts first, first+1, ..."""
    for n, expected in enumerate(range(first, first + count)):
        reply = patient(user, urls[n % len(urls)], seen)
        if started is not None:
            started()
        body = json_body(reply)
        if reply.status_code != 200 or not body or body.get("count") != expected:
            return [f"{user.name}: expected count {expected}, received {describe(reply)}"]
    return []


def last_count(user: User) -> int:
    return json_body(user.replies[-1])["count"]


def serving(bed: "tb.Testbed", user: User) -> "tb.Backend":
    return bed.backend_named(json_body(user.replies[-1])["backend"])


def records(bed: "tb.Testbed", users: list[User]) -> dict[str, tuple]:
    """What the store holds for each session: (owner, count, lease)."""
    found = {}
    for user in users:
        record = stored(bed, json_body(user.replies[-1])["session"])
        found[user.name] = (record["owner"], record["count"], record["lease"])
    return found


def one_owner_each(bed: "tb.Testbed", users: list[User]) -> dict[str, tuple]:
    """Sessions whose store record is not (the backend and instance serving
    it, its last count, no lease): {name: (expected, stored)}."""
    wanted = {u.name: (owner_of(serving(bed, u)), last_count(u), None) for u in users}
    held = records(bed, users)
    return {name: (wanted[name], held[name]) for name in wanted if held[name] != wanted[name]}


def catch_up(bed: "tb.Testbed", users: list[User], urls: list[str]) -> dict[str, tuple]:
    """One more request per session, in rounds, until the store holds every
    session as its owner serves it (a write made while the breaker was open
    is not stored; the next one is). Returns what still differs."""
    deadline = time.monotonic() + PATIENCE
    while True:
        in_parallel(lambda u: counts_continue(u, last_count(u) + 1, 1, urls, Seen()), users, workers=8)
        differ = one_owner_each(bed, users)
        if not differ or time.monotonic() > deadline:
            return differ


def test_leader_killed_in_a_failover_storm_then_quorum_lost_and_back(etcd_testbed):
    bed, envoy_a = etcd_testbed, etcd_testbed.envoy
    envoy_b = bed.start_envoy("envoy-b")
    settle_load_balancer(envoy_b)
    urls = [envoy_a.url, envoy_b.url]
    by_backend = start_sessions(bed, envoy_a.url, 90, requests_each=3, min_each=30)
    victim = max(by_backend, key=lambda name: len(by_backend[name]))
    movers = by_backend[victim]
    users = [u for group in by_backend.values() for u in group]
    expect(len(movers) >= 30, f"sessions on {victim}, which dies", ">= 30", len(movers))
    before = {e.name: settled_counters(e) for e in (envoy_a, envoy_b)}
    checks, seen = Checks(), Seen()

    # --- the storm: the backend dies and all its sessions go on at once,
    # through both Envoys; the etcd leader is killed once ten are under way.
    leader = bed.etcd.leader()
    moving, killed_at = threading.Semaphore(0), {}

    def kill_leader():
        for _ in range(10):
            moving.acquire(timeout=30)
        bed.etcd.kill(leader)
        killed_at["t"] = time.monotonic()

    killer = threading.Thread(target=kill_leader)
    killer.start()
    bed.kill_backend(bed.backends.index(bed.backend_named(victim)))
    storm_started = time.monotonic()
    first = {u.name: last_count(u) + 1 for u in movers}
    problems = sum(in_parallel(lambda u: counts_continue(u, first[u.name], REQUESTS_IN_STORM, urls, seen, moving.release),
                               movers, workers=len(movers), timeout=180), [])
    killer.join(30)
    took = time.monotonic() - storm_started
    leader_name = bed.etcd.members[leader].name
    expect("t" in killed_at, "the etcd leader was killed during the storm", leader_name, "not killed")
    print(f"storm: {len(movers)} failovers of {len(users)} sessions, leader {leader_name} killed "
          f"{killed_at['t'] - storm_started:.2f}s in; took {took:.1f}s; 503+Retry-After answers {len(seen.retried)} "
          f"({ {text: seen.retried.count(text) for text in set(seen.retried)} })")
    checks.expect(not problems, "every session counts on through the storm (no request lost)", "no problems",
                  "\n".join(problems))
    checks.expect_equal(seen.errors, [], "answers other than 200 or 503 with Retry-After during the storm")
    checks.expect_equal(sorted(u.name for u in movers if serving(bed, u).name == victim), [],
                        "sessions still answered by the killed backend")
    checks.expect_equal(catch_up(bed, users, urls), {}, "sessions whose store record is not (owner serving it, "
                                                        "its count, no lease) after the storm: (wanted, stored)")
    for envoy in (envoy_a, envoy_b):
        delta = changes(before[envoy.name], settled_counters(envoy))
        print(f"{envoy.name} during the storm: {delta}")
        checks.expect_equal(delta.get("failovers.fresh", 0), 0, f"{envoy.name}: sessions started over ({delta})")
    checks.done()

    # --- quorum lost: a second member dies. Pinned sessions are untouched; a
    # failover follows the outage policy (503, Retry-After, cookie kept).
    bed.etcd.kill(next(i for i, m in enumerate(bed.etcd.members) if m.process.running()))
    homes = {u.name: serving(bed, u).name for u in users}
    second = max(set(homes.values()), key=lambda name: sum(1 for h in homes.values() if h == name))
    rejected = [u for u in users if homes[u.name] == second]
    pinned = [u for u in users if homes[u.name] != second]
    bed.kill_backend(bed.backends.index(bed.backend_named(second)))
    started = time.monotonic()
    problems = sum(in_parallel(lambda u: counts_continue(u, last_count(u) + 1, 2, [envoy_a.url], Seen()), pinned,
                               workers=16), [])
    pinned_took = time.monotonic() - started
    print(f"quorum lost: {len(pinned)} pinned sessions, 2 requests each, in {pinned_took:.1f}s")
    checks.expect(not problems, "pinned sessions without quorum (200, counts on)", "no problems", "\n".join(problems))
    checks.expect_equal([u.name for u in pinned if any(r.history for r in u.replies[-2:])], [],
                        "pinned sessions redirected without quorum")
    outage_replies = in_parallel(lambda u: u.send(envoy_a.url), rejected, workers=16)
    for user, reply in zip(rejected, outage_replies):
        checks.expect(reply.status_code == 503 and reply.headers.get("retry-after") and "store" in reply.text,
                      f"{user.name}: a failover without quorum follows the policy", "503, Retry-After",
                      describe(reply))

    # --- both members back: everything recovers.
    bed.etcd.start()
    first = {u.name: json_body(next(r for r in reversed(u.replies) if r.status_code == 200))["count"] + 1
             for u in users}
    seen_after = Seen()
    problems = sum(in_parallel(lambda u: counts_continue(u, first[u.name], 2, urls, seen_after), users,
                               workers=16, timeout=180), [])
    checks.expect(not problems, "every session counts on after quorum is back (the rejected ones restored)",
                  "no problems", "\n".join(problems))
    checks.expect_equal(seen_after.errors, [], "answers other than 200 or 503 with Retry-After after recovery")
    checks.expect_equal(catch_up(bed, users, urls), {}, "sessions whose store record is not (owner serving it, "
                                                        "its count, no lease) after recovery: (wanted, stored)")
    checks.done()


def test_testbed_runs_on_etcd(wasm, tmp_path):
    """`envoy/testbed --store etcd`: the same "ready at" line, a session, Ctrl-C stops it all."""
    require_tool("etcd")
    command = [str(REPO / "envoy" / "testbed"), "--no-install", "--store", "etcd", "--free-ports",
               "--workdir", str(tmp_path / "testbed")]
    runner = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    output = Output(runner.stdout)
    try:
        url = output.wait_for(READY, 120).group(1)
        started = "\n".join(output.lines)
        for name in ("etcd-1", "etcd-2", "etcd-3", "envoy"):
            expect(f"started {name} pid" in started, f"the testbed reports {name}", "a 'started' line", started)
        user = User("user")
        counts = [json_body(user.send(url + "/"))["count"] for _ in range(2)]
        expect_equal(counts, [1, 2], "a session on the etcd testbed")
    finally:
        interrupt(runner, output)


def test_tls_to_etcd_is_the_clusters_transport_socket(wasm, tmp_path):
    """envoy/etcd-store.yaml's TLS socket on the store cluster: Envoy loads it (certificates made here)."""
    openssl = require_tool("openssl")
    for name, subject, extra in (("ca", "/CN=session-store etcd CA", []),
                                 ("client", "/CN=session-affinity", ["-CA", "ca.crt", "-CAkey", "ca.key"])):
        args = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-days", "1", "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.crt", *extra]
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, timeout=30)
    topology = yaml.safe_load((REPO / "envoy" / "etcd-store.yaml").read_text())
    text = yaml.safe_dump(topology["tls_transport_socket"]).replace("/etc/envoy/etcd/", f"{tmp_path}/")
    config = tb.default_filter_config("etcd")
    bootstrap = tb.render_bootstrap(tb.PortPlan(), 10000, 9901, config, store="etcd")
    store = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == tb.STORE_CLUSTER)
    store["transport_socket"] = yaml.safe_load(text)
    path = tmp_path / "etcd-tls.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    result = subprocess.run([tb.ENVOY_BIN, "--mode", "validate", "-c", str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL, env={**os.environ, **tb.envoy_env("etcd")})
    expect(result.returncode == 0, "envoy --mode validate: the etcd store cluster with TLS", "exit 0",
           f"exit {result.returncode}\n{result.stdout[-1500:]}{result.stderr[-1500:]}")

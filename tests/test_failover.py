"""Sessions survive the loss of their pod: failover end to end.

Real Envoy with the built filter, Redis behind webdis as the session store and
the demo backends, all on 127.0.0.1 (tests/conftest.py, envoy/rig).
Clients are `requests.Session`s with a cookie jar that follow redirects like
a browser: a 307 is replayed with the same method and body.

What each test proves:
- kill: a SIGKILLed backend's sessions move to live hosts with their state,
  under concurrent traffic, with no error seen by any client, and the failover
  counters count each moved session once;
- restart: a backend restarted at the same address (new instance id) loses no
  session either;
- store down (unreachable: webdis stopped, or every etcd member; unserving:
  Redis stopped behind webdis, or etcd without quorum): pinned sessions keep
  working; a failover during the outage follows store.on_outage ("fresh" and
  "reject"); when the store is back, failovers restore state again without
  any restart;
- two Envoys: a failover raced through two Envoy processes ends with one owner
  in the store and no lost increment;
- zombie: a host that lost the session writes with an old cookie through an
  Envoy that does not know it lost it; the store refuses the write and the
  client is re-pinned to the owner with a 503 and Retry-After;
- no unsafe replay: a POST that reached a backend killed mid-request is
  answered with an error, never replayed.

Every test runs on each selected session store (webdis, etcd: see
conftest.py). Every wait is bounded. On failure the report shows what was
expected next to what was received, and conftest.py adds the tail of every
process log.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from harness import (REQUEST_TIMEOUT, Checks, Paused, User, backend_at, changes, describe, drive, expect,
                     expect_equal, failovers, health, in_parallel, json_body, owner_of, settle_load_balancer,
                     settled_counters, start_sessions, stored, tb, verify_cookie, with_config)

pytestmark = pytest.mark.stores

# How long a store that is back may take to serve again: webdis reconnecting
# to Redis, etcd electing a leader, and the filter's breaker letting a probe
# through (its cooldown is 5 s, and a probe sent the moment the store is back
# may still fail and start another).
RECOVERY_TIMEOUT = 12.0


# ------------------------------------------------------------- the store

def store_down(bed: "tb.Testbed", outage: str):
    """"unreachable": nothing accepts store calls (webdis stopped; every etcd
    member killed). "unserving": the store answers but cannot serve (Redis
    stopped behind webdis; two etcd members killed, the third without quorum)."""
    if bed.etcd:
        for index in (0, 1, 2) if outage == "unreachable" else (1, 2):
            bed.etcd.kill(index)
    elif outage == "unreachable":
        bed.stop_webdis()
    else:
        bed.stop_redis()


def store_back(bed: "tb.Testbed", outage: str):
    if bed.etcd:
        bed.etcd.start()
        # Every member answers again; wait until the Envoys' health checks see it.
        for envoy in [bed.envoy] + bed.extra_envoys:
            tb.wait_until(lambda: store_hosts_healthy(envoy) == len(bed.etcd.members), 10.0,
                          f"{envoy.name}: every etcd member healthy")
    elif outage == "unreachable":
        bed.start_webdis()
    else:
        bed.start_redis()


def store_hosts_healthy(envoy: "tb.Envoy") -> int:
    """How many store endpoints Envoy's health checks see healthy."""
    _, _, body = tb.http_get(f"{envoy.admin_url}/clusters")
    flags = [line.rsplit("::", 1)[-1] for line in body.decode().splitlines()
             if line.startswith(f"{tb.STORE_CLUSTER}::") and "::health_flags::" in line]
    return flags.count("healthy")


def store_keeps_data(bed: "tb.Testbed", outage: str) -> bool:
    """etcd members keep their data; the testbed's Redis keeps none across a restart."""
    return bool(bed.etcd) or outage == "unreachable"


# ---------------------------------------------------------------------- tests

@pytest.mark.mesh
def test_kill_a_backend_and_every_session_keeps_counting(own_testbed):
    """30 sessions over three backends; SIGKILL the busiest backend; nobody notices."""
    bed, envoy = own_testbed, own_testbed.envoy
    by_backend = start_sessions(bed, envoy.url, 30, requests_each=20)
    spread = {name: len(users) for name, users in by_backend.items()}
    victim_name = max(spread, key=spread.get)
    victim = bed.backend_named(victim_name)
    users = [u for group in by_backend.values() for u in group]
    home = {u.name: name for name, group in by_backend.items() for u in group}
    before = settled_counters(envoy)

    bed.kill_backend(bed.backends.index(victim))
    started = time.monotonic()
    problems = sum(in_parallel(lambda u: drive(u, envoy.url, 21, 20), users), [])
    elapsed = time.monotonic() - started
    expect(not problems, f"every session counts 21..40 after {victim_name} was killed (no non-2xx final reply)",
           "no problems", "\n".join(problems) + f"\n{health(envoy)}")

    finals = {u.name: json_body(u.replies[-1]) for u in users}
    expect_equal({n: b["count"] for n, b in finals.items() if b["count"] != 40}, {}, "sessions whose final count is not 40")
    moved = sorted(n for n, b in finals.items() if b["backend"] != home[n])
    should_move = sorted(u.name for u in by_backend[victim_name])
    expect_equal(moved, should_move, f"sessions that moved (exactly those that were on {victim_name}) {health(envoy)}")
    expect_equal(sorted(n for n, b in finals.items() if b["backend"] == victim_name), [],
                 "sessions still answered by the killed backend")
    # Once moved, a session stays where it went (each moved once, then pinned).
    for user in users:
        phase2 = [json_body(r)["backend"] for r in user.replies[-20:]]
        hops = [b for i, b in enumerate(phase2) if i == 0 or b != phase2[i - 1]]
        expect(len(hops) == 1, f"{user.name} stays on one backend after the kill", "one backend", phase2)
    redirects = {u.name: sum(len(r.history) for r in u.replies[-20:]) for u in users}

    checks = Checks()
    for name in moved:
        record = stored(bed, finals[name]["session"])
        new_home = bed.backend_named(finals[name]["backend"])
        checks.expect_equal((record["owner"], record["count"]), (owner_of(new_home), 40),
                            f"{name}: store record (owner, count) after the move")
    delta = changes(before, settled_counters(envoy))
    report = f"counter changes {delta}; 307s followed per moved user {[redirects[n] for n in moved]}; " \
             f"phase took {elapsed:.1f}s"
    checks.expect_equal(failovers(delta), len(moved),
                        f"failovers.known + failovers.replayed + failovers.restart == sessions moved ({report})")
    checks.expect_equal(delta.get("failovers.restored", 0), len(moved), f"failovers.restored == sessions moved ({report})")
    for name in ("failovers.fresh", "store.errors", "store.timeouts", "store.writes_rejected",
                 "failovers.rejected", "failovers.busy"):
        checks.expect_equal(delta.get(name, 0), 0, f"{name} ({report})")
    checks.expect(delta.get("gone.marked", 0) >= 1, f"the killed host was marked gone ({report})", ">= 1",
                  delta.get("gone.marked", 0))
    checks.done()


@pytest.mark.mesh
def test_restart_at_the_same_address_keeps_counting(own_testbed):
    """Kill a backend and start it again on its port as a new instance."""
    bed, envoy = own_testbed, own_testbed.envoy
    by_backend = start_sessions(bed, envoy.url, 12, requests_each=5)
    victim_name = max(by_backend, key=lambda n: len(by_backend[n]))
    index = [b.name for b in bed.backends].index(victim_name)
    old_instance = bed.backends[index].instance
    before = settled_counters(envoy)

    restarted = bed.restart_backend(index)
    expect(restarted.instance != old_instance, "the restarted backend has a new instance id",
           f"not {old_instance}", restarted.instance)
    envoy.wait_host_health(restarted.address, healthy=True, timeout=10)
    users = [u for group in by_backend.values() for u in group]
    problems = sum(in_parallel(lambda u: drive(u, envoy.url, 6, 5), users), [])
    expect(not problems, f"every session counts 6..10 after {victim_name} restarted", "no problems",
           "\n".join(problems) + f"\n{health(envoy)}")
    for name, group in by_backend.items():
        for user in group:
            redirects = sum(len(r.history) for r in user.replies[-5:])
            if name != victim_name:
                expect_equal(redirects, 0, f"{user.name} on {name} (not restarted): redirects")
                expect_equal({json_body(r)["instance"] for r in user.replies[-5:]}, {bed.backend_named(name).instance},
                             f"{user.name} on {name}: instances that served it")
            else:
                expect(old_instance not in {json_body(r)["instance"] for r in user.replies[-5:]},
                       f"{user.name}: nothing answered by the old instance", f"not {old_instance}",
                       [json_body(r)["instance"] for r in user.replies[-5:]])

    # New sessions on the restarted instance are not mistaken for the old one.
    fresh = []
    for attempt in range(9):
        user = User(f"new{attempt}")
        reply = user.send(envoy.url)
        if json_body(reply) and json_body(reply)["instance"] == restarted.instance:
            fresh.append(user)
    expect(fresh, "new sessions land on the restarted instance", ">= 1 of 9", 0)
    for user in fresh:
        problems = drive(user, envoy.url, 2, 3)
        expect(not problems and not any(r.history for r in user.replies),
               f"{user.name}: a session on the restarted instance stays pinned", "counts 2..4, no redirect",
               problems or [describe(r) for r in user.replies])

    delta = changes(before, settled_counters(envoy))
    moved = len(by_backend[victim_name])
    expect(delta.get("failovers.restart", 0) >= 1, f"failovers.restart counted ({delta})", ">= 1",
           delta.get("failovers.restart", 0))
    expect_equal(failovers(delta), moved, f"failovers.known + .replayed + .restart == sessions of {victim_name} "
                                          f"({delta})")
    expect_equal(delta.get("failovers.restored", 0), moved, f"failovers.restored ({delta})")
    expect_equal(delta.get("failovers.fresh", 0), 0, f"failovers.fresh ({delta})")


@pytest.mark.parametrize("outage", ["unreachable", "unserving"])
def test_store_outage(own_testbed, outage):
    """Store down: pinned sessions work; failovers follow the policy; recovery needs no restart."""
    bed, envoy = own_testbed, own_testbed.envoy
    reject = bed.start_envoy("envoy-reject", with_config(envoy.filter_config, store={"on_outage": "reject"}))
    settle_load_balancer(reject)
    by_backend = start_sessions(bed, envoy.url, 24, requests_each=3, min_each=6)
    names = sorted(by_backend, key=lambda n: -len(by_backend[n]))
    first, second, third = names  # first dies during the outage, second after it
    expect(len(by_backend[first]) >= 6, "sessions on the backend that dies in the outage", ">= 6",
           {n: len(g) for n, g in by_backend.items()})
    fresh_users = by_backend[first][:-2]  # the rest fail over through envoy-reject
    rejected_users = by_backend[first][-2:]
    survivors = by_backend[second] + by_backend[third]
    before, before_reject = settled_counters(envoy), settled_counters(reject)
    checks = Checks()

    # --- the store goes away
    store_down(bed, outage)
    started = time.monotonic()
    problems = sum(in_parallel(lambda u: drive(u, envoy.url, 4, 3), survivors), [])
    took = time.monotonic() - started
    expect(not problems, f"pinned sessions keep working with {outage} down", "no problems", "\n".join(problems))
    redirected = [u.name for u in survivors if any(r.history for r in u.replies[-3:])]
    expect_equal(redirected, [], f"pinned sessions redirected during the {outage} outage")
    expect(took < 10, f"pinned requests are not held up by the {outage} outage", "< 10s for 3 rounds",
           f"{took:.1f}s")

    # --- a failover during the outage: policy "fresh" on envoy, "reject" on envoy-reject
    bed.kill_backend(bed.backends.index(bed.backend_named(first)))
    # The sessions' users act at once, as real users do.
    old_sids = {u.name: verify_cookie(u.cookie, envoy.filter_config).sid for u in fresh_users}
    fresh_replies = in_parallel(lambda u: u.send(envoy.url), fresh_users, workers=4)
    fresh_ok = []
    for user, reply in zip(fresh_users, fresh_replies):
        old_sid = old_sids[user.name]
        body = json_body(reply)
        if not checks.expect(reply.status_code == 200 and body and body["count"] == 1 and body["backend"] != first,
                             f"{user.name}: failover with the {outage} down, policy fresh: a new session on a live "
                             f"host", "200, count 1, not on " + first, describe(reply)):
            continue
        claims = verify_cookie(user.cookie, envoy.filter_config)
        # Never a moving cookie (flag 1); a new session's flag (2) may be set
        # until the cookie comes back (store.new_session_ttl).
        if checks.expect(claims.sid != old_sid and claims.host == bed.backend_named(body["backend"]).address
                         and claims.flags in (0, 2), f"{user.name}: the fresh session's cookie",
                         f"new sid (not {old_sid}), pinned to {body['backend']}", claims):
            fresh_ok.append(user)
    for user in rejected_users:
        reply = user.send(reject.url)
        checks.expect(reply.status_code == 503 and reply.headers.get("retry-after"),
                      f"{user.name}: failover with the {outage} down, policy reject", "503 with Retry-After",
                      describe(reply))
    delta = changes(before, settled_counters(envoy))
    checks.expect_equal(delta.get("failovers.fresh", 0), len(fresh_users), f"failovers.fresh on envoy ({delta})")
    checks.expect(delta.get("store.errors", 0) + delta.get("store.timeouts", 0) >= 1,
                  f"store errors counted during the outage ({delta})", ">= 1", delta)
    delta_reject = changes(before_reject, settled_counters(reject))
    checks.expect_equal(delta_reject.get("failovers.rejected", 0), len(rejected_users),
                        f"failovers.rejected on envoy-reject ({delta_reject})")
    checks.expect_equal(delta_reject.get("failovers.fresh", 0), 0,
                        f"failovers.fresh on envoy-reject ({delta_reject})")

    # --- the store comes back; nothing else is restarted
    store_back(bed, outage)
    # A rejected client retries: its failover now reads the store. Redis in the
    # testbed keeps no data across a restart, so after a Redis outage the
    # session is new to the store and starts from 1 on a live host.
    # The client honours Retry-After; the store may take a moment to serve again
    # (webdis reconnects to a restarted Redis), so retries are bounded, not single.
    back = time.monotonic()
    for user in rejected_users:
        expected = 4 if store_keeps_data(bed, outage) else 1
        tries = []
        while True:
            reply = user.send(reject.url)
            tries.append(f"{time.monotonic() - back:.1f}s: {reply.status_code}")
            retry_after = reply.headers.get("retry-after")
            if reply.status_code != 503 or not retry_after or time.monotonic() - back > RECOVERY_TIMEOUT:
                break
            time.sleep(min(float(retry_after), 2.0))
        print(f"{user.name}: retries on envoy-reject after the {outage} came back: {tries}")
        body = json_body(reply)
        checks.expect(reply.status_code == 200 and body and body["count"] == expected and body["backend"] != first,
                      f"{user.name}: retry after the {outage} outage on envoy-reject (tries {tries})",
                      f"200, count {expected}, on a live host within {RECOVERY_TIMEOUT:.0f}s", describe(reply))
    # Every live session writes (the store catches up), then the second backend
    # dies. A write that races the breaker's probe goes unprotected, as any
    # write in an outage does: such a session writes again (bounded).
    live = survivors + fresh_ok
    counts = {u.name: json_body(u.replies[-1])["count"] for u in live}
    sids = {u.name: verify_cookie(u.cookie, envoy.filter_config).sid for u in live}
    behind = live
    for _ in range(3):
        problems = sum(in_parallel(lambda u: drive(u, envoy.url, counts[u.name] + 1, 1), behind), [])
        expect(not problems, f"sessions after the {outage} came back", "no problems", "\n".join(problems))
        for user in behind:
            counts[user.name] += 1
        behind = [u for u in behind if stored(bed, sids[u.name])["count"] != counts[u.name]]
        if not behind:
            break
    expect_equal([u.name for u in behind], [], f"sessions whose state the store lacks after the {outage} came back")
    homes = {u.name: json_body(u.replies[-1])["backend"] for u in live}
    on_second = [u for u in live if homes[u.name] == second]
    expect(on_second, f"sessions on {second} to fail over after the outage", ">= 1", homes)
    before = settled_counters(envoy)
    bed.kill_backend(bed.backends.index(bed.backend_named(second)))
    problems = sum(in_parallel(lambda u: drive(u, envoy.url, counts[u.name] + 1, 2), live), [])
    checks.expect(not problems, f"after the {outage} outage, a failover restores state again", "no problems",
                  "\n".join(problems))
    delta = changes(before, settled_counters(envoy))
    redirects = [sum(len(r.history) for r in u.replies[-2:]) for u in on_second]
    report = f"{delta}; 307s followed per moved session {redirects}"
    checks.expect_equal(delta.get("failovers.restored", 0), len(on_second), f"failovers.restored after recovery ({report})")
    checks.expect_equal(failovers(delta), len(on_second), f"failovers after recovery ({report})")
    checks.expect_equal(delta.get("failovers.fresh", 0), 0, f"failovers.fresh after recovery ({report})")
    checks.done()


@pytest.mark.mesh
def test_two_envoys_race_one_failover(own_testbed):
    """The same session through two Envoys at once while its host is dead."""
    bed, envoy_a = own_testbed, own_testbed.envoy
    envoy_b = bed.start_envoy("envoy-b")
    settle_load_balancer(envoy_b)
    by_backend = start_sessions(bed, envoy_a.url, 15, requests_each=3)
    victim_name = max(by_backend, key=lambda n: len(by_backend[n]))
    sessions = by_backend[victim_name]
    expect(len(sessions) >= 4, f"sessions on {victim_name}", ">= 4", len(sessions))
    before_a, before_b = settled_counters(envoy_a), settled_counters(envoy_b)
    bed.kill_backend(bed.backends.index(bed.backend_named(victim_name)))

    outcomes = []
    for round_number, user in enumerate(sessions):
        sid = verify_cookie(user.cookie, envoy_a.filter_config).sid
        base = json_body(user.replies[-1])["count"]
        clients = [(user.with_cookie(f"{user.name}@a"), envoy_a), (user.with_cookie(f"{user.name}@b"), envoy_b)]
        barrier = threading.Barrier(len(clients), timeout=10)
        seen: dict[str, list] = {}

        def race(pair):
            client, envoy = pair
            barrier.wait()
            replies = []
            for _ in range(4):  # a 503 with Retry-After may be retried, like a careful client would
                reply = client.send(envoy.url)
                replies.append(reply)
                if reply.status_code != 503 or not reply.headers.get("retry-after"):
                    break
                time.sleep(min(float(reply.headers["retry-after"]), 2.0))
            seen[client.name] = replies

        in_parallel(race, clients, workers=2, timeout=30)
        counts = []
        for name, replies in seen.items():
            for reply in replies:
                body = json_body(reply)
                if 200 <= reply.status_code < 300:
                    counts.append(body["count"] if body else None)
                else:
                    expect(reply.status_code == 503 and reply.headers.get("retry-after"),
                           f"round {round_number}: {name}'s non-2xx replies are 503 with Retry-After",
                           "503 + Retry-After", describe(reply))
            final = replies[-1]
            expect(final.status_code == 200, f"round {round_number}: {name} ends with a success",
                   "200", [describe(r) for r in replies])
        expect_equal(sorted(counts), list(range(base + 1, base + 1 + len(counts))),
                     f"round {round_number} ({sid}): counts in the 2xx replies both clients saw (base {base})")
        record = stored(bed, sid)
        owners = {verify_cookie(c.cookie, envoy_a.filter_config).host for c, _ in clients}
        expect(record["owner"] and record["lease"] is None,
               f"round {round_number}: one owner in the store, no lease left", "owner set, no lease", record)
        owner_host, _, owner_instance = record["owner"].rpartition("#")
        owner = backend_at(bed, owner_host)
        expect_equal((owner.name != victim_name, owner_instance), (True, owner.instance),
                     f"round {round_number}: the owner is a live backend's current instance ({record['owner']})")
        expect_equal(owners, {owner_host}, f"round {round_number}: both clients' cookies pin to the store's owner")
        expect_equal(record["count"], base + len(counts), f"round {round_number}: count in the store")
        # One more increment through each Envoy: nothing was lost.
        for offset, (client, envoy) in enumerate(clients, start=1):
            reply = client.send(envoy.url)
            body = json_body(reply)
            expect(reply.status_code == 200 and body and body["count"] == base + len(counts) + offset
                   and body["backend"] == owner.name and not reply.history,
                   f"round {round_number}: {client.name} after the race",
                   f"200 from {owner.name}, count {base + len(counts) + offset}, no redirect", describe(reply))
        user.http.cookies.update(clients[0][0].http.cookies)
        outcomes.append({name: [r.status_code for r in replies] for name, replies in seen.items()})

    delta_a = changes(before_a, settled_counters(envoy_a))
    delta_b = changes(before_b, settled_counters(envoy_b))
    summary = f"envoy-a {delta_a}; envoy-b {delta_b}; statuses per round {outcomes}"
    for name in ("store.writes_rejected", "failovers.fresh"):
        expect_equal(delta_a.get(name, 0) + delta_b.get(name, 0), 0, f"{name} ({summary})")
    joined = delta_a.get("failovers.joined", 0) + delta_b.get("failovers.joined", 0)
    expect_equal(joined, len(sessions), f"failovers.joined: in every round one Envoy joined the other's move "
                                        f"({summary})")
    started = failovers(delta_a) + failovers(delta_b)
    expect(started >= len(sessions), f"every session failed over on at least one Envoy ({summary})",
           f">= {len(sessions)}", started)


def test_zombie_write_is_fenced(own_testbed):
    """An old owner that is alive again cannot overwrite the session it lost."""
    bed, envoy_a = own_testbed, own_testbed.envoy
    envoy_a.restart(with_config(envoy_a.filter_config, failover={"gone_ttl": "3s"}))
    settle_load_balancer(envoy_a)
    config = envoy_a.filter_config
    user = User("user")
    for _ in range(3):
        reply = user.send(envoy_a.url)
    body = json_body(reply)
    expect_equal(body["count"], 3, "count before the partition")
    old = bed.backend_named(body["backend"])
    old_cookie = user.with_cookie("old-cookie")  # a copy of the jar before the move
    sid = body["session"]

    with Paused(old.process) as partition:
        # The old host stops answering (but keeps its sessions): Envoy A's
        # health check takes it out, the session fails over to a live host.
        envoy_a.wait_host_health(old.address, healthy=False, timeout=10)
        reply = user.send(envoy_a.url)
        body = json_body(reply)
        expect(reply.status_code == 200 and body and body["count"] == 4 and body["backend"] != old.name,
               "failover off the partitioned host", f"200, count 4, not on {old.name}", describe(reply))
        owner = bed.backend_named(body["backend"])
        marked_at = time.monotonic()
        for expected in (5, 6):
            reply = user.send(envoy_a.url)
            expect(json_body(reply) and json_body(reply)["count"] == expected and not reply.history,
                   "the moved session is pinned to its new owner", f"count {expected}", describe(reply))
        expect_equal((stored(bed, sid)["owner"], stored(bed, sid)["count"]), (owner_of(owner), 6),
                     "store record (owner, count) after the move")
        partition.resume()
    envoy_a.wait_host_health(old.address, healthy=True, timeout=10)

    def zombie_request(envoy, who, owner_count):
        zombie = old_cookie.with_cookie(who)
        before = settled_counters(envoy)
        reply = zombie.send(envoy.url)
        expect(reply.status_code == 503 and reply.headers.get("retry-after") and not reply.history,
               f"{who}: old cookie answered by the old host; its write is refused",
               "503 with Retry-After, no redirect", describe(reply))
        claims = verify_cookie(zombie.cookie, config)
        expect_equal((claims.sid, claims.host, claims.instance, claims.flags),
                     (sid, owner.address, owner.instance, 0), f"{who}: cookie re-pinned to the owner")
        record = stored(bed, sid)
        expect_equal((record["owner"], record["count"]), (owner_of(owner), owner_count),
                     f"{who}: store record after the refused write (the owner's state is kept)")
        delta = changes(before, settled_counters(envoy))
        expect_equal(delta.get("store.writes_rejected", 0), 1, f"{who}: store.writes_rejected ({delta})")
        return zombie

    # Envoy B starts after the failover: it never saw the old host gone.
    envoy_b = bed.start_envoy("envoy-b", config)
    settle_load_balancer(envoy_b)
    zombie_b = zombie_request(envoy_b, "zombie-via-envoy-b", 6)
    reply = zombie_b.send(envoy_b.url)
    expect(reply.status_code == 200 and json_body(reply)["count"] == 7 and json_body(reply)["backend"] == owner.name,
           "the retry with the re-pinned cookie reaches the owner's state", f"200 from {owner.name}, count 7",
           describe(reply))
    # Envoy A forgets the old host after gone_ttl (3 s here), then behaves like B.
    time.sleep(max(0.0, 3.5 - (time.monotonic() - marked_at)))
    zombie_request(envoy_a, "zombie-via-envoy-a-after-gone-ttl", 7)
    reply = user.send(envoy_a.url)
    expect(reply.status_code == 200 and json_body(reply)["count"] == 8 and not reply.history,
           "the owner's session after both refused writes", f"200 from {owner.name}, count 8", describe(reply))


def test_post_that_reached_a_killed_backend_is_not_replayed(own_testbed):
    """POST /slow reaches the app, the app dies mid-request: an error, never a replay."""
    bed, envoy = own_testbed, own_testbed.envoy
    settle_load_balancer(envoy)
    user = User("user")
    for _ in range(3):
        reply = user.send(envoy.url)
    body = json_body(reply)
    expect_equal(body["count"], 3, "count before the slow request")
    victim = bed.backend_named(body["backend"])
    survivors = [b for b in bed.backends if b is not victim]
    before = settled_counters(envoy)

    result = {}

    def slow_post():
        try:
            result["reply"] = user.send(envoy.url, "/slow?ms=4000", method="POST", data=b"pay=1")
        except requests.RequestException as err:
            result["error"] = err

    poster = threading.Thread(target=slow_post)
    poster.start()
    # Envoy has the request at the app (an active upstream request), and the
    # app has counted it and sits in its 4 s sleep.
    tb.wait_until(lambda: envoy.stats("cluster.app.upstream_rq_active").get("cluster.app.upstream_rq_active"),
                  3.0, "the slow POST reaching the app")
    time.sleep(0.5)
    bed.kill_backend(bed.backends.index(victim))
    killed = time.monotonic()
    poster.join(REQUEST_TIMEOUT + 2)
    expect(not poster.is_alive(), "the slow POST finishes", "done", "still running")
    took = time.monotonic() - killed
    reply = result.get("reply")
    expect(reply is not None, "the slow POST got an HTTP answer", "a response", result.get("error"))
    expect(500 <= reply.status_code < 600 and not reply.history and took < 2.0,
           "a POST that reached the killed app is answered with an error, not replayed",
           "5xx, no redirect, right after the kill (a replay would sleep 4 s more)",
           f"{describe(reply)} {took:.1f}s after the kill")
    delta = changes(before, settled_counters(envoy))
    expect_equal(failovers(delta), 0, f"failovers counted for the POST that reached the app ({delta})")
    # Nothing else ever saw the POST.
    for backend in survivors:
        log = backend.process.log_path.read_text(errors="replace")
        expect_equal(log.count("POST /slow"), 0, f"POST /slow lines in {backend.name}'s log")

    reply = user.send(envoy.url)
    body = json_body(reply)
    expect(reply.status_code == 200 and body and body["count"] in (4, 5) and body["backend"] != victim.name,
           "the next request fails over with the stored state; the POST applied at most once",
           f"200, count 4 (POST lost with the host) or 5 (POST applied once), not on {victim.name}",
           describe(reply))

"""The gone table forgets a host that is back, per instance.

A backend is killed, its sessions fail over (the host is marked gone), and it
is started again at the same address as a new instance well within
failover.gone_ttl. The new instance's first answer overrules the mark:
sessions that then land on it stay pinned (no 307, no failover), while the
old instance's sessions are still gone there: a stale cookie naming the old
instance is sent to the session's new owner, never to the new instance.
"""

from __future__ import annotations

import time

from chaos import seconds
from harness import (User, changes, describe, drive, expect, expect_equal, failovers, in_parallel, json_body,
                     owner_of, settled_counters, start_sessions, stored, verify_cookie)

NEW_SESSIONS_ON_IT = 3


def test_a_host_back_as_a_new_instance_keeps_its_new_sessions(own_testbed):
    bed, envoy = own_testbed, own_testbed.envoy
    gone_ttl = seconds(envoy.filter_config["failover"]["gone_ttl"])
    by_backend = start_sessions(bed, envoy.url, 12, requests_each=3)
    victim_name = max(by_backend, key=lambda n: len(by_backend[n]))
    index = [b.name for b in bed.backends].index(victim_name)
    old_instance = bed.backends[index].instance
    movers = by_backend[victim_name]
    stale = [user.with_cookie(f"{user.name}-stale") for user in movers]  # cookies naming the old instance
    before = settled_counters(envoy)

    bed.kill_backend(index)
    killed = time.monotonic()
    problems = sum(in_parallel(lambda u: drive(u, envoy.url, 4, 2), movers), [])
    expect_equal(problems, [], f"the sessions of {victim_name} fail over and keep counting")
    delta = changes(before, settled_counters(envoy))
    expect(delta.get("gone.marked", 0) >= 1, f"{victim_name} marked gone ({delta})", ">= 1", delta)
    expect_equal(failovers(delta), len(movers), f"failovers of the sessions of {victim_name} ({delta})")

    restarted = bed.start_backend(index)
    expect(restarted.instance != old_instance, "the restarted backend is a new instance", f"not {old_instance}",
           restarted.instance)
    envoy.wait_host_health(restarted.address, healthy=True)
    before = settled_counters(envoy)
    on_it = []
    for attempt in range(10 * NEW_SESSIONS_ON_IT):
        user = User(f"new{attempt}")
        reply = user.send(envoy.url)
        body = json_body(reply)
        expect(reply.status_code == 200 and body and body["count"] == 1, f"{user.name}: a new session", "200, count 1",
               describe(reply))
        if body["instance"] == restarted.instance:
            on_it.append(user)
            if len(on_it) == NEW_SESSIONS_ON_IT:
                break
    expect_equal(len(on_it), NEW_SESSIONS_ON_IT, f"new sessions that landed on {victim_name}'s new instance")
    for user in on_it:
        expect_equal(drive(user, envoy.url, 2, 4), [], f"{user.name}: a session on the new instance keeps counting")
        served = [(json_body(r) or {}).get("instance") for r in user.replies]
        expect_equal((set(served), sum(len(r.history) for r in user.replies)), ({restarted.instance}, 0),
                     f"{user.name}: instances that served it, and 307s followed")
    delta = changes(before, settled_counters(envoy))
    expect(delta.get("gone.cleared", 0) >= 1, f"gone.cleared: the mark on {victim_name} forgotten ({delta})", ">= 1",
           delta.get("gone.cleared", 0))
    expect_equal(failovers(delta), 0, f"failovers while new sessions used the new instance ({delta})")

    # The old instance's sessions are still gone at that address.
    before = settled_counters(envoy)
    for user, copy in zip(movers, stale):
        expected = json_body(user.replies[-1])["count"] + 1
        reply = copy.send(envoy.url)
        body = json_body(reply)
        expect(reply.status_code == 200 and body and body["count"] == expected
               and body["instance"] not in (old_instance, restarted.instance),
               f"{copy.name}: a cookie naming {victim_name}'s old instance, after it came back",
               f"200, count {expected}, from the session's new owner", describe(reply))
        claims = verify_cookie(copy.cookie, envoy.filter_config)
        expect(claims.host != restarted.address, f"{copy.name}: the cookie it got back",
               f"pinned to the owner, not {restarted.address}", claims)
    delta = changes(before, settled_counters(envoy))
    expect_equal((delta.get("failovers.joined", 0), delta.get("failovers.restart", 0)), (len(stale), 0),
                 f"failovers.joined (each stale cookie joins its session's owner) and failovers.restart ({delta})")
    log = restarted.process.log_path.read_text(errors="replace").split(f"instance {restarted.instance}")[-1]
    expect_equal(log.count(" 409 "), 0, "requests the new instance answered 'unknown session' (409)")
    took = time.monotonic() - killed
    expect(took < gone_ttl, "the whole check ran while the mark could still be in force",
           f"< failover.gone_ttl ({gone_ttl:g}s)", f"{took:.1f}s")


def test_a_host_another_replica_knows_first_is_not_taken_for_gone(own_testbed):
    """Two proxy replicas whose endpoint views differ (file-based EDS): the
    lagging one has not received backend c yet when a session pinned there by
    the other arrives. Envoy answers it 503 UH. A host this proxy never saw,
    named by a cookie issued seconds ago, is no proof of death: the session is
    not moved (503 + Retry-After), and once the view catches up it is served
    where it lives (envoyproxy/envoy#42686). Before, the replica marked the
    host gone and moved the session off a live pod."""
    bed = own_testbed
    new = bed.backends[2]
    everyone = {b.address: "HEALTHY" for b in bed.backends}
    lagging = bed.start_envoy("lagging", endpoints={a: s for a, s in everyone.items() if a != new.address})
    user = None
    for attempt in range(9):
        candidate = User(f"user{attempt}")
        if json_body(candidate.send(bed.envoy.url))["backend"] == new.name:
            user = candidate
            break
    expect(user is not None, f"a session on {new.name} through {bed.envoy.name}", "within 9 new sessions", None)
    sid = json_body(user.replies[-1])["session"]
    before = settled_counters(lagging)

    early = user.send(lagging.url)
    expect(early.status_code == 503 and early.headers.get("retry-after") and not early.history,
           f"the session through the replica that does not know {new.name} yet", "503 with Retry-After, no 307",
           describe(early))
    expect_equal(stored(bed, sid)["owner"], owner_of(new), "the session's owner in the store (not moved)")
    expect_equal(changes(before, settled_counters(lagging)).get("failovers.deferred"), 1,
                 "the lagging replica's failovers.deferred")

    lagging.set_endpoints(everyone)
    lagging.wait_host_health(new.address, healthy=True, timeout=15)
    caught_up = user.send(lagging.url)
    body = json_body(caught_up) or {}
    expect((caught_up.status_code, body.get("backend"), body.get("count"), len(caught_up.history)) == (200, new.name, 2, 0),
           "the same session once the replica's view has the host", f"200 from {new.name}, count 2, no 307",
           describe(caught_up))

"""A pod that drains: its endpoint turns DRAINING in the proxy's EDS (what a
control plane sends for a terminating pod), here through the file-based EDS
the testbed rewrites.

Which way its sessions go is a config choice, the app cluster's
`common_lb_config.override_host_status`:
- with DRAINING listed (the shipped default), a session stays on its pod
  while the pod drains and moves, with its state, when the pod is gone;
- without it, Envoy answers 503 UH for the draining pod, and the session
  moves with its state on its next request (one 307), before the pod dies.
Either way no new session is placed on a draining pod, and the pod's death
afterwards costs a moved session nothing.
"""

from __future__ import annotations

import pytest

from harness import User, describe, expect, json_body, start_sessions
from rig import wait_until


def without_draining_overrides(bootstrap: dict):
    app = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "app")
    statuses = app["common_lb_config"]["override_host_status"]["statuses"]
    statuses[:] = [s for s in statuses if s != "DRAINING"]


@pytest.mark.parametrize("sessions_on_draining", ["stay", "move"])
def test_sessions_on_a_draining_pod(own_testbed, sessions_on_draining):
    bed, envoy = own_testbed, own_testbed.envoy
    if sessions_on_draining == "move":
        bed.bootstrap_patches.append(without_draining_overrides)
    everyone = {b.address: "HEALTHY" for b in bed.backends}
    envoy.set_endpoints(everyone)
    envoy.restart()
    by_backend = start_sessions(bed, envoy.url, 9, min_each=2)
    draining = bed.backends[0]
    users = by_backend[draining.name]
    counts = {u.name: json_body(u.replies[-1])["count"] for u in users}

    envoy.set_endpoints({**everyone, draining.address: "DRAINING"})
    wait_until(lambda: "draining" in envoy.host_health().get(draining.address, ""), 15,
               f"{envoy.name} sees {draining.address} draining")
    newcomers = [User(f"new{i}") for i in range(6)]
    placed = [(json_body(u.send(envoy.url)) or {}).get("backend") for u in newcomers]
    expect(draining.name not in placed and None not in placed, "new sessions while a pod drains",
           f"none on {draining.name}", placed)

    for user in users:
        reply = user.send(envoy.url)
        body = json_body(reply) or {}
        stays = sessions_on_draining == "stay"
        expect(reply.status_code == 200 and body.get("count") == counts[user.name] + 1
               and (body.get("backend") == draining.name) == stays and len(reply.history) == (0 if stays else 1),
               f"{user.name}, pinned to the draining {draining.name} ({sessions_on_draining})",
               "served there, no 307" if stays else "moved with its state after one 307", describe(reply))
        counts[user.name] += 1

    bed.kill_backend(0)
    for user in users:
        reply = user.send(envoy.url)
        body = json_body(reply) or {}
        # A session that stayed meets the dead pod (or finds it already marked gone).
        redirects = 1 if sessions_on_draining == "stay" else 0
        expect(reply.status_code == 200 and body.get("count") == counts[user.name] + 1
               and len(reply.history) <= redirects, f"{user.name} after the drained pod died",
               f"its state on a live pod after at most {redirects} 307", describe(reply))
        counts[user.name] += 1

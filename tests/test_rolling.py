"""Rolling restarts of the demo app under GET/POST load (tests/rolling.py):
every backend replaced in turn at its address, alternately SIGTERM after a
drain (DRAINING in the file-based EDS) and SIGKILL. No session is lost, no
GET gets an error, no session takes more than one 307 per pod loss. The
failover latency figures are printed; `tests/rolling.py --losses 60` is the
long run."""

from __future__ import annotations

import json

import rolling
from harness import expect

SESSIONS = 30
POD_LOSSES = 20


def test_rolling_restarts_lose_no_session(own_testbed):
    bed = own_testbed
    bed.envoy.set_endpoints({b.address: "HEALTHY" for b in bed.backends})
    bed.envoy.restart()
    outcome = rolling.run(bed, SESSIONS, POD_LOSSES)
    figures = outcome.figures()
    print("rolling restart figures " + json.dumps(figures))
    expect(not outcome.problems and outcome.losses == POD_LOSSES,
           f"{POD_LOSSES} pod losses under {SESSIONS} sessions' GETs and POSTs",
           "no session lost, no GET error, at most one 307 per session per pod loss",
           f"{outcome.problems[:10]}; {figures}")

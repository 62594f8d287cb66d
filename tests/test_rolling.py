"""Rolling restarts under GET/POST load (tests/rolling.py), of the demo app
and of real Tomcats with the valve: every backend replaced in turn at its
address, alternately SIGTERM after a drain (DRAINING in the file-based EDS)
and SIGKILL: 20 pod losses of the demo app, 6 of Tomcat. No session is lost, no GET gets an error, no
session takes more than one 307 per pod loss. The failover latency figures
are printed; `tests/rolling.py --losses 60 [--app tomcat]` is the long run."""

from __future__ import annotations

import json

import rolling
from harness import REPO, expect, require_tool, tb

import tomcats  # adapters/tomcat/tomcats.py (pytest.ini puts adapters/tomcat on the path)

SESSIONS = 30
POD_LOSSES = 20
# A Tomcat takes seconds to start: 20 losses cost about 7 minutes on a loaded
# 2-core machine, so CI replaces each Tomcat twice; `tests/rolling.py --app
# tomcat --losses 20` is the full run.
TOMCAT_POD_LOSSES = 6


def roll(bed, app: rolling.App, what: str, losses: int):
    bed.envoy.set_endpoints({b.address: "HEALTHY" for b in bed.backends})
    bed.envoy.restart()
    outcome = rolling.run(bed, SESSIONS, losses, app=app)
    figures = outcome.figures()
    print(f"rolling restart figures ({what}, {bed.module}) " + json.dumps(figures))
    expect(not outcome.problems and outcome.losses == losses,
           f"{losses} pod losses of {what} under {SESSIONS} sessions' GETs and POSTs",
           "no session lost, no GET error, at most one 307 per session per pod loss",
           f"{outcome.problems[:10]}; {figures}")


def test_rolling_restarts_lose_no_session(own_testbed):
    roll(own_testbed, rolling.DEMO, "the demo app", POD_LOSSES)


def test_rolling_restarts_of_tomcat_lose_no_session(module, tmp_path):
    for tool in ("java", str(tomcats.CATALINA_HOME / "bin" / "catalina.sh")):
        require_tool(tool)
    tomcats.build()
    with tomcats.TomcatTestbed(tb.PortPlan.free(), tmp_path / "testbed", module=module) as bed:
        roll(bed, rolling.TOMCAT, "Tomcat", TOMCAT_POD_LOSSES)

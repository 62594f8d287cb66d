"""The Tomcat adapter on each Tomcat line it supports besides the standalone
Tomcat 10 of test_tomcat.py: embedded Tomcat 10.1 (jakarta) and embedded
Tomcat 9 (javax, the same sources renamed), both run through
org.apache.catalina.startup.Tomcat with the valve added in code, the way
Spring Boot runs Tomcat. Real Envoy with the filter, Redis behind webdis, and
three JVMs per line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import REPO, expect, expect_equal, require_tool, tb
from test_tomcat import Shopper, counters, kill_serving, serving, shop, total

import tomcats  # adapters/tomcat/tomcats.py (pytest.ini puts adapters/tomcat on the path)


@pytest.fixture(scope="module", params=["10-embedded", "9-embedded"])
def line_bed(request, wasm, tmp_path_factory):
    require_tool("java")
    tomcats.build()
    if request.param == "9-embedded" and not Path("/usr/share/java/tomcat9-catalina.jar").exists():
        pytest.skip("libtomcat9-java is not installed (.ci/setup installs it)")
    workdir = tmp_path_factory.mktemp(f"tomcat-{request.param}")
    with tomcats.TomcatTestbed(tb.PortPlan.free(), workdir, line=request.param) as bed:
        yield bed


def test_tomcat_line_keeps_sessions_through_a_kill(line_bed):
    bed = line_bed
    for tomcat in bed.tomcats:
        bed.envoy.wait_host_health(tomcat.address, healthy=True, timeout=20)
    banner = bed.tomcats[0].process.log_tail(400)
    want = "Apache Tomcat/9." if bed.tomcats[0].line.startswith("9") else "Apache Tomcat/10."
    expect(want in banner, "the line's Tomcat runs", want, banner[-500:])

    # A cart, a login (changeSessionId), and a session shaped like a real app's.
    shopper, view = shop(bed, "apple", "apple")
    login = shopper.json("POST", "/login?user=ann")
    expect(login["session"] != view["session"], "login rotates the session id", "a new id", login)
    saved = shopper.json("POST", "/saved")
    origin = serving(bed, shopper.last)
    expect(counters(bed.tomcats[origin])["attributesSkipped"] >= 1, "the refused attribute is counted", ">= 1",
           counters(bed.tomcats[origin]))
    restored = total(bed, "sessionsRestored")

    kill_serving(bed, shopper.last)
    after = shopper.json("GET", "/cart")
    expect(serving(bed, shopper.last) != origin, "another Tomcat answers", "not the killed one", after)
    expect_equal((after["session"], after["user"], after["items"]), (login["session"], "ann", {"apple": 2}),
                 "the rotated session, its login and its cart after the kill")
    moved = shopper.json("GET", "/saved")
    wanted = {k: v for k, v in saved.items() if k != "served_by"} | {"queue": False}
    expect_equal({k: v for k, v in moved.items() if k != "served_by"}, wanted, "the real-app-shaped attributes")
    expect_equal(total(bed, "sessionsRestored"), restored + 1, "one restore")

    # A cookie-less probe makes no session on any line.
    created = total(bed, "sessionsCreated")
    expect_equal(Shopper(bed.envoy).send("GET", "/healthz").status_code, 200, "a probe")
    expect_equal(total(bed, "sessionsCreated"), created, "no session for a probe")

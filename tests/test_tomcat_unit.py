"""The Tomcat adapter's unit tests (JUnit 4: the state codec, keys, allow-list,
session ids, and the valve's decisions on embedded Tomcats), run through
adapters/tomcat/test/run so `tests/run` and `pytest -k tomcat` include them:
once on Tomcat 10.1 and, with libtomcat9-java installed, once more on Tomcat 9."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from harness import REPO, require_tool

JUNIT = Path("/usr/share/java/junit4.jar")
TOMCAT9 = Path("/usr/share/java/tomcat9-catalina.jar")


def test_tomcat_adapter_unit_tests():
    require_tool("javac")
    if not JUNIT.exists():
        message = f"{JUNIT} is missing (apt-get install junit4; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    run = subprocess.run([str(REPO / "adapters" / "tomcat" / "test" / "run")], capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    summary = re.findall(r"^(OK \(\d+ tests\)|Tests run: .*)$", run.stdout, re.M)
    if run.returncode != 0:
        pytest.fail(f"adapters/tomcat/test/run failed ({summary}):\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}",
                    pytrace=False)
    lines = 2 if TOMCAT9.exists() else 1
    if lines == 1 and os.environ.get("CI"):
        pytest.fail(f"{TOMCAT9} is missing (apt-get install libtomcat9-java; .ci/run installs it)")
    assert len(summary) == lines and all(s.startswith("OK") for s in summary), run.stdout[-2000:]

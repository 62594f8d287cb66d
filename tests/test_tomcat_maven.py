"""The Tomcat adapter's Maven build: `mvn -o package` against Debian's
maven-repo (no network), with Tomcat as a provided dependency, gives a jar
with the same classes as adapters/tomcat/build and the version in its manifest."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile

import pytest

from harness import REPO, expect, expect_equal

ADAPTER = REPO / "adapters" / "tomcat"
MAVEN_REPO = "/usr/share/maven-repo"


def test_tomcat_adapter_builds_offline_with_maven(tmp_path):
    if shutil.which("mvn") is None or not os.path.isdir(f"{MAVEN_REPO}/org/apache/tomcat/tomcat-catalina/10.x"):
        message = "mvn or Debian's maven-repo with libtomcat10-java is missing (.ci/setup installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pom = (ADAPTER / "pom.xml").read_text()
    version = re.search(r"^  <version>(.+)</version>$", pom, re.M).group(1)
    # A copy, so the build's output never lands in the work tree the other tests read.
    source = tmp_path / "tomcat"
    shutil.copytree(ADAPTER, source, ignore=shutil.ignore_patterns("build-out"))
    run = subprocess.run(["mvn", "-o", "-B", "-q", f"-Dmaven.repo.local={MAVEN_REPO}", "package"], cwd=source,
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    expect_equal(run.returncode, 0, f"mvn -o package\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}")
    jar = source / "build-out" / "maven" / f"session-affinity-tomcat-{version}.jar"
    with zipfile.ZipFile(jar) as archive:
        manifest = archive.read("META-INF/MANIFEST.MF").decode()
        classes = {n for n in archive.namelist() if n.endswith(".class")}
    expect(f"Implementation-Version: {version}" in manifest, "the version in the manifest", version, manifest)
    expected = {str(p.relative_to(ADAPTER / "src").with_suffix(".class")) for p in (ADAPTER / "src").rglob("*.java")}
    expect(expected <= classes and "dev/sessionaffinity/tomcat/SessionAffinityValve.class" in classes,
           "every source's class in the jar", sorted(expected), sorted(classes))

"""Tomcat instances with the session-affinity valve and the demo app, run from
Debian's packages for tests, benchmarks and `envoy/testbed --app tomcat`.

Three lines:
- "10": a standalone Tomcat 10.1 (Debian's tomcat10). Each instance gets its own
  CATALINA_BASE (conf/, lib/ with the valve jar, webapps/ROOT with the demo app,
  logs/, work/, temp/) and runs `catalina.sh run` in the foreground.
- "10-embedded", "9-embedded": an embedded Tomcat (org.apache.catalina.startup.Tomcat,
  what Spring Boot runs) from Debian's libtomcat10-java / libtomcat9-java jars,
  the valve added in code (adapters/tomcat/embedded).
All listen on 127.0.0.1 only and are stopped by PID. Instances start in
parallel and are waited on through /healthz (no sleeps); every start is a new
JVM with a new instance id, and a SIGKILLed instance can start again on the
same port.

    python3 adapters/tomcat/tomcats.py 18081 18082   # two Tomcats until Ctrl-C
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from html import escape
from pathlib import Path

ADAPTER = Path(__file__).resolve().parent
REPO = ADAPTER.parent.parent
sys.path.insert(0, str(REPO / "envoy"))

import rig as tb  # noqa: E402  (envoy/rig: processes, waits, the testbed itself)

BUILD_OUT = ADAPTER / "build-out"
JAR = BUILD_OUT / "session-affinity-tomcat.jar"
DEMO_APP = BUILD_OUT / "demo"
CATALINA_HOME = Path(os.environ.get("CATALINA_HOME", "/usr/share/tomcat10"))
VALVE = "dev.sessionaffinity.tomcat.SessionAffinityValve"
# A public test key: never use it anywhere else.
TEST_KEY = "tomcat-adapter-test-key-public-never-use-in-production"
KEY_ENVIRONMENT = "SESSION_STATE_KEYS"
# The valve's allow-list for the demo app's own classes.
DEMO_CLASSES = r"dev\.sessionaffinity\.demo\..*"
JAVA_OPTS = "-Xmx256m -XX:+UseSerialGC -Djava.security.egd=file:/dev/urandom"
START_TIMEOUT = 90.0
CONF_FILES = ("web.xml", "catalina.properties", "logging.properties")
LINES = ("10", "10-embedded", "9-embedded")
TOMCAT9_OUT = BUILD_OUT / "tomcat9"
EMBEDDED_MAIN = "dev.sessionaffinity.embedded.Main"


def embedded_classpath(line: str) -> str:
    """The valve jar, the demo app, the launcher and the line's Tomcat jars (Debian's)."""
    if line == "9-embedded":
        out, jar = TOMCAT9_OUT, TOMCAT9_OUT / "session-affinity-tomcat9.jar"
        tomcat = sorted(p for p in Path("/usr/share/java").glob("tomcat9-*.jar") if not p.stem[-1].isdigit())
    else:
        out, jar = BUILD_OUT, JAR
        tomcat = sorted((CATALINA_HOME / "lib").glob("*.jar")) + [CATALINA_HOME / "bin" / "tomcat-juli.jar"]
    parts = [jar, out / "demo" / "WEB-INF" / "classes", out / "embedded-classes", *tomcat]
    return ":".join(str(p) for p in parts)


def build(rebuild: bool = False, say=print) -> Path:
    """The valve jar and demo app, built with adapters/tomcat/build when missing or stale."""
    sources = [p for p in (ADAPTER / "src").rglob("*") if p.is_file()]
    sources += [p for folder in ("webapp", "embedded") for p in (ADAPTER / folder).rglob("*") if p.is_file()]
    sources += [ADAPTER / "build", ADAPTER / "pom.xml"]
    stale = not JAR.exists() or any(p.stat().st_mtime > JAR.stat().st_mtime for p in sources)
    if rebuild or stale:
        say("building the Tomcat adapter with adapters/tomcat/build")
        subprocess.run([str(ADAPTER / "build")], check=True, stdin=subprocess.DEVNULL, timeout=300)
    return JAR


def server_xml(port: int, connector: dict[str, str]) -> str:
    attributes = "".join(f' {name}="{escape(str(value))}"' for name, value in connector.items())
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by adapters/tomcat/tomcats.py: one loopback connector, no shutdown port. -->
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
    <Connector address="127.0.0.1" port="{port}" protocol="HTTP/1.1" connectionTimeout="20000"{attributes}/>
    <Engine name="Catalina" defaultHost="localhost">
      <Host name="localhost" appBase="webapps" unpackWARs="true" autoDeploy="false"/>
    </Engine>
  </Service>
</Server>
"""


def context_xml(valve: dict[str, str] | None) -> str:
    """conf/context.xml: the one line a user adds, with its attributes (no valve when None)."""
    line = ""
    if valve is not None:
        attributes = "".join(f' {name}="{escape(str(value))}"' for name, value in valve.items())
        line = f'\n    <Valve className="{VALVE}"{attributes}/>'
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Context>
    <WatchedResource>WEB-INF/web.xml</WatchedResource>{line}
</Context>
"""


def demo_valve(**overrides) -> dict[str, str]:
    """The valve attributes the tests use: the demo app's classes allowed."""
    return {"allowedClasses": DEMO_CLASSES, **overrides}


class Tomcat:
    """One Tomcat: fixed name, port and CATALINA_BASE; a new JVM (and instance id) on every start.

    valve: the valve's attributes (None: plain Tomcat, no valve and no jar);
    key: the signing key in its environment; connector: extra attributes of
    the HTTP connector (standalone line only); cpus: a taskset CPU list to pin
    the JVM to (benchmarks); line: one of LINES.
    """

    def __init__(self, name: str, port: int, base: Path, valve: dict[str, str] | None = None,
                 key: str | None = TEST_KEY, connector: dict[str, str] | None = None, cpus: str | None = None,
                 line: str = "10"):
        if line not in LINES:
            raise ValueError(f"line {line!r}: one of {LINES}")
        if line != "10" and (valve is None or connector):
            raise ValueError("an embedded Tomcat always has the valve and the default connector")
        self.line = line
        self.name = name
        self.cpus = cpus
        self.port = port
        self.base = Path(base)
        self.valve = valve
        self.key = key
        self.connector = connector or {}
        self.instance = ""
        self.process = tb.Process(f"tomcat-{name}", self._argv(), self.base / "console.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        environment = {
            "CATALINA_HOME": str(CATALINA_HOME), "CATALINA_BASE": str(self.base),
            "CATALINA_TMPDIR": str(self.base / "temp"), "JAVA_OPTS": JAVA_OPTS,
        }
        if self.key is not None:
            environment[KEY_ENVIRONMENT] = self.key
        # env execs catalina.sh, which execs java: the PID we hold is the JVM's.
        pinned = ["taskset", "-c", self.cpus] if self.cpus else []
        if self.line != "10":
            del environment["CATALINA_HOME"], environment["CATALINA_BASE"]
            return [*pinned, "env", *(f"{k}={v}" for k, v in environment.items()), "java", *JAVA_OPTS.split(),
                    f"-Djava.io.tmpdir={self.base / 'temp'}", "-cp", embedded_classpath(self.line), EMBEDDED_MAIN,
                    str(self.port), *(f"{k}={v}" for k, v in (self.valve or {}).items())]
        return [*pinned, "env", *(f"{k}={v}" for k, v in environment.items()),
                str(CATALINA_HOME / "bin" / "catalina.sh"), "run"]

    def write_base(self):
        """A fresh CATALINA_BASE: conf from Debian's install, the valve jar, the demo app as ROOT."""
        if self.base.exists():
            shutil.rmtree(self.base)
        for folder in ("conf", "lib", "logs", "webapps", "work", "temp"):
            (self.base / folder).mkdir(parents=True)
        if self.line != "10":
            return  # an embedded Tomcat is configured in code (adapters/tomcat/embedded)
        for name in CONF_FILES:
            shutil.copy(CATALINA_HOME / "etc" / name, self.base / "conf" / name)
        (self.base / "conf" / "server.xml").write_text(server_xml(self.port, self.connector))
        (self.base / "conf" / "context.xml").write_text(context_xml(self.valve))
        if self.valve is not None:
            shutil.copy(JAR, self.base / "lib" / JAR.name)
        shutil.copytree(DEMO_APP, self.base / "webapps" / "ROOT")

    def launch(self):
        """Start the JVM; wait_ready() waits for it."""
        if not (self.base / "conf").exists():
            self.write_base()
        self.process.start()

    def wait_ready(self, timeout: float = START_TIMEOUT, previous: str | None = None) -> str:
        """Wait until /healthz answers from a new JVM; returns its instance id ("" without the valve)."""
        def ready():
            self.process.ensure_alive()
            status, headers, _ = tb.http_get(f"{self.url}/healthz")
            instance = headers.get("x-instance-id", "")
            if status != 200 or (self.valve is not None and (not instance or instance == previous)):
                return None
            return instance or "plain"

        self.instance = tb.wait_until(ready, timeout, f"tomcat {self.name} on {self.address}")
        return self.instance

    def start(self, timeout: float = START_TIMEOUT) -> str:
        previous = self.instance
        self.launch()
        return self.wait_ready(timeout, previous)

    def kill(self):
        """SIGKILL, like a crashed pod: the in-memory sessions are gone."""
        self.process.kill()

    def stop(self):
        self.process.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The console and Tomcat's own log files, for a failing test's report."""
        parts = [self.process.log_tail(lines)]
        for path in sorted((self.base / "logs").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def start_all(tomcats: list[Tomcat], timeout: float = START_TIMEOUT):
    """Launch every Tomcat, then wait for each: they boot in parallel."""
    previous = [t.instance for t in tomcats]
    for tomcat in tomcats:
        tomcat.launch()
    for tomcat, instance in zip(tomcats, previous):
        tomcat.wait_ready(timeout, instance)


class TomcatTestbed(tb.Testbed):
    """The testbed with its three demo backends swapped for three Tomcats on the
    same ports, each with the valve and the demo app."""

    def __init__(self, ports: tb.PortPlan, workdir: Path, valve: dict[str, str] | None = None, line: str = "10",
                 connector: dict[str, str] | None = None, **kwargs):
        super().__init__(ports, workdir, **kwargs)
        build(say=self.say)
        # In mesh mode (--mesh) each Tomcat listens on its app port, behind its sidecar.
        self.tomcats = [Tomcat(b.name, b.app_port or b.port, self.workdir / f"tomcat-{b.name}", valve or demo_valve(),
                               connector=connector, line=line) for b in self.backends]
        for backend, tomcat in zip(self.backends, self.tomcats):
            backend.process = tomcat.process

    def start_backends(self):
        start_all(self.tomcats)
        for index in range(len(self.tomcats)):
            self._started(index)

    def start_backend(self, index: int, instance: str | None = None) -> tb.Backend:
        self.tomcats[index].start()
        return self._started(index)

    def _started(self, index: int) -> tb.Backend:
        backend, tomcat = self.backends[index], self.tomcats[index]
        backend.instance = tomcat.instance
        self.say(f"started tomcat {backend.name} pid {tomcat.process.pid} ({backend.address}, instance {backend.instance})")
        return backend

    def log_report(self, lines: int = 60) -> str:
        tomcat_logs = "\n".join(f"===== tomcat {t.name} logs in {t.base}\n{t.log_tail(lines)}" for t in self.tomcats)
        return super().log_report(lines) + "\n" + tomcat_logs


def main(argv: list[str]) -> int:
    ports = [int(p) for p in argv] or tb.free_ports(1)
    build()
    workdir = Path(tempfile.mkdtemp(prefix="sa-tomcats-"))
    tomcats = [Tomcat(f"t{i}", port, workdir / f"tomcat-{i}", demo_valve()) for i, port in enumerate(ports)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        start_all(tomcats)
        for tomcat in tomcats:
            print(f"tomcats: {tomcat.name} at {tomcat.url}/ instance {tomcat.instance} (pid {tomcat.process.pid})", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for tomcat in tomcats:
            tomcat.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

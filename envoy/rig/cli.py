"""The command line of envoy/testbed: start the testbed on the documented
ports (or free ones), report processes that exit, stop everything on Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .build import ensure_module, missing_tools
from .paths import MODULES, REPO, STORES
from .ports import PortPlan
from .probe import StartupError
from .testbed import Testbed


class _Stop(Exception):
    """Raised by the SIGINT and SIGTERM handlers so the runner unwinds and stops everything."""


def _raise_stop(signum, frame):
    raise _Stop()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="envoy/testbed",
        description="Run Redis, webdis, three demo backends and Envoy with the filter on 127.0.0.1. "
                    "Ctrl-C stops everything.")
    parser.add_argument("--store", choices=STORES, default="webdis",
                        help="the session store: webdis in front of Redis (default), or three etcd members")
    parser.add_argument("--free-ports", action="store_true",
                        help="pick free ports instead of the documented ones (to run beside another testbed)")
    parser.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads (default 2)")
    parser.add_argument("--rebuild", action="store_true", help="run filter/build even if the module exists")
    parser.add_argument("--module", choices=MODULES, default="wasm",
                        help="the filter as proxy-wasm (default), or as the native Envoy dynamic module "
                             "(no stateful_session filter)")
    parser.add_argument("--workdir", type=Path, help="where configs and logs go (default: a new temp dir)")
    parser.add_argument("--mesh", action="store_true",
                        help="put every backend behind its own sidecar Envoy, reached over mutual TLS (like Istio)")
    parser.add_argument("--no-install", action="store_true",
                        help="only check that the tools are there; envoy/testbed passes it to .ci/setup")
    parser.add_argument("--app", choices=("demo", "tomcat"), default="demo",
                        help="the backends: the demo backend (default), or Tomcat 10 with the adapter "
                             "valve and its demo app (adapters/tomcat)")
    return parser.parse_args(argv)


def testbed_class(app: str):
    """The Testbed for --app: tomcat swaps the backends for Tomcats (adapters/tomcat/tomcats.py)."""
    if app == "tomcat":
        sys.path.insert(0, str(REPO / "adapters" / "tomcat"))
        from tomcats import TomcatTestbed
        return TomcatTestbed
    return Testbed


def main(argv=None) -> int:
    args = parse_args(argv)

    def say(message):
        print(f"testbed: {message}", flush=True)

    # Explicit handlers: SIGINT may arrive ignored from a non-interactive parent.
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    missing = missing_tools(args.store)
    if missing:
        say(f"not installed: {', '.join(missing)}; `.ci/setup testbed` installs them (Debian/Ubuntu)")
        return 2
    try:
        ensure_module(args.module, args.rebuild, say)
    except subprocess.CalledProcessError as err:
        say(f"filter/build failed with exit code {err.returncode} (its output is above)")
        return 1
    except (OSError, subprocess.TimeoutExpired) as err:
        say(f"cannot build the filter: {err}")
        return 1
    except _Stop:
        return 130
    ports = PortPlan.free() if args.free_ports else PortPlan()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sa-testbed-"))
    testbed = testbed_class(args.app)(ports, workdir, concurrency=args.concurrency, say=say, mesh=args.mesh,
                                         module=args.module, store=args.store)
    say(f"configs and logs in {workdir}")
    try:
        testbed.start()
        say(f"ready at {testbed.envoy.url}/  (admin {testbed.envoy.admin_url}/, Ctrl-C stops)")
        reported = set()
        while True:
            time.sleep(0.5)
            for process in testbed.processes():
                if not process.running() and process.name not in reported:
                    reported.add(process.name)
                    say(f"{process.name} (pid {process.pid}) exited with code {process.popen.returncode}")
    except _Stop:
        say("stopping")
    except StartupError as err:
        say(f"failed to start: {err}")
        return 1
    finally:
        # A second Ctrl-C must not cut the cleanup short; each stop is bounded.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        testbed.stop()
    say("stopped")
    return 0


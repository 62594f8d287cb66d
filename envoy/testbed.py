"""The session-affinity testbed, run natively: Redis, webdis, three demo
backends and Envoy with the filter, all as processes on 127.0.0.1.

Run it with `envoy/testbed` (see envoy/README.md). Its parts are the package
envoy/rig, one job per module; the tests import that package and use the
same code with a port plan of free ports, so several test runs and a
developer's testbed can run side by side.

envoy/testbed.yaml stays the single source of the topology: it is parsed, its
ports, .wasm path and plugin JSON are rewritten in memory, and the result is
written to a work directory. Tracked files are never edited.

Every process is started in its own session (Ctrl-C reaches only the runner,
which stops the rest in order) and is stopped by its PID. If the runner dies
without cleaning up, the kernel sends its children SIGTERM (PR_SET_PDEATHSIG).
"""

import sys

from rig.cli import main

if __name__ == "__main__":
    sys.exit(main())

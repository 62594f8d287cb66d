"""Fixtures for the e2e tests: the built filter, testbeds on free ports, and
clients. A failing test's report gets the tail of every testbed process log.

`testbed` is shared by every test that only sends requests; a test that kills,
restarts or reconfigures anything asks for `own_testbed` instead.

A test marked `mesh` runs twice: with the backends reached directly, and with
each backend behind its own sidecar Envoy over mutual TLS (`--mesh`), as in
an Istio mesh.
"""

from __future__ import annotations

import pytest

from harness import Client, require_tool, tb


@pytest.fixture(scope="session")
def wasm():
    """The filter module; built with filter/build if it is missing or older than its sources."""
    for tool in tb.TOOLS:
        require_tool(tool)
    return tb.ensure_wasm()


def _testbed(workdir, filter_config=None, mesh=False):
    return tb.Testbed(tb.PortPlan.free(), workdir, concurrency=2, filter_config=filter_config, mesh=mesh)


def pytest_configure(config):
    config.addinivalue_line("markers", "mesh: also run the test with every backend behind a sidecar Envoy (mTLS)")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("mesh") and "own_testbed" in metafunc.fixturenames:
        metafunc.parametrize("topology", ["direct", "mesh"], indirect=True)


@pytest.fixture
def topology(request):
    """How the backends are reached: "direct", or "mesh" (through sidecars)."""
    return getattr(request, "param", "direct")


@pytest.fixture(scope="session")
def shared_testbed(wasm, tmp_path_factory):
    with _testbed(tmp_path_factory.mktemp("testbed")) as bed:
        yield bed


@pytest.fixture
def testbed(shared_testbed):
    """The shared testbed; every process must still be running when lent out."""
    for process in shared_testbed.processes():
        if not process.running():
            pytest.fail(f"shared testbed process {process.name} is not running; a test must not stop it")
    return shared_testbed


@pytest.fixture
def own_testbed(wasm, tmp_path, topology):
    """A testbed for this test alone, which it may kill, restart and reconfigure."""
    with _testbed(tmp_path / "testbed", mesh=topology == "mesh") as bed:
        yield bed


@pytest.fixture
def client(testbed):
    return Client(testbed.envoy)


@pytest.fixture
def filter_config(testbed):
    """The shared testbed's plugin JSON (a copy of envoy/testbed.yaml's)."""
    return testbed.envoy.filter_config


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    testbeds = {id(v): v for v in getattr(item, "funcargs", {}).values() if isinstance(v, tb.Testbed)}
    for bed in testbeds.values():
        report.sections.append((f"testbed logs ({bed.workdir})", bed.log_report()))

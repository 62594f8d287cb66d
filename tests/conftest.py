"""Fixtures for the e2e tests: the built filter, testbeds on free ports, and
clients. A failing test's report gets the tail of every testbed process log.

`testbed` is shared by every test that only sends requests; a test that kills,
restarts or reconfigures anything asks for `own_testbed` instead.

Tests marked `stores` run once per selected session store (`--store webdis
--store etcd`, or SA_STORES=webdis,etcd; webdis alone by default, so default
runs stay fast): their `own_testbed` runs that store. Other tests use webdis.
"""

from __future__ import annotations

import os

import pytest

from harness import Client, require_tool, tb


def pytest_addoption(parser):
    parser.addoption("--store", action="append", choices=tb.STORES,
                     help="a session store for the tests marked `stores` (repeat it for several; "
                          "default: SA_STORES, else webdis)")


def pytest_configure(config):
    config.addinivalue_line("markers", "stores: run once per selected session store (--store, SA_STORES)")


def selected_stores(config) -> list[str]:
    stores = config.getoption("--store") or [s for s in os.environ.get("SA_STORES", "webdis").split(",") if s]
    unknown = sorted(set(stores) - set(tb.STORES))
    if unknown:
        raise pytest.UsageError(f"unknown session store(s) {unknown}; choose from {list(tb.STORES)}")
    return stores


def pytest_generate_tests(metafunc):
    if "store" in metafunc.fixturenames and metafunc.definition.get_closest_marker("stores"):
        metafunc.parametrize("store", selected_stores(metafunc.config), indirect=True)


@pytest.fixture
def store(request):
    """The session store of the test's own testbed: webdis unless the test is marked `stores`."""
    return getattr(request, "param", "webdis")


@pytest.fixture(scope="session")
def wasm():
    """The filter module; built with filter/build if it is missing or older than its sources."""
    for tool in tb.TOOLS:
        require_tool(tool)
    return tb.ensure_wasm()


def _testbed(workdir, filter_config=None, store="webdis"):
    for tool in tb.STORE_TOOLS[store]:
        require_tool(tool)
    return tb.Testbed(tb.PortPlan.free(), workdir, concurrency=2, filter_config=filter_config, store=store)


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
def own_testbed(wasm, tmp_path, store):
    """A testbed for this test alone, which it may kill, restart and reconfigure."""
    with _testbed(tmp_path / "testbed", store=store) as bed:
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

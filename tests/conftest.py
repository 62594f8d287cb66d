"""Fixtures for the e2e tests: the built filter, testbeds on free ports, and
clients. A failing test's report gets the tail of every testbed process log.

`testbed` is shared by every test that only sends requests; a test that kills,
restarts or reconfigures anything asks for `own_testbed` instead.

A test marked `mesh` runs twice: with the backends reached directly, and with
each backend behind its own sidecar Envoy over mutual TLS (`--mesh`), as in
an Istio mesh (with the first selected store, if it is also marked `stores`).

Tests marked `stores` run once per selected session store (`--store webdis
--store etcd`, or SA_STORES=webdis,etcd; webdis alone by default, so default
runs stay fast): their `own_testbed` runs that store. Other tests use webdis.

The testbeds run the filter as proxy-wasm, or with `--module native` as the
native Envoy dynamic module (no stateful_session filter). That run selects
only the tests that use a testbed: the others do not depend on the build.
"""

from __future__ import annotations

import os

import pytest

from harness import User, require_tool, tb

TESTBED_FIXTURES = {"module", "shared_testbed", "testbed", "own_testbed"}


def pytest_addoption(parser):
    parser.addoption("--module", choices=tb.MODULES, default=os.environ.get("SA_MODULE", "wasm"),
                     help="the build the testbeds run: wasm (default) or native (also: SA_MODULE)")
    parser.addoption("--store", action="append", choices=tb.STORES,
                     help="a session store for the tests marked `stores` (repeat it for several; "
                          "default: SA_STORES, else webdis)")


def pytest_configure(config):
    config.addinivalue_line("markers", "stores: run once per selected session store (--store, SA_STORES)")
    config.addinivalue_line("markers", "mesh: also run the test with every backend behind a sidecar Envoy (mTLS)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--module") == "wasm":
        return
    kept = [item for item in items if TESTBED_FIXTURES & set(getattr(item, "fixturenames", ()))]
    deselected = [item for item in items if item not in kept]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture(scope="session")
def module(request):
    """Which build the testbeds run; built with filter/build if it is missing or older than its sources."""
    name = request.config.getoption("--module")
    for tool in tb.TOOLS:
        require_tool(tool)
    tb.ensure_module(name)
    return name


def selected_stores(config) -> list[str]:
    stores = config.getoption("--store") or [s for s in os.environ.get("SA_STORES", "webdis").split(",") if s]
    unknown = sorted(set(stores) - set(tb.STORES))
    if unknown:
        raise pytest.UsageError(f"unknown session store(s) {unknown}; choose from {list(tb.STORES)}")
    return stores


def pytest_generate_tests(metafunc):
    stores = None
    if "store" in metafunc.fixturenames and metafunc.definition.get_closest_marker("stores"):
        stores = selected_stores(metafunc.config)
    mesh = metafunc.definition.get_closest_marker("mesh") and "own_testbed" in metafunc.fixturenames
    if stores and mesh:
        # The store and the path to the app are independent: every store
        # direct, and the first store through the sidecars too.
        cases = [(store, "direct") for store in stores] + [(stores[0], "mesh")]
        metafunc.parametrize(("store", "topology"), cases, indirect=True, ids=[f"{s}-{t}" for s, t in cases])
    elif stores:
        metafunc.parametrize("store", stores, indirect=True)
    elif mesh:
        metafunc.parametrize("topology", ["direct", "mesh"], indirect=True)


@pytest.fixture
def store(request):
    """The session store of the test's own testbed: webdis unless the test is marked `stores`."""
    return getattr(request, "param", "webdis")


@pytest.fixture
def topology(request):
    """How the backends are reached: "direct", or "mesh" (through sidecars)."""
    return getattr(request, "param", "direct")


@pytest.fixture(scope="session")
def wasm():
    """The filter module; built with filter/build if it is missing or older than its sources."""
    for tool in tb.TOOLS:
        require_tool(tool)
    return tb.ensure_wasm()


def _testbed(workdir, module, filter_config=None, mesh=False, store="webdis"):
    for tool in tb.STORE_TOOLS[store]:
        require_tool(tool)
    return tb.Testbed(tb.PortPlan.free(), workdir, concurrency=2, filter_config=filter_config, mesh=mesh,
                      module=module, store=store)


@pytest.fixture(scope="session")
def shared_testbed(module, tmp_path_factory):
    with _testbed(tmp_path_factory.mktemp("testbed"), module) as bed:
        yield bed


@pytest.fixture
def testbed(shared_testbed):
    """The shared testbed; every process must still be running when lent out."""
    for process in shared_testbed.processes():
        if not process.running():
            pytest.fail(f"shared testbed process {process.name} is not running; a test must not stop it")
    return shared_testbed


@pytest.fixture
def own_testbed(module, tmp_path, topology, store):
    """A testbed for this test alone, which it may kill, restart and reconfigure."""
    with _testbed(tmp_path / "testbed", module, mesh=topology == "mesh", store=store) as bed:
        yield bed


@pytest.fixture
def client(testbed):
    return User(envoy=testbed.envoy, jar=False)


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

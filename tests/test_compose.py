"""The docker-compose testbed, checked without a Docker engine: it parses,
pins every image, waits on health, runs the same testbed.yaml and .wasm as
the native testbed, fails `up` when the module is missing, has its own
project name, and its Envoy health check passes against a real Envoy. The
Tomcat variant mounts what adapters/tomcat/build makes, in place of the
demo backends."""

from __future__ import annotations

import re
import subprocess
from pathlib import PurePosixPath

import pytest
import yaml

from harness import REPO, expect, expect_equal, require_tool, tb

COMPOSE = REPO / "envoy" / "docker-compose.yaml"
TOMCAT = REPO / "envoy" / "docker-compose.tomcat.yaml"
LOCAL = [COMPOSE.parent / "docker-compose.local.yaml"]
TOMCAT_LOCAL = [TOMCAT, COMPOSE.parent / "docker-compose.tomcat-local.yaml"]
PINNED = re.compile(r"^[\w./-]+:v?\d+\.\d+[\w.-]*$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, *LOCAL], [COMPOSE, TOMCAT], [COMPOSE, *LOCAL, *TOMCAT_LOCAL]],
                         ids=["official-images", "local-images", "tomcat-official-images", "tomcat-local-images"])
def test_docker_compose_config_accepts_it(files):
    docker_compose = require_tool("docker-compose")
    result = subprocess.run([docker_compose, *(a for f in files for a in ("-f", str(f))), "config", "-q"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    expect(result.returncode == 0, "docker-compose config", "exit 0", f"exit {result.returncode}: {result.stderr}")


def test_images_are_pinned(compose):
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        expect(PINNED.match(service["image"]), f"service {name} pins its image", "name:<version>", service["image"])
    dockerfile = (REPO / "envoy" / "backend" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    expect(PINNED.match(base) and base.startswith("python:3.12"), "the backend image pins python 3.12",
           "python:3.12.<patch>...", base)


def test_services_wait_on_health(compose):
    services = compose["services"]
    for name, service in services.items():
        expect("healthcheck" in service, f"service {name} has a health check", "healthcheck", sorted(service))
        expect_equal(service.get("network_mode"), "host", f"network_mode of {name}")
        for dependency, rule in service.get("depends_on", {}).items():
            expect_equal(rule, {"condition": "service_healthy"}, f"{name} waits for {dependency}")
    # Not the apps: Envoy's health checks find them, and the Tomcat variant
    # swaps them out (a dependency on a service it disables fails `up`).
    expect_equal(sorted(services["envoy"]["depends_on"]), ["webdis"], "what Envoy waits for")


def mount(volume) -> tuple[str, str]:
    """(source, target) of a volume in the short or the long syntax."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"]
    source, target, *_ = volume.split(":")
    return source, target


def test_a_missing_module_fails_up():
    """The .wasm is a bind mount in the long syntax: Docker refuses a missing
    source instead of creating an empty root-owned directory in its place
    (which the short syntax does, and Envoy then only logs its failure)."""
    envoy = yaml.safe_load(COMPOSE.read_text())["services"]["envoy"]
    module = one_of(v for v in envoy["volumes"] if mount(v)[0].endswith(".wasm"))
    expect(isinstance(module, dict) and module["type"] == "bind" and "bind" not in module,
           "the .wasm mount", "long syntax, type bind, no create_host_path", module)


def test_project_has_its_own_name():
    """docker-compose takes the project name from .env beside the compose file
    (1.x refuses a top-level name:), not from the folder (envoy)."""
    settings = dict(line.split("=", 1) for line in (COMPOSE.parent / ".env").read_text().splitlines()
                    if line and not line.startswith("#"))
    expect_equal(settings.get("COMPOSE_PROJECT_NAME"), "session-affinity-testbed", "the compose project name")


def test_readme_says_to_build_first():
    for readme in (REPO / "README.md", REPO / "envoy" / "README.md"):
        text = " ".join(readme.read_text().split())
        at = text.index("docker-compose -f envoy/docker-compose.yaml up")
        expect("filter/build" in text[max(0, at - 300):at], f"{readme.name}: filter/build before docker-compose up",
               "filter/build", text[max(0, at - 300):at])


def test_envoy_healthcheck_passes_on_a_live_envoy(tmp_path):
    """The health check, run as written against a real Envoy's admin port
    (in the image it runs in bash too): it passes. Envoy's admin answers the
    HTTP/1.0 request it used to send with 426, so it never passed."""
    require_tool("bash")
    envoy_bin = require_tool("envoy")
    check = yaml.safe_load(COMPOSE.read_text())["services"]["envoy"]["healthcheck"]["test"]
    expect_equal(check[:3], ["CMD", "bash", "-c"], "the health check's form")
    port = tb.free_ports(1)[0]
    config = tmp_path / "admin.yaml"
    config.write_text(yaml.safe_dump({"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}))
    envoy = tb.Process("envoy-admin", [envoy_bin, "-c", str(config), "--disable-hot-restart", "-l", "warning"],
                       tmp_path / "envoy.log")
    envoy.start()
    try:
        tb.wait_until(lambda: envoy.ensure_alive() or tb.accepts(port), 60, "Envoy's admin port")
        command = check[3].replace("/9901", f"/{port}")
        expect("/9901" in check[3], "the check asks the testbed's admin port", "9901", check[3])
        # LIVE only once the server is up: give it a bounded number of tries.
        tb.wait_until(lambda: subprocess.run(["bash", "-c", command], timeout=10).returncode == 0, 60,
                      "the health check to pass")
        old = check[3].replace("HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close", "HTTP/1.0")
        old = old.replace("/9901", f"/{port}")
        expect_equal(subprocess.run(["bash", "-c", old], timeout=10).returncode, 1, "the HTTP/1.0 check (426)")
    finally:
        envoy.stop()


def one_of(items):
    items = list(items)
    expect_equal(len(items), 1, "how many match")
    return items[0]


def test_envoy_runs_the_testbed_config_and_module(compose):
    """Same bootstrap file, and the .wasm appears where testbed.yaml looks for it."""
    envoy = compose["services"]["envoy"]
    mounts = {target: source for source, target in map(mount, envoy["volumes"])}
    config_target = envoy["command"][envoy["command"].index("-c") + 1]
    expect_equal(mounts.get(config_target), "./testbed.yaml", f"what is mounted at {config_target}")
    wasm_path = tb.find_wasm_filter(tb.load_bootstrap())["vm_config"]["code"]["local"]["filename"]
    wasm_target = str(PurePosixPath(envoy["working_dir"]) / wasm_path)
    expect_equal(mounts.get(wasm_target), f"../{wasm_path}", f"what is mounted at {wasm_target}")


def test_tomcat_variant_mounts_the_adapter_in_place_of_the_demo_backends():
    """Three Tomcats on the demo backends' ports (which it disables), each
    with the valve jar, the demo app and the conf files mounted as a user
    would install them; the jar and the app in the long syntax, so `up`
    fails when adapters/tomcat/build has not run."""
    services = yaml.safe_load(TOMCAT.read_text())["services"]
    for name in ("backend-a", "backend-b", "backend-c"):
        expect_equal(services[name], {"profiles": ["demo-app"]}, f"{name} in the Tomcat variant")
    for name, port in (("tomcat-a", 18081), ("tomcat-b", 18082), ("tomcat-c", 18083)):
        tomcat = services[name]
        expect_equal((tomcat["image"], tomcat["network_mode"]), ("tomcat:10.1", "host"), f"{name}: image, network")
        expect_equal(tomcat["environment"]["CATALINA_OPTS"], f"-Dhttp.port={port}", f"{name}: its port")
        expect(f"/dev/tcp/127.0.0.1/{port}" in tomcat["healthcheck"]["test"][3], f"{name}: health check",
               f"asks 127.0.0.1:{port}/healthz", tomcat["healthcheck"]["test"])
        mounts = {target: volume for volume in tomcat["volumes"] for _, target in [mount(volume)]}
        for target, source in (("/usr/local/tomcat/lib/session-affinity-tomcat.jar",
                                "../adapters/tomcat/build-out/session-affinity-tomcat.jar"),
                               ("/usr/local/tomcat/webapps/ROOT", "../adapters/tomcat/build-out/demo")):
            expect_equal(mounts.get(target), {"type": "bind", "source": source, "target": target, "read_only": True},
                         f"{name}: the mount at {target}")
        for conf in ("server.xml", "context.xml"):
            expect_equal(mount(mounts[f"/usr/local/tomcat/conf/{conf}"]), (f"./tomcat/{conf}", f"/usr/local/tomcat/conf/{conf}"),
                         f"{name}: conf/{conf}")
    context = (REPO / "envoy" / "tomcat" / "context.xml").read_text()
    expect('className="dev.sessionaffinity.tomcat.SessionAffinityValve"' in context
           and 'allowedClasses="dev\\.sessionaffinity\\.demo\\..*"' in context,
           "tomcat/context.xml", "the valve, the demo app's classes allowed", context)

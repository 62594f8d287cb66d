"""The docker-compose testbed, checked statically (CI has no Docker engine):
it parses, pins every image, waits on health, and runs the same testbed.yaml
and .wasm as the native testbed."""

from __future__ import annotations

import re
import subprocess
from pathlib import PurePosixPath

import pytest
import yaml

from harness import REPO, expect, expect_equal, require_tool, tb

COMPOSE = REPO / "envoy" / "docker-compose.yaml"
PINNED = re.compile(r"^[\w./-]+:v?\d+\.\d+[\w.-]*$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_compose_config_accepts_it():
    docker_compose = require_tool("docker-compose")
    result = subprocess.run([docker_compose, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
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
    expect_equal(sorted(services["envoy"]["depends_on"]), sorted(["webdis", "backend-a", "backend-b", "backend-c"]),
                 "what Envoy waits for")


def test_envoy_runs_the_testbed_config_and_module(compose):
    """Same bootstrap file, and the .wasm appears where testbed.yaml looks for it."""
    envoy = compose["services"]["envoy"]
    mounts = {target: source for source, target, *_ in (v.split(":") for v in envoy["volumes"])}
    config_target = envoy["command"][envoy["command"].index("-c") + 1]
    expect_equal(mounts.get(config_target), "./testbed.yaml", f"what is mounted at {config_target}")
    wasm_path = tb.find_wasm_filter(tb.load_bootstrap())["vm_config"]["code"]["local"]["filename"]
    wasm_target = str(PurePosixPath(envoy["working_dir"]) / wasm_path)
    expect_equal(mounts.get(wasm_target), f"../{wasm_path}", f"what is mounted at {wasm_target}")

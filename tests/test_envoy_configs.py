"""Envoy configs checked by the real Envoy (`--mode validate` loads the .wasm in
V8 and runs on_configure): every shipped bootstrap is accepted, and a bad
plugin config is refused with the field named."""

from __future__ import annotations

import copy
import os
import subprocess

import pytest
import yaml

from harness import REPO, expect, tb

SHORT_SECRET = "too-short-secret"


def validate(path, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([tb.ENVOY_BIN, "--mode", "validate", "-c", str(path)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, env={**os.environ, **tb.envoy_env()})


def envoy_bootstraps() -> list:
    """Every YAML file under envoy/ that is an Envoy bootstrap."""
    found = []
    for path in sorted((REPO / "envoy").rglob("*.yaml")):
        documents = list(yaml.safe_load_all(path.read_text()))
        if any(isinstance(d, dict) and ("static_resources" in d or "dynamic_resources" in d) for d in documents):
            found.append(path)
    return found


def test_the_testbed_config_is_found():
    expect(REPO / "envoy" / "testbed.yaml" in envoy_bootstraps(), "bootstrap discovery finds the testbed",
           "envoy/testbed.yaml", envoy_bootstraps())


@pytest.mark.parametrize("path", envoy_bootstraps(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_envoy_config_validates(path, wasm):
    result = validate(path)
    expect(result.returncode == 0, f"envoy --mode validate -c {path.relative_to(REPO)}", "exit 0 and OK",
           f"exit {result.returncode}\n{result.stdout}{result.stderr[-3000:]}")


def _with(change):
    config = copy.deepcopy(tb.default_filter_config())
    change(config)
    return config


BAD_CONFIGS = {
    "short_secret": (lambda c: c["keys"][0].update(secret=SHORT_SECRET), "keys[0].secret"),
    "unknown_top_level_field": (lambda c: c.update(colour="blue"), "colour"),
    "unknown_cookie_field": (lambda c: c["cookie"].update(colour="blue"), "cookie.colour"),
    "bad_same_site": (lambda c: c["cookie"].update(same_site="sideways"), "cookie.same_site"),
    "bad_duration": (lambda c: c["cookie"].update(ttl="ten minutes"), "cookie.ttl"),
    "bad_store_timeout": (lambda c: c["store"].update(timeout="5 parsecs"), "store.timeout"),
    "no_keys": (lambda c: c.update(keys=[]), "keys"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_plugin_config_is_refused_naming_the_field(case, wasm, tmp_path):
    change, field = BAD_CONFIGS[case]
    bootstrap = tb.render_bootstrap(tb.PortPlan(), 10000, 9901, _with(change))
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    result = validate(path)
    output = result.stdout + result.stderr
    filter_lines = [line for line in output.splitlines() if "wasm log" in line and "invalid config" in line]
    expect(result.returncode != 0, f"envoy --mode validate with a bad config ({case})", "a non-zero exit",
           f"exit 0\n{output[-2000:]}")
    expect(any(field in line for line in filter_lines), f"the filter's error line names the field ({case})",
           f"a line with {field!r}", "\n".join(filter_lines) or output[-2000:])
    expect(SHORT_SECRET not in output, "no secret in Envoy's output", f"no {SHORT_SECRET!r}", "the secret appears")

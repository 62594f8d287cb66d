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


def validate(path, cwd=REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tb.ENVOY_BIN, "--mode", "validate", "-c", str(path)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, **tb.envoy_env(), **(env or {})})


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
def test_shipped_envoy_config_validates(path, wasm, tmp_path):
    cwd = REPO
    if "filename: mesh/" in path.read_text():
        # envoy/sidecar.yaml names the certificates envoy/rig/mesh.py makes, relative to where it runs.
        tb.mesh_mode.make_certificates(tmp_path / "mesh")
        cwd = tmp_path
    result = validate(path, cwd=cwd)
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


def validate_changed(change, path):
    """`envoy --mode validate` of the testbed bootstrap with its plugin config
    changed; returns the result and everything Envoy printed."""
    path.write_text(yaml.safe_dump(tb.render_bootstrap(tb.PortPlan(), 10000, 9901, _with(change))))
    result = validate(path)
    return result, result.stdout + result.stderr


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_plugin_config_is_refused_naming_the_field(case, wasm, tmp_path):
    change, field = BAD_CONFIGS[case]
    result, output = validate_changed(change, tmp_path / f"{case}.yaml")
    filter_lines = [line for line in output.splitlines() if "wasm log" in line and "invalid config" in line]
    expect(result.returncode != 0, f"envoy --mode validate with a bad config ({case})", "a non-zero exit",
           f"exit 0\n{output[-2000:]}")
    expect(any(field in line for line in filter_lines), f"the filter's error line names the field ({case})",
           f"a line with {field!r}", "\n".join(filter_lines) or output[-2000:])
    expect(SHORT_SECRET not in output, "no secret in Envoy's output", f"no {SHORT_SECRET!r}", "the secret appears")


# Values that reach the VM through environment variables and are wrong: the
# error must name the field and the variable, never the value.
BAD_ENV = {
    "short_key_from_env": ("SA_TEST_KEY", "a-short-but-secret-key", "keys[0].secret_env",
                           lambda c: c["keys"].insert(0, {"id": "env", "secret_env": "SA_TEST_KEY"})),
    "store_password_with_control_characters": (tb.STORE_PASSWORD_ENV, "secret-store-pass\x01word",
                                               "store.auth.password_env", lambda c: None),
}


@pytest.mark.parametrize("case", BAD_ENV)
def test_a_bad_secret_from_the_environment_is_refused_without_echoing_it(case, wasm, tmp_path):
    var, value, field, change = BAD_ENV[case]
    bootstrap = tb.render_bootstrap(tb.PortPlan(), 10000, 9901, _with(change))
    config = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm_config = next(f for f in config["http_filters"] if f["name"] == tb.WASM_FILTER)["typed_config"]["config"]
    host_env_keys = wasm_config["vm_config"]["environment_variables"]["host_env_keys"]
    if var not in host_env_keys:
        host_env_keys.append(var)
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    result = validate(path, env={var: value})
    output = result.stdout + result.stderr
    expect(result.returncode != 0, f"envoy --mode validate with {case}", "a non-zero exit", f"exit 0\n{output[-2000:]}")
    expect(any(field in line for line in output.splitlines() if "invalid config" in line),
           f"the error names {field}", f"a line with {field!r}", output[-2000:])
    expect(value not in output and value.encode("unicode_escape").decode() not in output,
           "the value is not in Envoy's output", "absent", "it appears")


# A secret pasted where the name of its environment variable belongs.
PASTED_SECRET = "Zm9vYmFyLXBhc3RlZC1zZWNyZXQtdmFsdWUtMDEyMzQ1Njc4OQ=="
PASTED = {
    "secret_env": ("keys[0].secret_env", lambda c: c["keys"].insert(0, {"id": "env", "secret_env": PASTED_SECRET})),
    "password_env": ("store.auth.password_env", lambda c: c["store"]["auth"].update(password_env=PASTED_SECRET)),
}


@pytest.mark.parametrize("case", PASTED)
def test_a_secret_pasted_as_a_variable_name_is_refused_without_echoing_it(case, wasm, tmp_path):
    field, change = PASTED[case]
    result, output = validate_changed(change, tmp_path / f"{case}.yaml")
    expect(result.returncode != 0, f"envoy --mode validate with a secret in {case}", "a non-zero exit",
           f"exit 0\n{output[-2000:]}")
    expect(any(field in line and "must name an environment variable" in line for line in output.splitlines()),
           f"the error names {field} and says what to fix", f"a line with {field!r}", output[-2000:])
    expect(PASTED_SECRET not in output, "the pasted secret is not in Envoy's output", "absent", "it appears")

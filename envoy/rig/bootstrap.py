"""Envoy configs rendered from envoy/testbed.yaml: this port plan's ports, this
build of the filter and this plugin JSON, with the etcd store's cluster from
envoy/etcd-store.yaml. Tracked files are only read."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from .etcd import store_topology
from .paths import (APP_CLUSTER, NATIVE, STORE_CLUSTER, STORE_PASSWORD_ENV, TESTBED_YAML, WASM, WASM_FILTER,
                    WEBDIS_JSON)
from .ports import PortPlan


def store_password() -> str:
    """The password the filter sends webdis (its ACL's basic auth in envoy/webdis.json)."""
    for rule in json.loads(WEBDIS_JSON.read_text())["acl"]:
        if "http_basic_auth" in rule:
            return rule["http_basic_auth"].partition(":")[2]
    raise ValueError(f"{WEBDIS_JSON} has no http_basic_auth rule")


def envoy_env(module: str = "wasm", store: str = "webdis") -> dict[str, str]:
    """What an Envoy running envoy/testbed.yaml needs in its environment."""
    if store == "etcd":
        env = {STORE_PASSWORD_ENV: store_topology()["password"]}
    else:
        env = {STORE_PASSWORD_ENV: store_password()}
    if module == "native":
        env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(NATIVE.parent)
    return env


def load_bootstrap() -> dict:
    return yaml.safe_load(TESTBED_YAML.read_text())


def find_wasm_filter(bootstrap: dict) -> dict:
    """The wasm filter's `config` block in the listener's filter chain."""
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] == WASM_FILTER:
                        return http_filter["typed_config"]["config"]
    raise KeyError(f"no {WASM_FILTER} filter in {TESTBED_YAML}")


def default_filter_config(store: str = "webdis") -> dict:
    """The plugin JSON of envoy/testbed.yaml, parsed (tests read keys from it);
    with the etcd store, its store section is envoy/etcd-store.yaml's."""
    config = json.loads(find_wasm_filter(load_bootstrap())["configuration"]["value"])
    if store == "etcd":
        config["store"] = store_topology()["store"]
    return config


def use_native_module(bootstrap: dict):
    """Swaps the wasm filter for the native module with the same plugin JSON,
    and drops stateful_session: the module picks the host itself."""
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                filters = network_filter["typed_config"].get("http_filters", [])
                for index, http_filter in enumerate(filters):
                    if http_filter["name"] == WASM_FILTER:
                        filters[index] = native_filter(http_filter["typed_config"]["config"]["configuration"]["value"])
                filters[:] = [f for f in filters if f["name"] != "envoy.filters.http.stateful_session"]


def native_filter(plugin_json: str) -> dict:
    """The native module's http_filters entry (filter/native/envoy.yaml shows it to users)."""
    return {"name": "envoy.filters.http.dynamic_modules", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": {"name": NATIVE.stem.removeprefix("lib"), "do_not_close": True},
        "filter_name": "session_affinity",
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin_json},
    }}


def _endpoints(port_list) -> list[dict]:
    return [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        for port in port_list
    ]}]


def render_bootstrap(ports: PortPlan, listener: int, admin: int, filter_config: dict, wasm: Path = WASM,
                     module: str = "wasm", store: str = "webdis") -> dict:
    """envoy/testbed.yaml with this plan's ports, this .wasm (or the native module)
    and this plugin JSON (and with the etcd store, envoy/etcd-store.yaml's cluster)."""
    bootstrap = copy.deepcopy(load_bootstrap())
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = admin
    listeners = bootstrap["static_resources"]["listeners"]
    if len(listeners) != 1:
        raise ValueError(f"{TESTBED_YAML} must have exactly one listener, found {len(listeners)}")
    listeners[0]["address"]["socket_address"]["port_value"] = listener
    wasm_config = find_wasm_filter(bootstrap)
    wasm_config["vm_config"]["code"]["local"]["filename"] = str(wasm)
    wasm_config["configuration"]["value"] = json.dumps(filter_config, indent=1)
    clusters = bootstrap["static_resources"]["clusters"]
    for index, cluster in enumerate(clusters):
        if cluster["name"] == APP_CLUSTER:
            cluster["load_assignment"]["endpoints"] = _endpoints(ports.backends)
        elif cluster["name"] == STORE_CLUSTER and store == "etcd":
            clusters[index] = store_topology()["cluster"]
            clusters[index]["load_assignment"]["endpoints"] = _endpoints(ports.etcd[:3])
        elif cluster["name"] == STORE_CLUSTER:
            cluster["load_assignment"]["endpoints"] = _endpoints([ports.webdis])
    if module == "native":
        use_native_module(bootstrap)
    return bootstrap


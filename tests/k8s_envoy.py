"""Turning the Istio manifests in k8s/ into an Envoy config that the real Envoy
can check and run, without a cluster.

istiod would generate a proxy's listeners and clusters, apply the EnvoyFilter
patches to them, and serve the Wasm module config over ECDS; the Istio agent
would download the module and check its sha256. Here:
- `skeleton()` builds the part istiod generates, reduced to what matters to the
  filter: Istio's names (listener 0.0.0.0_8080, cluster
  outbound|8080||demo.<ns>.svc.cluster.local), an EDS cluster, the gateway's or
  the sidecar's route with the retry policy istiod derives from the
  VirtualService, and a few of Istio's HTTP filters before the router. It is not istiod's full output (no mTLS, no
  Istio-only filters such as istio.stats).
- `apply_envoyfilter()` applies EnvoyFilter configPatches with Istio's
  semantics for the operations k8s/ uses; anything else raises, so the subset
  cannot silently grow.
- `wasmplugin_filter()` does what istiod does with a WasmPlugin.
- `agent_fetch()` does what the Istio agent does with a remote module: it maps
  the URL to a local file, checks the sha256 and rewrites the code source to
  that file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import yaml

ENVOY = os.environ.get("ENVOY_BIN", "envoy")
HCM = "envoy.filters.network.http_connection_manager"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
TYPED_EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"


def app_cluster(namespace: str) -> str:
    return f"outbound|8080||demo.{namespace}.svc.cluster.local"


def istio_retry_policy(http_route: dict | None = None) -> dict | None:
    """The route retry policy istiod derives from a VirtualService http route
    (retry.ConvertPolicy): its default without `retries`, none with
    `attempts: 0`, else the default with the attempts and retryOn given."""
    retries = (http_route or {}).get("retries")
    if retries is not None:
        if retries.get("attempts", 0) <= 0:
            return None
        if set(retries) - {"attempts"}:
            raise NotImplementedError(f"retries fields {sorted(retries)}")
        return {**istio_retry_policy(), "num_retries": retries["attempts"]}
    return {
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2,
        "retriable_status_codes": [503],
        "host_selection_retry_max_attempts": 5,
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
        }],
    }


def skeleton(kind: str, namespace: str, listen_port: int, admin_port: int, eds_path: Path,
             http_route: dict | None = None) -> tuple[dict, dict]:
    """An Istio-shaped bootstrap for a gateway ("gateway") or for a client's
    sidecar outbound side ("sidecar"). Returns the bootstrap and the Istio
    view of it: the context and Istio port of each listener (the socket binds
    `listen_port` on 127.0.0.1; Istio's port is 8080) and the context of each
    cluster, for matching patches. `http_route` is the VirtualService http
    route to the app, if any: it decides the route's retry policy."""
    cluster = app_cluster(namespace)
    host = f"demo.{namespace}.svc.cluster.local"
    if kind == "gateway":
        context, route_name = "GATEWAY", "http.8080"
        vhost = {"name": "*:8080", "domains": ["*"]}
    elif kind == "sidecar":
        context, route_name = "SIDECAR_OUTBOUND", "8080"
        vhost = {"name": f"{host}:8080",
                 "domains": [host, f"{host}:8080", "demo", "demo:8080", f"demo.{namespace}", f"demo.{namespace}:8080"]}
    else:
        raise ValueError(kind)
    vhost["routes"] = [{
        "name": "demo" if kind == "gateway" else "default",
        "match": {"prefix": "/"},
        "route": {"cluster": cluster, "timeout": "0s"},
    }]
    policy = istio_retry_policy(http_route)
    if policy is not None:
        vhost["routes"][0]["route"]["retry_policy"] = policy
    listener = {
        "name": "0.0.0.0_8080",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [{"filters": [{
            "name": HCM,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "outbound_0.0.0.0_8080",
                "route_config": {"name": route_name, "virtual_hosts": [vhost], "validate_clusters": False},
                "use_remote_address": kind == "gateway",
                "http_filters": [
                    {"name": "envoy.filters.http.cors",
                     "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
                    {"name": "envoy.filters.http.fault",
                     "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                    {"name": "envoy.filters.http.router",
                     "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                ],
            },
        }]}],
    }
    bootstrap = {
        "node": {"id": f"{kind}~127.0.0.1~test.{namespace}~{namespace}.svc.cluster.local", "cluster": f"{kind}.{namespace}"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [listener],
            "clusters": [{
                "name": cluster,
                "type": "EDS",
                "eds_cluster_config": {"service_name": cluster, "eds_config": {
                    "path_config_source": {"path": str(eds_path)}, "resource_api_version": "V3"}},
                "connect_timeout": "10s",
                "lb_policy": "LEAST_REQUEST",
                "circuit_breakers": {"thresholds": [{
                    "max_connections": 4294967295, "max_pending_requests": 4294967295,
                    "max_requests": 4294967295, "max_retries": 4294967295, "track_remaining": True}]},
            }],
        },
    }
    view = {"listeners": {"0.0.0.0_8080": {"context": context, "port": 8080}},
            "clusters": {cluster: context}, "context": context}
    return bootstrap, view


def apply_destination_rule(bootstrap: dict, namespace: str, rule: dict) -> None:
    """What istiod does with a DestinationRule's outlierDetection on the app's
    cluster (applyOutlierDetection in istiod); other traffic policies raise."""
    spec = rule["spec"]
    if spec["host"] not in ("demo", f"demo.{namespace}", f"demo.{namespace}.svc.cluster.local"):
        return
    policy = spec.get("trafficPolicy", {})
    if set(policy) - {"outlierDetection"} or set(spec) - {"host", "trafficPolicy"}:
        raise NotImplementedError(f"DestinationRule fields {sorted(spec)} {sorted(policy)}")
    outlier = policy["outlierDetection"]
    known = {"splitExternalLocalOriginErrors", "consecutiveLocalOriginFailures", "consecutive5xxErrors",
             "consecutiveGatewayErrors", "interval", "baseEjectionTime", "maxEjectionPercent", "minHealthPercent"}
    if set(outlier) - known:
        raise NotImplementedError(f"outlierDetection fields {sorted(set(outlier) - known)}")
    out = {"enforcing_success_rate": 0}
    for field, envoy in (("consecutive5xxErrors", "consecutive_5xx"),
                         ("consecutiveGatewayErrors", "consecutive_gateway_failure")):
        if field in outlier:
            out[envoy] = outlier[field]
            out[f"enforcing_{envoy}"] = 100 if outlier[field] > 0 else 0
    for field, envoy in (("interval", "interval"), ("baseEjectionTime", "base_ejection_time")):
        if field in outlier:
            out[envoy] = outlier[field]
    if outlier.get("maxEjectionPercent", 0) > 0:
        out["max_ejection_percent"] = outlier["maxEjectionPercent"]
    if outlier.get("splitExternalLocalOriginErrors"):
        out["split_external_local_origin_errors"] = True
        if outlier.get("consecutiveLocalOriginFailures", 0) > 0:
            out["consecutive_local_origin_failure"] = outlier["consecutiveLocalOriginFailures"]
            out["enforcing_consecutive_local_origin_failure"] = 100
        out["enforcing_local_origin_success_rate"] = 0
    for c in bootstrap["static_resources"]["clusters"]:
        if c["name"] == app_cluster(namespace):
            c["outlier_detection"] = out
            c.setdefault("common_lb_config", {})["healthy_panic_threshold"] = {
                "value": outlier.get("minHealthPercent", 0)}


def eds(cluster: str, endpoints: list[tuple[str, int]]) -> dict:
    """A ClusterLoadAssignment as istiod sends it: ready pods, HEALTHY."""
    return {"resources": [{
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": cluster,
        "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
             "health_status": "HEALTHY"} for ip, port in endpoints]}],
    }]}


def write_atomically(path: Path, data: dict) -> None:
    """Envoy's file-based xDS sees a change when the file is moved into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# EnvoyFilter patches, with Istio's semantics for the subset k8s/ uses.

class NotImplementedPatch(Exception):
    pass


def _context_ok(match: dict, context: str) -> bool:
    return match.get("context", "ANY") in ("ANY", context)


def _proto_merge(base, patch):
    """proto.Merge as istiod uses it for MERGE: messages merge field by field,
    repeated fields are appended, scalars are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _proto_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        return base + copy.deepcopy(patch)
    return copy.deepcopy(patch)


def apply_envoyfilter(bootstrap: dict, view: dict, envoyfilter: dict, ecds: dict) -> list[str]:
    """Applies the configPatches in order. EXTENSION_CONFIG resources go to
    `ecds` (name -> TypedExtensionConfig). Returns a line per applied patch."""
    applied = []
    for i, p in enumerate(envoyfilter["spec"]["configPatches"]):
        match, patch = p.get("match", {}), p["patch"]
        op, value = patch["operation"], patch.get("value")
        where = f"{envoyfilter['metadata']['name']}[{i}] {p['applyTo']} {op}"
        if set(match) - {"context", "listener", "cluster"}:
            raise NotImplementedPatch(f"{where}: match fields {sorted(match)}")
        if p["applyTo"] == "EXTENSION_CONFIG":
            if op != "ADD":
                raise NotImplementedPatch(where)
            ecds[value["name"]] = {"@type": TYPED_EXTENSION_CONFIG, **copy.deepcopy(value)}
            applied.append(f"{where} {value['name']}")
        elif p["applyTo"] == "HTTP_FILTER":
            applied += _patch_http_filters(bootstrap, view, match, op, value, where)
        elif p["applyTo"] == "CLUSTER":
            applied += _patch_clusters(bootstrap, view, match, op, value, where)
        else:
            raise NotImplementedPatch(where)
    return applied


def _patch_http_filters(bootstrap, view, match, op, value, where) -> list[str]:
    lm = match.get("listener", {})
    if set(lm) - {"portNumber", "name", "filterChain"} or set(lm.get("filterChain", {})) - {"filter"}:
        raise NotImplementedPatch(f"{where}: listener match {lm}")
    fm = lm.get("filterChain", {}).get("filter", {})
    sub = fm.get("subFilter", {}).get("name")
    applied = []
    for listener in bootstrap["static_resources"]["listeners"]:
        meta = view["listeners"][listener["name"]]
        if not _context_ok(match, meta["context"]):
            continue
        if "portNumber" in lm and lm["portNumber"] != meta["port"]:
            continue
        if "name" in lm and lm["name"] != listener["name"]:
            continue
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                if f["name"] != HCM or fm.get("name", HCM) != HCM:
                    continue
                filters = f["typed_config"]["http_filters"]
                names = [x["name"] for x in filters]
                if op in ("INSERT_BEFORE", "INSERT_AFTER"):
                    if sub is None:
                        raise NotImplementedPatch(f"{where}: {op} without subFilter")
                    if sub not in names:
                        continue  # Istio skips a patch whose anchor is missing
                    at = names.index(sub) + (op == "INSERT_AFTER")
                elif op == "INSERT_FIRST":
                    at = 0
                else:
                    raise NotImplementedPatch(where)
                filters.insert(at, copy.deepcopy(value))
                applied.append(f"{where} {value['name']} at {at} in {listener['name']}")
    return applied


def _patch_clusters(bootstrap, view, match, op, value, where) -> list[str]:
    clusters = bootstrap["static_resources"]["clusters"]
    if op == "ADD":
        if "cluster" in match:
            raise NotImplementedPatch(f"{where}: ADD with a cluster match")
        if not _context_ok(match, view["context"]):
            return []
        clusters.append(copy.deepcopy(value))
        view["clusters"][value["name"]] = view["context"]
        return [f"{where} {value['name']}"]
    if op != "MERGE":
        raise NotImplementedPatch(where)
    cm = match.get("cluster", {})
    if set(cm) - {"name", "service", "portNumber"}:
        raise NotImplementedPatch(f"{where}: cluster match {cm}")
    applied = []
    for i, c in enumerate(clusters):
        if c["name"] not in view["clusters"] or not _context_ok(match, view["clusters"][c["name"]]):
            continue
        parts = c["name"].split("|")
        if "name" in cm and cm["name"] != c["name"]:
            continue
        if "service" in cm and (len(parts) != 4 or parts[3] != cm["service"]):
            continue
        if "portNumber" in cm and (len(parts) != 4 or parts[1] != str(cm["portNumber"])):
            continue
        clusters[i] = _proto_merge(c, value)
        applied.append(f"{where} {c['name']}")
    return applied


# --------------------------------------------------------------------------
# What istiod does with a WasmPlugin, and what the Istio agent does with a
# remote module.

def wasmplugin_resource(plugin: dict) -> tuple[str, dict]:
    """The ECDS resource istiod builds for a WasmPlugin (extensions.go)."""
    ns, name, spec = plugin["metadata"]["namespace"], plugin["metadata"]["name"], plugin["spec"]
    env = {"key_values": {"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "1"}}
    if spec.get("imagePullPolicy", "UNSPECIFIED_POLICY") != "UNSPECIFIED_POLICY":
        env["key_values"]["ISTIO_META_WASM_IMAGE_PULL_POLICY"] = spec["imagePullPolicy"]
    host = [e["name"] for e in spec.get("vmConfig", {}).get("env", []) if e.get("valueFrom") == "HOST"]
    env["key_values"].update({e["name"]: e.get("value", "") for e in spec.get("vmConfig", {}).get("env", [])
                              if e.get("valueFrom", "INLINE") == "INLINE"})
    if host:
        env["host_env_keys"] = host
    config = {
        "name": f"{ns}.{name}",
        "root_id": spec.get("pluginName", ""),
        "vm_config": {
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"remote": {"http_uri": {"uri": spec["url"], "timeout": "30s", "cluster": "_"},
                                "sha256": spec.get("sha256", "")}},
            "environment_variables": env,
        },
    }
    if spec.get("pluginConfig"):
        config["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                   "value": json.dumps(spec["pluginConfig"], separators=(",", ":"))}
    resource_name = f"extensions.istio.io/wasmplugin/{ns}.{name}"
    return resource_name, {"@type": TYPED_EXTENSION_CONFIG, "name": resource_name,
                           "typed_config": {"@type": WASM_TYPE, "config": config}}


def insert_wasmplugin(bootstrap: dict, view: dict, plugin: dict, ecds: dict) -> str:
    """Adds the plugin's filter the way istiod does for a plugin without a
    phase: at the end of the chain, just before the router (only the
    listeners its match selects: mode CLIENT and the listed ports)."""
    name, resource = wasmplugin_resource(plugin)
    ecds[name] = resource
    ports = {p["number"] for m in plugin["spec"].get("match", []) for p in m.get("ports", [])}
    modes = {m.get("mode", "UNDEFINED") for m in plugin["spec"].get("match", [])} or {"UNDEFINED"}
    if not modes <= {"CLIENT", "CLIENT_AND_SERVER", "UNDEFINED"}:
        raise NotImplementedPatch(f"WasmPlugin match modes {modes}")
    for listener in bootstrap["static_resources"]["listeners"]:
        if ports and view["listeners"][listener["name"]]["port"] not in ports:
            continue
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                filters = f["typed_config"]["http_filters"]
                at = [x["name"] for x in filters].index("envoy.filters.http.router")
                filters.insert(at, {"name": name, "config_discovery": {
                    "config_source": {"ads": {}, "initial_fetch_timeout": "0s"}, "type_urls": [WASM_TYPE]}})
    return name


def agent_fetch(ecds: dict, modules: dict[str, Path]) -> None:
    """For every Wasm resource with a remote module: look its URL up in
    `modules`, check the sha256 like the Istio agent does, and point the code
    at the local file."""
    for resource in ecds.values():
        vm = resource["typed_config"]["config"]["vm_config"]
        remote = vm["code"].get("remote")
        if remote is None:
            continue
        uri = remote["http_uri"]["uri"]
        if uri not in modules:
            raise KeyError(f"no local file for the module at {uri}")
        digest = hashlib.sha256(Path(modules[uri]).read_bytes()).hexdigest()
        if remote.get("sha256") and remote["sha256"] != digest:
            raise ValueError(f"sha256 mismatch for {uri}: config {remote['sha256']}, file {digest}")
        vm["code"] = {"local": {"filename": str(modules[uri])}}


def resolve_ecds(bootstrap: dict, ecds: dict, workdir: Path | None = None) -> None:
    """Points every ECDS filter at its resource: inline (for --mode validate,
    which does not load ECDS resources), or from a file that Envoy watches
    (`workdir` given; the filter is then loaded over ECDS as in Istio)."""
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                for hf in f["typed_config"]["http_filters"]:
                    if "config_discovery" not in hf:
                        continue
                    name = hf["name"]
                    if name not in ecds:
                        raise KeyError(f"filter {name} asks ECDS for a resource nobody provides")
                    resource = ecds[name]
                    if resource["typed_config"]["@type"] not in hf["config_discovery"]["type_urls"]:
                        raise ValueError(f"ECDS resource {name} has a type the filter does not accept")
                    if workdir is None:
                        del hf["config_discovery"]
                        hf["typed_config"] = copy.deepcopy(resource["typed_config"])
                    else:
                        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
                        path = Path(workdir) / f"ecds-{digest}.json"
                        path.write_text(json.dumps({"resources": [resource]}))
                        hf["config_discovery"]["config_source"] = {
                            "path_config_source": {"path": str(path)}, "initial_fetch_timeout": "0s"}


def resolve_dns(bootstrap: dict, names: dict[tuple[str, int], tuple[str, int]]) -> None:
    """Replaces cluster endpoint addresses (what cluster DNS would answer)."""
    for c in bootstrap["static_resources"]["clusters"]:
        for group in c.get("load_assignment", {}).get("endpoints", []):
            for lb in group["lb_endpoints"]:
                sa = lb["endpoint"]["address"]["socket_address"]
                key = (sa["address"], sa["port_value"])
                if key in names:
                    sa["address"], sa["port_value"] = names[key]


def http_filter_names(bootstrap: dict) -> list[str]:
    listener = bootstrap["static_resources"]["listeners"][0]
    return [f["name"] for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]]


# --------------------------------------------------------------------------
# Running Envoy.

def envoy_validate(config: dict | str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`envoy --mode validate`: loads the .wasm in V8 and runs on_configure.
    `env` is Envoy's whole environment (None: this process's)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config if isinstance(config, str) else yaml.safe_dump(config))
    try:
        return subprocess.run([ENVOY, "--mode", "validate", "-c", f.name, "-l", "warning"],
                              capture_output=True, text=True, timeout=timeout,
                              env=os.environ if env is None else env)
    finally:
        os.unlink(f.name)

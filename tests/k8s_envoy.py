"""Turning the Istio manifests in k8s/ into an Envoy config that the real Envoy
can check and run, without a cluster.

istiod would generate a proxy's listeners and clusters, apply the EnvoyFilter
patches to them, and serve the Wasm module config over ECDS; the Istio agent
would download the module and check its sha256. Here:
- The skeletons build the part istiod generates, reduced to what matters to
  the filter, with Istio's names, routes and HTTP filters in istiod's order
  (its own extensions, such as istio.stats, by stand-ins under their names):
  `gateway_skeleton()` a gateway's listeners from a Gateway resource (HTTPS
  with the credentialName Secret's files, the redirect of an HTTP server with
  httpsRedirect), `sidecar_skeleton()` the sidecar of a client of the app
  (outbound port 8080, and a virtualInbound chain of its own), and
  `app_sidecar_skeleton()` an app pod's sidecar, inbound side
  (virtualInbound, the route istiod builds with or without its inbound retry
  policy, the inbound cluster). The app's cluster is EDS, and its route carries the
  retry policy istiod derives from the VirtualService. It is not istiod's
  full output (no mTLS, no authn/authz filters).
- `apply_envoyfilters()` applies the EnvoyFilters whose workloadSelector
  selects the proxy's pod, with Istio's semantics for the operations k8s/
  uses; anything else raises, so the subset cannot silently grow.
- `insert_wasmplugin()` does what istiod does with a WasmPlugin, under the
  filter name of each Istio version in ISTIO_VERSIONS.
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


def store_cluster(namespace: str) -> str:
    return f"outbound|7379||webdis.{namespace}.svc.cluster.local"


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


# The HTTP filters istiod puts on a listener (buildHTTPConnectionManager in
# pilot/pkg/networking/core/listener_builder.go, Istio 1.22 to 1.28), without
# the authentication and authorization filters that policies would add after
# the first one. WasmPlugins without a phase go right after those, before
# AFTER_PLUGINS[0]. Istio's own extensions (istio.*) are not in upstream Envoy:
# a header_mutation filter without mutations stands in for each, under Istio's
# name.
ISTIO_ONLY = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
AFTER_PLUGINS = {
    "outbound": ["envoy.filters.http.grpc_stats", "istio.alpn", "envoy.filters.http.fault",
                 "envoy.filters.http.cors", "istio.stats", "envoy.filters.http.router"],
    # No ALPN filter on a sidecar's inbound side.
    "inbound": ["envoy.filters.http.grpc_stats", "envoy.filters.http.fault",
                "envoy.filters.http.cors", "istio.stats", "envoy.filters.http.router"],
}
FILTER_TYPES = {
    "envoy.filters.http.grpc_stats": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
    "envoy.filters.http.fault": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
    "envoy.filters.http.cors": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors",
    "envoy.filters.http.router": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
}


def istio_http_filters(side: str) -> list[dict]:
    names = ["istio.metadata_exchange"] + AFTER_PLUGINS[side]
    return [{"name": n, "typed_config": {"@type": FILTER_TYPES.get(n, ISTIO_ONLY)}} for n in names]


def hcm(stat_prefix: str, route_config: dict, side: str, use_remote_address: bool) -> dict:
    return {
        "name": HCM,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": route_config,
            "use_remote_address": use_remote_address,
            "http_filters": istio_http_filters(side),
        },
    }


def static_cluster(name: str, address: str, port: int) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "10s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}}]}]}}


# The Istio versions modelled, from 1.24 (the oldest the manifests support).
# What differs between them here:
# - the name istiod gives a WasmPlugin's filter (wasmplugin_filter_name());
# - the inbound route's retry policy: from 1.24 on (with a proxy of the same
#   version, and ENABLE_INBOUND_RETRY_POLICY on, its default), istiod gives
#   the inbound route a retry policy (BuildDefaultHTTPInboundRoute in
#   pilot/pkg/networking/core/route/route.go). (1, 23) stands for a route
#   without it: an older istiod, or ENABLE_INBOUND_RETRY_POLICY=false.
ISTIO_VERSIONS = ((1, 24), (1, 25), (1, 26), (1, 29), (1, 30))
LATEST = ISTIO_VERSIONS[-1]
INBOUND_ROUTES = ((1, 23), LATEST)  # without and with the inbound retry policy


def wasmplugin_filter_name(namespace: str, name: str, istio: tuple[int, int]) -> str:
    """The HTTP filter (and ECDS resource) name istiod gives a WasmPlugin:
    with its typo up to 1.25, fixed in 1.26 (istio/istio#55348), and from
    1.30 the name of the TrafficExtension istiod translates the plugin to."""
    if istio >= (1, 30):
        return f"extensions.istio.io/trafficextension/{namespace}.{name}~istio-translated-wasmplugin"
    if istio >= (1, 26):
        return f"extensions.istio.io/wasmplugin/{namespace}.{name}"
    return f"extenstions.istio.io/wasmplugin/{namespace}.{name}"


def inbound_route_config(port: int, istio: tuple[int, int]) -> dict:
    """The route configuration istiod builds inline in a sidecar's inbound
    HTTP connection manager (buildSidecarInboundHTTPRouteConfig in
    pilot/pkg/networking/core/httproute.go): named after the inbound cluster,
    one wildcard virtual host, one route without timeouts."""
    cluster = f"inbound|{port}||"
    route = {"cluster": cluster, "timeout": "0s",
             "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"}}
    if istio >= (1, 24):
        route["retry_policy"] = {"retry_on": "reset-before-request", "num_retries": 2}
    return {"name": cluster, "validate_clusters": False, "virtual_hosts": [{
        "name": f"inbound|http|{port}", "domains": ["*"],
        "routes": [{"name": "default", "match": {"prefix": "/"}, "route": route}]}]}


def virtual_inbound(port: int, bind_port: int | None, istio: tuple[int, int]) -> dict:
    """A sidecar's virtualInbound listener with the HTTP chain of `port`.
    Istio binds it on 15006 and iptables sends it the pod's inbound
    connections, whose original destination port selects the chain. Bound
    here on 127.0.0.1:`bind_port` (the chain then matches that port), or not
    bound at all (None)."""
    listener = {
        "name": "virtualInbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": bind_port or 15006}},
        "filter_chains": [{"filter_chain_match": {"destination_port": bind_port or port},
                           "filters": [hcm(f"inbound_0.0.0.0_{port}", inbound_route_config(port, istio),
                                           "inbound", False)]}],
    }
    if bind_port is None:
        listener["bind_to_port"] = False
    return listener


def outbound_clusters(namespace: str, eds_path: Path) -> list[dict]:
    """The app's cluster (EDS, as istiod sends it) and webdis' (its address is
    the Service's name, for resolve_dns)."""
    cluster = app_cluster(namespace)
    return [{
        "name": cluster,
        "type": "EDS",
        "eds_cluster_config": {"service_name": cluster, "eds_config": {
            "path_config_source": {"path": str(eds_path)}, "resource_api_version": "V3"}},
        "connect_timeout": "10s",
        "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": {"thresholds": [{
            "max_connections": 4294967295, "max_pending_requests": 4294967295,
            "max_requests": 4294967295, "max_retries": 4294967295, "track_remaining": True}]},
    }, static_cluster(store_cluster(namespace), f"webdis.{namespace}.svc.cluster.local", 7379)]


def app_route(name: str, namespace: str, http_route: dict | None) -> dict:
    """The route to the app istiod derives from a VirtualService http route."""
    route = {"name": name, "match": {"prefix": "/"}, "route": {"cluster": app_cluster(namespace), "timeout": "0s"}}
    policy = istio_retry_policy(http_route)
    if policy is not None:
        route["route"]["retry_policy"] = policy
    return route


def proxy_bootstrap(kind: str, namespace: str, admin_port: int, listeners: list[dict], clusters: list[dict],
                    chains: dict, cluster_contexts: dict) -> tuple[dict, dict]:
    """The bootstrap, and the Istio view of it that patches match against:
    the context and Istio port of each filter chain, the context of each
    cluster."""
    bootstrap = {
        "node": {"id": f"{kind}~127.0.0.1~test.{namespace}~{namespace}.svc.cluster.local", "cluster": f"{kind}.{namespace}"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    return bootstrap, {"chains": chains, "clusters": cluster_contexts}


def gateway_tls(credential: tuple[Path, Path]) -> dict:
    """A gateway's HTTPS server (tls mode SIMPLE): the certificate istiod
    serves it from the credentialName Secret over SDS, here its files."""
    cert, key = credential
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [{"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}],
        },
    }}


def gateway_skeleton(namespace: str, gateway: dict, http_route: dict | None, listen: dict[int, int], admin_port: int,
                     eds_path: Path, credentials: dict[str, tuple[Path, Path]]) -> tuple[dict, dict]:
    """An Istio gateway's bootstrap from a Gateway resource: a listener
    0.0.0.0_<port> per server (bound on 127.0.0.1:listen[port]), the route
    config istiod names after the server (gatewayRDSRouteName in
    pilot/pkg/model/gateway.go), HTTPS with the credentialName Secret's files
    from `credentials`, and a redirect to HTTPS (require_tls ALL) on an HTTP
    server with httpsRedirect. `http_route` is the VirtualService http route
    bound to the gateway."""
    listeners, chains = [], {}
    for server in gateway["spec"]["servers"]:
        port, name, protocol = server["port"]["number"], server["port"]["name"], server["port"]["protocol"]
        tls = server.get("tls", {})
        if server["hosts"] != ["*"] or "bind" in server:
            raise NotImplementedError(f"Gateway server hosts {server['hosts']}, bind")
        vhost = {"name": f"*:{port}", "domains": ["*"], "routes": [app_route("demo", namespace, http_route)]}
        chain: dict = {}
        if protocol == "HTTPS":
            if set(tls) != {"mode", "credentialName"} or tls["mode"] != "SIMPLE":
                raise NotImplementedError(f"Gateway HTTPS tls {tls}")
            route_name = f"https.{port}.{name}.{gateway['metadata']['name']}.{namespace}"
            chain["transport_socket"] = gateway_tls(credentials[tls["credentialName"]])
        elif protocol == "HTTP":
            if set(tls) - {"httpsRedirect"}:
                raise NotImplementedError(f"Gateway HTTP tls {tls}")
            route_name = f"http.{port}"
            if tls.get("httpsRedirect"):
                vhost["require_tls"] = "ALL"
        else:
            raise NotImplementedError(f"Gateway protocol {protocol}")
        route_config = {"name": route_name, "virtual_hosts": [vhost], "validate_clusters": False}
        chain["filters"] = [hcm(f"outbound_0.0.0.0_{port}", route_config, "outbound", True)]
        listeners.append({"name": f"0.0.0.0_{port}",
                          "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen[port]}},
                          "filter_chains": [chain]})
        chains[(f"0.0.0.0_{port}", 0)] = {"context": "GATEWAY", "port": port}
    clusters = outbound_clusters(namespace, eds_path)
    return proxy_bootstrap("router", namespace, admin_port, listeners, clusters, chains,
                           {c["name"]: "GATEWAY" for c in clusters})


def sidecar_skeleton(namespace: str, listen_port: int, admin_port: int, eds_path: Path,
                     http_route: dict | None = None, istio: tuple[int, int] = LATEST) -> tuple[dict, dict]:
    """The sidecar of a client of the app: its outbound listener for the
    app's port 8080 (bound on 127.0.0.1:`listen_port`), with the route
    istiod derives from `http_route`, the mesh VirtualService's. It also gets
    Istio's virtualInbound listener with a chain for a port 8080 of its own
    (a labelled client may serve that port too), not bound, so that a patch
    meant for the outbound side shows where else it lands."""
    host = f"demo.{namespace}.svc.cluster.local"
    vhost = {"name": f"{host}:8080",
             "domains": [host, f"{host}:8080", "demo", "demo:8080", f"demo.{namespace}", f"demo.{namespace}:8080"],
             "routes": [app_route("default", namespace, http_route)]}
    route_config = {"name": "8080", "virtual_hosts": [vhost], "validate_clusters": False}
    listeners = [{
        "name": "0.0.0.0_8080",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [{"filters": [hcm("outbound_0.0.0.0_8080", route_config, "outbound", False)]}],
    }, virtual_inbound(8080, None, istio)]
    clusters = outbound_clusters(namespace, eds_path) + [static_cluster("inbound|8080||", "127.0.0.1", 8080)]
    contexts = {c["name"]: "SIDECAR_OUTBOUND" for c in clusters}
    contexts["inbound|8080||"] = "SIDECAR_INBOUND"
    chains = {("0.0.0.0_8080", 0): {"context": "SIDECAR_OUTBOUND", "port": 8080},
              ("virtualInbound", 0): {"context": "SIDECAR_INBOUND", "port": 8080}}
    return proxy_bootstrap("sidecar", namespace, admin_port, listeners, clusters, chains, contexts)


def app_sidecar_skeleton(namespace: str, listen_port: int, admin_port: int, app_port: int,
                         istio: tuple[int, int] = LATEST) -> tuple[dict, dict]:
    """The istio-proxy of an app pod, inbound side: what callers reach
    (127.0.0.1:`listen_port` stands for the pod's 8080) and the app it
    forwards to (127.0.0.1:`app_port`). Istio's inbound cluster is
    ORIGINAL_DST, bound to 127.0.0.6; a static one stands in for it.
    No mTLS, as everywhere here (envoy/sidecar.yaml runs the same inbound
    config with mTLS in the testbed's --mesh mode)."""
    cluster = static_cluster("inbound|8080||", "127.0.0.1", app_port)
    return proxy_bootstrap("sidecar", namespace, admin_port, [virtual_inbound(8080, listen_port, istio)], [cluster],
                           {("virtualInbound", 0): {"context": "SIDECAR_INBOUND", "port": 8080}},
                           {cluster["name"]: "SIDECAR_INBOUND"})


def apply_destination_rule(bootstrap: dict, namespace: str, rule: dict) -> None:
    """What istiod does with a DestinationRule's outlierDetection
    (applyOutlierDetection) and connectionPool.tcp.connectTimeout
    (applyConnectionPool) on the app's cluster; other fields raise."""
    spec = rule["spec"]
    if spec["host"] not in ("demo", f"demo.{namespace}", f"demo.{namespace}.svc.cluster.local"):
        return
    policy = spec.get("trafficPolicy", {})
    if set(policy) - {"outlierDetection", "connectionPool"} or set(spec) - {"host", "trafficPolicy"}:
        raise NotImplementedError(f"DestinationRule fields {sorted(spec)} {sorted(policy)}")
    pool = policy.get("connectionPool", {})
    if set(pool) - {"tcp"} or set(pool.get("tcp", {})) - {"connectTimeout"}:
        raise NotImplementedError(f"connectionPool fields {pool}")
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
            c["connect_timeout"] = pool.get("tcp", {}).get("connectTimeout", c["connect_timeout"])
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
    repeated fields are appended, scalars are replaced, except by their zero
    value (0, "", false: unset in proto3, so a MERGE cannot write it over a
    set value; {num_retries: 0} leaves a route's 2 retries)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if k in base and not isinstance(v, (dict, list)) and not v:
                continue
            out[k] = _proto_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        return base + copy.deepcopy(patch)
    return copy.deepcopy(patch)


GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


def selects(envoyfilter: dict, labels: dict[str, str]) -> bool:
    """Whether an EnvoyFilter applies to a pod with these labels: its
    targetRefs name the Gateway API Gateway whose pods Istio deployed (they
    carry the Gateway's name as a label), or its workloadSelector selects
    them (neither: every proxy of its namespace)."""
    spec = envoyfilter["spec"]
    if "targetRefs" in spec:
        for ref in spec["targetRefs"]:
            if (ref.get("group"), ref["kind"]) != ("gateway.networking.k8s.io", "Gateway"):
                raise NotImplementedPatch(f"{envoyfilter['metadata']['name']}: targetRefs {ref}")
        return labels.get(GATEWAY_NAME_LABEL) in {ref["name"] for ref in spec["targetRefs"]}
    wanted = spec.get("workloadSelector", {}).get("labels", {})
    return all(labels.get(k) == v for k, v in wanted.items())


def apply_envoyfilters(bootstrap: dict, view: dict, envoyfilters: list[dict], ecds: dict,
                       labels: dict[str, str]) -> list[str]:
    """Applies the EnvoyFilters that select a pod with `labels` as istiod
    does: by priority, then in the given order (istiod: creation time, then
    name)."""
    applied = []
    for ef in sorted(envoyfilters, key=lambda ef: ef["spec"].get("priority", 0)):
        if selects(ef, labels):
            applied += apply_envoyfilter(bootstrap, view, ef, ecds)
    return applied


def apply_envoyfilter(bootstrap: dict, view: dict, envoyfilter: dict, ecds: dict) -> list[str]:
    """Applies the configPatches in order. EXTENSION_CONFIG resources go to
    `ecds` (name -> TypedExtensionConfig). Returns a line per applied patch."""
    applied = []
    for i, p in enumerate(envoyfilter["spec"]["configPatches"]):
        match, patch = p.get("match", {}), p["patch"]
        op, value = patch["operation"], patch.get("value")
        where = f"{envoyfilter['metadata']['name']}[{i}] {p['applyTo']} {op}"
        if set(match) - {"context", "listener", "cluster", "routeConfiguration"}:
            raise NotImplementedPatch(f"{where}: match fields {sorted(match)}")
        if p["applyTo"] == "EXTENSION_CONFIG":
            if op != "ADD":
                raise NotImplementedPatch(where)
            ecds[value["name"]] = {"@type": TYPED_EXTENSION_CONFIG, **copy.deepcopy(value)}
            applied.append(f"{where} {value['name']}")
        elif p["applyTo"] in ("HTTP_FILTER", "NETWORK_FILTER"):
            applied += _patch_listeners(bootstrap, view, p["applyTo"], match, op, value, where)
        elif p["applyTo"] == "CLUSTER":
            applied += _patch_clusters(bootstrap, view, match, op, value, where)
        elif p["applyTo"] == "ROUTE_CONFIGURATION":
            applied += _patch_route_configurations(bootstrap, view, match, op, value, where)
        elif p["applyTo"] == "HTTP_ROUTE":
            applied += _patch_gateway_routes(bootstrap, view, match, op, value, where)
        else:
            raise NotImplementedPatch(where)
    return applied


def _matching_hcms(bootstrap: dict, view: dict, match: dict, where: str):
    """(listener name, HCM typed_config) of every filter chain the match
    selects, with istiod's rules (listenerMatch and filterChainMatch in
    pilot/pkg/networking/core/envoyfilter/listener_patch.go): on the virtual
    listeners, portNumber is the filter chain's destination port."""
    lm = match.get("listener", {})
    if set(lm) - {"portNumber", "name", "filterChain"} or set(lm.get("filterChain", {})) - {"filter"}:
        raise NotImplementedPatch(f"{where}: listener match {lm}")
    if lm.get("filterChain", {}).get("filter", {}).get("name", HCM) != HCM:
        raise NotImplementedPatch(f"{where}: only the HTTP connection manager is matched here")
    for listener in bootstrap["static_resources"]["listeners"]:
        for index, chain in enumerate(listener["filter_chains"]):
            meta = view["chains"][(listener["name"], index)]
            if not _context_ok(match, meta["context"]):
                continue
            if "portNumber" in lm and lm["portNumber"] != meta["port"]:
                continue
            if "name" in lm and lm["name"] != listener["name"]:
                continue
            for f in chain["filters"]:
                if f["name"] == HCM:
                    yield listener["name"], f


def _patch_listeners(bootstrap, view, apply_to, match, op, value, where) -> list[str]:
    sub = match.get("listener", {}).get("filterChain", {}).get("filter", {}).get("subFilter", {}).get("name")
    applied = []
    for listener, hcm_filter in _matching_hcms(bootstrap, view, match, where):
        if apply_to == "NETWORK_FILTER":
            if op != "MERGE":
                raise NotImplementedPatch(where)
            if value.get("typed_config", {}).get("@type") != hcm_filter["typed_config"]["@type"]:
                raise NotImplementedPatch(f"{where}: MERGE needs the HCM's @type")
            hcm_filter["typed_config"] = _proto_merge(hcm_filter["typed_config"], value["typed_config"])
            applied.append(f"{where} in {listener}")
            continue
        filters = hcm_filter["typed_config"]["http_filters"]
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
        applied.append(f"{where} {value['name']} at {at} in {listener}")
    return applied


def _patch_route_configurations(bootstrap, view, match, op, value, where) -> list[str]:
    """ROUTE_CONFIGURATION MERGE on the route configurations held in the
    connection managers (a sidecar's inbound ones; istiod sends outbound ones
    over RDS, and patches those the same way), with istiod's
    routeConfigurationMatch for sidecars (envoyfilter/rc_patch.go): an exact
    name, and portNumber is the port in the name ("inbound|8080||", or "8080"
    outbound). Gateway route names carry more (gateway, port name): not
    implemented."""
    rm = match.get("routeConfiguration", {})
    if op != "MERGE" or set(rm) - {"portNumber", "name"}:
        raise NotImplementedPatch(f"{where}: route configuration match {rm}")
    applied = []
    for listener in bootstrap["static_resources"]["listeners"]:
        for index, chain in enumerate(listener["filter_chains"]):
            context = view["chains"][(listener["name"], index)]["context"]
            if not _context_ok(match, context):
                continue
            if context == "GATEWAY":
                raise NotImplementedPatch(f"{where}: route configurations of a gateway")
            for f in (f for f in chain["filters"] if f["name"] == HCM):
                rc = f["typed_config"]["route_config"]
                name = rc["name"]
                port = parse_cluster_name(name)[3] if name.startswith("inbound") else int(name) if name.isdigit() else 0
                if rm.get("name", name) != name or rm.get("portNumber", port) != port:
                    continue
                f["typed_config"]["route_config"] = _proto_merge(rc, value)
                applied.append(f"{where} {name} in {listener['name']}")
    return applied


def _patch_gateway_routes(bootstrap, view, match, op, value, where) -> list[str]:
    """HTTP_ROUTE MERGE on every route of a gateway's route configurations
    whose port (istiod's gateway route names: <protocol>.<port>.<...>) is the
    match's portNumber; no virtual host or route match."""
    rm = match.get("routeConfiguration", {})
    if op != "MERGE" or set(rm) != {"portNumber"} or match.get("context") != "GATEWAY":
        raise NotImplementedPatch(f"{where}: HTTP_ROUTE match {match}")
    applied = []
    for listener in bootstrap["static_resources"]["listeners"]:
        for index, chain in enumerate(listener["filter_chains"]):
            if view["chains"][(listener["name"], index)]["context"] != "GATEWAY":
                continue
            for f in (f for f in chain["filters"] if f["name"] == HCM):
                rc = f["typed_config"]["route_config"]
                if int(rc["name"].split(".")[1]) != rm["portNumber"]:
                    continue
                for vhost in rc["virtual_hosts"]:
                    vhost["routes"] = [_proto_merge(r, value) for r in vhost["routes"]]
                applied.append(f"{where} {rc['name']} in {listener['name']}")
    return applied


def parse_cluster_name(name: str) -> tuple[str, str, str, int]:
    """model.ParseSubsetKey: direction, subset, hostname, port of an Istio
    cluster name ("outbound|8080|v1|demo.ns.svc.cluster.local")."""
    parts = name.split("|")
    if len(parts) != 4:
        return "", "", "", 0
    return parts[0], parts[2], parts[3], int(parts[1] or 0)


def _patch_clusters(bootstrap, view, match, op, value, where) -> list[str]:
    """CLUSTER MERGE with istiod's clusterMatch (cluster_patch.go): an exact
    name, or any of service, subset, portNumber. Inbound clusters carry no
    service name here (istiod would use the proxy's own services)."""
    if op != "MERGE":
        raise NotImplementedPatch(where)
    cm = match.get("cluster", {})
    if set(cm) - {"name", "service", "subset", "portNumber"}:
        raise NotImplementedPatch(f"{where}: cluster match {cm}")
    clusters = bootstrap["static_resources"]["clusters"]
    applied = []
    for i, c in enumerate(clusters):
        if c["name"] not in view["clusters"] or not _context_ok(match, view["clusters"][c["name"]]):
            continue
        _, subset, hostname, port = parse_cluster_name(c["name"])
        if "name" in cm:
            if cm["name"] != c["name"]:
                continue
        elif (("subset" in cm and cm["subset"] != subset) or ("service" in cm and cm["service"] != hostname)
              or ("portNumber" in cm and cm["portNumber"] != port)):
            continue
        clusters[i] = _proto_merge(c, value)
        applied.append(f"{where} {c['name']}")
    return applied


# --------------------------------------------------------------------------
# What istiod does with a WasmPlugin, and what the Istio agent does with a
# remote module.

def wasmplugin_resource(plugin: dict, istio: tuple[int, int]) -> tuple[str, dict]:
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
    resource_name = wasmplugin_filter_name(ns, name, istio)
    return resource_name, {"@type": TYPED_EXTENSION_CONFIG, "name": resource_name,
                           "typed_config": {"@type": WASM_TYPE, "config": config}}


def insert_wasmplugin(bootstrap: dict, view: dict, plugin: dict, ecds: dict, labels: dict[str, str],
                      istio: tuple[int, int] = LATEST) -> str | None:
    """Adds the plugin's filter where istiod puts a plugin without a phase:
    after the authentication and authorization filters, before the filters
    istiod appends last (AFTER_PLUGINS). Only on a pod its selector selects,
    and on the chains its match selects: mode CLIENT (gateways, sidecars'
    outbound side) and the listed ports."""
    if set(plugin["spec"].get("selector", {})) - {"matchLabels"}:
        raise NotImplementedPatch(f"WasmPlugin selector {plugin['spec']['selector']}")
    if any(labels.get(k) != v for k, v in plugin["spec"].get("selector", {}).get("matchLabels", {}).items()):
        return None
    name, resource = wasmplugin_resource(plugin, istio)
    ecds[name] = resource
    if plugin["spec"].get("phase", "UNSPECIFIED_PHASE") != "UNSPECIFIED_PHASE":
        raise NotImplementedPatch(f"WasmPlugin phase {plugin['spec']['phase']}")
    ports = {p["number"] for m in plugin["spec"].get("match", []) for p in m.get("ports", [])}
    modes = {m.get("mode", "UNDEFINED") for m in plugin["spec"].get("match", [])} or {"UNDEFINED"}
    if modes != {"CLIENT"}:
        raise NotImplementedPatch(f"WasmPlugin match modes {modes}")
    for listener in bootstrap["static_resources"]["listeners"]:
        for index, chain in enumerate(listener["filter_chains"]):
            meta = view["chains"][(listener["name"], index)]
            if meta["context"] == "SIDECAR_INBOUND" or (ports and meta["port"] not in ports):
                continue
            for f in chain["filters"]:
                filters = f["typed_config"]["http_filters"]
                at = next(i for i, x in enumerate(filters) if x["name"] in AFTER_PLUGINS["outbound"])
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


def http_connection_managers(bootstrap: dict) -> dict[tuple[str, int], dict]:
    """(listener name, filter chain index) -> the HCM's typed_config."""
    return {(listener["name"], i): f["typed_config"]
            for listener in bootstrap["static_resources"]["listeners"]
            for i, chain in enumerate(listener["filter_chains"])
            for f in chain["filters"] if f["name"] == HCM}


def http_filter_names(hcm_config: dict) -> list[str]:
    return [f["name"] for f in hcm_config["http_filters"]]


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

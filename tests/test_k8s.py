"""Proof for k8s/ without a cluster.

- Every manifest and every rendered overlay validates: Kubernetes kinds against
  the schemas of `kubernetes-validate` (strict), Istio kinds against the CRDs'
  OpenAPI schemas vendored in k8s/schemas (unknown fields and CEL rules
  checked).
- What the manifests promise an operator holds: every listener patch names
  its context, relative patches have a priority (istioctl analyze's
  EnvoyFilter checks, ported), the proxies refuse header names with
  underscores, Redis has a memory bound below its container's limit and an
  ACL that covers the filter's Lua scripts and nothing more, webdis answers
  only the proxies' credentials, and only the proxies' pods may reach it.
- The Istio manifests, applied to an Istio-shaped Envoy config (tests/k8s_envoy.py),
  give a config that the real Envoy accepts with the real filter module, and
  refuses when the key's environment variable is missing.
- The same assembled config, run on 127.0.0.1 in front of real demo backends
  and a real Redis + webdis (configured from the manifests), keeps sessions
  sticky and keeps a session's state when its pod is deleted (the pod's
  endpoint leaves EDS, as in Kubernetes).
- Every overlay is assembled as istiod 1.24, 1.25, 1.26, 1.29 and 1.30 would
  (their WasmPlugin filter names); the Gateway API overlay, validated against
  the vendored Gateway API CRDs, aims the EnvoyFilter at the Gateway's pods.
- The etcd StatefulSet's config script, the auth Job and the maintenance
  CronJob run as written against three real etcd members over TLS, and a
  member that lost its data rejoins; Redis with the AOF overlay keeps its
  data across a SIGKILL.
- The plain-Envoy gateway's ConfigMap is what the generator derives from
  envoy/testbed.yaml, and Envoy accepts it; the same for its etcd variant
  (envoy-gateway-etcd), whose store cluster names every member of the etcd
  StatefulSet, which runs with pre-vote and auto-compaction and admits only
  the proxies.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml

import k8s_envoy as ke
import k8s_manifests as km
from harness import require_tool, tb  # tb is envoy/rig, the other e2e tests' harness

REPO = km.REPO
K8S = km.K8S
NAMESPACE = "session-demo"
TEST_KEY = "k8s-test-key-0123456789-abcdefghijklmnop"  # 40 bytes, test only
TEST_STORE_PASSWORD = "k8s-test-store-password-0123456"  # test only
TEST_REDIS_PASSWORD = "k8s-test-redis-password-0123456"  # test only

OVERLAYS = [p.name for p in km.overlay_dirs()]
MANIFEST_DOCS = [(f, i, d) for f in km.manifest_files() for i, d in enumerate(km.load_docs(f))]


def doc_id(item) -> str:
    f, i, d = item
    return f"{f.relative_to(K8S)}#{d['kind']}/{d['metadata']['name']}"


def rendered(overlay: str) -> dict[tuple[str, str], dict]:
    """The overlay's objects, and the Deployments Istio generates for its
    Gateway API gateways."""
    docs = km.render(K8S / "overlays" / overlay)
    return {(d["kind"], d["metadata"]["name"]): d for d in docs + istio_gateway_deployments(docs)}


def istio_gateway_deployments(docs: list[dict]) -> list[dict]:
    """The Deployment istiod generates for each Gateway API Gateway of class
    istio (its gateway template, reduced to what the tests check): named
    <gateway>-istio, running as the service account of that name, its pods
    labelled with the Gateway's name and infrastructure.labels, and the
    `deployment` key of the infrastructure.parametersRef ConfigMap merged in."""
    out = []
    for gw in (d for d in docs if d["kind"] == "Gateway" and d["apiVersion"].startswith("gateway.networking.k8s.io/")):
        assert gw["spec"]["gatewayClassName"] == "istio"
        infra, name = gw["spec"].get("infrastructure", {}), f"{gw['metadata']['name']}-istio"
        labels = {**infra.get("labels", {}), ke.GATEWAY_NAME_LABEL: gw["metadata"]["name"]}
        deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                      "metadata": {"name": name, "namespace": gw["metadata"]["namespace"]},
                      "spec": {"replicas": 1, "template": {"metadata": {"labels": labels}, "spec": {
                          "serviceAccountName": name, "containers": [{"name": "istio-proxy", "image": "auto"}]}}}}
        if "parametersRef" in infra:
            ref = infra["parametersRef"]
            assert (ref["group"], ref["kind"]) == ("", "ConfigMap"), ref
            options = one(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["name"])
            deployment = km.strategic_merge(deployment, yaml.safe_load(options["data"]["deployment"]), True)
        out.append(deployment)
    return out


@pytest.fixture(scope="session")
def wasm_module() -> Path:
    """The filter module; built with filter/build when it is missing."""
    require_tool(ke.ENVOY)
    return tb.ensure_wasm()


def readme_certificate_command() -> str:
    """The openssl command k8s/README.md gives for the gateways' TLS Secret."""
    blocks = re.findall(r"```sh\n(.*?)```", (K8S / "README.md").read_text(), re.S)
    block = one(b for b in blocks if "create secret tls" in b).replace("\\\n", " ")
    return re.search(r"openssl req [^&\n]*", block).group(0).strip()


@pytest.fixture(scope="session")
def gateway_certificate(tmp_path_factory) -> tuple[Path, Path]:
    """tls.crt and tls.key, made by the README's own command."""
    require_tool("openssl")
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(["sh", "-c", readme_certificate_command()], cwd=directory, check=True, capture_output=True,
                   timeout=60)
    return directory / "tls.crt", directory / "tls.key"


# --------------------------------------------------------------------------
# Static validation.

@pytest.mark.parametrize("item", MANIFEST_DOCS, ids=doc_id)
def test_manifest_validates(item):
    _, _, doc = item
    km.validate(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = km.render(K8S / "overlays" / overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service"} <= kinds
    for d in docs:
        km.validate(d)
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == NAMESPACE, km.ident(d)
    assert "Secret" not in kinds, "no Secret is shipped: the keys are created with kubectl (k8s/README.md)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_workloads_are_pinned_and_probed(overlay):
    docs = rendered(overlay)
    for (kind, name), d in docs.items():
        if kind != "Deployment":
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            image = c["image"]
            if image == "auto":  # filled in by Istio's injector
                continue
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: unpinned {image}"
    for name in ("demo", *store_workloads(docs)):
        c = pod_templates(docs)[name]["spec"]["containers"][0]
        assert "readinessProbe" in c and "livenessProbe" in c, name
    demo = docs[("Deployment", "demo")]["spec"]
    assert demo["replicas"] == 3
    app = demo["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in app["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The instance id is the pod name plus the app's per-start random suffix.
    assert app["args"][app["args"].index("--name") + 1] == "$(POD_NAME)" and "--instance" not in app["args"]


def test_renderer_matches_kubectl_kustomize():
    """The renderer in k8s_manifests.py against a real kustomize, where one is
    installed (kubectl's built-in `kubectl kustomize`)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the renderer is checked by the other tests only")
    probe = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    version = json.loads(probe.stdout or "{}").get("kustomizeVersion", "") if probe.returncode == 0 else ""
    major = re.match(r"v(\d+)\.", version)
    if not major or int(major.group(1)) < 4:  # `patches:` needs kustomize 4+ (Debian's kubectl 1.20 has v2)
        pytest.skip(f"kubectl has no kustomize 4+ ({version or 'none'})")
    for d in km.kustomize_dirs():
        out = subprocess.run([kubectl, "kustomize", str(d)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{d}: {out.stderr}"
        theirs = {km.ident(x): x for x in yaml.safe_load_all(out.stdout) if x}
        ours = {km.ident(x): x for x in km.render(d)}
        assert ours == theirs, f"{d.relative_to(K8S)}: renderer and kubectl kustomize differ"


def test_validators_reject_bad_manifests():
    """The validators are not rubber stamps."""
    ef = km.load_docs(K8S / "istio" / "envoyfilter" / "envoyfilter.yaml")[0]
    wp = km.load_docs(K8S / "istio" / "wasmplugin" / "wasmplugin.yaml")[0]
    demo = km.load_docs(K8S / "base" / "demo.yaml")[0]
    bad = []
    x = copy.deepcopy(ef); x["spec"]["configPatches"][1]["match"]["listener"]["portNumbr"] = 8080; bad.append(x)
    x = copy.deepcopy(ef); x["spec"]["configPatches"][0]["applyTo"] = "HTTP_FILTERS"; bad.append(x)
    x = copy.deepcopy(ef); x["spec"]["targetRefs"] = [{"kind": "Gateway", "name": "g"}]; bad.append(x)  # CEL
    x = copy.deepcopy(wp); x["spec"]["vmConfig"]["env"][0]["value"] = "inline"; bad.append(x)  # CEL
    x = copy.deepcopy(wp); x["spec"]["sha256"] = "abc"; bad.append(x)
    x = copy.deepcopy(wp); x["spec"]["url"] = "ftp://example.com/x.wasm"; bad.append(x)  # CEL
    x = copy.deepcopy(demo); x["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3; bad.append(x)
    x = copy.deepcopy(demo); x["spec"]["replica"] = 3; bad.append(x)
    policy = next(d for d in km.load_docs(K8S / "istio" / "gateway" / "gateway.yaml")
                  if d["kind"] == "AuthorizationPolicy")
    x = copy.deepcopy(policy); x["spec"]["rules"][0]["from"][0]["source"]["principal"] = ["x"]; bad.append(x)
    x = copy.deepcopy(policy); x["spec"]["action"] = "PERMIT"; bad.append(x)
    for doc in bad:
        with pytest.raises(AssertionError):
            km.validate(doc)


def test_cel_rules_all_translated():
    """Every CEL rule in the Istio CRDs has a translation in k8s_manifests."""
    rules = set()

    def walk(node):
        if isinstance(node, dict):
            rules.update(r["rule"] for r in node.get("x-kubernetes-validations", []))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(list(km.istio_schemas().values()))
    assert rules and rules <= set(km.CEL_RULES), sorted(rules - set(km.CEL_RULES))


# --------------------------------------------------------------------------
# What the overlays promise an operator.

ISTIO_OVERLAYS = [o for o in OVERLAYS if o.startswith("istio-")]


WORKLOADS = ("Deployment", "StatefulSet")


def pod_templates(docs: dict) -> dict[str, dict]:
    """Deployment or StatefulSet name -> its pod template."""
    return {name: d["spec"]["template"] for (kind, name), d in docs.items() if kind in WORKLOADS}


def workload(docs: dict, name: str) -> dict:
    return next(d for (kind, n), d in docs.items() if kind in WORKLOADS and n == name)


def store_workloads(docs: dict) -> tuple[str, ...]:
    """The session store's workloads: etcd's members, or webdis and Redis."""
    return ("etcd",) if ("StatefulSet", "etcd") in docs else ("webdis", "redis")


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions)."""
    if set(selector) - {"matchLabels", "matchExpressions"}:
        raise NotImplementedError(selector)
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        value = labels.get(e["key"])
        ok &= {"In": value in e.get("values", []), "NotIn": value not in e.get("values", []),
               "Exists": value is not None, "DoesNotExist": value is None}[e["operator"]]
    return ok


def proxies(docs: dict) -> set[str]:
    """The Deployments whose pods run the filter (the label the EnvoyFilter and
    WasmPlugin select; the plain Envoy gateway carries it too)."""
    return {name for name, t in pod_templates(docs).items()
            if t["metadata"]["labels"].get("session-affinity") == "enabled"}


def admitted(docs: dict, target: str) -> set[str]:
    """The Deployments whose pods the NetworkPolicies let reach `target`'s pods.
    Every peer must be a podSelector alone: pods of the policy's namespace."""
    pods = {name: t["metadata"]["labels"] for name, t in pod_templates(docs).items()}
    policies = [d for (kind, _), d in docs.items()
                if kind == "NetworkPolicy" and selects(d["spec"]["podSelector"], pods[target])]
    assert policies and all("Ingress" in p["spec"]["policyTypes"] for p in policies), target
    out = set()
    for rule in (r for p in policies for r in p["spec"].get("ingress", [])):
        assert rule.get("from"), f"a rule without 'from' admits everyone to {target}"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, peer
            out |= {name for name, labels in pods.items() if selects(peer["podSelector"], labels)}
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_proxies_reach_the_app_and_the_store(overlay):
    """NetworkPolicies admit to the app and webdis exactly the pods that run
    the filter (not the app, not the store, not a client that does not run
    it), and only webdis to Redis."""
    docs = rendered(overlay)
    assert proxies(docs)
    assert admitted(docs, "demo") == proxies(docs)
    if store_workloads(docs) == ("etcd",):
        assert admitted(docs, "etcd") == proxies(docs) | {"etcd"}  # members reach each other
        return
    assert admitted(docs, "webdis") == proxies(docs)
    assert admitted(docs, "redis") == {"webdis"}


@pytest.mark.parametrize("overlay", ISTIO_OVERLAYS)
@pytest.mark.parametrize("target", ["demo", "webdis"])
def test_istio_app_and_store_admit_only_the_proxies_service_accounts(overlay, target):
    """With Istio, the app and webdis have sidecars, and their ALLOW policies
    name exactly the proxies' service accounts (mTLS identities, which labels
    are not), on the port they serve."""
    docs = rendered(overlay)
    templates = pod_templates(docs)
    assert docs[("Namespace", NAMESPACE)]["metadata"]["labels"]["istio-injection"] == "enabled"
    labels = templates[target]["metadata"]["labels"]
    assert labels.get("sidecar.istio.io/inject", "true") == "true"
    policies = [d for (kind, _), d in docs.items()
                if kind == "AuthorizationPolicy" and selects(d["spec"]["selector"], labels)]
    assert policies and all(p["spec"]["action"] == "ALLOW" for p in policies)
    principals = {pr for p in policies for r in p["spec"]["rules"] for f in r["from"] for pr in f["source"]["principals"]}
    accounts = {templates[name]["spec"].get("serviceAccountName", "default") for name in proxies(docs)}
    assert principals == {f"cluster.local/ns/{NAMESPACE}/sa/{sa}" for sa in accounts}
    assert "default" not in accounts  # the app's pods run as default
    port = {"demo": "8080", "webdis": "7379"}[target]
    assert {p for pol in policies for r in pol["spec"]["rules"] for t in r["to"] for p in t["operation"]["ports"]} == {port}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_ready_for_operators(overlay):
    """No pod gets a Kubernetes API token; sidecar injection is set by label
    (the annotation is deprecated); every Deployment with more than one pod
    has a PodDisruptionBudget that lets drains proceed one pod at a time."""
    docs = rendered(overlay)
    budgets = [d["spec"] for (kind, _), d in docs.items() if kind == "PodDisruptionBudget"]
    assert all(b.get("maxUnavailable", 0) >= 1 and "minAvailable" not in b for b in budgets)
    for name, template in pod_templates(docs).items():
        assert template["spec"]["automountServiceAccountToken"] is False, name
        annotations = template["metadata"].get("annotations", {})
        assert "sidecar.istio.io/inject" not in annotations and "proxy.istio.io/config" not in annotations, name
        if workload(docs, name)["spec"]["replicas"] > 1:
            assert sum(selects(b["selector"], template["metadata"]["labels"]) for b in budgets) == 1, name


def test_app_pods_outlive_their_endpoints():
    """A deleted app pod keeps serving until the proxies' endpoints drop it."""
    pod = base_object("Deployment", "demo")["spec"]["template"]["spec"]
    sleep = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep >= 5 and pod["terminationGracePeriodSeconds"] > sleep


# --------------------------------------------------------------------------
# The Istio manifests: what they say.

def envoyfilter() -> dict:
    return km.load_docs(K8S / "istio" / "envoyfilter" / "envoyfilter.yaml")[0]


def routing_envoyfilter() -> dict:
    return km.load_docs(K8S / "istio" / "wasmplugin" / "envoyfilter.yaml")[0]


def wasmplugin() -> dict:
    return km.load_docs(K8S / "istio" / "wasmplugin" / "wasmplugin.yaml")[0]


def inbound_envoyfilter() -> dict:
    return km.load_docs(K8S / "istio" / "app" / "inbound.yaml")[0]


def demo_gateway() -> dict:
    return next(d for d in km.load_docs(K8S / "istio" / "gateway" / "gateway.yaml") if d["kind"] == "Gateway")


def https_port() -> int:
    """The port of the demo Gateway's HTTPS server: where the filter runs."""
    return one(s["port"]["number"] for s in demo_gateway()["spec"]["servers"] if s["port"]["protocol"] == "HTTPS")


def one(items):
    items = list(items)
    assert len(items) == 1, items
    return items[0]


PROXY_CONTEXTS = ("GATEWAY", "SIDECAR_OUTBOUND")
STATEFUL_SESSION = "session-affinity.stateful_session"
ECDS_NAME = f"{NAMESPACE}.session-affinity"


def test_envoyfilter_parts_in_order():
    ef = envoyfilter()
    patches = ef["spec"]["configPatches"]
    assert [(p["applyTo"], p["patch"]["operation"], p.get("match", {}).get("context")) for p in patches] == [
        ("EXTENSION_CONFIG", "ADD", None),
        ("HTTP_FILTER", "INSERT_BEFORE", "GATEWAY"), ("HTTP_FILTER", "INSERT_BEFORE", "SIDECAR_OUTBOUND"),
        ("HTTP_FILTER", "INSERT_BEFORE", "GATEWAY"), ("HTTP_FILTER", "INSERT_BEFORE", "SIDECAR_OUTBOUND"),
        ("NETWORK_FILTER", "MERGE", "GATEWAY"), ("NETWORK_FILTER", "MERGE", "SIDECAR_OUTBOUND"),
        ("CLUSTER", "MERGE", "GATEWAY"), ("CLUSTER", "MERGE", "SIDECAR_OUTBOUND")]
    wasm, filt, _, stateful, _, underscores, _, merge, _ = patches
    # The ECDS resource and the filter that loads it share a namespaced name.
    assert wasm["patch"]["value"]["name"] == filt["patch"]["value"]["name"] == ECDS_NAME
    remote = wasm["patch"]["value"]["typed_config"]["config"]["vm_config"]["code"]["remote"]
    assert remote["http_uri"]["uri"].startswith("https://") and len(remote["sha256"]) == 64
    assert stateful["patch"]["value"]["name"] == STATEFUL_SESSION
    ss = stateful["patch"]["value"]["typed_config"]
    assert ss["strict"] is True
    assert ss["session_state"]["typed_config"]["name"] == "x-session-route"
    assert underscores["patch"]["value"]["typed_config"]["common_http_protocol_options"] == \
        {"headers_with_underscores_action": "REJECT_REQUEST"}
    assert km.plugin_config(ef)["store"]["cluster"] == ke.store_cluster(NAMESPACE)
    # The app's clusters by service and port (subsets included), not by one name.
    assert merge["match"]["cluster"] == {"service": f"demo.{NAMESPACE}.svc.cluster.local", "portNumber": 8080}
    assert "DRAINING" in merge["patch"]["value"]["common_lb_config"]["override_host_status"]["statuses"]


@pytest.mark.parametrize("ef", [envoyfilter(), routing_envoyfilter()], ids=lambda ef: ef["metadata"]["name"])
def test_envoyfilter_patches_name_their_context(ef):
    """No listener or cluster patch uses ANY (it would also reach a labelled
    client's inbound chain on port 8080), and the gateway and the sidecar's
    outbound side get the same patches: on the gateway's HTTPS listener and
    on the sidecar's listener for the app's port."""
    patches = [p for p in ef["spec"]["configPatches"] if p["applyTo"] != "EXTENSION_CONFIG"]
    assert patches and all(p["match"].get("context") in PROXY_CONTEXTS for p in patches)
    ports = {"GATEWAY": https_port(), "SIDECAR_OUTBOUND": 8080}

    def generic(p):
        match = {k: v for k, v in p["match"].items() if k != "context"}
        if "listener" in match:
            assert match["listener"]["portNumber"] == ports[p["match"]["context"]], p
            match["listener"] = {k: v for k, v in match["listener"].items() if k != "portNumber"}
        return {**p, "match": match}
    by_context = {c: [generic(p) for p in patches if p["match"]["context"] == c] for c in PROXY_CONTEXTS}
    assert by_context["GATEWAY"] == by_context["SIDECAR_OUTBOUND"]


def istioctl_envoyfilter_findings(ef: dict) -> list[str]:
    """istioctl analyze's EnvoyFilter analyzer (pkg/config/analysis/analyzers/
    envoyfilter/envoyfilter.go, Istio 1.22 to 1.28), ported: relative
    operations need a priority (IST0151; IST0155 with proxyVersion), REPLACE
    only on filters (IST0152), ADD and REMOVE not on routes (IST0153, IST0154)."""
    found = []
    for i, p in enumerate(ef["spec"]["configPatches"]):
        op, apply_to = p["patch"]["operation"], p["applyTo"]
        on_route = apply_to in ("ROUTE_CONFIGURATION", "HTTP_ROUTE")
        on_filter = apply_to in ("NETWORK_FILTER", "HTTP_FILTER")
        if op == "REPLACE" and not on_filter:
            found.append(f"IST0152 configPatches[{i}]")
        if op == "ADD" and on_route:
            found.append(f"IST0153 configPatches[{i}]")
        if op == "REMOVE" and on_route:
            found.append(f"IST0154 configPatches[{i}]")
        relative = (op in ("INSERT_BEFORE", "INSERT_AFTER") or (op == "REPLACE" and on_filter)
                    or (op == "REMOVE" and not on_route))
        if relative and ef["spec"].get("priority", 0) == 0:
            found.append(f"IST0151 configPatches[{i}]")
    return found


@pytest.mark.parametrize("ef", [envoyfilter(), routing_envoyfilter(), inbound_envoyfilter()],
                         ids=lambda ef: ef["metadata"]["name"])
def test_envoyfilter_passes_istioctl_analyze_checks(ef):
    """Every EnvoyFilter sets its priority; without it, those with relative
    operations would get IST0151."""
    assert istioctl_envoyfilter_findings(ef) == [] and ef["spec"]["priority"] != 0
    without_priority = copy.deepcopy(ef)
    del without_priority["spec"]["priority"]
    relative = any(p["patch"]["operation"].startswith("INSERT_") for p in ef["spec"]["configPatches"])
    assert any(f.startswith("IST0151") for f in istioctl_envoyfilter_findings(without_priority)) == relative


def test_app_inbound_patch_is_the_reference_sidecars():
    """The app's inbound EnvoyFilter selects the app's pods and nothing that
    runs the filter, patches only their inbound side, and adds exactly what
    envoy/sidecar.yaml (the testbed's mesh sidecar) has: the local reply mark
    for the flags of an unreached app, and its removal from the app's answers,
    under the name the plugin config uses."""
    ef = inbound_envoyfilter()
    for overlay in ISTIO_OVERLAYS:
        templates = pod_templates(rendered(overlay))
        chosen = {name for name, t in templates.items() if ke.selects(ef, t["metadata"]["labels"])}
        assert chosen == {"demo"}, overlay
    patches = ef["spec"]["configPatches"]
    assert [(p["applyTo"], p["patch"]["operation"], p["match"]["context"]) for p in patches] == [
        ("NETWORK_FILTER", "MERGE", "SIDECAR_INBOUND"), ("ROUTE_CONFIGURATION", "MERGE", "SIDECAR_INBOUND")]
    mark, strip = patches
    assert mark["match"]["listener"]["portNumber"] == strip["match"]["routeConfiguration"]["portNumber"] == 8080
    reference = yaml.safe_load((REPO / "envoy" / "sidecar.yaml").read_text())
    inbound = reference["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert mark["patch"]["value"]["typed_config"]["local_reply_config"] == inbound["local_reply_config"]
    assert strip["patch"]["value"] == {"response_headers_to_remove": inbound["route_config"]["response_headers_to_remove"]}
    header = km.plugin_config(envoyfilter()).get("headers", {}).get("unreached", "x-session-unreached")
    assert strip["patch"]["value"]["response_headers_to_remove"] == [header]
    mapper = one(mark["patch"]["value"]["typed_config"]["local_reply_config"]["mappers"])
    assert one(mapper["headers_to_add"])["header"] == {"key": header, "value": "%RESPONSE_FLAGS%"}


def test_keys_come_from_the_secret_only():
    """Plugin configs name environment variables, never secrets; each variable
    is exposed to the VM and filled from a Secret in every proxy container."""
    cfg = km.plugin_config(envoyfilter())
    assert cfg["keys"] and all(set(k) == {"id", "secret_env"} for k in cfg["keys"])
    vm = envoyfilter()["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]["vm_config"]
    host_env = vm["environment_variables"]["host_env_keys"]
    assert {k["secret_env"] for k in cfg["keys"]} | {"SA_STORE_PASSWORD"} == set(host_env)
    secrets = {"SA_KEY_1": "session-affinity-keys", "SA_STORE_PASSWORD": "session-store-auth"}
    for overlay, deployment, container in [("istio-gateway", "demo-gateway", "istio-proxy"),
                                           ("istio-gateway-api", "demo-gw-istio", "istio-proxy"),
                                           ("istio-sidecar", "client", "istio-proxy"),
                                           ("envoy-gateway", "envoy-gateway", "envoy")]:
        pod = rendered(overlay)[("Deployment", deployment)]["spec"]["template"]["spec"]
        c = next(c for c in pod["containers"] if c["name"] == container)
        env = {e["name"]: e for e in c.get("env", [])}
        for n in host_env:
            assert env[n]["valueFrom"]["secretKeyRef"] == {"name": secrets[n], "key": n}, (overlay, n)
    assert [e["name"] for e in wasmplugin()["spec"]["vmConfig"]["env"] if e["valueFrom"] == "HOST"] == host_env
    gateway_vm = envoy_configmap_bootstrap_wasm()["vm_config"]
    assert gateway_vm["environment_variables"]["host_env_keys"] == host_env
    for f in km.manifest_files():
        text = f.read_text()
        assert '"secret":' not in text and "kind: Secret" not in text, f


def test_wasmplugin_variant_says_the_same():
    ef, wp, routing = envoyfilter(), wasmplugin(), routing_envoyfilter()
    wasm = ef["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]
    assert wp["spec"]["pluginConfig"] == km.plugin_config(ef)
    assert wp["spec"]["url"] == wasm["vm_config"]["code"]["remote"]["http_uri"]["uri"]
    assert wp["spec"]["sha256"] == wasm["vm_config"]["code"]["remote"]["sha256"]
    assert wp["spec"]["pluginName"] == wasm["root_id"]
    assert wp["spec"]["selector"]["matchLabels"] == ef["spec"]["workloadSelector"]["labels"] == \
        routing["spec"]["workloadSelector"]["labels"]
    assert routing["spec"]["priority"] == ef["spec"]["priority"]
    # The routing EnvoyFilter repeats the main one's non-Wasm patches:
    # stateful_session right before the router, anchored on a name every
    # Istio version gives the router (the plugin's own name differs by
    # version: tests/k8s_envoy.py wasmplugin_filter_name).
    main = ef["spec"]["configPatches"]
    assert routing["spec"]["configPatches"] == main[3:]
    for p in routing["spec"]["configPatches"][:2]:
        assert p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"


def test_set_wasm_source_pins_both_manifests(tmp_path, wasm_module):
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    url = "https://wasm.test/session-affinity/session_affinity.wasm"
    subprocess.run([str(K8S / "set-wasm-source"), url, str(wasm_module)], check=True,
                   env={**os.environ, "K8S_DIR": str(copy_dir)}, capture_output=True, timeout=60)
    ef = km.load_docs(copy_dir / "istio" / "envoyfilter" / "envoyfilter.yaml")[0]
    wp = km.load_docs(copy_dir / "istio" / "wasmplugin" / "wasmplugin.yaml")[0]
    km.validate(ef)
    km.validate(wp)
    labels = {"session-affinity": "enabled"}
    ecds = {}
    ke.apply_envoyfilters(*ke.sidecar_skeleton(NAMESPACE, 1, 2, tmp_path / "eds.json"), [ef], ecds, labels)
    ke.agent_fetch(ecds, {url: wasm_module})  # checks the pinned sha256
    other = tmp_path / "other.wasm"
    other.write_bytes(wasm_module.read_bytes() + b"\0")
    ecds = {}
    ke.apply_envoyfilters(*ke.sidecar_skeleton(NAMESPACE, 1, 2, tmp_path / "eds.json"), [ef], ecds, labels)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        ke.agent_fetch(ecds, {url: other})


# --------------------------------------------------------------------------
# The Istio manifests in the real Envoy.

VARIANTS = {
    # name: (overlay, the Deployment whose proxy runs the filter)
    "gateway-envoyfilter": ("istio-gateway", "demo-gateway"),
    "gateway-wasmplugin": ("istio-gateway-wasmplugin", "demo-gateway"),
    "sidecar-envoyfilter": ("istio-sidecar", "client"),
    "gateway-configmap-wasm": ("istio-gateway-local-wasm", "demo-gateway"),
}
TLS_SECRET = "demo-gateway-tls"


def is_gateway(variant: str) -> bool:
    return VARIANTS[variant][1] == "demo-gateway"


def proxy_ports(variant: str) -> list[int]:
    """The ports the variant's proxy serves, as Istio numbers them: the
    Gateway's servers, or the app's port on the client's outbound side."""
    return [s["port"]["number"] for s in demo_gateway()["spec"]["servers"]] if is_gateway(variant) else [8080]


def filter_port(variant: str) -> int:
    return https_port() if is_gateway(variant) else 8080


def free_listen_ports(variant: str) -> dict[int, int]:
    """Istio port -> the 127.0.0.1 port its listener binds here."""
    ports = proxy_ports(variant)
    return dict(zip(ports, tb.free_ports(len(ports))))


def pod_labels(docs: list[dict], deployment: str) -> dict[str, str]:
    return one(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == deployment)[
        "spec"]["template"]["metadata"]["labels"]


def assemble(variant: str, wasm: Path, workdir: Path, listen: dict[int, int], admin_port: int,
             certificate: tuple[Path, Path], store: tuple[str, int] = ("127.0.0.1", 7379),
             ecds_files: bool = False, istio: tuple[int, int] = ke.LATEST) -> dict:
    """The Envoy config an Istio proxy selected by the overlay would run,
    built by istiod version `istio`; `certificate` stands for the gateway's
    TLS Secret."""
    overlay, deployment = VARIANTS[variant]
    docs = km.render(K8S / "overlays" / overlay)
    routes = [h for d in docs if d["kind"] == "VirtualService" for h in d["spec"]["http"]
              if is_gateway(variant) == bool(d["spec"].get("gateways"))]
    if is_gateway(variant):
        gateway = one(d for d in docs if d["kind"] == "Gateway")
        bootstrap, view = ke.gateway_skeleton(NAMESPACE, gateway, one(routes), listen, admin_port,
                                              workdir / "eds.json", {TLS_SECRET: certificate})
    else:
        bootstrap, view = ke.sidecar_skeleton(NAMESPACE, listen[8080], admin_port, workdir / "eds.json", one(routes),
                                              istio)
    labels = pod_labels(docs, deployment)
    for d in docs:
        if d["kind"] == "DestinationRule":
            ke.apply_destination_rule(bootstrap, NAMESPACE, d)
    if not (workdir / "eds.json").exists():
        ke.write_atomically(workdir / "eds.json", ke.eds(ke.app_cluster(NAMESPACE), []))
    ecds: dict = {}
    modules = {}
    for d in docs:
        if d["kind"] == "WasmPlugin":
            assert ke.insert_wasmplugin(bootstrap, view, d, ecds, labels, istio)
            modules[d["spec"]["url"]] = wasm
    ke.apply_envoyfilters(bootstrap, view, [d for d in docs if d["kind"] == "EnvoyFilter"], ecds, labels)
    for r in ecds.values():
        code = r["typed_config"]["config"]["vm_config"]["code"]
        if "remote" in code:
            modules[code["remote"]["http_uri"]["uri"]] = wasm
            code["remote"]["sha256"] = ""  # the committed manifests hold a placeholder; see test_set_wasm_source_pins_both_manifests
        else:  # a module mounted into the proxy: check the mount, use the build
            assert code["local"]["filename"] == local_module_path(docs), code
            code["local"]["filename"] = str(wasm)
    ke.agent_fetch(ecds, modules)
    ke.resolve_dns(bootstrap, {(f"webdis.{NAMESPACE}.svc.cluster.local", 7379): store})
    ke.resolve_ecds(bootstrap, ecds, workdir if ecds_files else None)
    return bootstrap


def local_module_path(docs: list[dict]) -> str:
    """Where the gateway's istio-proxy container mounts the module ConfigMap."""
    gw = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "demo-gateway")
    pod = gw["spec"]["template"]["spec"]
    volume = next(v["name"] for v in pod["volumes"] if v["configMap"]["name"] == "session-affinity-wasm")
    proxy = next(c for c in pod["containers"] if c["name"] == "istio-proxy")
    mount = next(m["mountPath"] for m in proxy["volumeMounts"] if m["name"] == volume)
    return f"{mount}/session_affinity.wasm"


def test_module_fits_in_a_configmap(wasm_module):
    """The ConfigMap delivery (envoy-gateway, istio-gateway-local-wasm) works
    while the module stays under the 1 MiB ConfigMap limit."""
    assert wasm_module.stat().st_size < 1024 * 1024 - 4096


def assemble_app_sidecar(overlay: str, listen_port: int, admin_port: int, app_port: int,
                         istio: tuple[int, int] = ke.LATEST) -> dict:
    """The Envoy config of an app pod's sidecar (inbound side) in the overlay:
    Istio's inbound shape, with the EnvoyFilters and WasmPlugins that select
    the app's pods applied. None of them may bring the filter there."""
    docs = km.render(K8S / "overlays" / overlay)
    bootstrap, view = ke.app_sidecar_skeleton(NAMESPACE, listen_port, admin_port, app_port, istio)
    labels, ecds = pod_labels(docs, "demo"), {}
    for d in docs:
        if d["kind"] == "WasmPlugin":
            assert ke.insert_wasmplugin(bootstrap, view, d, ecds, labels, istio) is None
    applied = ke.apply_envoyfilters(bootstrap, view, [d for d in docs if d["kind"] == "EnvoyFilter"], ecds, labels)
    assert ecds == {} and len(applied) == 2, applied  # the inbound patch's two parts, once each
    return bootstrap


def filter_chains(config: dict, variant: str) -> tuple[list[str], list[str] | None]:
    """The HTTP filters of the chain that runs the filter (a gateway's HTTPS
    listener, a sidecar's outbound one), and of the sidecar's inbound chain
    (None on a gateway)."""
    hcms = ke.http_connection_managers(config)
    inbound = hcms.get(("virtualInbound", 0))
    return (ke.http_filter_names(hcms[(f"0.0.0.0_{filter_port(variant)}", 0)]),
            None if inbound is None else ke.http_filter_names(inbound))


def expected_chain(variant: str, istio: tuple[int, int] = ke.LATEST) -> list[str]:
    """Istio's chain with the filter: before the router (EnvoyFilter), or
    where istiod puts a WasmPlugin without a phase; stateful_session right
    before the router."""
    chain = ["istio.metadata_exchange", *ke.AFTER_PLUGINS["outbound"]]
    if VARIANTS[variant][0] == "istio-gateway-wasmplugin":
        plugin = ke.wasmplugin_filter_name(NAMESPACE, "session-affinity", istio)
        return chain[:1] + [plugin] + chain[1:-1] + [STATEFUL_SESSION] + chain[-1:]
    return chain[:-1] + [ECDS_NAME, STATEFUL_SESSION] + chain[-1:]


def rejects_underscores(hcm_config: dict) -> bool:
    return hcm_config.get("common_http_protocol_options", {}).get("headers_with_underscores_action") == \
        "REJECT_REQUEST"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_istio_config_loads_in_envoy(variant, wasm_module, gateway_certificate, tmp_path):
    config = assemble(variant, wasm_module, tmp_path, free_listen_ports(variant), tb.free_ports(1)[0],
                      gateway_certificate)
    outbound, inbound = filter_chains(config, variant)
    assert outbound == expected_chain(variant)
    hcms = ke.http_connection_managers(config)
    assert rejects_underscores(hcms[(f"0.0.0.0_{filter_port(variant)}", 0)])
    if inbound is not None:  # the sidecar's inbound side is left as Istio made it
        assert hcms[("virtualInbound", 0)] == ke.virtual_inbound(8080, None, ke.LATEST)[
            "filter_chains"][0]["filters"][0]["typed_config"]
    # On a gateway, every port but the HTTPS one only redirects, without the filter.
    for port in set(proxy_ports(variant)) - {filter_port(variant)}:
        plain = hcms[(f"0.0.0.0_{port}", 0)]
        assert ke.http_filter_names(plain) == ke.http_filter_names({"http_filters": ke.istio_http_filters("outbound")})
        assert [v["require_tls"] for v in plain["route_config"]["virtual_hosts"]] == ["ALL"]
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == ke.app_cluster(NAMESPACE))
    # The app cluster's lb settings are the testbed's (override_host_status, panic threshold).
    testbed = yaml.safe_load((REPO / "envoy" / "testbed.yaml").read_text())
    testbed_app = next(c for c in testbed["static_resources"]["clusters"] if "override_host_status" in
                       c.get("common_lb_config", {}))
    assert cluster["common_lb_config"] == testbed_app["common_lb_config"]
    # A dead node stalls a pinned request for 1 s, not Istio's default 10 s.
    assert cluster["connect_timeout"] == "1s"
    # ... and TCP keepalive finds a vanished peer on a pooled connection.
    assert cluster["upstream_connection_options"] == testbed_app["upstream_connection_options"]
    # Like the testbed, nothing is ejected (a route timeout would count as a
    # local-origin failure); the DestinationRule's outlierDetection is only
    # there for minHealthPercent. Envoy's defaults enforce 5xx and success rate.
    assert "outlier_detection" not in testbed_app
    od = cluster["outlier_detection"]
    assert not od.get("split_external_local_origin_errors")
    assert (od.get("enforcing_consecutive_5xx"), od.get("enforcing_success_rate")) == (0, 0)
    assert od.get("enforcing_failure_percentage", 0) == od.get("enforcing_consecutive_gateway_failure", 0) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SA_")}
    ok = ke.envoy_validate(config, env={**env, "SA_KEY_1": TEST_KEY, "SA_STORE_PASSWORD": TEST_STORE_PASSWORD})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Without the key in the proxy's environment the filter refuses to load.
    missing = ke.envoy_validate(config, env=env)
    assert missing.returncode != 0
    assert "SA_KEY_1" in missing.stdout + missing.stderr
    assert TEST_KEY not in missing.stdout + missing.stderr


@pytest.mark.parametrize("istio", ke.ISTIO_VERSIONS, ids=lambda v: "istio-%d.%d" % v)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_overlay_on_every_istio_version(variant, istio, wasm_module, gateway_certificate, tmp_path):
    """Each overlay, built by each modelled istiod (its WasmPlugin filter
    name, its inbound route), gives the filter chain the filter needs; the
    WasmPlugin's is loaded by the real Envoy. An anchor on the plugin's own
    filter name, as this overlay had, matches one name of the three: its
    stateful_session goes missing on the other versions, without an error."""
    config = assemble(variant, wasm_module, tmp_path, free_listen_ports(variant), tb.free_ports(1)[0],
                      gateway_certificate, istio=istio)
    assert filter_chains(config, variant)[0] == expected_chain(variant, istio)
    if VARIANTS[variant][0] != "istio-gateway-wasmplugin":
        return
    ok = ke.envoy_validate(config, env={**os.environ, "SA_KEY_1": TEST_KEY, "SA_STORE_PASSWORD": TEST_STORE_PASSWORD})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    docs = km.render(K8S / "overlays" / VARIANTS[variant][0])
    gateway = one(d for d in docs if d["kind"] == "Gateway")
    bootstrap, view = ke.gateway_skeleton(NAMESPACE, gateway, None, free_listen_ports(variant), 1,
                                          tmp_path / "eds.json", {TLS_SECRET: gateway_certificate})
    labels = pod_labels(docs, "demo-gateway")
    plugin = one(d for d in docs if d["kind"] == "WasmPlugin")
    ke.insert_wasmplugin(bootstrap, view, plugin, {}, labels, istio)
    anchored = copy.deepcopy(routing_envoyfilter())
    for p in anchored["spec"]["configPatches"][:2]:
        p["patch"]["operation"] = "INSERT_AFTER"
        p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] = \
            ke.wasmplugin_filter_name(NAMESPACE, plugin["metadata"]["name"], (1, 26))
    ke.apply_envoyfilters(bootstrap, view, [anchored], {}, labels)
    chain = filter_chains(bootstrap, variant)[0]
    assert (STATEFUL_SESSION in chain) == ((1, 26) <= istio < (1, 30)), chain


def istio_servers(gateway: dict) -> dict:
    """A Gateway API Gateway as the Istio Gateway istiod turns it into (its
    HTTPS listeners, terminated with their Secret), for ke.gateway_skeleton."""
    servers = []
    for listener in gateway["spec"]["listeners"]:
        assert listener["protocol"] == "HTTPS" and listener["tls"]["mode"] == "Terminate", listener
        servers.append({"port": {"number": listener["port"], "name": listener["name"], "protocol": "HTTPS"},
                        "hosts": ["*"], "tls": {"mode": "SIMPLE",
                                                "credentialName": one(listener["tls"]["certificateRefs"])["name"]}})
    return {"metadata": gateway["metadata"], "spec": {"servers": servers}}


def test_gateway_api_overlay_aims_the_filter_at_its_gateway(wasm_module, gateway_certificate, tmp_path):
    """istio-gateway-api: the EnvoyFilter targets the Gateway (targetRefs, no
    workloadSelector), patches the port of its HTTPS listener, on the gateway
    only, and is the main EnvoyFilter otherwise; the gateway's routes to the
    app do not retry; the HTTPRoute sends that listener to the app; the
    Gateway serves the README's TLS Secret. Assembled as istiod would (the
    Gateway as its listeners, the EnvoyFilter applied to the pods Istio
    deploys for it), the chain has the filter and Envoy loads it."""
    docs = km.render(K8S / "overlays" / "istio-gateway-api")
    gateway = one(d for d in docs if d["kind"] == "Gateway")
    ef = one(d for d in docs if d["kind"] == "EnvoyFilter" and d["metadata"]["name"] == "session-affinity")
    assert "workloadSelector" not in ef["spec"]
    assert ef["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                         "name": gateway["metadata"]["name"]}]
    https = one(listener for listener in gateway["spec"]["listeners"] if listener["protocol"] == "HTTPS")
    assert [c["name"] for c in https["tls"]["certificateRefs"]] == [TLS_SECRET]
    patches = ef["spec"]["configPatches"]
    assert all(p["match"]["context"] == "GATEWAY" for p in patches if "match" in p)

    def without_port(p: dict) -> dict:
        p = copy.deepcopy(p)
        p.get("match", {}).get("listener", {}).pop("portNumber", None)
        return p
    main = [p for p in envoyfilter()["spec"]["configPatches"] if p.get("match", {}).get("context") != "SIDECAR_OUTBOUND"]
    assert [without_port(p) for p in patches[:-1]] == [without_port(p) for p in main]
    assert {p["match"]["listener"]["portNumber"] for p in patches if "listener" in p.get("match", {})} == {https["port"]}
    no_retry = patches[-1]
    assert (no_retry["applyTo"], no_retry["match"]["routeConfiguration"]) == ("HTTP_ROUTE", {"portNumber": https["port"]})
    route = one(d for d in docs if d["kind"] == "HTTPRoute")
    assert route["spec"]["parentRefs"] == [{"name": gateway["metadata"]["name"], "sectionName": https["name"]}]
    assert [(b["name"], b["port"]) for r in route["spec"]["rules"] for b in r["backendRefs"]] == [("demo", 8080)]

    objects = rendered("istio-gateway-api")
    assert proxies(objects) == {f"{gateway['metadata']['name']}-istio"}
    labels = pod_templates(objects)[f"{gateway['metadata']['name']}-istio"]["metadata"]["labels"]
    listen = dict(zip([https["port"]], tb.free_ports(1)))
    bootstrap, view = ke.gateway_skeleton(NAMESPACE, istio_servers(gateway), None, listen, tb.free_ports(1)[0],
                                          tmp_path / "eds.json", {TLS_SECRET: gateway_certificate})
    ke.write_atomically(tmp_path / "eds.json", ke.eds(ke.app_cluster(NAMESPACE), []))
    ecds: dict = {}
    applied = ke.apply_envoyfilters(bootstrap, view, [d for d in docs if d["kind"] == "EnvoyFilter"], ecds, labels)
    assert len(applied) == len(patches), applied  # each patch lands once
    hcm = ke.http_connection_managers(bootstrap)[(f"0.0.0.0_{https['port']}", 0)]
    chain = ["istio.metadata_exchange", *ke.AFTER_PLUGINS["outbound"]]
    assert ke.http_filter_names(hcm) == chain[:-1] + [ECDS_NAME, STATEFUL_SESSION] + chain[-1:]
    # Istio's default retry conditions are gone; what is left never holds.
    for retry in (r["route"]["retry_policy"] for v in hcm["route_config"]["virtual_hosts"] for r in v["routes"]):
        assert retry["retry_on"] == "retriable-headers", retry
        assert retry["retriable_headers"] == [{"name": ":status", "string_match": {"exact": "0"}}], retry
    for r in ecds.values():
        r["typed_config"]["config"]["vm_config"]["code"] = {"local": {"filename": str(wasm_module)}}
    ke.resolve_ecds(bootstrap, ecds)
    ke.resolve_dns(bootstrap, {(f"webdis.{NAMESPACE}.svc.cluster.local", 7379): ("127.0.0.1", 7379)})
    ok = ke.envoy_validate(bootstrap, env={**os.environ, "SA_KEY_1": TEST_KEY, "SA_STORE_PASSWORD": TEST_STORE_PASSWORD})
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_app_cluster_patch_reaches_subsets_only_of_the_app(tmp_path):
    """The CLUSTER MERGE matches the app's service and port: its subset
    clusters too (a DestinationRule with subsets), not another service's
    cluster on the same port nor the sidecar's inbound cluster."""
    bootstrap, view = ke.sidecar_skeleton(NAMESPACE, 1, 2, tmp_path / "eds.json")
    extra = [f"outbound|8080|v1|demo.{NAMESPACE}.svc.cluster.local", f"outbound|8080||other.{NAMESPACE}.svc.cluster.local"]
    for name in extra:
        bootstrap["static_resources"]["clusters"].append(ke.static_cluster(name, "127.0.0.1", 1))
        view["clusters"][name] = "SIDECAR_OUTBOUND"
    ke.apply_envoyfilters(bootstrap, view, [envoyfilter()], {}, {"session-affinity": "enabled"})
    patched = {c["name"] for c in bootstrap["static_resources"]["clusters"] if "common_lb_config" in c}
    assert patched == {ke.app_cluster(NAMESPACE), extra[0]}


# --------------------------------------------------------------------------
# The plain-Envoy gateway.

GEN = K8S / "gen-envoy-config"
ENVOY_CONFIGMAP = K8S / "overlays" / "envoy-gateway" / "envoy-config.yaml"
ETCD_CONFIGMAP = K8S / "overlays" / "envoy-gateway-etcd" / "envoy-config.yaml"


@pytest.mark.parametrize("store, path", [([], ENVOY_CONFIGMAP), (["--store", "etcd"], ETCD_CONFIGMAP)], ids=["webdis", "etcd"])
def test_envoy_gateway_configmap_is_what_the_generator_makes(store, path):
    """The committed ConfigMaps are derived from envoy/testbed.yaml (and
    envoy/etcd-store.yaml); this fails when one changes without
    `k8s/gen-envoy-config [--store etcd] --write`."""
    out = subprocess.run([sys.executable, str(GEN), *store], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == path.read_text(), f"stale: run k8s/gen-envoy-config {' '.join(store)} --write"


def test_etcd_members_are_what_the_proxies_reach():
    """envoy-gateway-etcd: the store cluster names every member of the
    StatefulSet, health-checks /health (false without quorum) and the plugin
    speaks etcd; the members run with pre-vote and auto-compaction, and the
    Job gives the filter's user readwrite on the plugin's key prefix only."""
    docs = rendered("envoy-gateway-etcd")
    etcd = docs[("StatefulSet", "etcd")]["spec"]
    settings = etcd_settings(etcd)
    members = [f"etcd-{i}" for i in range(etcd["replicas"])]
    assert etcd["replicas"] == 3 and etcd["podManagementPolicy"] == "Parallel"
    assert settings["pre-vote"] == "true" and settings["auto-compaction-mode"] == "periodic"
    assert [m.split("=")[0] for m in settings["initial-cluster"].split(",")] == members
    assert docs[("Service", "etcd")]["spec"]["publishNotReadyAddresses"] is True
    bootstrap = yaml.safe_load(docs[("ConfigMap", "envoy-gateway-config")]["data"]["envoy.yaml"])
    plugin = json.loads(envoy_configmap_bootstrap_wasm(bootstrap)["configuration"]["value"])
    assert plugin["store"]["dialect"] == "etcd"
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == plugin["store"]["cluster"])
    hosts = [e["endpoint"]["address"]["socket_address"]["address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert hosts == [f"{m}.etcd" for m in members]
    assert cluster["health_checks"][0]["http_health_check"]["path"] == "/health"
    job = docs[("Job", "etcd-auth")]["spec"]["template"]["spec"]["containers"][0]
    prefix = plugin["store"]["key_prefix"]
    key_range = [base64.b64encode(k.encode()).decode() for k in (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))]
    assert '"permType":"READWRITE","key":"%s","range_end":"%s"' % tuple(key_range) in job["args"][0]
    assert plugin["store"]["auth"]["username"] in job["args"][0]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in job["env"] if "valueFrom" in e} == {"session-store-auth"}
    # The Job and the CronJob reach every member by the name the proxies use.
    cron = docs[("CronJob", "etcd-maintenance")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for container, variable in [(job, "ETCD_ENDPOINTS"), (cron["initContainers"][0], "ETCDCTL_ENDPOINTS")]:
        assert container_env(container, dict.fromkeys(["SA_STORE_PASSWORD", "ETCD_ROOT_PASSWORD"], ""))[variable] == ",".join(f"https://{h}:2379" for h in hosts)
    # ... over TLS, checking the members' certificate against the Secret's CA,
    # which the gateway mounts.
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    gateway = docs[("Deployment", "envoy-gateway")]["spec"]["template"]["spec"]
    mount = one(m for m in one(c for c in gateway["containers"] if c["name"] == "envoy")["volumeMounts"]
                if m["name"] == "etcd-ca")
    assert tls["trusted_ca"]["filename"] == f"{mount['mountPath']}/ca.crt"
    assert one(v for v in gateway["volumes"] if v["name"] == "etcd-ca")["secret"]["secretName"] == "etcd-tls"


def etcd_object(kind: str, name: str) -> dict:
    return one(d for d in km.load_docs(K8S / "etcd" / "etcd.yaml") if (d["kind"], d["metadata"]["name"]) == (kind, name))


def etcd_settings(statefulset_spec: dict) -> dict[str, str]:
    """etcd's settings, as the StatefulSet's config script writes them to
    etcd's config file (from its ETCD_* variables)."""
    init = one(statefulset_spec["template"]["spec"]["initContainers"])
    env = container_env(init, dict.fromkeys(["ETCD_ROOT_PASSWORD"], ""))
    return {k[5:].lower().replace("_", "-"): v for k, v in env.items() if k.startswith("ETCD_")}


def test_etcd_quota_fits_its_volume():
    """The database quota leaves room on the volume for the WAL, snapshots
    and a defragmentation's copy of the database."""
    etcd = etcd_object("StatefulSet", "etcd")["spec"]
    quota = int(etcd_settings(etcd)["quota-backend-bytes"])
    volume = memory_bytes(one(etcd["volumeClaimTemplates"])["spec"]["resources"]["requests"]["storage"])
    assert 2 * quota + 512 * 1024 ** 2 <= volume


ETCD_SECRETS = {"SA_STORE_PASSWORD": 'store "pass" \\ word-0123456789', "ETCD_ROOT_PASSWORD": 'root\\"pw-0123456789'}
ETCD_TLS_MOUNT = "/etc/etcd-tls/"  # where the pods mount the Secret etcd-tls


@pytest.fixture
def etcd_tls(tmp_path) -> Path:
    """ca.crt, tls.crt and tls.key of the Secret etcd-tls, made by the
    openssl commands k8s/README.md gives."""
    require_tool("openssl")
    blocks = re.findall(r"```sh\n(.*?)```", (K8S / "README.md").read_text(), re.S)
    block = one(b for b in blocks if "secret generic etcd-tls" in b)
    directory = tmp_path / "etcd-tls"
    directory.mkdir()
    for line in block.splitlines():
        if line.startswith(("openssl ", "printf ")):
            subprocess.run(["sh", "-c", line], cwd=directory, check=True, capture_output=True, timeout=60)
    return directory


def in_pod_paths(text: str, tls: Path) -> str:
    return text.replace(ETCD_TLS_MOUNT, f"{tls}/")


def run_etcd_auth_job(endpoints: str, tls: Path, root_password: str = ETCD_SECRETS["ETCD_ROOT_PASSWORD"]
                      ) -> subprocess.CompletedProcess:
    """The auth Job's script as written, with sh and curl, against `endpoints`."""
    job = etcd_object("Job", "etcd-auth")["spec"]["template"]["spec"]["containers"][0]
    assert job["image"].startswith("curlimages/curl:") and job["command"] == ["sh", "-ec"]
    env = {**container_env(job, {**ETCD_SECRETS, "ETCD_ROOT_PASSWORD": root_password}), "ETCD_ENDPOINTS": endpoints,
           "PATH": os.environ["PATH"]}
    return subprocess.run(["sh", "-ec", in_pod_paths(job["args"][0], tls)], env=env, capture_output=True, text=True,
                          timeout=120)


class EtcdMembers:
    """Three real etcd members on 127.0.0.1 started as the StatefulSet starts
    its pods: its init container's script writes each member's config file
    (TLS with `tls`, the Secret etcd-tls), then etcd runs with that file."""

    def __init__(self, workdir: Path, tls: Path):
        spec = etcd_object("StatefulSet", "etcd")["spec"]["template"]["spec"]
        self.init, etcd = one(spec["initContainers"]), one(spec["containers"])
        self.workdir, self.tls = workdir, tls
        config_file = one(e["value"] for e in self.init["env"] if e["name"] == "CONFIG_FILE")
        assert etcd["command"] == ["etcd", f"--config-file={config_file}"]
        self.clients, self.peers = tb.free_ports(3), tb.free_ports(3)
        self.names = [f"etcd-{i}" for i in range(3)]
        self.urls = [f"https://127.0.0.1:{port}" for port in self.clients]
        self.members = [tb.Process(n, [a.replace(config_file, str(workdir / f"{n}.yml")) for a in etcd["command"]],
                                   workdir / f"{n}.log") for n in self.names]

    def configure(self, i: int) -> subprocess.CompletedProcess:
        """The init container's script for member i, its URLs on 127.0.0.1."""
        env = container_env(self.init, ETCD_SECRETS)
        peers = [f"https://127.0.0.1:{port}" for port in self.peers]
        env.update(PATH=os.environ["PATH"], CONFIG_FILE=str(self.workdir / f"{self.names[i]}.yml"),
                   ETCD_TLS=str(self.tls), MEMBER_CLIENT_URLS=",".join(self.urls), ETCD_NAME=self.names[i],
                   ETCD_DATA_DIR=str(self.workdir / self.names[i]),
                   ETCD_INITIAL_CLUSTER=",".join(f"{n}={p}" for n, p in zip(self.names, peers)),
                   ETCD_LISTEN_CLIENT_URLS=self.urls[i], ETCD_ADVERTISE_CLIENT_URLS=self.urls[i],
                   ETCD_LISTEN_PEER_URLS=peers[i], ETCD_INITIAL_ADVERTISE_PEER_URLS=peers[i])
        done = subprocess.run(["sh", "-ec", self.init["args"][0]], env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def post(self, i: int, path: str, body: dict, token: str | None = None):
        import requests
        return requests.post(self.urls[i] + path, json=body, timeout=10, verify=str(self.tls / "ca.crt"),
                             headers={"authorization": token} if token else {})

    def healthy(self, i: int) -> bool:
        import requests
        try:
            reply = requests.get(self.urls[i] + "/health", timeout=2, verify=str(self.tls / "ca.crt"))
        except requests.RequestException:
            return False
        return reply.status_code == 200 and reply.json().get("health") == "true"

    def wait_healthy(self, i: int) -> None:
        tb.wait_until(lambda: self.members[i].ensure_alive() or self.healthy(i), tb.START_TIMEOUT,
                      f"{self.names[i]} healthy")

    def __enter__(self):
        """A first start: every member configured, then all started at once
        (none is healthy before a quorum is up)."""
        for i in range(3):
            self.configure(i)
        for member in self.members:
            member.start()
        for i in range(3):
            self.wait_healthy(i)
        return self

    def __exit__(self, kind, *_):
        if kind is not None:
            for member in self.members:
                print(f"===== {member.name}\n{member.log_tail(20)}")
        for member in self.members:
            member.stop()


def test_etcd_auth_job_and_maintenance_run_on_real_etcd(tmp_path, etcd_tls):
    """The auth Job's script, run as written (sh and curl, through the JSON
    gateway, over TLS) against three real etcd members started as the
    StatefulSet starts them: it turns auth on with the filter's user limited
    to "sa:" keys (passwords with quotes and backslashes), says so and stops
    when run again, and fails with a wrong root password. Then the
    maintenance CronJob's etcdctl commands, as written: defragment every
    member and save a snapshot, as root."""
    for tool in ("etcd", "etcdctl", "curl", "sh"):
        require_tool(tool)
    from rig.etcd import b64
    with EtcdMembers(tmp_path, etcd_tls) as cluster:
        endpoints = ",".join(cluster.urls)
        first = run_etcd_auth_job(endpoints, etcd_tls)
        assert first.returncode == 0 and "auth is on" in first.stdout, first.stdout + first.stderr
        answer = cluster.post(1, "/v3/auth/authenticate",
                              {"name": "session-affinity", "password": ETCD_SECRETS["SA_STORE_PASSWORD"]})
        assert answer.status_code == 200, answer.text
        token = answer.json()["token"]
        assert cluster.post(1, "/v3/kv/put", {"key": b64("sa:job-test"), "value": b64("1")}, token).status_code == 200
        for key in ("sb:x", "s", "other"):
            refused = cluster.post(1, "/v3/kv/put", {"key": b64(key), "value": b64("1")}, token)
            assert refused.status_code != 200 and "permission denied" in refused.text, (key, refused.text)
        assert cluster.post(1, "/v3/kv/put", {"key": b64("sa:x"), "value": b64("1")}).status_code != 200  # no token
        again = run_etcd_auth_job(endpoints, etcd_tls)
        assert again.returncode == 0 and "auth is already on" in again.stdout, again.stdout + again.stderr
        wrong = run_etcd_auth_job(endpoints, etcd_tls, "not-the-root-password")
        assert wrong.returncode != 0 and "auth is" not in wrong.stdout, wrong.stdout
        assert ETCD_SECRETS["ETCD_ROOT_PASSWORD"] not in first.stdout + first.stderr + wrong.stdout + wrong.stderr

        cron = etcd_object("CronJob", "etcd-maintenance")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        backup = tmp_path / "backup"
        backup.mkdir()
        for container in cron["initContainers"] + cron["containers"]:
            env = {k: in_pod_paths(v, etcd_tls) for k, v in container_env(container, ETCD_SECRETS).items()}
            env = {**env, "PATH": os.environ["PATH"],
                   "ETCDCTL_ENDPOINTS": endpoints if "," in env["ETCDCTL_ENDPOINTS"] else cluster.urls[0]}
            argv = [a.replace("/backup/", f"{backup}/") for a in container["command"]]
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, (argv, done.stdout + done.stderr)
            if container["name"] == "defrag":
                assert done.stdout.count("Finished defragmenting etcd member") == 3, done.stdout
        status = subprocess.run(["etcdctl", "snapshot", "status", str(backup / "etcd-snapshot.db"), "-w", "json"],
                                capture_output=True, text=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"})
        assert status.returncode == 0 and json.loads(status.stdout)["totalKey"] >= 1, status.stdout + status.stderr


def test_etcd_member_that_lost_its_volume_rejoins(tmp_path, etcd_tls):
    """Three real etcd members started as the StatefulSet starts them (TLS
    between them and to clients), auth turned on by the Job. One member is
    killed and loses its data directory (a lost volume): the config script
    has it take its own place in the cluster again, and it comes back
    healthy with the data. With "new", as before, it could not."""
    for tool in ("etcd", "curl", "sh"):
        require_tool(tool)
    from rig.etcd import b64, unb64
    with EtcdMembers(tmp_path, etcd_tls) as cluster:
        assert all("initial-cluster-state: new" in (tmp_path / f"{n}.yml").read_text() for n in cluster.names)
        assert run_etcd_auth_job(",".join(cluster.urls), etcd_tls).returncode == 0
        login = {"name": "session-affinity", "password": ETCD_SECRETS["SA_STORE_PASSWORD"]}
        token = cluster.post(0, "/v3/auth/authenticate", login).json()["token"]
        put = cluster.post(0, "/v3/kv/put", {"key": b64("sa:kept"), "value": b64("state")}, token)
        assert put.status_code == 200, put.text

        cluster.members[2].kill()
        shutil.rmtree(tmp_path / cluster.names[2])
        rejoin = cluster.configure(2)
        assert "joining the cluster" in rejoin.stdout, rejoin.stdout
        assert "initial-cluster-state: existing" in (tmp_path / f"{cluster.names[2]}.yml").read_text()
        cluster.members[2].start()
        cluster.wait_healthy(2)
        token = cluster.post(2, "/v3/auth/authenticate", login).json()["token"]
        kept = cluster.post(2, "/v3/kv/range", {"key": b64("sa:kept"), "serializable": True}, token).json()
        assert [unb64(kv["value"]) for kv in kept.get("kvs", [])] == ["state"], kept
        listed = cluster.post(2, "/v3/cluster/member/list", {}).json()["members"]
        assert sorted(m.get("name") for m in listed) == cluster.names, listed


def app_tls_certificate(bootstrap: dict) -> dict:
    """The certificate of the gateway's HTTPS listener (file paths in the pod)."""
    app_chain = one(next(l for l in bootstrap["static_resources"]["listeners"] if l["name"] == "app")["filter_chains"])
    return app_chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"][0]


def test_envoy_gateway_etcd_config_loads_in_envoy(wasm_module, gateway_certificate, etcd_tls):
    bootstrap = yaml.safe_load(km.load_docs(ETCD_CONFIGMAP)[0]["data"]["envoy.yaml"])
    envoy_configmap_bootstrap_wasm(bootstrap)["vm_config"]["code"]["local"]["filename"] = str(wasm_module)
    tls = app_tls_certificate(bootstrap)
    tls["certificate_chain"]["filename"], tls["private_key"]["filename"] = map(str, gateway_certificate)
    for cluster in bootstrap["static_resources"]["clusters"]:
        if "transport_socket" in cluster:  # the etcd members' CA, mounted from the Secret etcd-tls
            ca = cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]["trusted_ca"]
            ca["filename"] = in_pod_paths(ca["filename"], etcd_tls)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SA_")}
    ok = ke.envoy_validate(bootstrap, env={**env, "SA_KEY_1": TEST_KEY, "SA_STORE_PASSWORD": TEST_STORE_PASSWORD})
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_one_plugin_json_everywhere():
    out = subprocess.run([sys.executable, str(GEN), "--plugin-json"], capture_output=True, text=True,
                         timeout=60, check=True)
    generated = json.loads(out.stdout)
    assert json.loads(envoy_configmap_bootstrap_wasm()["configuration"]["value"]) == generated
    # Istio proxies reach the store through webdis' own Istio cluster (mTLS,
    # service account); that is the one difference.
    istio = copy.deepcopy(generated)
    istio["store"]["cluster"] = ke.store_cluster(NAMESPACE)
    assert km.plugin_config(envoyfilter()) == wasmplugin()["spec"]["pluginConfig"] == istio
    # Only the keys differ from the testbed's (its keys are public test
    # literals), and the cookie: Secure, so named __Host-sa, where the testbed
    # serves plain HTTP on loopback.
    testbed = yaml.safe_load((REPO / "envoy" / "testbed.yaml").read_text())
    testbed_json = json.loads(envoy_configmap_bootstrap_wasm(testbed)["configuration"]["value"])
    assert {k: v for k, v in testbed_json.items() if k not in ("keys", "cookie")} == \
        {k: v for k, v in generated.items() if k not in ("keys", "cookie")}
    assert generated["cookie"] == {k: v for k, v in testbed_json["cookie"].items() if k != "name"} | {"secure": True}


def envoy_configmap_bootstrap() -> dict:
    cm = km.load_docs(ENVOY_CONFIGMAP)[0]
    return yaml.safe_load(cm["data"]["envoy.yaml"])


def envoy_configmap_bootstrap_wasm(bootstrap: dict | None = None) -> dict:
    bootstrap = bootstrap or envoy_configmap_bootstrap()
    for hf in bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
        if hf["name"] == "envoy.filters.http.wasm":
            return hf["typed_config"]["config"]
    raise KeyError("no wasm filter")


def test_envoy_gateway_config_loads_in_envoy(wasm_module, gateway_certificate):
    bootstrap = envoy_configmap_bootstrap()
    pod = rendered("envoy-gateway")[("Deployment", "envoy-gateway")]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    wasm = envoy_configmap_bootstrap_wasm(bootstrap)
    # The paths in the config are where the pod mounts its ConfigMaps and the TLS Secret.
    assert pod["containers"][0]["args"][:2] == ["-c", f"{mounts['config']}/envoy.yaml"]
    assert volumes["config"]["configMap"]["name"] == km.load_docs(ENVOY_CONFIGMAP)[0]["metadata"]["name"]
    assert wasm["vm_config"]["code"]["local"]["filename"] == f"{mounts['wasm']}/session_affinity.wasm"
    assert volumes["tls"]["secret"]["secretName"] == TLS_SECRET
    tls = app_tls_certificate(bootstrap)
    assert (tls["certificate_chain"]["filename"], tls["private_key"]["filename"]) == \
        (f"{mounts['tls']}/tls.crt", f"{mounts['tls']}/tls.key")
    app_hcm = ke.http_connection_managers(bootstrap)[("app", 0)]
    assert ke.http_filter_names(app_hcm) == ["envoy.filters.http.wasm", STATEFUL_SESSION, "envoy.filters.http.router"]
    assert rejects_underscores(app_hcm)
    # Plain HTTP only redirects, without the filter.
    http_hcm = ke.http_connection_managers(bootstrap)[("http", 0)]
    assert ke.http_filter_names(http_hcm) == ["envoy.filters.http.router"]
    assert [r["redirect"] for r in http_hcm["route_config"]["virtual_hosts"][0]["routes"]] == [{"https_redirect": True}]
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    listen = {l["name"]: l["address"]["socket_address"]["port_value"] for l in bootstrap["static_resources"]["listeners"]}
    assert listen == {"app": ports["https"], "http": ports["http"], "health": ports["health"]}
    service = rendered("envoy-gateway")[("Service", "envoy-gateway")]["spec"]["ports"]
    assert {(p["port"], p["targetPort"]) for p in service} == {(443, "https"), (80, "http")}
    wasm["vm_config"]["code"]["local"]["filename"] = str(wasm_module)
    tls["certificate_chain"]["filename"], tls["private_key"]["filename"] = map(str, gateway_certificate)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SA_")}
    ok = ke.envoy_validate(bootstrap, env={**env, "SA_KEY_1": TEST_KEY, "SA_STORE_PASSWORD": TEST_STORE_PASSWORD})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = ke.envoy_validate(bootstrap, env=env)
    assert missing.returncode != 0 and "SA_KEY_1" in missing.stdout + missing.stderr


# --------------------------------------------------------------------------
# The assembled Istio config, running: sticky sessions, and a session that
# survives the deletion of its pod.

class Client:
    """A cookie-keeping client that follows a redirect back to the same URL the
    way a browser does (the filter's recovery uses a 307)."""

    def __init__(self, base: str, host: str, ca: Path | None = None):
        """`ca`: the certificate an https:// `base` must present."""
        self.base, self.host, self.cookie, self.set_cookie = base, host, None, None
        self.tls = ssl.create_default_context(cafile=str(ca)) if ca else None

    def get(self, path: str = "/", hops: int = 3, method: str = "GET") -> tuple[int, dict, dict]:
        import urllib.request
        for _ in range(hops + 1):
            req = urllib.request.Request(self.base + path, headers={"host": self.host}, method=method)
            if self.cookie:
                req.add_header("cookie", self.cookie)
            try:
                with urllib.request.urlopen(req, timeout=10, context=self.tls) as r:
                    status, headers, body = r.status, r.headers, r.read()
            except urllib.error.HTTPError as e:
                status, headers, body = e.code, e.headers, e.read()
            for value in headers.get_all("set-cookie") or []:
                self.cookie, self.set_cookie = value.split(";", 1)[0], value
            if status in (302, 303, 307, 308):
                path = headers.get("location", path).replace(self.base, "") or "/"
                continue
            try:
                data = json.loads(body)
            except ValueError:
                data = {"raw": body.decode(errors="replace")}
            return status, dict(headers.items()), data
        raise AssertionError(f"more than {hops} redirects for {path}")


# --------------------------------------------------------------------------
# The store as the manifests configure it: Redis with its ACL user, webdis
# with its own ACL, both run for real from base/store.yaml.

STORE_USER = "session-affinity"
TEST_SECRETS = {"SA_STORE_PASSWORD": TEST_STORE_PASSWORD, "REDIS_PASSWORD": TEST_REDIS_PASSWORD}


def base_object(kind: str, name: str) -> dict:
    return next(d for d in km.render(K8S / "base") if (d["kind"], d["metadata"]["name"]) == (kind, name))


def container_env(container: dict, secrets: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: secretKeyRef values
    (from `secrets`, by key), fieldRef values (a pod named etcd-0 in
    NAMESPACE), then $(NAME) references to earlier variables."""
    env: dict[str, str] = {}
    pod = {"metadata.name": "etcd-0", "metadata.namespace": NAMESPACE}
    for e in container.get("env", []):
        if "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = pod[e["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "valueFrom" in e:
            env[e["name"]] = secrets[e["valueFrom"]["secretKeyRef"]["key"]]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
    return env


def redis_acl_commands() -> set[str]:
    rules = base_object("ConfigMap", "redis-config")["data"]["session-affinity.acl"].split()
    return {r[1:] for r in rules if r.startswith("+")}


def start_redis(workdir: Path, port: int, monkeypatch, default_user_like_proxy: bool = False,
                overlay: str | None = None) -> tb.Process:
    """Redis as its pod starts it (in the base, or in `overlay`): the
    container's script, the ConfigMap's files (in `workdir` instead of
    /etc/redis, its data directory /data in workdir/data) and the Secret's
    password. `default_user_like_proxy` gives the user default the rules and
    password of session-affinity, for Debian's webdis 0.1.9, which can log in
    only as default (AUTH <password>); webdis 0.1.13+ logs in as
    session-affinity."""
    objects = rendered(overlay) if overlay else {(k, n): base_object(k, n) for k, n in
                                                  [("ConfigMap", "redis-config"), ("Deployment", "redis")]}
    cm = objects[("ConfigMap", "redis-config")]["data"]
    container = objects[("Deployment", "redis")]["spec"]["template"]["spec"]["containers"][0]
    conf, rules = cm["redis.conf"], cm["session-affinity.acl"]
    if default_user_like_proxy:
        assert "\nuser default off\n" in conf
        conf = conf.replace("\nuser default off\n", f"\nuser default on >{TEST_REDIS_PASSWORD} {rules}\n")
    (workdir / "data").mkdir(exist_ok=True)
    files = {**cm, "redis.conf": f"dir {workdir}/data\n" + conf + f"port {port}\nbind 127.0.0.1\n"}
    for name, text in files.items():
        (workdir / name).write_text(text.replace("/etc/redis/", f"{workdir}/").replace("dir /data", f"dir {workdir}/data")
                                    + "\n")
    for name, value in container_env(container, TEST_SECRETS).items():
        monkeypatch.setenv(name, value)
    assert container["command"] == ["sh", "-c"]
    script = container["args"][0].replace("/etc/redis/", f"{workdir}/")
    redis = tb.Process("redis", ["sh", "-c", script], workdir / "redis.log")
    redis.start()
    try:
        tb.wait_until(lambda: redis.ensure_alive() or redis_cli(port, "PING") == "PONG", 10, f"redis on {port}")
    except BaseException:
        redis.stop()
        raise
    return redis


def redis_cli(port: int, *args: str, password: str | None = TEST_REDIS_PASSWORD) -> str:
    """One command as the user session-affinity (or unauthenticated)."""
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    user = []
    if password is not None:
        env["REDISCLI_AUTH"], user = password, ["--user", STORE_USER, "--no-auth-warning"]
    out = subprocess.run(["redis-cli", "-p", str(port), *user, *args], capture_output=True, text=True,
                         timeout=10, env=env)
    return (out.stdout + out.stderr).strip()


def webdis_config(path: Path, redis_port: int, http_port: int, require_credentials: bool = True) -> Path:
    """The webdis.json of the ConfigMap for Debian's webdis 0.1.9, on
    127.0.0.1: the "$NAME" values filled from the container's environment (as
    webdis 0.1.13+ does itself) and the Redis login reduced to the password
    (see start_redis). `require_credentials=False` drops the basic-auth
    condition from the ACL, for a filter that does not send credentials."""
    config = json.loads(base_object("ConfigMap", "webdis-config")["data"]["webdis.json"])
    container = base_object("Deployment", "webdis")["spec"]["template"]["spec"]["containers"][0]
    env = container_env(container, TEST_SECRETS)

    def fill(value):
        if isinstance(value, str) and re.fullmatch(r"\$[A-Z0-9_]+", value):
            return env[value[1:]]
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value
    config = fill(config)
    assert config["redis_auth"] == [STORE_USER, TEST_REDIS_PASSWORD]
    config["redis_auth"] = TEST_REDIS_PASSWORD
    if not require_credentials:
        for entry in config["acl"]:
            entry.pop("http_basic_auth", None)
    config.update(redis_host="127.0.0.1", redis_port=redis_port, http_host="127.0.0.1", http_port=http_port,
                  logfile="/dev/stderr")
    path.write_text(json.dumps(config))
    return path


def lua_redis_commands() -> set[str]:
    """Every command the filter's Lua scripts call (filter/src)."""
    text = "".join(p.read_text() for p in (REPO / "filter" / "src").rglob("*.rs"))
    return {c.lower() for c in re.findall(r"""redis\.p?call\(\s*['"](\w+)['"]""", text)}


def test_redis_acl_covers_the_filters_scripts():
    """The ACL's list is the one place: it holds EVAL, EVALSHA and every
    command the scripts call, and webdis lets the proxies run only EVAL and
    EVALSHA."""
    used = lua_redis_commands()
    assert used and used <= redis_acl_commands(), sorted(used - redis_acl_commands())
    assert {"eval", "evalsha", "ping"} <= redis_acl_commands()
    acl = json.loads(base_object("ConfigMap", "webdis-config")["data"]["webdis.json"])["acl"]
    credentialed = [e for e in acl if "http_basic_auth" in e]
    assert acl[0] == {"disabled": ["*"]} and credentialed == [acl[-1]]
    assert {c.lower() for c in credentialed[0]["enabled"]} == {"eval", "evalsha"}
    assert all(e.get("enabled", []) == ["PING"] for e in acl[1:-1])


# A call of each command the ACL allows in scripts, on a key of its own.
SCRIPT_CALLS = {"get": [], "set": ["v", "PX", "60000"], "del": [], "exists": [], "hget": ["f"],
                "hset": ["f", "v"], "hdel": ["f"], "hexists": ["f"], "pexpire": ["60000"]}
CALL_SCRIPT = "redis.call(ARGV[1], KEYS[1], unpack(ARGV, 2)) return 'ok'"


def test_redis_runs_the_acl_and_nothing_more(tmp_path, monkeypatch):
    for tool in ("redis-server", "redis-cli"):
        require_tool(tool)
    port = tb.free_ports(1)[0]
    redis = start_redis(tmp_path, port, monkeypatch)
    try:
        assert "NOAUTH" in redis_cli(port, "PING", password=None)  # the user default is off
        assert "WRONGPASS" in redis_cli(port, "PING", password="wrong")
        assert set(SCRIPT_CALLS) == redis_acl_commands() - {"eval", "evalsha", "ping"}
        for command, args in SCRIPT_CALLS.items():
            assert redis_cli(port, "EVAL", CALL_SCRIPT, "1", f"sa:{command}", command, *args) == "ok", command
            assert "NOPERM" in redis_cli(port, "EVAL", CALL_SCRIPT, "1", f"other:{command}", command, *args), command
        sha = hashlib.sha1(CALL_SCRIPT.encode()).hexdigest()
        assert redis_cli(port, "EVALSHA", sha, "1", "sa:x", "get") == "ok"
        for forbidden in (["KEYS", "*"], ["FLUSHALL"], ["CONFIG", "GET", "maxmemory"], ["SCAN", "0"],
                          ["SCRIPT", "FLUSH"], ["PUBLISH", "sa:c", "m"]):
            assert "NOPERM" in redis_cli(port, *forbidden), forbidden
            assert "ERR" in redis_cli(port, "EVAL", "return redis.call(unpack(ARGV))", "0", *forbidden), forbidden
        # The readiness probe sees PONG, and only with the Secret's password.
        probe = base_object("Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        command = [a.replace("redis-cli", f"redis-cli -p {port}") for a in probe["exec"]["command"]]
        env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
        assert subprocess.run(command, env={**env, "REDISCLI_AUTH": TEST_REDIS_PASSWORD}, timeout=10).returncode == 0
        assert subprocess.run(command, env={**env, "REDISCLI_AUTH": "wrong"}, timeout=10).returncode != 0
    finally:
        redis.stop()


def test_redis_aof_overlay_keeps_the_store_across_a_crash(tmp_path, monkeypatch):
    """envoy-gateway-redis-aof: Redis keeps its data in an append-only file
    on the PersistentVolumeClaim; a session written, then Redis killed
    (SIGKILL) and started again on the same volume, is still there. In the
    base, the same crash loses it."""
    for tool in ("redis-server", "redis-cli"):
        require_tool(tool)
    docs = rendered("envoy-gateway-redis-aof")
    pod = docs[("Deployment", "redis")]["spec"]["template"]["spec"]
    data = one(v for v in pod["volumes"] if v["name"] == "data")
    assert docs[("PersistentVolumeClaim", data["persistentVolumeClaim"]["claimName"])]
    assert one(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "data")["mountPath"] == "/data"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    for overlay, kept in (("envoy-gateway-redis-aof", True), (None, False)):
        workdir = tmp_path / (overlay or "base")
        workdir.mkdir()
        port = tb.free_ports(1)[0]
        redis = start_redis(workdir, port, monkeypatch, overlay=overlay)
        try:
            assert redis_cli(port, "EVAL", CALL_SCRIPT, "1", "sa:session", "set", "state-1") == "ok"
            redis.kill()
            redis.start()
            tb.wait_until(lambda: redis.ensure_alive() or redis_cli(port, "PING") == "PONG", 30, f"redis on {port}")
            stored = redis_cli(port, "EVAL", "return redis.call('GET', KEYS[1]) or 'none'", "1", "sa:session")
            assert stored == ("state-1" if kept else "none"), (overlay, stored)
        finally:
            redis.stop()


def test_webdis_answers_only_the_proxies_credentials(tmp_path, monkeypatch):
    for tool in ("redis-server", "redis-cli", "webdis"):
        require_tool(tool)
    import requests
    redis_port, http_port = tb.free_ports(2)
    redis = start_redis(tmp_path, redis_port, monkeypatch, default_user_like_proxy=True)
    webdis = tb.Process("webdis", ["webdis", str(webdis_config(tmp_path / "webdis.json", redis_port, http_port))],
                        tmp_path / "webdis.log")
    base = f"http://127.0.0.1:{http_port}"
    proxy = (STORE_USER, TEST_STORE_PASSWORD)
    try:
        webdis.start()
        tb.wait_until(lambda: webdis.ensure_alive() or tb.http_get(f"{base}/PING")[0] == 200, 10, "webdis /PING")
        evaluate = "EVAL/" + "/".join(urllib.parse.quote(p, safe="") for p in
                                      ["return redis.call('EXISTS', KEYS[1])", "1", "sa:x"])

        def status(auth, method="POST", body=evaluate, path="/"):
            return requests.request(method, base + path, data=body, auth=auth, timeout=5)
        reply = status(proxy)
        assert (reply.status_code, reply.json()) == (200, {"EVAL": 0})
        assert status(None).status_code == 403
        assert status((STORE_USER, "wrong")).status_code == 403
        for command in ("GET/sa:x", "SET/sa:x/v", "FLUSHALL", "CONFIG/GET/maxmemory", "KEYS/*", "DEL/sa:x"):
            assert status(proxy, "GET", None, "/" + command).status_code == 403, command
        # Through webdis, Redis still confines EVAL to the session keys.
        outside = "EVAL/" + "/".join(urllib.parse.quote(p, safe="") for p in
                                     ["return redis.call('GET', KEYS[1])", "1", "other"])
        assert status(proxy, body=outside).json()["EVAL"][0] is False
    finally:
        webdis.stop()
        redis.stop()


def memory_bytes(value: str) -> int:
    """A Redis size ("192mb") or a Kubernetes quantity ("256Mi")."""
    number, unit = re.fullmatch(r"(\d+)([a-zA-Z]*)", value).groups()
    scale = {"": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3, "Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3}
    return int(number) * scale[unit]


def test_redis_bounds_its_memory_and_never_runs_twice():
    conf = dict(line.split(" ", 1) for line in base_object("ConfigMap", "redis-config")["data"]["redis.conf"]
                .splitlines() if line and not line.startswith("#"))
    redis = base_object("Deployment", "redis")["spec"]
    resources = redis["template"]["spec"]["containers"][0]["resources"]
    limit = memory_bytes(resources["limits"]["memory"])
    assert memory_bytes(conf["maxmemory"]) <= limit * 3 // 4
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    # Every key the filter writes has a TTL; the closest to expiry go first: a
    # flood's one-request sessions, not sessions in use (tests/test_abuse.py).
    assert conf["maxmemory-policy"] == "volatile-ttl"
    assert "maxmemory-policy volatile-ttl" in (REPO / "envoy" / "redis.conf").read_text().splitlines()
    assert redis["strategy"] == {"type": "Recreate"} and redis["replicas"] == 1


class IstioRun:
    """The assembled config of a variant, running on 127.0.0.1 in front of
    real demo backends ("pods"; a fourth for the ReplicaSet to start later)
    and Redis + webdis configured from base/store.yaml. The filter is loaded
    over ECDS and the endpoints over EDS, from files. With `app_sidecars`
    (an Istio version), each pod's app sits behind its own sidecar, assembled
    from the overlay like an app pod's istio-proxy (or as Istio makes it,
    without `inbound_patch`): the proxy's endpoints are the sidecars, and
    killing an app leaves its sidecar up."""

    def __init__(self, variant: str, wasm: Path, tmp_path: Path, monkeypatch, certificate: tuple[Path, Path],
                 app_sidecars: tuple[int, int] | None = None, inbound_patch: bool = True):
        for tool in ("redis-server", "redis-cli", "webdis"):
            require_tool(tool)
        self.variant, self.monkeypatch, self.inbound_patch = variant, monkeypatch, inbound_patch
        ports = tb.PortPlan.free(backends=4)
        self.bed = tb.Testbed(ports, tmp_path / "tb", wasm=wasm)
        # The store as the manifests configure it. The filter sends webdis the
        # proxies' credentials once its plugin JSON has store.auth; until then
        # webdis runs its ACL without the basic-auth condition.
        sends_credentials = "auth" in km.plugin_config(envoyfilter())["store"]
        self.bed.webdis.argv = ["webdis", str(webdis_config(tmp_path / "webdis.json", ports.redis, ports.webdis,
                                                            require_credentials=sends_credentials))]
        (tmp_path / "redis").mkdir()
        self.redis_dir = tmp_path / "redis"
        self.bed.backends.append(tb.Backend("d", ports.backends[3],
                                            tb.Process("backend-d", [], self.bed.workdir / "backend-d.log")))
        self.workdir = tmp_path / "istio"
        self.workdir.mkdir()
        self.listen, self.admin = free_listen_ports(variant), tb.free_ports(1)[0]
        if app_sidecars is not None:
            for backend in self.bed.backends:
                self._add_app_sidecar(backend, app_sidecars)
        self.config = assemble(variant, wasm, self.workdir, self.listen, self.admin, certificate,
                               store=("127.0.0.1", ports.webdis), ecds_files=True)
        self.envoy = tb.Process("envoy", [ke.ENVOY, "-c", str(self.workdir / "envoy.yaml"), "--concurrency", "2",
                                          "--disable-hot-restart", "-l", "info"], self.workdir / "envoy.log")
        if is_gateway(variant):
            self.url, self.host, self.ca = f"https://127.0.0.1:{self.listen[https_port()]}", "demo-gateway.example", \
                certificate[0]
        else:
            self.url, self.host, self.ca = f"http://127.0.0.1:{self.listen[8080]}", "demo:8080", None

    def _add_app_sidecar(self, backend: tb.Backend, istio: tuple[int, int]) -> None:
        """The pod's address (backend.port) is its sidecar's; the app moves to a port of its own."""
        backend.app_port, admin = tb.free_ports(2)
        config = self.workdir / f"sidecar-{backend.name}.yaml"
        if self.inbound_patch:
            bootstrap = assemble_app_sidecar(VARIANTS[self.variant][0], backend.port, admin, backend.app_port, istio)
        else:
            bootstrap = ke.app_sidecar_skeleton(NAMESPACE, backend.port, admin, backend.app_port, istio)[0]
        config.write_text(yaml.safe_dump(bootstrap))
        backend.sidecar = tb.Process(f"sidecar-{backend.name}", [
            ke.ENVOY, "-c", str(config), "--concurrency", "1", "--disable-hot-restart", "-l", "warning",
        ], self.workdir / f"sidecar-{backend.name}.log")

    def start_pod(self, index: int) -> tb.Backend:
        backend = self.bed.start_backend(index)
        if backend.sidecar is not None:
            backend.sidecar.start()
            tb.wait_until(lambda: backend.sidecar.ensure_alive() or tb.accepts(backend.port), 30,
                          f"the sidecar of pod {backend.name}")
        return backend

    def start(self) -> list[tb.Backend]:
        """Everything but the fourth pod; returns the three pods in EDS."""
        self.bed.redis = start_redis(self.redis_dir, self.bed.ports.redis, self.monkeypatch,
                                     default_user_like_proxy=True)
        self.bed.start_webdis()
        pods = [self.start_pod(i) for i in range(3)]
        self.set_endpoints(pods)
        (self.workdir / "envoy.yaml").write_text(yaml.safe_dump(self.config))
        # What the Secrets give the proxy container.
        self.monkeypatch.setenv("SA_KEY_1", TEST_KEY)
        self.monkeypatch.setenv("SA_STORE_PASSWORD", TEST_STORE_PASSWORD)
        self.envoy.start()
        tb.wait_until(lambda: self.hosts() == {p.address for p in pods}, 30, "envoy with the three pods from EDS")
        tb.wait_until(lambda: all(tb.accepts(port) for port in self.listen.values()), 30, "envoy's listeners")
        return pods

    def set_endpoints(self, pods: list[tb.Backend]) -> None:
        """The pods' addresses in EDS, as istiod sends them; waits until Envoy has them."""
        ke.write_atomically(self.workdir / "eds.json",
                            ke.eds(ke.app_cluster(NAMESPACE), [("127.0.0.1", p.port) for p in pods]))
        if self.envoy.running():
            tb.wait_until(lambda: self.hosts() == {p.address for p in pods}, 30, "the new endpoints in EDS")

    def hosts(self) -> set[str]:
        self.envoy.ensure_alive()
        _, _, body = tb.http_get(f"http://127.0.0.1:{self.admin}/clusters")
        prefix = ke.app_cluster(NAMESPACE) + "::"
        return {line.split("::")[1] for line in body.decode().splitlines()
                if line.startswith(prefix) and "::cx_active::" in line}

    def client(self) -> Client:
        return Client(self.url, self.host, self.ca)

    def first_session(self) -> tuple[Client, dict]:
        """A client whose session started; the filter is loaded over ECDS once
        the listener answers."""
        client = self.client()
        status, headers, body = tb.wait_until(lambda: (lambda r: r if r[0] == 200 else None)(client.get()),
                                               30, "first answer through the filter")
        assert client.cookie and body["count"] == 1 and body["session"], headers
        return client, body

    def restored(self) -> int:
        body = tb.http_get(f"http://127.0.0.1:{self.admin}/stats?filter=session_affinity.failovers.restored")[2]
        return sum(int(line.rsplit(": ", 1)[1]) for line in body.decode().splitlines() if ": " in line)

    def __enter__(self) -> "IstioRun":
        return self

    def __exit__(self, failed, *_):
        if failed is not None:
            print(self.bed.log_report(40))
            print(f"===== envoy\n{self.envoy.log_tail(80)}")
        self.envoy.stop()
        self.bed.stop()


def assert_session_moves(run: IstioRun, client: Client, gone: str, count: int) -> None:
    """The session that was on pod `gone` with `count` requests continues on
    another pod with its state, and stays there; the failover is counted."""
    status, _, body = client.get()
    assert status == 200, (status, body, run.envoy.log_tail(30))
    assert body["backend"] != gone and body["count"] == count + 1, body
    moved = body["backend"]
    for n in range(count + 2, count + 5):
        status, _, body = client.get()
        assert (status, body["backend"], body["count"]) == (200, moved, n), body
    # Counters are flushed from each worker once a second.
    tb.wait_until(lambda: run.restored() >= 1, 5, "the failovers.restored counter")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_istio_config_keeps_sessions_across_pod_deletion(variant, wasm_module, gateway_certificate, tmp_path,
                                                         monkeypatch):
    with IstioRun(variant, wasm_module, tmp_path, monkeypatch, gateway_certificate) as run:
        pods = run.start()
        client, body = run.first_session()
        # A gateway serves HTTPS, so the cookie is Secure, with the __Host- prefix.
        assert client.cookie.startswith("__Host-sa=") and "; Secure" in client.set_cookie, client.set_cookie
        first = body["backend"]
        for n in range(2, 8):
            status, _, body = client.get()
            assert (status, body["backend"], body["count"]) == (200, first, n), body
        # Several sessions spread over the pods, each pinned to its own.
        others = [run.client() for _ in range(8)]
        placed = {c: c.get()[2]["backend"] for c in others}
        assert len(set(placed.values())) >= 2, placed
        for c, name in placed.items():
            assert c.get()[2]["backend"] == name

        # kubectl delete pod: its endpoint leaves EDS, the pod stops, the
        # ReplicaSet starts a new pod (new address) that joins EDS.
        doomed = run.bed.backend_named(first)
        replacement = run.start_pod(3)
        run.set_endpoints([p for p in pods if p is not doomed] + [replacement])
        doomed.process.stop()
        assert_session_moves(run, client, first, 7)

        # A header name with an underscore never reaches the filter or the app.
        import requests
        forged = requests.get(client.base + "/", timeout=5, verify=str(run.ca) if run.ca else True, headers={
            "host": run.host, "cookie": client.cookie, "x_session_state": "forged", "x_session_id": "A" * 22})
        assert forged.status_code == 400, (forged.status_code, forged.text)
        if is_gateway(variant):  # plain HTTP: a redirect to HTTPS, and no cookie
            plain = requests.get(f"http://127.0.0.1:{run.listen[8080]}/", timeout=5, allow_redirects=False,
                                 headers={"host": run.host})
            assert (plain.status_code, plain.headers["location"]) == (301, f"https://{run.host}/"), plain.headers
            assert "set-cookie" not in plain.headers


APP_DEATH = {  # name: (Istio version, the app's sidecar has the inbound patch)
    "no-inbound-retries": ((1, 23), True),
    "istio-%d.%d" % ke.LATEST: (ke.LATEST, True),
    "istio-%d.%d-without-inbound-patch" % ke.LATEST: (ke.LATEST, False),
}


@pytest.mark.parametrize("case", list(APP_DEATH))
def test_istio_gateway_moves_sessions_off_a_pod_whose_app_died(case, wasm_module, gateway_certificate, tmp_path,
                                                              monkeypatch):
    """Each pod's app behind its own sidecar, as in the mesh. The app
    container of the session's pod dies and the pod stays in EDS (a crash,
    or a deleted pod the proxies' endpoints still list: istio/istio#7665).
    Its sidecar answers 503 itself, marked by the inbound patch; the gateway's
    filter moves the session to another pod with its state. Without the
    patch, the sidecar's bare 503 has no instance id: a POST gets the 503; a
    GET moves the session (the server's error, not the app's), unless the
    gateway, which knows nothing, places the replay on the dead pod again:
    that GET gets the 503 and the session stays in the store, so a later GET
    moves it. The patch makes the first move certain."""
    istio, patched = APP_DEATH[case]
    with IstioRun("gateway-envoyfilter", wasm_module, tmp_path, monkeypatch, gateway_certificate,
                  app_sidecars=istio, inbound_patch=patched) as run:
        pods = run.start()
        client, body = run.first_session()
        first = body["backend"]
        for n in range(2, 5):
            assert client.get()[2]["count"] == n
        run.bed.backend_named(first).process.kill()
        assert run.hosts() == {p.address for p in pods}  # nothing told the gateway
        if not patched:
            status, headers, body = client.get(method="POST")
            assert status == 503 and "x-instance-id" not in headers, (status, body)
            # Each replay lands on the dead pod with chance 1/3: 12 in a row is 2 in a million.
            for _ in range(12):
                status, headers, body = client.get()
                if status == 200:
                    break
                assert status == 503 and "x-instance-id" not in headers, (status, body)
            assert (status, body["backend"] != first, body["count"]) == (200, True, 5), (status, body)
            assert_session_moves(run, client, first, 5)
            return
        assert_session_moves(run, client, first, 4)


# --------------------------------------------------------------------------
# The app pods' sidecars: the inbound patch, in the real Envoy.

@pytest.mark.parametrize("istio", ke.INBOUND_ROUTES, ids=lambda v: "istio-%d.%d" % v)
@pytest.mark.parametrize("overlay", ISTIO_OVERLAYS)
def test_app_sidecar_config_loads_in_envoy(overlay, istio, tmp_path):
    config = assemble_app_sidecar(overlay, *tb.free_ports(3), istio)
    inbound = ke.http_connection_managers(config)[("virtualInbound", 0)]
    assert "local_reply_config" in inbound and inbound["route_config"]["response_headers_to_remove"]
    assert ke.http_filter_names(inbound) == ke.http_filter_names({"http_filters": ke.istio_http_filters("inbound")})
    ok = ke.envoy_validate(config)
    assert ok.returncode == 0, ok.stdout + ok.stderr


class ForgingApp:
    """An app that answers 503 with its own x-session-unreached, as a buggy or
    hostile app might, on 127.0.0.1:port (a thread of this process)."""

    def __init__(self, port: int):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(503)
                self.send_header("x-session-unreached", "UF")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.mark.parametrize("istio", ke.INBOUND_ROUTES, ids=lambda v: "istio-%d.%d" % v)
def test_app_sidecar_marks_only_its_own_replies(istio, tmp_path):
    """A demo app behind the sidecar config an app pod gets: its answers pass
    unmarked; killed, the sidecar's own 503 carries x-session-unreached with
    its response flags (without the patch: a bare 503, which the gateway
    cannot tell from the app's); an app that sends the header itself has it
    removed."""
    require_tool(ke.ENVOY)
    import requests
    bed = tb.Testbed(tb.PortPlan.free(backends=1), tmp_path / "tb")
    app = bed.backends[0]
    app.app_port, patched, bare, *admins = tb.free_ports(5)
    # Istio 1.24+ retries a reset before the request reached the app, twice.
    flags = "URX,UF" if istio >= (1, 24) else "UF"
    sidecars = []
    for port, admin, config in [
            (patched, admins[0], assemble_app_sidecar("istio-gateway", patched, admins[0], app.app_port, istio)),
            (bare, admins[1], ke.app_sidecar_skeleton(NAMESPACE, bare, admins[1], app.app_port, istio)[0])]:
        path = tmp_path / f"sidecar-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        sidecars.append(tb.Process(f"sidecar-{port}", [ke.ENVOY, "-c", str(path), "--concurrency", "1",
                                                         "--disable-hot-restart", "-l", "warning"],
                                   tmp_path / f"sidecar-{port}.log"))
    try:
        bed.start_backend(0)
        for sidecar, port in zip(sidecars, (patched, bare)):
            sidecar.start()
            tb.wait_until(lambda: sidecar.ensure_alive() or tb.accepts(port), 30, f"sidecar on {port}")

        def get(port: int) -> requests.Response:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        served = get(patched)
        assert served.status_code == 200 and "x-session-unreached" not in served.headers
        assert served.headers["x-instance-id"] == app.instance
        app.process.kill()
        reply = get(patched)
        assert (reply.status_code, reply.headers.get("x-session-unreached")) == (503, flags), reply.headers
        assert "x-instance-id" not in reply.headers
        reply = get(bare)
        assert reply.status_code == 503 and "x-session-unreached" not in reply.headers, reply.headers
        with ForgingApp(app.app_port):
            forged = get(patched)
            assert forged.status_code == 503 and "x-session-unreached" not in forged.headers, forged.headers
    except BaseException:
        for sidecar in sidecars:
            print(f"===== {sidecar.name}\n{sidecar.log_tail(40)}")
        raise
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        bed.stop()


def test_readme_names_what_exists():
    """k8s/README.md mentions every overlay, and every k8s path it names exists."""
    text = (K8S / "README.md").read_text()
    for overlay in OVERLAYS:
        assert f"overlays/{overlay}" in text, overlay
    for path in set(re.findall(r"k8s/([\w./-]+[\w])", text)):
        assert (K8S / path).exists(), path
    for path in set(re.findall(r"`((?:base|istio|overlays)/[\w./-]+)`", text)):
        assert (K8S / path).exists(), path


def test_gateways_serve_the_tls_secret_the_readme_creates():
    """Both gateways serve HTTPS from the one TLS Secret k8s/README.md tells
    users to create; no key is committed."""
    blocks = re.findall(r"```sh\n(.*?)```", (K8S / "README.md").read_text(), re.S)
    assert f"create secret tls {TLS_SECRET} " in one(b for b in blocks if "create secret tls" in b)
    https = one(s for s in demo_gateway()["spec"]["servers"] if s["port"]["protocol"] == "HTTPS")
    assert https["tls"] == {"mode": "SIMPLE", "credentialName": TLS_SECRET}
    service = rendered("istio-gateway")[("Service", "demo-gateway")]["spec"]["ports"]
    assert {(p["port"], p["targetPort"]) for p in service} == {(443, https_port()), (80, 8080)}
    envoy_pod = rendered("envoy-gateway")[("Deployment", "envoy-gateway")]["spec"]["template"]["spec"]
    assert {v["secret"]["secretName"] for v in envoy_pod["volumes"] if "secret" in v} == {TLS_SECRET}
    for f in K8S.rglob("*"):
        assert not f.is_file() or "PRIVATE KEY" not in f.read_text(errors="replace"), f

"""Proof for k8s/ without a cluster.

- Every manifest and every rendered overlay validates: Kubernetes kinds against
  the schemas of `kubernetes-validate` (strict), Istio kinds against the CRDs'
  OpenAPI schemas in <repo>/../shared/schemas/istio-crds.yaml (unknown fields
  and CEL rules checked).
- The Istio manifests, applied to an Istio-shaped Envoy config (tests/k8s_envoy.py),
  give a config that the real Envoy accepts with the real filter module, and
  refuses when the key's environment variable is missing.
- The same assembled config, run on 127.0.0.1 in front of real demo backends
  and a real Redis + webdis, keeps sessions sticky and keeps a session's state
  when its pod is deleted (the pod's endpoint leaves EDS, as in Kubernetes).
- The plain-Envoy gateway's ConfigMap is what the generator derives from
  envoy/testbed.yaml, and Envoy accepts it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import k8s_envoy as ke
import k8s_manifests as km
from harness import require_tool, tb  # tb is envoy/testbed.py, the other e2e tests' harness

REPO = km.REPO
K8S = km.K8S
NAMESPACE = "session-demo"
TEST_KEY = "k8s-test-key-0123456789-abcdefghijklmnop"  # 40 bytes, test only

OVERLAYS = [p.name for p in km.overlay_dirs()]
MANIFEST_DOCS = [(f, i, d) for f in km.manifest_files() for i, d in enumerate(km.load_docs(f))]


def doc_id(item) -> str:
    f, i, d = item
    return f"{f.relative_to(K8S)}#{d['kind']}/{d['metadata']['name']}"


def rendered(overlay: str) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in km.render(K8S / "overlays" / overlay)}


@pytest.fixture(scope="session")
def wasm_module() -> Path:
    """The filter module; built with filter/build when it is missing."""
    require_tool(ke.ENVOY)
    return tb.ensure_wasm()


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
    for name in ("demo", "redis", "webdis"):
        c = docs[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]
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
# The Istio manifests: what they say.

def envoyfilter() -> dict:
    return km.load_docs(K8S / "istio" / "envoyfilter" / "envoyfilter.yaml")[0]


def test_envoyfilter_parts_in_order():
    patches = envoyfilter()["spec"]["configPatches"]
    assert [(p["applyTo"], p["patch"]["operation"]) for p in patches] == [
        ("EXTENSION_CONFIG", "ADD"), ("HTTP_FILTER", "INSERT_BEFORE"), ("HTTP_FILTER", "INSERT_BEFORE"),
        ("CLUSTER", "ADD"), ("CLUSTER", "MERGE")]
    wasm, filt, stateful, store, merge = patches
    assert filt["patch"]["value"]["name"] == wasm["patch"]["value"]["name"]
    remote = wasm["patch"]["value"]["typed_config"]["config"]["vm_config"]["code"]["remote"]
    assert remote["http_uri"]["uri"].startswith("https://") and len(remote["sha256"]) == 64
    ss = stateful["patch"]["value"]["typed_config"]
    assert ss["strict"] is True
    assert ss["session_state"]["typed_config"]["name"] == "x-session-route"
    assert store["patch"]["value"]["name"] == km.plugin_config(envoyfilter())["store"]["cluster"]
    assert merge["match"]["cluster"]["name"] == ke.app_cluster(NAMESPACE)
    assert "DRAINING" in merge["patch"]["value"]["common_lb_config"]["override_host_status"]["statuses"]


def test_keys_come_from_the_secret_only():
    """Plugin configs name environment variables, never secrets; each variable
    is exposed to the VM and filled from the Secret in every proxy container."""
    cfg = km.plugin_config(envoyfilter())
    assert cfg["keys"] and all(set(k) == {"id", "secret_env"} for k in cfg["keys"])
    names = {k["secret_env"] for k in cfg["keys"]}
    vm = envoyfilter()["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]["vm_config"]
    assert names <= set(vm["environment_variables"]["host_env_keys"])
    for overlay, deployment, container in [("istio-gateway", "demo-gateway", "istio-proxy"),
                                           ("istio-sidecar", "client", "istio-proxy"),
                                           ("envoy-gateway", "envoy-gateway", "envoy")]:
        pod = rendered(overlay)[("Deployment", deployment)]["spec"]["template"]["spec"]
        c = next(c for c in pod["containers"] if c["name"] == container)
        env = {e["name"]: e for e in c.get("env", [])}
        for n in names:
            assert env[n]["valueFrom"]["secretKeyRef"] == {"name": "session-affinity-keys", "key": n}, (overlay, n)
    for f in km.manifest_files():
        text = f.read_text()
        assert '"secret":' not in text and "kind: Secret" not in text, f


def test_wasmplugin_variant_says_the_same():
    ef = envoyfilter()
    wp, routing = km.load_docs(K8S / "istio" / "wasmplugin" / "wasmplugin.yaml")[0], \
        km.load_docs(K8S / "istio" / "wasmplugin" / "envoyfilter.yaml")[0]
    wasm = ef["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]
    assert wp["spec"]["pluginConfig"] == km.plugin_config(ef)
    assert wp["spec"]["url"] == wasm["vm_config"]["code"]["remote"]["http_uri"]["uri"]
    assert wp["spec"]["sha256"] == wasm["vm_config"]["code"]["remote"]["sha256"]
    assert wp["spec"]["pluginName"] == wasm["root_id"]
    assert [e["name"] for e in wp["spec"]["vmConfig"]["env"] if e["valueFrom"] == "HOST"] == \
        wasm["vm_config"]["environment_variables"]["host_env_keys"]
    assert wp["spec"]["selector"]["matchLabels"] == ef["spec"]["workloadSelector"]["labels"] == \
        routing["spec"]["workloadSelector"]["labels"]
    # The routing EnvoyFilter repeats the main one's non-Wasm patches.
    stateful, *clusters = routing["spec"]["configPatches"]
    assert stateful["patch"]["value"] == ef["spec"]["configPatches"][2]["patch"]["value"]
    assert stateful["patch"]["operation"] == "INSERT_AFTER"
    assert stateful["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == \
        f"extensions.istio.io/wasmplugin/{NAMESPACE}.{wp['metadata']['name']}"
    assert clusters == ef["spec"]["configPatches"][3:]


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
    ecds = {}
    ke.apply_envoyfilter(*ke.skeleton("gateway", NAMESPACE, 1, 2, tmp_path / "eds.json"), ef, ecds)
    ke.agent_fetch(ecds, {url: wasm_module})  # checks the pinned sha256
    other = tmp_path / "other.wasm"
    other.write_bytes(wasm_module.read_bytes() + b"\0")
    ecds = {}
    ke.apply_envoyfilter(*ke.skeleton("gateway", NAMESPACE, 1, 2, tmp_path / "eds.json"), ef, ecds)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        ke.agent_fetch(ecds, {url: other})


# --------------------------------------------------------------------------
# The Istio manifests in the real Envoy.

VARIANTS = {
    # name: (overlay, proxy kind)
    "gateway-envoyfilter": ("istio-gateway", "gateway"),
    "gateway-wasmplugin": ("istio-gateway-wasmplugin", "gateway"),
    "sidecar-envoyfilter": ("istio-sidecar", "sidecar"),
    "gateway-configmap-wasm": ("istio-gateway-local-wasm", "gateway"),
}


def assemble(variant: str, wasm: Path, workdir: Path, listen_port: int, admin_port: int,
             store: tuple[str, int] = ("127.0.0.1", 7379), ecds_files: bool = False) -> dict:
    """The Envoy config an Istio proxy selected by the overlay would run."""
    overlay, kind = VARIANTS[variant]
    docs = km.render(K8S / "overlays" / overlay)
    routes = [h for d in docs if d["kind"] == "VirtualService" for h in d["spec"]["http"]
              if (kind == "gateway") == bool(d["spec"].get("gateways"))]
    assert len(routes) == 1, routes
    bootstrap, view = ke.skeleton(kind, NAMESPACE, listen_port, admin_port, workdir / "eds.json", routes[0])
    for d in docs:
        if d["kind"] == "DestinationRule":
            ke.apply_destination_rule(bootstrap, NAMESPACE, d)
    if not (workdir / "eds.json").exists():
        ke.write_atomically(workdir / "eds.json", ke.eds(ke.app_cluster(NAMESPACE), []))
    ecds: dict = {}
    modules = {}
    for d in docs:
        if d["kind"] == "WasmPlugin":
            ke.insert_wasmplugin(bootstrap, view, d, ecds)
            modules[d["spec"]["url"]] = wasm
    for d in docs:
        if d["kind"] == "EnvoyFilter":
            ke.apply_envoyfilter(bootstrap, view, d, ecds)
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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_istio_config_loads_in_envoy(variant, wasm_module, tmp_path):
    config = assemble(variant, wasm_module, tmp_path, *tb.free_ports(2))
    names = ke.http_filter_names(config)
    wasm_name = next(n for n in names if n.startswith("extensions.istio.io/wasmplugin/") or n == "session_affinity")
    assert names[-3:] == [wasm_name, "envoy.filters.http.stateful_session", "envoy.filters.http.router"], names
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == ke.app_cluster(NAMESPACE))
    # The app cluster's lb settings are the testbed's (override_host_status, panic threshold).
    testbed = yaml.safe_load((REPO / "envoy" / "testbed.yaml").read_text())
    testbed_app = next(c for c in testbed["static_resources"]["clusters"] if "override_host_status" in
                       c.get("common_lb_config", {}))
    assert cluster["common_lb_config"] == testbed_app["common_lb_config"]
    # ... and so is its outlier detection (the DestinationRule), up to the
    # thresholds Istio writes out while their enforcement is 0.
    def enforced(od: dict) -> dict:
        return {k: v for k, v in od.items()
                if not (k in ("consecutive_5xx", "consecutive_gateway_failure") and od.get(f"enforcing_{k}") == 0)}
    assert enforced(cluster["outlier_detection"]) == enforced(testbed_app["outlier_detection"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SA_KEY_")}
    ok = ke.envoy_validate(config, env={**env, "SA_KEY_1": TEST_KEY})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Without the key in the proxy's environment the filter refuses to load.
    missing = ke.envoy_validate(config, env=env)
    assert missing.returncode != 0
    assert "SA_KEY_1" in missing.stdout + missing.stderr
    assert TEST_KEY not in missing.stdout + missing.stderr


# --------------------------------------------------------------------------
# The plain-Envoy gateway.

GEN = K8S / "gen-envoy-config"
ENVOY_CONFIGMAP = K8S / "overlays" / "envoy-gateway" / "envoy-config.yaml"


def test_envoy_gateway_configmap_is_what_the_generator_makes():
    """The committed ConfigMap is derived from envoy/testbed.yaml; this fails
    when either changes without `k8s/gen-envoy-config --write`."""
    out = subprocess.run([sys.executable, str(GEN)], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == ENVOY_CONFIGMAP.read_text(), "stale: run k8s/gen-envoy-config --write"


def test_one_plugin_json_everywhere():
    out = subprocess.run([sys.executable, str(GEN), "--plugin-json"], capture_output=True, text=True,
                         timeout=60, check=True)
    generated = json.loads(out.stdout)
    wp = km.load_docs(K8S / "istio" / "wasmplugin" / "wasmplugin.yaml")[0]
    assert km.plugin_config(envoyfilter()) == wp["spec"]["pluginConfig"] == generated
    assert json.loads(envoy_configmap_bootstrap_wasm()["configuration"]["value"]) == generated
    # Only the keys differ from the testbed's (its keys are public test literals).
    testbed = yaml.safe_load((REPO / "envoy" / "testbed.yaml").read_text())
    testbed_json = json.loads(envoy_configmap_bootstrap_wasm(testbed)["configuration"]["value"])
    assert {k: v for k, v in testbed_json.items() if k != "keys"} == \
        {k: v for k, v in generated.items() if k != "keys"}


def envoy_configmap_bootstrap() -> dict:
    cm = km.load_docs(ENVOY_CONFIGMAP)[0]
    return yaml.safe_load(cm["data"]["envoy.yaml"])


def envoy_configmap_bootstrap_wasm(bootstrap: dict | None = None) -> dict:
    bootstrap = bootstrap or envoy_configmap_bootstrap()
    for hf in bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
        if hf["name"] == "envoy.filters.http.wasm":
            return hf["typed_config"]["config"]
    raise KeyError("no wasm filter")


def test_envoy_gateway_config_loads_in_envoy(wasm_module):
    bootstrap = envoy_configmap_bootstrap()
    pod = rendered("envoy-gateway")[("Deployment", "envoy-gateway")]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v["configMap"]["name"] for v in pod["volumes"]}
    wasm = envoy_configmap_bootstrap_wasm(bootstrap)
    # The paths in the config are where the pod mounts its ConfigMaps.
    assert pod["containers"][0]["args"][:2] == ["-c", f"{mounts['config']}/envoy.yaml"]
    assert volumes["config"] == km.load_docs(ENVOY_CONFIGMAP)[0]["metadata"]["name"]
    assert wasm["vm_config"]["code"]["local"]["filename"] == f"{mounts['wasm']}/session_affinity.wasm"
    names = [f["name"] for f in bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
             ["typed_config"]["http_filters"]]
    assert names == ["envoy.filters.http.wasm", "envoy.filters.http.stateful_session", "envoy.filters.http.router"]
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    listen = {l["name"]: l["address"]["socket_address"]["port_value"] for l in bootstrap["static_resources"]["listeners"]}
    assert listen == {"app": ports["http"], "health": ports["health"]}
    wasm["vm_config"]["code"]["local"]["filename"] = str(wasm_module)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SA_KEY_")}
    ok = ke.envoy_validate(bootstrap, env={**env, "SA_KEY_1": TEST_KEY})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = ke.envoy_validate(bootstrap, env=env)
    assert missing.returncode != 0 and "SA_KEY_1" in missing.stdout + missing.stderr


# --------------------------------------------------------------------------
# The assembled Istio config, running: sticky sessions, and a session that
# survives the deletion of its pod.

class Client:
    """A cookie-keeping client that follows a redirect back to the same URL the
    way a browser does (the filter's recovery uses a 307)."""

    def __init__(self, base: str, host: str):
        self.base, self.host, self.cookie = base, host, None

    def get(self, path: str = "/", hops: int = 3) -> tuple[int, dict, dict]:
        import urllib.request
        for _ in range(hops + 1):
            req = urllib.request.Request(self.base + path, headers={"host": self.host})
            if self.cookie:
                req.add_header("cookie", self.cookie)
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    status, headers, body = r.status, r.headers, r.read()
            except urllib.error.HTTPError as e:
                status, headers, body = e.code, e.headers, e.read()
            for value in headers.get_all("set-cookie") or []:
                self.cookie = value.split(";", 1)[0]
            if status in (302, 303, 307, 308):
                path = headers.get("location", path).replace(self.base, "") or "/"
                continue
            try:
                data = json.loads(body)
            except ValueError:
                data = {"raw": body.decode(errors="replace")}
            return status, dict(headers.items()), data
        raise AssertionError(f"more than {hops} redirects for {path}")


def webdis_config_from_manifest(path: Path, redis_port: int, http_port: int) -> Path:
    """The webdis.json of the k8s ConfigMap, pointed at 127.0.0.1 ports."""
    cm = next(d for d in km.load_docs(K8S / "base" / "store.yaml") if d["kind"] == "ConfigMap")
    config = json.loads(cm["data"]["webdis.json"])
    config.update(redis_host="127.0.0.1", redis_port=redis_port, http_host="127.0.0.1", http_port=http_port,
                  logfile="/dev/stderr")
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_istio_config_keeps_sessions_across_pod_deletion(variant, wasm_module, tmp_path, monkeypatch):
    for tool in ("redis-server", "webdis"):
        require_tool(tool)
    ports = tb.PortPlan.free(backends=4)
    bed = tb.Testbed(ports, tmp_path / "tb", wasm=wasm_module)
    bed.webdis.argv = ["webdis", str(webdis_config_from_manifest(tmp_path / "webdis.json", ports.redis, ports.webdis))]
    bed.backends.append(tb.Backend("d", ports.backends[3], tb.Process("backend-d", [], bed.workdir / "backend-d.log")))
    listen, admin = tb.free_ports(2)
    workdir = tmp_path / "istio"
    workdir.mkdir()
    cluster = ke.app_cluster(NAMESPACE)
    envoy = None
    try:
        bed.start_redis()
        bed.start_webdis()
        pods = [bed.start_backend(i) for i in range(3)]  # "d" is the pod the ReplicaSet starts later
        ke.write_atomically(workdir / "eds.json", ke.eds(cluster, [("127.0.0.1", p.port) for p in pods]))
        config = assemble(variant, wasm_module, workdir, listen, admin, store=("127.0.0.1", ports.webdis),
                          ecds_files=True)
        (workdir / "envoy.yaml").write_text(yaml.safe_dump(config))
        monkeypatch.setenv("SA_KEY_1", TEST_KEY)  # what the Secret gives the proxy container
        envoy = tb.Process("envoy", [ke.ENVOY, "-c", str(workdir / "envoy.yaml"), "--concurrency", "2",
                                      "--disable-hot-restart", "-l", "info"], workdir / "envoy.log")
        envoy.start()

        def hosts() -> set[str]:
            envoy.ensure_alive()
            _, _, body = tb.http_get(f"http://127.0.0.1:{admin}/clusters")
            return {line.split("::")[1] for line in body.decode().splitlines()
                    if line.startswith(cluster + "::") and "::cx_active::" in line}

        tb.wait_until(lambda: hosts() == {p.address for p in pods}, 30, "envoy with the three pods from EDS")
        tb.wait_until(lambda: tb.accepts(listen), 30, "envoy listener")
        host = "demo-gateway.example" if VARIANTS[variant][1] == "gateway" else "demo:8080"
        client = Client(f"http://127.0.0.1:{listen}", host)
        # The filter is loaded over ECDS once the listener answers.
        status, headers, body = tb.wait_until(lambda: (lambda r: r if r[0] == 200 else None)(client.get()),
                                               30, "first answer through the filter")
        assert client.cookie and client.cookie.startswith("sa="), headers
        first = body["backend"]
        assert body["count"] == 1 and body["session"]
        for n in range(2, 8):
            status, _, body = client.get()
            assert (status, body["backend"], body["count"]) == (200, first, n), body
        # Several sessions spread over the pods, each pinned to its own.
        others = [Client(client.base, host) for _ in range(8)]
        placed = {c: c.get()[2]["backend"] for c in others}
        assert len(set(placed.values())) >= 2, placed
        for c, name in placed.items():
            assert c.get()[2]["backend"] == name

        # kubectl delete pod: its endpoint leaves EDS, the pod stops, the
        # ReplicaSet starts a new pod (new address) that joins EDS.
        doomed = bed.backend_named(first)
        replacement = bed.start_backend(3)
        alive = [p for p in pods if p is not doomed] + [replacement]
        ke.write_atomically(workdir / "eds.json", ke.eds(cluster, [("127.0.0.1", p.port) for p in alive]))
        tb.wait_until(lambda: hosts() == {p.address for p in alive}, 30, "EDS without the deleted pod")
        doomed.process.stop()

        status, _, body = client.get()
        assert status == 200, (status, body, envoy.log_tail(30))
        assert body["backend"] != first and body["count"] == 8, body
        moved = body["backend"]
        for n in range(9, 12):
            status, _, body = client.get()
            assert (status, body["backend"], body["count"]) == (200, moved, n), body

        def restored() -> int:
            body = tb.http_get(f"http://127.0.0.1:{admin}/stats?filter=session_affinity.failovers.restored")[2]
            return sum(int(line.rsplit(": ", 1)[1]) for line in body.decode().splitlines() if ": " in line)

        # Counters are flushed from each worker once a second.
        tb.wait_until(lambda: restored() >= 1, 5, "the failovers.restored counter")
    except BaseException:
        print(bed.log_report(40))
        if envoy is not None:
            print(f"===== envoy\n{envoy.log_tail(80)}")
        raise
    finally:
        if envoy is not None:
            envoy.stop()
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

"""Reading, rendering and validating the Kubernetes manifests in k8s/.

No cluster and no kustomize binary are needed:
- `render(dir)` is a small kustomize for the subset k8s/ uses (resources,
  namespace, images, patches as strategic-merge or JSON 6902). Any other
  kustomization field is an error, so the subset cannot silently grow. Where a
  real kustomize is at hand (`kubectl kustomize`), the tests compare with it.
- `validate_core(doc)` checks Kubernetes kinds against the JSON schemas that the
  `kubernetes-validate` package ships (strict: unknown fields are errors).
- `validate_istio(doc)` checks Istio and Gateway API kinds against the
  OpenAPI v3 schemas of their CRDs, vendored in k8s/schemas/ (sources and
  licenses in k8s/schemas/README.md). Unknown fields are errors (as with
  `kubectl apply --validate=strict`), the schemas' defaults are applied first
  (as the API server does), and every CEL rule (x-kubernetes-validations) on
  the way is evaluated: Istio's by a hand translation below, the others by a
  CEL implementation (PyPI common-expression-language); a rule that cannot be
  evaluated fails the check instead of being skipped. Transition rules (those
  with oldSelf) apply only to updates and are skipped. AuthorizationPolicy,
  whose CRD is not vendored, is checked against a hand-written schema of the
  fields k8s/ may use.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import urllib.parse
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
SCHEMAS = K8S / "schemas"
ISTIO_CRDS = SCHEMAS / "istio-crds.yaml"
GATEWAY_API_CRDS = SCHEMAS / "gateway-api-crds.yaml"
KUBERNETES_VERSION = "1.30"

ISTIO_GROUPS = ("networking.istio.io", "extensions.istio.io", "security.istio.io")
CRD_GROUPS = ISTIO_GROUPS + ("gateway.networking.k8s.io",)


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def ident(doc: dict) -> tuple[str, str, str, str]:
    meta = doc.get("metadata", {})
    return (doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else "",
            doc["kind"], meta.get("namespace", ""), meta["name"])


# --------------------------------------------------------------------------
# A small kustomize.

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass",
                  "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
# Strategic-merge keys of the lists this repo patches (Kubernetes kinds only).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


class KustomizeError(Exception):
    pass


def render(directory: Path) -> list[dict]:
    """Renders the kustomization in `directory` to a list of resources."""
    directory = Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.exists():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: fields this renderer does not implement: {sorted(unknown)}")
    resources: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += render(path)
        else:
            if directory.resolve() not in path.parents:
                raise KustomizeError(f"{kfile}: file {entry} is outside the kustomization root")
            resources += load_docs(path)
    seen = set()
    for r in resources:
        if ident(r) in seen:
            raise KustomizeError(f"{kfile}: duplicate resource {ident(r)}")
        seen.add(ident(r))
    for p in k.get("patches", []):
        apply_patch(resources, p, directory)
    if "namespace" in k:
        for r in resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r.setdefault("metadata", {})["namespace"] = k["namespace"]
    for image in k.get("images", []):
        set_image(resources, image)
    return resources


def apply_patch(resources: list[dict], spec: dict, directory: Path) -> None:
    if set(spec) - {"patch", "path", "target"}:
        raise KustomizeError(f"patch fields not implemented: {sorted(set(spec) - {'patch', 'path', 'target'})}")
    text = spec["patch"] if "patch" in spec else (directory / spec["path"]).read_text()
    body = yaml.safe_load(text)
    if isinstance(body, list):  # JSON 6902: needs a target
        targets = [r for r in resources if matches(r, spec.get("target"))]
        if "target" not in spec or len(targets) != 1:
            raise KustomizeError(f"JSON 6902 patch must target exactly one resource, got {len(targets)}")
        json6902(targets[0], body)
        return
    target = spec.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
    targets = [r for r in resources if matches(r, target)]
    if not targets:
        raise KustomizeError(f"patch matches no resource: {target}")
    if body.get("$patch") == "delete":  # strategic merge: the resource is left out
        resources[:] = [r for r in resources if not matches(r, target)]
        return
    for r in targets:
        merged = strategic_merge(r, body, builtin="istio.io" not in r["apiVersion"])
        r.clear()
        r.update(merged)


def matches(resource: dict, target: dict | None) -> bool:
    if not target:
        return False
    for key in set(target) - {"kind", "name", "namespace", "group", "version"}:
        raise KustomizeError(f"patch target field not implemented: {key}")
    return all(
        (key != "kind" or resource["kind"] == value)
        and (key != "name" or resource["metadata"]["name"] == value)
        and (key != "namespace" or resource["metadata"].get("namespace") == value)
        and (key != "group" or resource["apiVersion"].split("/")[0] == value)
        and (key != "version" or resource["apiVersion"].split("/")[-1] == value)
        for key, value in target.items())


def strategic_merge(base, patch, builtin: bool, field: str = ""):
    """Strategic merge for Kubernetes kinds (lists with a known merge key merge
    by that key), JSON merge patch for custom resources (lists replace)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, builtin, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if (builtin and isinstance(patch, list) and isinstance(base, list) and field in MERGE_KEYS
            and all(isinstance(x, dict) for x in base + patch)):
        # Items new to the list come first, as kubectl kustomize orders them.
        key = MERGE_KEYS[field]
        out = [copy.deepcopy(x) for x in base]
        new = []
        for item in patch:
            match = [i for i, x in enumerate(out) if x.get(key) == item.get(key)]
            if match:
                out[match[0]] = strategic_merge(out[match[0]], item, builtin)
            else:
                new.append(copy.deepcopy(item))
        return new + out
    return copy.deepcopy(patch)


def json6902(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] in ("replace", "add"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif op["op"] == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                if op["op"] == "replace" and last not in parent:
                    raise KustomizeError(f"replace of a missing path {op['path']}")
                parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise KustomizeError(f"JSON 6902 op not implemented: {op['op']}")


def set_image(resources: list[dict], image: dict) -> None:
    for r in resources:
        pod = r.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            ref = c.get("image", "")
            name = re.split(r"[:@]", ref.rsplit("/", 1)[-1], maxsplit=1)[0]
            name = ref[:len(ref) - len(ref.rsplit("/", 1)[-1])] + name
            if name != image["name"]:
                continue
            tag = ref[len(name):]
            new = image.get("newName", name)
            if "digest" in image:
                tag = "@" + image["digest"]
            elif "newTag" in image:
                tag = ":" + image["newTag"]
            c["image"] = new + tag


def kustomize_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def overlay_dirs() -> list[Path]:
    return sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def manifest_files() -> list[Path]:
    """Every YAML file under k8s/ that holds Kubernetes objects."""
    return sorted(p for p in K8S.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and SCHEMAS not in p.parents)


# --------------------------------------------------------------------------
# Validation of Kubernetes kinds.

def is_custom(doc: dict) -> bool:
    """A kind defined by a vendored CRD (Istio's, the Gateway API's)."""
    return doc.get("apiVersion", "").split("/")[0] in CRD_GROUPS


def validate_core(doc: dict) -> None:
    import kubernetes_validate
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')}: "
                             f"{'/'.join(map(str, e.absolute_path))}: {e.message}") from None


# --------------------------------------------------------------------------
# Validation of Istio kinds against their CRDs.

def served_schemas(path: Path) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of the
    CRDs in `path`."""
    out = {}
    for crd in load_docs(path):
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


@functools.lru_cache(maxsize=None)
def istio_schemas() -> dict[tuple[str, str], dict]:
    return {**HAND_SCHEMAS, **served_schemas(ISTIO_CRDS)}


@functools.lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str], dict]:
    return {**istio_schemas(), **served_schemas(GATEWAY_API_CRDS)}


def _strings(**extra) -> dict:
    return {"type": "array", "items": {"type": "string"}, **extra}


def _object(**properties) -> dict:
    return {"type": "object", "properties": properties, "additionalProperties": False}


# AuthorizationPolicy (security.istio.io/v1), whose CRD k8s/schemas lacks: the
# subset of its fields that k8s/ may use, written from Istio's reference
# (istio.io/latest/docs/reference/config/security/authorization-policy/).
# Any other field is an error; use one only after adding it here.
HAND_SCHEMAS = {
    ("security.istio.io/v1", "AuthorizationPolicy"): _object(spec=_object(
        selector=_object(matchLabels={"type": "object", "additionalProperties": {"type": "string"}}),
        action={"type": "string", "enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
        rules={"type": "array", "items": _object(
            **{"from": {"type": "array", "items": _object(source=_object(
                principals=_strings(minItems=1), namespaces=_strings(minItems=1)))}},
            to={"type": "array", "items": _object(operation=_object(
                ports=_strings(minItems=1), methods=_strings(minItems=1), paths=_strings(minItems=1)))})},
    )),
}


def _has(obj, key):
    return isinstance(obj, dict) and key in obj


def _is_url_with_scheme(value: str) -> bool:
    parsed = urllib.parse.urlparse(value)
    return bool(parsed.scheme) and bool(parsed.netloc or parsed.path)


def _url_scheme_ok(self: str) -> bool:
    allowed = ("", "http", "https", "oci", "file")
    if _is_url_with_scheme(self):
        return urllib.parse.urlparse(self).scheme in allowed
    return _is_url_with_scheme("http://" + self)


def _duration(value: str) -> float:
    total, rest = 0.0, value
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    for number, unit in re.findall(r"([0-9.]+)(ms|us|µs|ns|h|m|s)", value):
        total += float(number) * units[unit]
        rest = rest.replace(number + unit, "", 1)
    if rest or not value:
        raise ValueError(f"not a duration: {value!r}")
    return total


# Every CEL rule in the Istio CRDs, translated by hand. `s` is the value the
# rule is attached to (CEL's `self`). The other CRDs' rules are evaluated by
# evaluate_cel().
CEL_RULES = {
    '(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1':
        lambda s: _has(s, "selector") + _has(s, "targetRef") + _has(s, "targetRefs") <= 1,
    'self.all(key, !key.contains("*"))': lambda s: all("*" not in k for k in s),
    'self.all(key, key.size() != 0)': lambda s: all(len(k) != 0 for k in s),
    '!self.contains("*")': lambda s: "*" not in s,
    'self.size() == 0': lambda s: len(s) == 0,
    'isURL(self) ? (url(self).getScheme() in ["", "http", "https", "oci", "file"]) : (isURL("http://" + self) &&\n'
    'url("http://" + self).getScheme() in ["", "http", "https", "oci", "file"])': _url_scheme_ok,
    '(has(self.valueFrom) ? self.valueFrom : "") != "HOST" || !has(self.value)':
        lambda s: s.get("valueFrom", "") != "HOST" or "value" not in s,
    "duration(self) >= duration('1ms')": lambda s: _duration(s) >= 1e-3,
    '(has(self.workloadSelector) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1':
        lambda s: _has(s, "workloadSelector") + _has(s, "targetRefs") <= 1,
    'has(self.context) ? ((self.context == "WAYPOINT") ? has(self.waypoint) : !has(self.waypoint)) : !has(self.waypoint)':
        lambda s: (("waypoint" in s) if s.get("context") == "WAYPOINT" else ("waypoint" not in s)),
    '0 < self && self <= 65535': lambda s: 0 < s <= 65535,
    '(has(self.tlsCertificates) ? 1 : 0) + (has(self.credentialNames) ? 1 : 0) <= 1':
        lambda s: _has(s, "tlsCertificates") + _has(s, "credentialNames") <= 1,
    '(has(self.credentialName) ? 1 : 0) + (has(self.credentialNames) ? 1 : 0) <= 1':
        lambda s: _has(s, "credentialName") + _has(s, "credentialNames") <= 1,
    '(has(self.credentialNames) ? 1 : 0) + (has(self.tlsCertificates) ? 1 : 0) <= 1':
        lambda s: _has(s, "credentialNames") + _has(s, "tlsCertificates") <= 1,
    # The Gateway API's one rule that needs Kubernetes' string library
    # (split), which the CEL implementation lacks.
    'self.all(key, key.split("/")[0].size() < 253)': lambda s: all(len(k.split("/")[0]) < 253 for k in s),
}


def structural(schema: dict) -> dict:
    """Turns a CRD's structural schema into a JSON schema that rejects unknown
    fields (Kubernetes would prune them silently; a typo must fail here)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties",):
            out[key] = {k: structural(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural(value)
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [structural(v) for v in value]
        elif key == "nullable":
            continue
        else:
            out[key] = value
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (schema.get("type") == "object" and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    return out


def evaluate_cel(rule: str, value):
    """A CEL rule by the CEL implementation, with `self` bound to `value`."""
    try:
        import cel
    except ImportError:
        raise AssertionError("CEL rules need the PyPI package common-expression-language (.ci/requirements/tests.txt)")
    return cel.evaluate(rule, {"self": value})


def with_defaults(schema: dict, value):
    """`value` with the schema's defaults filled in, as the API server does
    before it checks the CEL rules."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        out = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and isinstance(sub, dict) and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = with_defaults(sub, out[key])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [with_defaults(schema["items"], v) for v in value]
    return value


def cel_errors(schema: dict, value, path: str = "") -> list[str]:
    """Evaluates every x-kubernetes-validations rule that applies to `value`."""
    errors = []
    if not isinstance(schema, dict):
        return errors
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: checked on updates only
        check = CEL_RULES.get(rule["rule"]) or functools.partial(evaluate_cel, rule["rule"])
        try:
            ok = check(value)
        except Exception as e:  # noqa: BLE001 - any evaluation error fails the check
            errors.append(f"{path or '/'}: CEL rule {rule['rule']!r} could not be evaluated: {e}")
            continue
        if ok is not True:
            errors.append(f"{path or '/'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in schema.get("properties", {}):
                errors += cel_errors(schema["properties"][key], sub, f"{path}/{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += cel_errors(schema["additionalProperties"], sub, f"{path}/{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            errors += cel_errors(schema["items"], sub, f"{path}/{i}")
    return errors


def validate_istio(doc: dict) -> None:
    schema = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        raise AssertionError(f"no served CRD version for {doc['apiVersion']} {doc['kind']}")
    name = f"{doc['kind']}/{doc['metadata'].get('name')}"
    # metadata is checked by the API server, not by the CRD schema.
    meta = doc["metadata"]
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta.get("name", "")) or len(meta["name"]) > 253:
        raise AssertionError(f"{name}: invalid metadata.name")
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    validator = jsonschema.Draft7Validator(structural(schema))
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '/'}: {e.message}"
              for e in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))]
    errors += cel_errors(schema, with_defaults(schema, body))
    if errors:
        raise AssertionError(f"{name}:\n  " + "\n  ".join(errors))


def validate(doc: dict) -> None:
    (validate_istio if is_custom(doc) else validate_core)(doc)


def plugin_config(envoyfilter: dict) -> dict:
    """The plugin JSON of the Wasm filter in an EnvoyFilter's EXTENSION_CONFIG."""
    for p in envoyfilter["spec"]["configPatches"]:
        if p["applyTo"] == "EXTENSION_CONFIG":
            return json.loads(p["patch"]["value"]["typed_config"]["config"]["configuration"]["value"])
    raise KeyError("no EXTENSION_CONFIG patch")


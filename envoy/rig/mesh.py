"""The testbed's mesh mode (`envoy/testbed --mesh`): every demo backend sits
behind its own sidecar Envoy, and the gateway (the Envoy with the filter)
reaches the sidecars over mutual TLS, as an Istio gateway reaches app pods.

What this makes real: when an app dies, its sidecar lives on and answers its
own 503, so the gateway sees no connection failure and no response flags.
The sidecar's inbound listener (envoy/sidecar.yaml) marks those replies with
x-session-unreached, and the filter fails the session over on that mark.

The certificates are made here with the openssl command: a CA, the workload's
identity (spiffe://cluster.local/ns/session-demo/sa/demo) and the gateway's
(.../sa/demo-gateway), like Istio's ISTIO_MUTUAL; each side checks the other's
SPIFFE URI.
"""

from __future__ import annotations

import copy
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from .paths import ENVOY_DIR

SIDECAR_YAML = ENVOY_DIR / "sidecar.yaml"
TRUST_DOMAIN = "spiffe://cluster.local/ns/session-demo/sa"
WORKLOAD_ID = f"{TRUST_DOMAIN}/demo"
GATEWAY_ID = f"{TRUST_DOMAIN}/demo-gateway"
APP_CLUSTER = "app"


@dataclass(frozen=True)
class Certificates:
    ca: Path
    workload: tuple[Path, Path]
    gateway: tuple[Path, Path]


def make_certificates(directory: Path) -> Certificates:
    """A CA and two leaf certificates (workload, gateway) with SPIFFE URIs."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/O=session-affinity testbed mesh CA")
    for name, identity in (("workload", WORKLOAD_ID), ("gateway", GATEWAY_ID)):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/O=session-affinity testbed {name}")
        (directory / f"{name}.ext").write_text(f"subjectAltName=URI:{identity}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return Certificates(ca=directory / "ca.crt",
                        workload=(directory / "workload.crt", directory / "workload.key"),
                        gateway=(directory / "gateway.crt", directory / "gateway.key"))


def tls_certificate(pair: tuple[Path, Path]) -> dict:
    return {"certificate_chain": {"filename": str(pair[0])}, "private_key": {"filename": str(pair[1])}}


def render_sidecar(port: int, admin: int, app_port: int, certs: Certificates) -> dict:
    """envoy/sidecar.yaml for one backend: its ports and the certificates."""
    bootstrap = copy.deepcopy(yaml.safe_load(SIDECAR_YAML.read_text()))
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = bootstrap["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    tls["tls_certificates"] = [tls_certificate(certs.workload)]
    tls["validation_context"]["trusted_ca"] = {"filename": str(certs.ca)}
    app = bootstrap["static_resources"]["clusters"][0]
    app["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = app_port
    return bootstrap


def gateway_patch(certs: Certificates):
    """A testbed bootstrap patch: the gateway reaches the app pods' sidecars
    over mutual TLS, and does not health-check them (an Istio gateway does
    not either: readiness and EDS take a pod out, after a while)."""
    def patch(bootstrap: dict):
        for cluster in bootstrap["static_resources"]["clusters"]:
            if cluster["name"] != APP_CLUSTER:
                continue
            cluster.pop("health_checks", None)
            cluster["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": {
                        "tls_certificates": [tls_certificate(certs.gateway)],
                        "validation_context": {
                            "trusted_ca": {"filename": str(certs.ca)},
                            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": WORKLOAD_ID}}],
                        },
                    },
                },
            }
    return patch

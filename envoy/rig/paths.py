"""Where the testbed's files and programs are, and the names its parts share:
the builds, the stores, the Envoy clusters. Everything else in the package
imports these; this module imports nothing of it."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
ENVOY_DIR = REPO / "envoy"
TESTBED_YAML = ENVOY_DIR / "testbed.yaml"
WEBDIS_JSON = ENVOY_DIR / "webdis.json"
REDIS_CONF = ENVOY_DIR / "redis.conf"
# The environment variable that hands Envoy's VM the store password (the
# plugin JSON's store.auth.password_env, listed in host_env_keys).
STORE_PASSWORD_ENV = "SA_STORE_PASSWORD"
BACKEND_APP = ENVOY_DIR / "backend" / "app.py"
WASM = REPO / "target" / "wasm32-unknown-unknown" / "release" / "session_affinity.wasm"
# The same filter as an Envoy dynamic module (filter/native): Envoy loads
# lib<name>.so from ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
NATIVE = REPO / "target" / "native" / "libsession_affinity_native.so"
MODULES = ("wasm", "native")
# Where each build's counters appear in Envoy's /stats.
METRIC_PREFIXES = {"wasm": "wasmcustom.session_affinity.", "native": "dynamicmodulescustom.session_affinity."}
BACKEND_NAMES = ("a", "b", "c")
ENVOY_BIN = os.environ.get("ENVOY_BIN", "envoy")
# The session stores a testbed can run (envoy/testbed --store): webdis in
# front of Redis, or three etcd members (envoy/etcd-store.yaml); the programs
# each needs. .ci/setup testbed installs them.
STORES = ("webdis", "etcd")
STORE_TOOLS = {"webdis": ("redis-server", "webdis"), "etcd": ("etcd",)}
# The programs the default testbed starts.
TOOLS = (ENVOY_BIN, *STORE_TOOLS["webdis"])
WASM_FILTER = "envoy.filters.http.wasm"
APP_CLUSTER = "app"
STORE_CLUSTER = "session_store"

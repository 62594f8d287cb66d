"""The testbed's parts, one job per module; the tests import this package
(as `tb`) and envoy/testbed.py runs its command line (cli.py).

- paths: where files and programs are, and the names the parts share
- ports: free ports, and the plan of who listens where
- probe: bounded waits, HTTP and TCP probes
- process: one child process, stopped by its PID
- redis_client: Redis commands as the store's admin user
- etcd: a three-member etcd cluster
- mesh: sidecar Envoys and their mutual-TLS certificates
- bootstrap: Envoy configs rendered from envoy/testbed.yaml
- admin: an Envoy's admin interface
- envoy: one Envoy of the testbed
- testbed: every process of one testbed
- build: the filter's build and the tools a testbed needs
"""

from . import mesh as mesh_mode
from .admin import AdminClient
from .bootstrap import (default_filter_config, envoy_env, find_wasm_filter, load_bootstrap, native_filter,
                        render_bootstrap, store_password, use_native_module)
from .build import ensure_module, ensure_wasm, missing_tools, module_is_stale, module_path
from .envoy import Envoy
from .paths import (APP_CLUSTER, BACKEND_APP, BACKEND_NAMES, ENVOY_BIN, ENVOY_DIR, METRIC_PREFIXES, MODULES, NATIVE,
                    REDIS_CONF, REPO, STORE_CLUSTER, STORE_PASSWORD_ENV, STORE_TOOLS, STORES, TESTBED_YAML, TOOLS,
                    WASM, WASM_FILTER, WEBDIS_JSON)
from .ports import PortPlan, free_ports
from .probe import START_TIMEOUT, StartupError, accepts, http_get, wait_until
from .process import STOP_TIMEOUT, Process
from .redis_client import redis_admin, redis_command
from .testbed import Backend, Testbed

__all__ = [
    "APP_CLUSTER", "AdminClient", "BACKEND_APP", "BACKEND_NAMES", "Backend", "ENVOY_BIN", "ENVOY_DIR", "Envoy",
    "METRIC_PREFIXES", "MODULES", "NATIVE", "PortPlan", "Process", "REDIS_CONF", "REPO", "START_TIMEOUT",
    "STOP_TIMEOUT", "STORES", "STORE_CLUSTER", "STORE_PASSWORD_ENV", "STORE_TOOLS", "StartupError", "TESTBED_YAML",
    "TOOLS", "Testbed", "WASM", "WASM_FILTER", "WEBDIS_JSON", "accepts", "default_filter_config", "ensure_module",
    "ensure_wasm", "envoy_env", "find_wasm_filter", "free_ports", "http_get", "load_bootstrap", "mesh_mode",
    "missing_tools", "module_is_stale", "module_path", "native_filter", "redis_admin", "redis_command",
    "render_bootstrap", "store_password", "use_native_module", "wait_until",
]

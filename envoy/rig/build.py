"""The filter's build for the testbed: the tools it needs, and the module,
built with filter/build when it is missing or older than its sources."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .paths import ENVOY_BIN, NATIVE, REPO, STORE_TOOLS, WASM

def missing_tools(store: str = "webdis") -> list[str]:
    """The tools a testbed with this store needs that are not on PATH."""
    return [tool for tool in (ENVOY_BIN, *STORE_TOOLS[store]) if shutil.which(tool) is None]


def module_path(module: str = "wasm") -> Path:
    return NATIVE if module == "native" else WASM


def module_is_stale(module: str = "wasm") -> bool:
    """True if the module is missing or older than any of its sources."""
    built_path = module_path(module)
    if not built_path.exists():
        return True
    sources = [*(REPO / "filter" / "src").rglob("*.rs"), REPO / "filter" / "Cargo.toml", REPO / "filter" / "build",
               REPO / "Cargo.toml", REPO / "Cargo.lock"]
    if module == "native":
        sources += [*(REPO / "filter" / "native" / "src").rglob("*.rs"), REPO / "filter" / "native" / "Cargo.toml"]
    built = built_path.stat().st_mtime
    return any(path.exists() and path.stat().st_mtime > built for path in sources)


def ensure_module(module: str = "wasm", rebuild: bool = False, say=print) -> Path:
    """The built module, built with filter/build when missing or stale (or when asked)."""
    if rebuild or module_is_stale(module):
        say("building the filter with filter/build (the first build takes a few minutes)")
        subprocess.run([str(REPO / "filter" / "build")], cwd=REPO, check=True, stdin=subprocess.DEVNULL, timeout=1800)
    built = module_path(module)
    if not built.exists():
        raise FileNotFoundError(f"filter/build did not produce {built}")
    return built


def ensure_wasm(rebuild: bool = False, say=print) -> Path:
    """The .wasm (what the Kubernetes and Istio setups load)."""
    return ensure_module("wasm", rebuild, say)


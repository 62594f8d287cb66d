"""The benchmark's variants: what each one puts in Envoy's filter chain, the
cookies and plugin JSON it is loaded with, and the check that it does what
its name says before any load."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path

from running import (ROUTE_HEADER, ROUTER, Bench, Variant, http_get, native_filter, stateful_session_cookie,
                     stateful_session_header, wasm_filter)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cookie_signer  # noqa: E402  (tests/cookie_signer.py)

# The key every filter variant uses; cookies are sealed (or signed) with it in Python.
SECRET = "bench-only-secret-0123456789abcdef-not-for-production"
KID = "k1"
COOKIE = "sa"
# The cookie version the filter issues and the bench sends: "sealed" (v3) or
# "signed" (v2); instructions.py --cookie-format changes it.
COOKIE_FORMAT = "sealed"


# ---------------------------------------------------------------- cookies --

def new_sid() -> str:
    """22 chars of base64url: 16 random bytes, as the contract says."""
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()


def sign_cookie(sid: str, host: str, instance: str, *, iat: int | None = None,
                ttl: int = 86400, kid: str = KID, flags: int = 0,
                secret: str = SECRET, cluster: str = "app", fmt: str | None = None) -> str:
    """A cookie value in `fmt` (default COOKIE_FORMAT) for a session in the
    bench's `app` cluster."""
    iat = int(time.time()) if iat is None else iat
    claims = cookie_signer.Claims(sid, cookie_signer.cluster_tag(cluster), host, instance, iat, iat, iat + ttl, kid,
                                  flags)
    if (fmt or COOKIE_FORMAT) == "sealed":
        return cookie_signer.seal(claims, secret)
    return cookie_signer.sign(claims, secret)


def filter_config(store_port_unused: int = 0, *, write: str = "sync",
                  gone_ttl: str | None = None, extra: dict | None = None, dialect: str = "webdis") -> str:
    """Our filter's plugin JSON (working contract); only documented keys."""
    cfg: dict = {
        "cookie": {"name": COOKIE, "ttl": "24h", "secure": False, "format": COOKIE_FORMAT},
        "keys": [{"id": KID, "secret": SECRET}],
        "headers": {"route": ROUTE_HEADER},
        "store": {"dialect": dialect, "cluster": "session_store",
                  "authority": "session-store", "key_prefix": "sa:",
                  "timeout": "500ms", "write": write},
    }
    if gone_ttl:
        cfg["failover"] = {"gone_ttl": gone_ttl}
    for k, v in (extra or {}).items():
        cfg.setdefault(k, {}).update(v)
    return json.dumps(cfg)


# ------------------------------------------------------------ responses --

def instances_seen(port: int, path: str, headers: dict, n: int = 6) -> list[str]:
    seen = []
    for _ in range(n):
        status, hdrs, _ = http_get(port, path, headers)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}")
        seen.append(hdrs.get("x-served-by", ["?"])[0])
    return seen


def set_cookie_value(hdrs: dict[str, list[str]], name: str) -> str | None:
    for sc in hdrs.get("set-cookie", []):
        first = sc.split(";", 1)[0]
        k, _, v = first.partition("=")
        if k.strip() == name:
            return v.strip()
    return None


# --- per-variant request headers and sanity checks (run once, before load)

def cookie_headers(bench: Bench, v: Variant) -> dict:
    """The filter's cookie; the baselines read the signed (v2) one."""
    return {"cookie": f"{COOKIE}={pinned_cookie(bench, None if v.uses_filter else 'signed')}"}


def native_cookie_headers(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    for _ in range(6):  # round robin: find a cookie that pins the second upstream
        _, hdrs, _ = http_get(v.envoy.port, "/")
        value = set_cookie_value(hdrs, "sa-native")
        if value and hdrs.get("x-served-by", [""])[0] == bench.upstreams.instances[1]:
            return {"cookie": f"sa-native={value}"}
    raise RuntimeError("native stateful_session set no usable cookie")


def store_session_headers(bench: Bench, v: Variant) -> dict:
    """A session made the real way (new session through the filter, so the
    store holds its owner), pinned to the second upstream."""
    assert v.envoy is not None
    for _ in range(9):
        _, hdrs, _ = http_get(v.envoy.port, "/state/")
        value = set_cookie_value(hdrs, COOKIE)
        if value and hdrs.get("x-served-by", [""])[0] == bench.upstreams.instances[1]:
            return {"cookie": f"{COOKIE}={value}"}
    raise RuntimeError("the filter set no session cookie on a new session")


def check_router(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    seen = instances_seen(v.envoy.port, v.path, v.request_headers)
    return {"instances_seen": sorted(set(seen))}


def check_pinned(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    want = bench.upstreams.instances[1]
    seen = instances_seen(v.envoy.port, v.path, v.request_headers)
    if set(seen) != {want}:
        raise RuntimeError(f"{v.name}: expected every request on {want}, got {seen}")
    # A client-forged route header alone must not pin anything for the wasm variants.
    return {"pinned_to": want}


def check_filter_pinned(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    notes = check_pinned(bench, v)
    _, hdrs, _ = http_get(v.envoy.port, v.path, v.request_headers)
    if set_cookie_value(hdrs, COOKIE) is not None:
        notes["set_cookie_on_pinned"] = True  # would mean a refresh or a rejection
    return notes


def check_filter_new(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    status, hdrs, _ = http_get(v.envoy.port, v.path)
    value = set_cookie_value(hdrs, COOKIE)
    if status != 200 or not value:
        raise RuntimeError(f"new session: status {status}, no {COOKIE} cookie")
    return {"cookie_example_len": len(value)}


def check_filter_state(bench: Bench, v: Variant) -> dict:
    assert v.envoy is not None
    notes = check_pinned(bench, v)
    _, hdrs, _ = http_get(v.envoy.port, v.path, v.request_headers)
    if "x-session-state" in hdrs:
        raise RuntimeError("x-session-state reached the client")
    return notes


# --- the pinned session, and the list of variants

def pinned_cookie(bench, fmt: str | None = None) -> str:
    """A cookie for a session on the pinned (second) upstream."""
    host = bench.upstreams.hosts[1]
    return sign_cookie(new_sid(), host, bench.upstreams.instance_of(host), fmt=fmt)


def pinned_route(bench) -> str:
    """The routing header value for the pinned upstream, as the filter sets it."""
    return base64.b64encode(bench.upstreams.hosts[1].encode()).decode()


def chosen(bench) -> list[Variant]:
    """The variants this run measures (--variants), ready to start."""
    sticky = [stateful_session_header(), ROUTER]
    fcfg = filter_config
    all_variants = [
        Variant("router", "router only", [ROUTER], check=check_router),
        Variant("native_cookie", "Envoy native cookie (stateful_session)",
                [stateful_session_cookie(), ROUTER],
                headers=native_cookie_headers, check=check_pinned),
        Variant("noop_wasm", "no-op wasm",
                [wasm_filter("noop", bench.wasm("noop"), ""), ROUTER], check=check_router),
        Variant("naive_wasm", "naive sticky wasm",
                [wasm_filter("naive", bench.wasm("naive"), SECRET)] + sticky,
                headers=cookie_headers, check=check_pinned),
        Variant("floor_wasm", "host-call floor wasm",
                [wasm_filter("floor", bench.wasm("floor"), pinned_route(bench))] + sticky,
                headers=cookie_headers, check=check_pinned),
        Variant("filter_pinned", "filter: pinned",
                [wasm_filter("session_affinity", bench.wasm("filter"), fcfg())] + sticky,
                headers=cookie_headers, check=check_filter_pinned, uses_filter=True),
        Variant("filter_new", "filter: new session",
                [wasm_filter("session_affinity", bench.wasm("filter"), fcfg())] + sticky,
                check=check_filter_new, uses_filter=True),
        Variant("native_filter_pinned", "native module: pinned",
                [native_filter(fcfg()), ROUTER],
                headers=cookie_headers, check=check_filter_pinned, uses_filter=True),
        Variant("native_filter_new", "native module: new session",
                [native_filter(fcfg()), ROUTER],
                check=check_filter_new, uses_filter=True),
        Variant("filter_state_sync", "filter: pinned + state write (sync)",
                [wasm_filter("session_affinity", bench.wasm("filter"), fcfg(write="sync"))]
                + sticky, path="/state/", headers=store_session_headers,
                check=check_filter_state, uses_filter=True, needs_store=True),
        Variant("filter_state_async", "filter: pinned + state write (async)",
                [wasm_filter("session_affinity", bench.wasm("filter"), fcfg(write="async"))]
                + sticky, path="/state/", headers=store_session_headers,
                check=check_filter_state, uses_filter=True, needs_store=True),
        Variant("filter_state_sync_etcd", "filter: pinned + state write (sync, etcd)",
                [wasm_filter("session_affinity", bench.wasm("filter"), fcfg(write="sync", dialect="etcd"))]
                + sticky, path="/state/", headers=store_session_headers,
                check=check_filter_state, uses_filter=True, needs_store=True, store="etcd"),
    ]
    wanted = bench.args.variants
    return [v for v in all_variants if not wanted or v.name in wanted]

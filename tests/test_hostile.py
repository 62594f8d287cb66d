"""The hostile-input corpus (tests/hostile/) through the real Envoy: every
bad cookie starts a new session and is counted under its reason, every
hostile header set is answered without a client value reaching the app, and
the filter still serves sessions afterwards."""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter as Tally

import pytest

import cookie_signer
from harness import Counters, REPO, expect, expect_equal, keyring, verify_cookie

CORPUS = REPO / "tests" / "hostile"
COOKIE_CASES = json.loads((CORPUS / "cookies.json").read_text())
HEADER_CASES = json.loads((CORPUS / "headers.json").read_text())


def relative(value, now: int):
    """"+N"/"-N" seconds from now as a number; anything else as written."""
    if isinstance(value, str) and value[:1] in "+-" and value[1:].isdigit():
        return now + int(value)
    return value


def cookie_header(case: dict, name: str, real: str, filter_config: dict) -> str:
    """The cookie header value of a corpus case, built on the real session's cookie."""
    places = {"name": name, "valid": real, "valid_half": cookie_signer.half(real), "valid_minus_one": real[:-1],
              "valid_rest": real[1:], "valid_percent": real.replace("|", "%7C"), "padding": "A" * 600}
    if "raw" in case:
        return case["raw"].format(**places, **sealed_places(real, filter_config))
    now = int(time.time())
    keys = keyring(filter_config)
    claims = cookie_signer.parse(real, keys)
    changes = {field: relative(value, now) for field, value in case["sign"].items()}
    forged = claims.but(**changes)
    secret = {"attacker": secrets.token_hex(32), "first": filter_config["keys"][0]["secret"]}.get(
        case.get("key"), keys.get(forged.kid, filter_config["keys"][0]["secret"]))
    if case.get("format") == "sealed":
        nonce = cookie_signer.opaque(real)[:cookie_signer.NONCE_LEN] if case.get("nonce") == "valid" else None
        cookie = cookie_signer.seal(forged, secret, nonce)
    else:
        cookie = cookie_signer.sign(forged, secret)
    return case.get("then", "{name}={cookie}").format(cookie=cookie, **places)


def sealed_places(real: str, filter_config: dict) -> dict:
    """Placeholders made from the real (sealed) cookie's opaque part."""
    header, _, _ = real.rpartition("|")
    sealed = cookie_signer.opaque(real)
    other_kid = next(k["id"] for k in filter_config["keys"] if k["id"] != header.split("|")[1])
    with_opaque = lambda data: f"{header}|{cookie_signer.b64url(data)}"  # noqa: E731
    return {"valid_opaque": cookie_signer.b64url(sealed),
            "valid_other_kid": f"3|{other_kid}|{cookie_signer.b64url(sealed)}",
            "valid_tag_cut": with_opaque(sealed[:-cookie_signer.TAG_LEN]),
            "valid_tag_cut_one": with_opaque(sealed[:-1]),
            "valid_nonce_only": with_opaque(sealed[:cookie_signer.NONCE_LEN]),
            "valid_other_nonce": with_opaque(secrets.token_bytes(cookie_signer.NONCE_LEN) + sealed[cookie_signer.NONCE_LEN:])}


def test_every_hostile_cookie_starts_a_counted_new_session(client, testbed, filter_config):
    real = client.new_session()
    expected = Tally()
    counters = Counters(testbed.envoy)
    for case in COOKIE_CASES:
        header = cookie_header(case, client.cookie_name, real.cookie, filter_config)
        reply = client.get(headers={"cookie": header})
        expect_equal(reply.status, 200, f"{case['name']}: status")
        body = reply.body
        expect(body["count"] == 1 and body["received"].get("x-session-new") == "1"
               and body["session"] != real.body["session"],
               f"{case['name']}: a new session", "count 1, x-session-new, not the real session", body)
        if reply.cookie:
            verify_cookie(reply.cookie, filter_config)
        if case["expect"]:
            expected[f"cookies.rejected.{case['expect']}"] += 1
        expected["sessions.created"] += 1
    counters.expect(dict(expected) | {"sessions.pinned": 0})
    # Still serving: a panic would have killed the worker's VM.
    expect_equal(client.get(cookie=real.cookie).body["count"], 2, "the real session after the corpus")


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c["name"] for c in HEADER_CASES])
def test_hostile_headers_never_reach_the_app(case, client):
    session = client.new_session()
    count = 1
    for cookie in (None, session.cookie):
        reply = client.request(case.get("path", "/"), cookie=cookie, headers=case.get("headers", {}))
        expect(reply.status in (case.get("status", 200), 307), f"{case['name']}: status",
               f"{case.get('status', 200)}", reply.describe())
        if reply.status == 307:
            location = reply.headers.get("location", "")
            expect(location.startswith("/") and not location.startswith(("//", "/\\")), "the replay stays on this site",
                   "a path", location)
        if reply.status != 200:
            continue
        received = {name.lower(): value for name, value in reply.body["received"].items()}
        sent = {name.lower(): value for name, value in case.get("headers", {}).items()}
        leaked = {name: value for name, value in sent.items() if received.get(name) == value}
        if cookie is None and leaked.get("x-session-new") == "1":
            del leaked["x-session-new"]  # the filter's own, on a new session
        expect_equal(leaked, {}, f"{case['name']}: client values the app saw")
        if cookie and reply.body["session"] == session.body["session"]:
            count += 1
    expect_equal(client.get(cookie=session.cookie).body["count"], count + 1, f"{case['name']}: the session afterwards")

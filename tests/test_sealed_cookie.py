"""The sealed routing cookie (v3) through the real Envoy: a client learns
nothing about pods from it, and signed (v2) cookies from before the switch
keep their sessions and are re-issued sealed, across a key rotation."""

from __future__ import annotations

import base64
import binascii
import copy
import struct

import cookie_signer
from harness import Counters, User, expect, expect_equal, verify_cookie

REASONS = ("malformed", "unknown_key", "bad_signature", "expired")
OLD = {"id": "old", "secret": "sealed-test-old-key-0123456789abcdef"}
NEW = {"id": "new", "secret": "sealed-test-new-key-0123456789abcdef"}


def decodings(value: str) -> list[bytes]:
    """The value and each '|'-separated part of it: raw, base64 and base64url
    (with and without padding, whatever decodes)."""
    found = []
    for text in [value, *value.split("|")]:
        found.append(text.encode())
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            for padded in (text, text + "=" * (-len(text) % 4)):
                try:
                    found.append(decode(padded.encode()))
                except (binascii.Error, ValueError):
                    pass
    return found


def secrets_of(claims: cookie_signer.Claims) -> dict[str, list[bytes]]:
    """What the cookie must not show, as text and as binary numbers."""
    ip, _, port = claims.host.rpartition(":")
    times = {"since": claims.since, "iat": claims.iat, "exp": claims.exp}
    shown = {"address": [ip.encode()], "port": [f":{port}".encode(), struct.pack(">H", int(port))],
             "instance id": [claims.instance.encode()], "session id": [claims.sid.encode()]}
    for name, t in times.items():
        shown[name] = [str(t).encode(), struct.pack(">I", t), struct.pack("<I", t), struct.pack(">Q", t),
                       struct.pack("<Q", t)]
    return shown


def test_the_cookie_shows_no_address_port_instance_or_time(client, filter_config):
    values = [client.new_session().cookie for _ in range(3)]
    for value in values:
        expect(value.startswith("3|") and value.count("|") == 2, "the cookie shows a version, a key id and opaque "
               "bytes", "3|<kid>|<opaque>", value)
        claims = verify_cookie(value, filter_config)
        expect(claims.instance != "", "the testbed's apps send an instance id", "non-empty", claims)
        for what, needles in secrets_of(claims).items():
            for decoded in decodings(value):
                for needle in needles:
                    expect(needle not in decoded, f"the cookie shows no {what}", f"no {needle!r}",
                           f"found in {decoded!r} (cookie {value})")
    expect_equal(len(set(values)), 3, "three sessions, three different cookies")


def with_cookie(config: dict, keys: list[dict], **cookie) -> dict:
    changed = copy.deepcopy(config)
    changed["keys"] = keys
    changed.setdefault("cookie", {}).update(cookie)
    return changed


def test_signed_cookies_migrate_to_sealed_across_a_key_rotation(own_testbed):
    envoy = own_testbed.envoy
    base = envoy.filter_config
    client = User(envoy=envoy, jar=False)

    # Before: a signed cookie, then a sealed one, both under the old key.
    envoy.restart(with_cookie(base, [OLD], format="signed"))
    first = client.new_session()
    signed = first.cookie
    expect(signed.startswith("2|"), "format signed issues v2", "2|...", signed)
    since = verify_cookie(signed, envoy.filter_config).since
    envoy.restart(with_cookie(base, [OLD], format="sealed"))
    old_sealed = client.new_session()
    expect(old_sealed.cookie.startswith("3|old|"), "sealed under the old key", "3|old|...", old_sealed.cookie)

    # Rotate: both keep their sessions and come back sealed under the new key.
    envoy.restart(with_cookie(base, [NEW, OLD], format="sealed"))
    counters = Counters(envoy)
    reply = client.get(cookie=signed)
    expect_equal((reply.body["backend"], reply.body["session"], reply.body["count"]),
                 (first.body["backend"], first.body["session"], 2), "the v2 session after the switch")
    sealed = reply.cookie or ""
    expect(sealed.startswith("3|new|"), "the v2 cookie is re-issued sealed under the new key", "3|new|...", sealed)
    claims = verify_cookie(sealed, envoy.filter_config)
    expect_equal((claims.sid, claims.since), (first.body["session"], since),
                 "the sealed cookie carries the same session and start")
    again = client.get(cookie=sealed)
    expect_equal((again.body["backend"], again.body["count"], again.cookie), (first.body["backend"], 3, None),
                 "the sealed cookie routes and is young enough to keep (backend, count, Set-Cookie)")
    resealed = client.get(cookie=old_sealed.cookie)
    expect_equal((resealed.body["backend"], resealed.body["session"], resealed.body["count"]),
                 (old_sealed.body["backend"], old_sealed.body["session"], 2),
                 "an old-key sealed session after the rotation")
    expect((resealed.cookie or "").startswith("3|new|"), "re-sealed under the new key", "3|new|...", resealed.cookie)
    counters.expect({"sessions.pinned": 3, "sessions.created": 0} | {f"cookies.rejected.{r}": 0 for r in REASONS})

    # The old key removed: cookies under it start over, the new key's keep working.
    envoy.restart(with_cookie(base, [NEW], format="sealed"))
    counters = Counters(envoy)
    expect_equal(client.get(cookie=sealed).body["count"], 4, "the new-key sealed cookie after the old key went")
    for cookie in (signed, old_sealed.cookie):
        gone = client.get(cookie=cookie)
        expect_equal((gone.body["count"], gone.body["received"].get("x-session-new")), (1, "1"),
                     f"a cookie under the removed key starts over ({cookie[:6]}...)")
    counters.expect({"cookies.rejected.unknown_key": 2, "sessions.created": 2, "sessions.pinned": 1})

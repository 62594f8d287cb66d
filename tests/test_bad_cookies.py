"""A forged, tampered, expired or malformed cookie never routes: it starts a
new session and is counted under its reason.

Every bad cookie is made from a real session's cookie, so the only thing
wrong with it is the thing the case names.
"""

from __future__ import annotations

import time

import pytest

import cookie_signer
from harness import Counters, expect, expect_equal, keyring, verify_cookie

REASONS = ("malformed", "unknown_key", "bad_signature", "expired")


def forged_signature(real, claims, keys, other_host):
    return cookie_signer.like(real, claims, "an-attacker-guess-of-the-secret-0123456789")


def tampered_payload(real, claims, keys, other_host):
    """Another host in the payload (signed), or one changed byte in the
    sealed part, the original tag kept."""
    if real.startswith(cookie_signer.SEALED):
        sealed = bytearray(cookie_signer.opaque(real))
        sealed[len(sealed) // 2] ^= 1
        return real.rpartition("|")[0] + "|" + cookie_signer.b64url(bytes(sealed))
    return real.replace(f"|{claims.host}|", f"|{other_host}|")


def wrong_key_id(real, claims, keys, other_host):
    """Says it was signed by the second key, but was signed by the first."""
    second = list(keys)[1]
    return cookie_signer.like(real, claims.but(kid=second), keys[claims.kid])


def unknown_key_id(real, claims, keys, other_host):
    return cookie_signer.like(real, claims.but(kid="retired"), keys[claims.kid])


def expired(real, claims, keys, other_host):
    now = int(time.time())
    return cookie_signer.like(real, claims.but(since=now - 7300, iat=now - 7200, exp=now - 60), keys[claims.kid])


def truncated(real, claims, keys, other_host):
    return cookie_signer.half(real)


def garbage(real, claims, keys, other_host):
    return "definitely-not-a-session-cookie"


def wrong_version(real, claims, keys, other_host):
    return "1" + real[1:]


def oversized(real, claims, keys, other_host):
    """Correctly signed, but longer than the 512 bytes a cookie may have."""
    return cookie_signer.like(real, claims.but(instance="i" * 600), keys[claims.kid])


CASES = [
    (forged_signature, "bad_signature"),
    (tampered_payload, "bad_signature"),
    (wrong_key_id, "bad_signature"),
    (unknown_key_id, "unknown_key"),
    (expired, "expired"),
    (truncated, "malformed"),
    (garbage, "malformed"),
    (wrong_version, "malformed"),
    (oversized, "malformed"),
]


@pytest.fixture
def session(client, filter_config):
    """A real session: its reply, cookie and verified claims."""
    reply = client.new_session()
    return reply, reply.cookie, verify_cookie(reply.cookie, filter_config)


@pytest.mark.parametrize("make, reason", CASES, ids=[make.__name__ for make, _ in CASES])
def test_bad_cookie_starts_a_new_session(make, reason, client, testbed, filter_config, session):
    _, real, claims = session
    other_host = next(b.address for b in testbed.backends if b.address != claims.host)
    bad = make(real, claims, keyring(filter_config), other_host)
    expect(bad != real, "the bad cookie differs from the real one", "a different value", bad)
    counters = Counters(testbed.envoy)

    reply = client.get(cookie=bad)

    expect_equal(reply.status, 200, f"status for a {make.__name__} cookie")
    body = reply.body
    expect_equal((body["count"], body["received"].get("x-session-new")), (1, "1"),
                 "a new session at the app (count, x-session-new)")
    expect(body["session"] != claims.sid, "the old session id is not used", f"not {claims.sid}", body["session"])
    expect("x-session-route" not in body["received"], "no routing header reached Envoy's override",
           "absent", body["received"].get("x-session-route"))
    new_claims = verify_cookie(reply.cookie or "", filter_config)
    expect_equal(new_claims.sid, body["session"], "the new cookie carries the new session")
    counters.expect({f"cookies.rejected.{r}": int(r == reason) for r in REASONS}
                    | {"sessions.created": 1, "sessions.pinned": 0})


def test_python_signer_matches_the_filter(filter_config, session):
    """The same claims sealed in Python (with the cookie's own nonce) give the
    filter's cookie, byte for byte; so do they signed as v2 by either side."""
    _, real, claims = session
    keys = keyring(filter_config)
    nonce = cookie_signer.opaque(real)[:cookie_signer.NONCE_LEN]
    expect_equal(cookie_signer.seal(claims, keys[claims.kid], nonce), real, "cookie sealed in Python")


def test_every_configured_key_verifies(client, testbed, filter_config, session):
    """A cookie sealed with the second (not sealing) key still routes."""
    first, real, claims = session
    second = filter_config["keys"][1]
    cookie = cookie_signer.like(real, claims.but(kid=second["id"]), second["secret"])
    counters = Counters(testbed.envoy)
    body = client.get(cookie=cookie).body
    expect_equal((body["backend"], body["session"], body["count"]),
                 (first.body["backend"], claims.sid, 2), "the session continues on its backend")
    counters.expect({"sessions.pinned": 1, "sessions.created": 0} | {f"cookies.rejected.{r}": 0 for r in REASONS})


def test_secrets_never_appear_in_logs_or_responses(client, testbed, filter_config, session):
    """After good and bad cookies alike, no key secret is in a response or in Envoy's log."""
    _, real, _ = session
    replies = [client.get(cookie=real), client.get(cookie=real[:-3]), client.get(cookie="garbage")]
    log = testbed.envoy.process.log_path.read_text(errors="replace")
    for key in filter_config["keys"]:
        for reply in replies:
            expect(key["secret"] not in reply.response.text and key["secret"] not in str(reply.headers),
                   f"key {key['id']}'s secret is not in a response", "absent", reply.describe())
        expect(key["secret"] not in log, f"key {key['id']}'s secret is not in Envoy's log", "absent",
               f"found in {testbed.envoy.process.log_path}")

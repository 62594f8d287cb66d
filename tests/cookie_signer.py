"""The routing cookie (v2), implemented again in Python from the written format.

An independent implementation checks that what the filter issues matches the
format, and lets tests forge every kind of bad cookie precisely:

    2|<sid>|<cluster>|<upstream>|<instance>|<since>|<iat>|<exp>|<kid>|<flags>|<tag>

cluster = base64url (no padding) of the first 6 bytes of SHA-256 of the Envoy
cluster name; tag = base64url, no padding, of HMAC-SHA256(secret of kid, every
byte up to and including the 10th '|'). The whole value is at most 512 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, replace

VERSION = "2"
MAX_LEN = 512
FIELDS = 11


def cluster_tag(cluster: str) -> str:
    """The cookie's short name for an Envoy cluster ("" for none)."""
    return b64url(hashlib.sha256(cluster.encode()).digest()[:6]) if cluster else ""


@dataclass(frozen=True)
class Claims:
    sid: str
    cluster: str
    host: str
    instance: str
    since: int
    iat: int
    exp: int
    kid: str
    flags: int = 0

    def but(self, **changes) -> "Claims":
        """A copy with some fields changed, for forging variants."""
        return replace(self, **changes)


class CookieRejected(ValueError):
    """The cookie is not valid; reason is one of the filter's counter names."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def payload(claims: Claims) -> str:
    """The signed part: every field and the '|' before the tag."""
    fields = [VERSION, claims.sid, claims.cluster, claims.host, claims.instance, str(claims.since), str(claims.iat),
              str(claims.exp), claims.kid, str(claims.flags)]
    return "|".join(fields) + "|"


def tag(secret: str | bytes, signed: str) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return b64url(hmac.new(key, signed.encode(), hashlib.sha256).digest())


def sign(claims: Claims, secret: str | bytes) -> str:
    """A cookie value for claims, signed with secret (which need not match kid)."""
    signed = payload(claims)
    return signed + tag(secret, signed)


def parse(value: str) -> Claims:
    """The claims of a cookie value, without checking its tag."""
    if len(value) > MAX_LEN:
        raise CookieRejected("malformed", f"{len(value)} bytes, more than {MAX_LEN}")
    parts = value.split("|")
    if len(parts) != FIELDS or parts[0] != VERSION:
        raise CookieRejected("malformed", f"expected {FIELDS} fields of version {VERSION}, got {parts[:2]}...")
    _, sid, cluster, host, instance, since, iat, exp, kid, flags, _tag = parts
    if not all(n.isdigit() for n in (since, iat, exp, flags)):
        raise CookieRejected("malformed", "since, iat, exp and flags must be decimal")
    return Claims(sid, cluster, host, instance, int(since), int(iat), int(exp), kid, int(flags))


def verify(value: str, keys: dict[str, str], now: float | None = None) -> Claims:
    """Check a cookie value like the filter does; keys maps key id to secret."""
    claims = parse(value)
    secret = keys.get(claims.kid)
    if secret is None:
        raise CookieRejected("unknown_key", f"key id {claims.kid!r} is not in {sorted(keys)}")
    signed, _, received_tag = value.rpartition("|")
    if not hmac.compare_digest(tag(secret, signed + "|"), received_tag):
        raise CookieRejected("bad_signature", "tag does not match")
    if claims.exp <= (time.time() if now is None else now):
        raise CookieRejected("expired", f"exp {claims.exp}")
    return claims

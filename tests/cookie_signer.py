"""The routing cookie (v3 sealed, v2 signed), implemented again in Python from
the written format.

An independent implementation checks that what the filter issues matches the
format, and lets tests forge every kind of bad cookie precisely:

    3|<kid>|<sealed>
    2|<sid>|<cluster>|<upstream>|<instance>|<since>|<iat>|<exp>|<kid>|<flags>|<tag>

v3: sealed = base64url (no padding) of nonce (12 bytes) + ciphertext + tag (16
bytes), ChaCha20-Poly1305 under the key HMAC-SHA256(secret, "session-affinity
cookie sealing key"), with "3|<kid>|" as associated data, over
"sid|cluster|upstream|instance|iat|age|ttl|flags" (age = iat - since, ttl =
exp - iat) padded with '|' to a multiple of 16 bytes.

v2: cluster = base64url (no padding) of the first 6 bytes of SHA-256 of the
Envoy cluster name; tag = base64url, no padding, of HMAC-SHA256(secret of kid,
every byte up to and including the 10th '|').

The whole value is at most 512 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

SIGNED = "2"
SEALED = "3"
MAX_LEN = 512
FIELDS = 11
PAD = 16
NONCE_LEN = 12
TAG_LEN = 16
SEALING_LABEL = b"session-affinity cookie sealing key"


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


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


# ---------------------------------------------------------------- v2 (signed)

def payload(claims: Claims) -> str:
    """The signed part: every field and the '|' before the tag."""
    fields = [SIGNED, claims.sid, claims.cluster, claims.host, claims.instance, str(claims.since), str(claims.iat),
              str(claims.exp), claims.kid, str(claims.flags)]
    return "|".join(fields) + "|"


def tag(secret: str | bytes, signed: str) -> str:
    return b64url(hmac.new(_key(secret), signed.encode(), hashlib.sha256).digest())


def sign(claims: Claims, secret: str | bytes) -> str:
    """A v2 cookie value for claims, signed with secret (which need not match kid)."""
    signed = payload(claims)
    return signed + tag(secret, signed)


# ---------------------------------------------------------------- v3 (sealed)

def _minus(a, b) -> str:
    """a - b for numbers; a as written otherwise (to forge odd fields)."""
    return str(a - b) if isinstance(a, int) and isinstance(b, int) else str(a)


def plaintext(claims: Claims) -> bytes:
    """What a v3 cookie seals: the claims without kid, padded with '|'."""
    text = "|".join([claims.sid, claims.cluster, claims.host, claims.instance, str(claims.iat),
                     _minus(claims.iat, claims.since), _minus(claims.exp, claims.iat), str(claims.flags)]).encode()
    return text + b"|" * (-len(text) % PAD)


def seal(claims: Claims, secret: str | bytes, nonce: bytes | None = None) -> str:
    """A v3 cookie value for claims, sealed with secret (which need not match
    kid); a random nonce unless one is given (to reproduce a value)."""
    header = f"{SEALED}|{claims.kid}|"
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    sealing_key = hmac.new(_key(secret), SEALING_LABEL, hashlib.sha256).digest()
    sealed = ChaCha20Poly1305(sealing_key).encrypt(nonce, plaintext(claims), header.encode())
    return header + b64url(nonce + sealed)


def opaque(value: str) -> bytes:
    """The decoded opaque part of a v3 value (nonce, ciphertext, tag)."""
    return unb64url(value.rpartition("|")[2])


def half(value: str) -> str:
    """The first half of a value, one character shorter where that half would
    still have the shape of a sealed value (nonce, whole 16-byte blocks, tag):
    a truncation the filter must refuse as malformed, not as a bad tag."""
    cut = value[: len(value) // 2]
    if cut.startswith(SEALED + "|") and cut.count("|") == 2:
        try:
            body = len(unb64url(cut.rpartition("|")[2])) - NONCE_LEN - TAG_LEN
        except (binascii.Error, ValueError):
            return cut  # not even base64
        if body > 0 and body % PAD == 0:
            return cut[:-1]
    return cut


def like(real: str, claims: Claims, secret: str | bytes) -> str:
    """A cookie value for claims in the same version as real."""
    return seal(claims, secret) if real.startswith(SEALED + "|") else sign(claims, secret)


# ----------------------------------------------------------------- checking

def _claims(fields: list[str], kid: str) -> Claims:
    sid, cluster, host, instance, since, iat, exp, flags = fields
    if not all(n.isdigit() for n in (since, iat, exp, flags)):
        raise CookieRejected("malformed", "since, iat, exp and flags must be decimal")
    return Claims(sid, cluster, host, instance, int(since), int(iat), int(exp), kid, int(flags))


def _open(value: str, keys: dict[str, str]) -> Claims:
    header, _, sealed_b64 = value.rpartition("|")
    parts = header.split("|")
    if len(parts) != 2 or not parts[1]:
        raise CookieRejected("malformed", f"expected 3|kid|sealed, got {value[:40]}...")
    kid = parts[1]
    try:
        sealed = unb64url(sealed_b64)
    except (binascii.Error, ValueError) as err:
        raise CookieRejected("malformed", f"not base64url: {err}") from err
    body = len(sealed) - NONCE_LEN - TAG_LEN
    if body <= 0 or body % PAD:
        raise CookieRejected("malformed", f"{len(sealed)} sealed bytes")
    secret = keys.get(kid)
    if secret is None:
        raise CookieRejected("unknown_key", f"key id {kid!r} is not in {sorted(keys)}")
    sealing_key = hmac.new(_key(secret), SEALING_LABEL, hashlib.sha256).digest()
    try:
        text = ChaCha20Poly1305(sealing_key).decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], (header + "|").encode())
    except InvalidTag as err:
        raise CookieRejected("bad_signature", "does not open") from err
    fields = text.decode().rstrip("|").split("|")
    if len(fields) != 8:
        raise CookieRejected("malformed", f"{len(fields)} sealed fields")
    sid, cluster, host, instance, iat, age, ttl, flags = fields
    if not all(n.isdigit() for n in (iat, age, ttl)) or int(age) > int(iat):
        raise CookieRejected("malformed", "iat, age and ttl must be decimal, age at most iat")
    since, exp = int(iat) - int(age), int(iat) + int(ttl)
    return _claims([sid, cluster, host, instance, str(since), iat, str(exp), flags], kid)


def parse(value: str, keys: dict[str, str] | None = None) -> Claims:
    """The claims of a cookie value: a v2 tag is not checked; a v3 value is
    opened, which needs keys."""
    if len(value) > MAX_LEN:
        raise CookieRejected("malformed", f"{len(value)} bytes, more than {MAX_LEN}")
    if value.startswith(SEALED + "|"):
        return _open(value, keys or {})
    parts = value.split("|")
    if len(parts) != FIELDS or parts[0] != SIGNED:
        raise CookieRejected("malformed", f"expected {FIELDS} fields of version {SIGNED}, got {parts[:2]}...")
    _, sid, cluster, host, instance, since, iat, exp, kid, flags, _tag = parts
    return _claims([sid, cluster, host, instance, since, iat, exp, flags], kid)


def verify(value: str, keys: dict[str, str], now: float | None = None) -> Claims:
    """Check a cookie value like the filter does; keys maps key id to secret."""
    claims = parse(value, keys)
    if not value.startswith(SEALED + "|"):
        secret = keys.get(claims.kid)
        if secret is None:
            raise CookieRejected("unknown_key", f"key id {claims.kid!r} is not in {sorted(keys)}")
        signed, _, received_tag = value.rpartition("|")
        if not hmac.compare_digest(tag(secret, signed + "|"), received_tag):
            raise CookieRejected("bad_signature", "tag does not match")
    if claims.exp <= (time.time() if now is None else now):
        raise CookieRejected("expired", f"exp {claims.exp}")
    return claims

"""Bearer secrets: generated, shown once, stored as sha256 with a visible prefix.

The secret has 256 bits of entropy, so a plain sha256 (not a slow password hash) is the right
tool: it lets the api look a key up by hash in one indexed query, and nothing is learnt from a
leaked hash that brute force could turn back into a key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SECRET_PREFIXES = {
    "tenant": "sk-",
    "platform_admin": "sk-admin-",
    "incubator_admin": "sk-inc-",
    "provider": "sk-prov-",
    "enrolment": "enr-",
    "node": "nk-",
}
VISIBLE_CHARS = 8


def generate(kind: str) -> tuple[str, str, str]:
    """A new secret for ``kind``: (secret, sha256 hex, visible prefix such as ``sk-Ab3dE9xQ``)."""
    prefix = SECRET_PREFIXES[kind]
    secret = prefix + secrets.token_urlsafe(32)
    return secret, digest(secret), secret[: len(prefix) + VISIBLE_CHARS]


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    """Constant-time comparison, for places that compare rather than look up by hash."""
    return hmac.compare_digest(digest(secret), stored_digest)

"""Typed, prefixed, time-ordered ids (``ten_...``, ``key_...``, ``node_...``, ``req_...``).

A ULID body (48-bit millisecond time + 80 random bits, Crockford base32) keeps ids sortable by
creation time, which keeps B-tree inserts local, while the prefix tells a user what an id names.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

PREFIXES = {
    "tenant": "ten",
    "incubator": "inc",
    "key": "key",
    "provider": "prov",
    "node": "node",
    "reservation": "res",
    "request": "req",
    "grant": "grt",
    "model": "mdl",
    "enrolment": "enr",
    "invoice": "inv",
    "transaction": "txn",
    "price": "prc",
    "offer": "ofr",
}


def ulid(now_ms: int | None = None) -> str:
    """A 26-character ULID string."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(kind: str) -> str:
    """A new id for ``kind`` (a key of ``PREFIXES``), e.g. ``new_id("tenant") -> "ten_01J..."``."""
    return f"{PREFIXES[kind]}_{ulid().lower()}"


def has_prefix(value: str, kind: str) -> bool:
    """Whether ``value`` looks like an id of ``kind``; a cheap check before a database look-up."""
    prefix = PREFIXES[kind] + "_"
    return value.startswith(prefix) and len(value) == len(prefix) + 26

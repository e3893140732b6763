"""Joining the marketplace: trade a one-time token for a node id, keep the identity on disk.

The node generates its NATS nkey pair here; only the public key is sent. The identity file
(``node-identity.json``, mode 0600) holds the seed, so a restarted agent comes back as the same
node without a new token, and a provider can revoke exactly this machine.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from market import natsauth

IDENTITY_FILE = "node-identity.json"


class EnrolError(RuntimeError):
    """Enrolment failed; the message is one line a provider can act on."""


@dataclass(frozen=True)
class Identity:
    node_id: str
    provider_id: str
    api: str
    nats_url: str
    nkey_seed: str
    heartbeat_interval_s: float = 1.0


def load(data_dir: Path, api: str) -> Identity | None:
    """The saved identity, if this machine already joined through ``api``."""
    path = data_dir / IDENTITY_FILE
    if not path.exists():
        return None
    identity = Identity(**json.loads(path.read_text()))
    return identity if identity.api.rstrip("/") == api.rstrip("/") else None


def save(data_dir: Path, identity: Identity) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    natsauth.write_atomically(data_dir / IDENTITY_FILE, json.dumps(asdict(identity)))


def enrol(api: str, token: str, hardware: dict[str, Any], name: str | None = None, timeout: float = 30.0) -> Identity:
    seed = natsauth.new_node_seed()
    body = {
        "token": token,
        "public_key": natsauth.public_key(seed),
        "name": name or socket.gethostname(),
        "hardware": hardware,
    }
    try:
        response = httpx.post(api.rstrip("/") + "/api/nodes/enrol", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise EnrolError(f"cannot reach the marketplace at {api}: {exc}") from None
    if response.status_code != 201:
        try:
            detail = response.json().get("detail") or response.text
        except ValueError:
            detail = response.text
        raise EnrolError(f"enrolment refused ({response.status_code}): {detail}")
    out = response.json()
    return Identity(
        node_id=out["node_id"],
        provider_id=out["provider_id"],
        api=api,
        nats_url=out["nats_url"],
        nkey_seed=seed,
        heartbeat_interval_s=float(out.get("heartbeat_interval_s", 1.0)),
    )


def describe_hardware(accelerator: str | None = None, memory_gib: float = 0.0, count: int = 1) -> dict[str, Any]:
    """What this machine says about itself at enrolment (heartbeats repeat it)."""
    if accelerator is None:
        accelerator = "cpu"
        if memory_gib == 0.0:
            try:
                pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                memory_gib = round(pages / 2**30, 1)
            except (ValueError, OSError):
                memory_gib = 0.0
    return {"accelerator": accelerator or platform.machine(), "memory_gib": memory_gib, "count": count}

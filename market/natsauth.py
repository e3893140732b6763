"""NATS authorization: per-service users and one nkey user per provider node.

Providers are third parties, so a node's NATS identity is an nkey pair it generates itself: only
its public key ever leaves the machine (sent at enrolment), and the server authenticates it by a
signed nonce. The rendered authorization block gives each node exactly:

* subscribe ``node.<id>.>`` (its jobs, cancels and control orders),
* publish ``fleet.heartbeat.<id>`` and ``fleet.relay.<id>.*`` (chunk batches for an api replica:
  the api accepts a chunk from it only for a job placed on this node),
* publish to the reply subject of a message it received (``allow_responses``), which is how its
  chunks reach the api's inbox for that job: a node cannot read other nodes' jobs, the usage
  stream or admin traffic, nor publish anywhere else.

Services (api, scheduler, billing) have their own users. The block is rendered from the database
(nodes not revoked) into the file the server includes, and the server is told to reload (SIGHUP):
reload drops the connections of users no longer listed, so revoking a node cuts it off at once.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

import nkeys

from market import subjects

SERVICES = ("api", "scheduler", "billing", "admin")
RESPONSE_WINDOW = "2h"
"""How long a node may keep replying to one job's inbox (longest streamed completion)."""
RESPONSE_MAX = 1_000_000


def new_node_seed() -> str:
    """A new user nkey seed (``SU...``), generated on the provider's machine."""
    seed: bytes = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode()


def public_key(seed: str) -> str:
    return str(nkeys.from_seed(seed.encode()).public_key.decode())


def is_user_public_key(value: str) -> bool:
    """A well-formed user public nkey: base32, user prefix byte, 32-byte key, valid CRC16."""
    if not value.startswith("U") or len(value) != 56:
        return False
    try:
        raw = base64.b32decode(value + "=" * (-len(value) % 8))
    except (binascii.Error, ValueError):
        return False
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    return len(body) == 33 and body[0] == nkeys.PREFIX_BYTE_USER and nkeys.crc16(body) == crc


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    node_id: str
    public_key: str


def node_permissions(node_id: str) -> dict[str, object]:
    return {
        "publish": {"allow": [subjects.heartbeat(node_id), subjects.node_relay(node_id, "*")]},
        "subscribe": {"allow": [subjects.node_all(node_id)]},
        "allow_responses": {"max": RESPONSE_MAX, "expires": RESPONSE_WINDOW},
    }


def render(service_passwords: dict[str, str], nodes: list[NodeIdentity]) -> str:
    """The ``authorization`` block (NATS config syntax accepts JSON values)."""
    users: list[dict[str, object]] = [
        {"user": name, "password": password, "permissions": {"publish": ">", "subscribe": ">"}}
        for name, password in sorted(service_passwords.items())
    ]
    users += [{"nkey": n.public_key, "permissions": node_permissions(n.node_id)} for n in nodes]
    return "# rendered by market.natsauth; do not edit\nauthorization " + json.dumps({"users": users}, indent=1) + "\n"


def load_or_create_service_passwords(path: Path) -> dict[str, str]:
    """Service credentials for the embedded server, kept beside its data (mode 0600)."""
    if path.exists():
        data: dict[str, str] = json.loads(path.read_text())
        return data
    passwords = {name: secrets.token_urlsafe(24) for name in SERVICES}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(passwords, out)
    return passwords


def write_atomically(path: Path, content: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(content)
    tmp.replace(path)


def reload_server(pid_file: Path) -> bool:
    """Ask the nats-server whose pid is in ``pid_file`` to re-read its configuration."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True

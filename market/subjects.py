"""NATS subject names, in one place (NATS permissions for nodes are derived from these too)."""

from __future__ import annotations

JOBS_SUBMIT = "jobs.submit"
"""Request/reply: api -> scheduler queue group ``SCHEDULERS_QUEUE``; payload Job, reply Placement."""
SCHEDULERS_QUEUE = "schedulers"
SCHEDULERS_ALIVE = "schedulers.alive"
"""Scheduler -> api: ``SchedulerAlive`` every heartbeat interval; a job waiting at a replica whose
beats stopped is submitted again."""
JOBS_WITHDRAW = "jobs.withdraw"
"""Api -> every scheduler replica: Cancel for a job that waits for a slot and is no longer wanted."""

HEARTBEATS = "fleet.heartbeat.*"
FLEET_EVENTS = "fleet.events"
"""Scheduler -> api: FleetEvent (a node was lost, started draining or was revoked)."""
CONTROL_PREFIX = "control"
KEYS_REVOKED = "control.keys.revoked"
"""Api replicas tell each other a key was revoked, so cached authentications drop at once."""

USAGE_STREAM = "USAGE"
USAGE_SUBJECTS = "usage.>"
USAGE_DEDUP_WINDOW_S = 2 * 60 * 60.0
"""JetStream's duplicate window: a republished usage event within it is dropped by the server;
the ledger's unique request id catches anything older."""


def node_jobs(node_id: str) -> str:
    return f"node.{node_id}.jobs"


def node_cancel(node_id: str) -> str:
    return f"node.{node_id}.cancel"


def node_keepalive(node_id: str) -> str:
    """Api -> node: the jobs it still wants (``wire.Keepalive``)."""
    return f"node.{node_id}.keepalive"


def node_control(node_id: str) -> str:
    """Platform -> node: drain and revoke orders."""
    return f"node.{node_id}.control"


def node_all(node_id: str) -> str:
    """Everything addressed to one node (what its NATS credentials may subscribe to)."""
    return f"node.{node_id}.>"


def heartbeat(node_id: str) -> str:
    return f"fleet.heartbeat.{node_id}"


def node_relay(node_id: str, relay_id: str) -> str:
    """Node -> one api replica: ChunkBatch messages. The node's id in the subject is what NATS
    authorised it to publish, so the api knows which node sent each batch."""
    return f"fleet.relay.{node_id}.{relay_id}"


def relay_inbox(relay_id: str) -> str:
    """What an api replica subscribes to for the batches of every node."""
    return f"fleet.relay.*.{relay_id}"


def usage(tenant_id: str) -> str:
    return f"usage.{tenant_id}"


def inbox_prefix(instance: str) -> str:
    """The api instance's chunk inboxes: ``_INBOX.<instance>.<job>``."""
    return f"_INBOX.{instance}"

"""Fixtures for the token API: a tenant with a key and a model in the catalog, and a fake fleet.

The fake fleet stands in for the scheduler and nodes only in these tests of the api's own
behaviour (errors, failover rules, formats); the real data path is tested end to end in tests/e2e.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.aio.client import Client
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from market import keys, subjects, wire
from market.db import session_factory
from market.ids import new_id
from market.models import ApiKey, Model, Tenant


@dataclass
class TenantKey:
    tenant_id: str
    key_id: str
    secret: str


async def make_tenant(
    engine: AsyncEngine, name: str = "acme", models: tuple[tuple[str, int], ...] = (), tokens: int = 10_000_000
) -> TenantKey:
    """A tenant with a key and a grant of ``tokens`` for this period (admission holds against it)."""
    from api.admin.quota import create_grant

    async with session_factory(engine)() as session, session.begin():
        tenant = Tenant(id=new_id("tenant"), name=name)
        session.add(tenant)
        await session.flush()
        if tokens:
            await create_grant(session, tenant, tokens, 0, "test grant", None)
        secret, digest, prefix = keys.generate("tenant")
        key = ApiKey(id=new_id("key"), role="tenant", tenant_id=tenant.id, prefix=prefix, secret_hash=digest)
        session.add(key)
        for model_name, context in models:
            if await session.get(Model, model_name) is None:
                session.add(Model(name=model_name, context_length=context))
    return TenantKey(tenant.id, key.id, secret)


KEY_BUCKET = "SELECT 1 FROM rate_limit_buckets WHERE scope = $1 FOR UPDATE"
"""Locks a key's rate-limit row (``tests.conftest.row_locked``): its admissions wait."""


async def use_up_quota(engine: AsyncEngine, tenant_id: str) -> None:
    """The tenant's grants all used: its next admission is refused ``insufficient_quota``."""
    async with session_factory(engine)() as session, session.begin():
        await session.execute(text("UPDATE tenant_quotas SET used = granted WHERE tenant_id = :t"), {"t": tenant_id})


@pytest.fixture
async def tenant(engine: AsyncEngine) -> TenantKey:
    return await make_tenant(engine, models=(("fake-model", 2048),))


NodeBehaviour = Callable[[wire.Job, str, Client], Awaitable[None]]


@dataclass
class FakeFleet:
    """A scheduler replying with placements in order, and nodes scripted per test."""

    nc: Client
    nodes: dict[str, NodeBehaviour] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    placed: list[tuple[str, str]] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    cancelled_on: list[tuple[str, str]] = field(default_factory=list)
    """(node, job) for each cancel a node received."""
    also_to: str | None = None
    """Send every placed job to this node as well, unannounced (as a scheduler replica taken for
    dead that woke and placed it too would)."""
    subs: list[Any] = field(default_factory=list)
    busy_answers: int = 0
    """Answer this many submissions with ``no_capacity`` first (every node busy)."""
    unanswered: int = 0
    """Take this many submissions first and never answer them (a replica that died with them)."""
    submissions: int = 0
    without_tools: bool = False
    """No node parses tool calls: a job with tools is answered ``tools_unsupported``, as a real
    scheduler answers it."""
    jobs: list[wire.Job] = field(default_factory=list)
    """Every submission, as the schedulers got it."""
    answer_delay: float = 0.0
    """Send a placed job to its node at once but answer the api this much later (a scheduler
    placing it in the instant the api withdraws it)."""

    async def start(self) -> None:
        async def on_submit(msg: Any) -> None:
            job = wire.decoder(wire.Job).decode(msg.data)
            self.submissions += 1
            self.jobs.append(job)
            if self.unanswered > 0:
                self.unanswered -= 1
                return
            if job.tools and self.without_tools:
                await msg.respond(wire.encode(wire.Placement(job_id=job.id, error="tools_unsupported")))
                return
            candidates = [n for n in self.order if n not in job.exclude_nodes]
            if self.busy_answers > 0:
                self.busy_answers -= 1
                candidates = []
            if not candidates:
                await msg.respond(wire.encode(wire.Placement(job_id=job.id, error="no_capacity", retry_after_s=2)))
                return
            node = candidates[0]
            self.placed.append((job.id, node))
            await self.nc.publish(subjects.node_jobs(node), msg.data, reply=job.reply)
            if self.also_to is not None and self.also_to != node:
                await self.nc.publish(subjects.node_jobs(self.also_to), msg.data, reply=job.reply)
            if self.answer_delay:
                await asyncio.sleep(self.answer_delay)
            await msg.respond(wire.encode(wire.Placement(job_id=job.id, node_id=node, provider_id="prov_fake")))

        self.subs.append(await self.nc.subscribe(subjects.JOBS_SUBMIT, queue=subjects.SCHEDULERS_QUEUE, cb=on_submit))
        for node_id, behaviour in self.nodes.items():
            await self._node(node_id, behaviour)

    async def _node(self, node_id: str, behaviour: NodeBehaviour) -> None:
        async def on_job(msg: Any) -> None:
            job = wire.decoder(wire.Job).decode(msg.data)
            asyncio.get_running_loop().create_task(behaviour(job, msg.reply, self.nc))

        async def on_cancel(msg: Any) -> None:
            job_id = wire.decoder(wire.Cancel).decode(msg.data).job_id
            self.cancels.append(job_id)
            self.cancelled_on.append((node_id, job_id))

        self.subs.append(await self.nc.subscribe(subjects.node_jobs(node_id), cb=on_job))
        self.subs.append(await self.nc.subscribe(subjects.node_cancel(node_id), cb=on_cancel))

    async def stop(self) -> None:
        for sub in self.subs:
            await sub.unsubscribe()


def chunk(job: wire.Job, node: str, seq: int, kind: str, **kw: Any) -> bytes:
    return wire.encode(wire.Chunk(job_id=job.id, node_id=node, seq=seq, kind=kind, **kw))  # type: ignore[arg-type]


def echo_node(node_id: str, words: int = 5, delay: float = 0.0) -> NodeBehaviour:
    """A node that answers with ``words`` tokens ``w0 w1 ...`` and exact usage."""

    async def behave(job: wire.Job, reply: str, nc: Client) -> None:
        await nc.publish(reply, chunk(job, node_id, 0, "accepted"))
        for i in range(words):
            if delay:
                await asyncio.sleep(delay)
            finish = "length" if i == words - 1 else None
            await nc.publish(reply, chunk(job, node_id, i + 1, "data", pieces=[wire.Piece(0, f"w{i} ", 1, finish)]))
        await nc.publish(reply, chunk(job, node_id, words + 1, "end", usage=wire.Usage(7, words)))

    return behave


@pytest.fixture
async def fleet(nc: Client) -> AsyncIterator[Callable[..., Awaitable[FakeFleet]]]:
    made: list[FakeFleet] = []

    async def make(nodes: dict[str, NodeBehaviour]) -> FakeFleet:
        f = FakeFleet(nc=nc, nodes=nodes, order=list(nodes))
        await f.start()
        made.append(f)
        return f

    yield make
    for f in made:
        await f.stop()

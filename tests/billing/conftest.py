"""Billing fixtures: tenants, providers, keys and price books made directly in the database, usage
events built the way the api publishes them, and a clean usage stream per test."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from billing import ingest
from billing.ledger import post_reservation_hours
from billing.worker import UsageWorker
from market import bus, db, keys, subjects
from market.ids import new_id, ulid
from market.models import ApiKey, Incubator, Model, Provider, Reservation, ReservationChange, Tenant
from market.models.billing import PayoutSpec, PriceSpec, create_price_book
from market.settings import Settings
from market.wire import UsageEvent, encode
from tests.conftest import Servers

OCTOBER = datetime(2026, 10, 1, tzinfo=UTC).timestamp()
"""Usage in these tests happens in October 2026 unless a test says otherwise."""
MODEL = "llama-3-8b"

_seq = itertools.count()


@pytest.fixture
def sessions(servers: Servers, engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return db.session_factory(engine)


async def make_tenant(sessions: async_sessionmaker[AsyncSession], *, incubator: bool = False) -> str:
    async with sessions.begin() as session:
        incubator_id = None
        if incubator:
            incubator_id = new_id("incubator")
            session.add(Incubator(id=incubator_id, name="incubator"))
            await session.flush()
        tenant_id = new_id("tenant")
        session.add(Tenant(id=tenant_id, name=f"tenant {tenant_id[-6:]}", incubator_id=incubator_id))
    return tenant_id


async def make_provider(sessions: async_sessionmaker[AsyncSession]) -> str:
    async with sessions.begin() as session:
        provider_id = new_id("provider")
        session.add(Provider(id=provider_id, name="gpu provider"))
    return provider_id


async def make_key(sessions: async_sessionmaker[AsyncSession], role: str, **owner: str | None) -> str:
    """A bearer key for ``role``; returns the secret."""
    secret, hashed, prefix = keys.generate(role)
    async with sessions.begin() as session:
        session.add(ApiKey(id=new_id("key"), role=role, prefix=prefix, secret_hash=hashed, scopes=["manage"], **owner))
    return secret


async def make_prices(
    sessions: async_sessionmaker[AsyncSession],
    *,
    effective_from: datetime = datetime(2026, 1, 1, tzinfo=UTC),
    model: str = MODEL,
    input_price: int = 30,
    output_price: int = 60,
    payout: tuple[int, int] | None = (20, 40),
    margin_bps: int = 2000,
    reservation_hour_minor: int | None = 150,
) -> str:
    """A price book: ``model`` at input/output minor per 1M tokens in every class (burst +50%)."""
    prices = [
        PriceSpec(
            model=model,
            admission_class="on_demand",
            input_minor_per_million=input_price,
            output_minor_per_million=output_price,
        ),
        PriceSpec(
            model=model,
            admission_class="burst",
            input_minor_per_million=input_price * 3 // 2,
            output_minor_per_million=output_price * 3 // 2,
        ),
        PriceSpec(
            model=model,
            admission_class="reserved",
            input_minor_per_million=input_price // 2,
            output_minor_per_million=output_price // 2,
            reservation_hour_minor=reservation_hour_minor,
        ),
    ]
    payouts = (
        [PayoutSpec(model=model, input_minor_per_million=payout[0], output_minor_per_million=payout[1])]
        if payout
        else []
    )
    async with sessions.begin() as session:
        book = await create_price_book(
            session,
            currency="usd",
            effective_from=effective_from,
            platform_margin_bps=margin_bps,
            prices=prices,
            payouts=payouts,
        )
    return book.id


async def make_reservation(
    sessions: async_sessionmaker[AsyncSession],
    tenant_id: str,
    changes: list[tuple[datetime, int]],
    *,
    reservation_id: str | None = None,
    model: str = MODEL,
) -> str:
    """A reservation with its history, as the api writes it: sized ``changes[i][1]`` slots from
    ``changes[i][0]``; a last size of 0 ends it then."""
    rid = reservation_id or new_id("reservation")
    created, first = changes[0]
    ended = changes[-1][0] if changes[-1][1] == 0 else None
    async with sessions.begin() as session:
        if await session.get(Model, model) is None:
            session.add(Model(name=model, context_length=4096))
            await session.flush()
        session.add(
            Reservation(
                id=rid,
                tenant_id=tenant_id,
                model=model,
                slots=first,
                created_at=created,
                status="active" if ended is None else "ended",
                ended_at=ended,
            )
        )
        await session.flush()
        for at, slots in changes:
            session.add(ReservationChange(reservation_id=rid, slots=slots, burst_slots=0, at=at))
    return rid


async def post_hours(settings: Settings, since: datetime, until: datetime) -> int:
    """One billing-worker pass over reservation hours ended in ``[since, until)``."""
    conn = await asyncpg.connect(db.plain_url(settings.require_database_url()))
    try:
        async with conn.transaction():
            return await post_reservation_hours(conn, settings.currency, since, until)
    finally:
        await conn.close()


def usage_event(
    tenant_id: str,
    *,
    provider_id: str | None = None,
    prompt: int = 1000,
    completion: int = 500,
    relayed: int | None = None,
    admission_class: str = "on_demand",
    model: str = MODEL,
    at: float = OCTOBER + 86400,
    key_id: str = "key_test",
    request_id: str | None = None,
) -> UsageEvent:
    return UsageEvent(
        request_id=request_id or f"req_{ulid().lower()}{next(_seq)}",
        tenant_id=tenant_id,
        key_id=key_id,
        model=model,
        admission_class=admission_class,  # type: ignore[arg-type]
        node_id="node_test" if provider_id else None,
        provider_id=provider_id,
        prompt_tokens=prompt,
        completion_tokens=completion,
        relayed_completion_tokens=completion if relayed is None else relayed,
        outcome="completed",
        started_at=at - 1.5,
        ended_at=at,
        ttft_ms=120.0,
        engine_ttft_ms=95.5,
        duration_ms=1500.0,
    )


async def store(settings: Settings, events: list[UsageEvent]) -> ingest.BatchResult:
    """Write events the way the worker does, without NATS."""
    conn = await asyncpg.connect(db.plain_url(settings.require_database_url()))
    try:
        return await ingest.store_batch(conn, events, settings.currency)
    finally:
        await conn.close()


async def fetch(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db.plain_url(settings.require_database_url()))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def fetchval(settings: Settings, sql: str, *args: Any) -> Any:
    return (await fetch(settings, sql, *args))[0][0]


@pytest.fixture
async def usage_stream(servers: Servers, nc: Client) -> AsyncIterator[JetStreamContext]:
    """The USAGE stream, emptied, so a test's worker sees only that test's events."""
    js = nc.jetstream()
    await bus.ensure_usage_stream(js)
    await js.purge_stream(subjects.USAGE_STREAM)
    yield js
    with contextlib.suppress(Exception):
        for info in await js.consumers_info(subjects.USAGE_STREAM):
            await js.delete_consumer(subjects.USAGE_STREAM, info.name)


async def publish(js: JetStreamContext, event: UsageEvent, *, msg_id: str | None = None) -> None:
    """As the api publishes: subject ``usage.<tenant>``, ``Nats-Msg-Id`` = request id."""
    await js.publish(
        subjects.usage(event.tenant_id), encode(event), headers={"Nats-Msg-Id": msg_id or event.request_id}
    )


def new_worker(settings: Settings, durable: str, **options: Any) -> UsageWorker:
    options.setdefault("ack_wait_s", 1.0)
    options.setdefault("fetch_timeout_s", 0.2)
    options.setdefault("batch_size", 500)
    return UsageWorker(settings, durable=durable, **options)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def consumer_drained(js: JetStreamContext, durable: str) -> bool:
    info = await js.consumer_info(subjects.USAGE_STREAM, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0

"""The worker bills every usage event exactly once: duplicates, redeliveries, a crash between
commit and ack, several workers, a missing price and a NATS restart change nothing a tenant pays."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing import ingest
from billing import worker as worker_module
from billing.worker import UsageWorker, charge_hours_until
from market.money import token_cost_micros
from market.settings import Settings
from market.wire import UsageEvent
from tests.billing.conftest import (
    consumer_drained,
    eventually,
    fetch,
    fetchval,
    make_prices,
    make_provider,
    make_reservation,
    make_tenant,
    new_worker,
    publish,
    store,
    usage_event,
)
from tests.conftest import Servers


@contextlib.asynccontextmanager
async def running(worker: UsageWorker) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.ready.wait(), 20)
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def owed(settings: Settings, tenant_id: str) -> int:
    return int(
        await fetchval(
            settings,
            "SELECT coalesce(sum(amount_micros), 0) FROM ledger_entries WHERE account_id = $1",
            f"tenant:{tenant_id}",
        )
    )


async def count(settings: Settings, table: str) -> int:
    return int(await fetchval(settings, f"SELECT count(*) FROM {table}"))  # noqa: S608 - test constant


async def test_duplicated_and_redelivered_events_bill_once(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], usage_stream: JetStreamContext
) -> None:
    tenant = await make_tenant(sessions)
    provider = await make_provider(sessions)
    await make_prices(sessions)
    events = [usage_event(tenant, provider_id=provider, prompt=1000 + i, completion=200 + i) for i in range(30)]
    for event in events:
        await publish(usage_stream, event)
    for event in events[:10]:  # the api retried the publish: JetStream's dedup window drops these
        await publish(usage_stream, event)
    for event in events[10:20]:  # republished past the dedup window: only the ledger's key stops them
        await publish(usage_stream, event, msg_id=event.request_id + "-again")

    worker = new_worker(settings, "dup-test")
    async with running(worker):
        await eventually(lambda: consumer_drained(usage_stream, "dup-test"), what="the stream to drain")

    expected = sum(token_cost_micros(e.prompt_tokens, 30) + token_cost_micros(e.completion_tokens, 60) for e in events)
    assert await count(settings, "usage_records") == 30
    assert await count(settings, "ledger_transactions") == 30
    assert await owed(settings, tenant) == expected
    assert worker.stats.recorded == 30
    assert worker.stats.duplicates == 10

    # Each record keeps the request's timings, the engine's part of the TTFT included.
    timings = await fetch(
        settings,
        "SELECT ttft_ms, engine_ttft_ms, duration_ms FROM usage_records WHERE request_id = $1",
        events[0].request_id,
    )
    assert tuple(timings[0]) == (120.0, 95.5, 1500.0)

    # The same events stored again by hand (another worker, a replay) change nothing either.
    again = await store(settings, events)
    assert (again.received, again.recorded) == (30, 0)
    assert await owed(settings, tenant) == expected


class Killed(Exception):
    """Stands in for the process dying."""


class DiesBeforeAck(UsageWorker):
    """Commits its first batch, then dies before acknowledging it."""

    async def ack(self, msgs: list[Any]) -> None:
        raise Killed


async def test_worker_killed_between_commit_and_ack_loses_and_doubles_nothing(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], usage_stream: JetStreamContext
) -> None:
    tenant = await make_tenant(sessions)
    provider = await make_provider(sessions)
    await make_prices(sessions)
    events = [usage_event(tenant, provider_id=provider, prompt=100 * (i + 1)) for i in range(200)]
    for event in events:
        await publish(usage_stream, event)

    doomed = DiesBeforeAck(settings, durable="kill-test", ack_wait_s=1.0, fetch_timeout_s=0.2, batch_size=500)
    with pytest.raises(Killed):
        await asyncio.wait_for(doomed.run(asyncio.Event()), 30)
    committed = await count(settings, "usage_records")
    assert committed == 200  # written, never acknowledged
    balance_after_crash = await owed(settings, tenant)

    survivor = new_worker(settings, "kill-test")
    async with running(survivor):
        await eventually(lambda: consumer_drained(usage_stream, "kill-test"), what="redelivery to be acknowledged")

    assert survivor.stats.duplicates == 200  # every event came back, and none was billed again
    assert await count(settings, "usage_records") == 200
    assert await count(settings, "ledger_transactions") == 200
    assert (
        await owed(settings, tenant)
        == balance_after_crash
        == sum(token_cost_micros(e.prompt_tokens, 30) + token_cost_micros(e.completion_tokens, 60) for e in events)
    )


async def test_several_workers_share_the_stream(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], usage_stream: JetStreamContext
) -> None:
    tenants = [await make_tenant(sessions) for _ in range(3)]
    provider = await make_provider(sessions)
    await make_prices(sessions)
    events = [usage_event(tenants[i % 3], provider_id=provider, prompt=i + 1) for i in range(1500)]
    await asyncio.gather(*(publish(usage_stream, e) for e in events))

    workers = [new_worker(settings, "shared-test", batch_size=100, name=f"w{i}") for i in range(3)]
    async with running(workers[0]), running(workers[1]), running(workers[2]):
        await eventually(lambda: consumer_drained(usage_stream, "shared-test"), what="the stream to drain")

    assert await count(settings, "usage_records") == 1500
    assert sum(w.stats.recorded for w in workers) == 1500
    assert sum(1 for w in workers if w.stats.recorded) >= 2  # the work really was shared
    total = sum(token_cost_micros(e.prompt_tokens, 30) + token_cost_micros(e.completion_tokens, 60) for e in events)
    assert sum([await owed(settings, t) for t in tenants]) == total


async def test_usage_without_a_price_is_kept_and_billed_once_priced(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)
    event = usage_event(tenant, model="new-model", prompt=2000, completion=1000)
    result = await store(settings, [event])
    assert (result.recorded, result.unrated) == (1, 1)
    assert await owed(settings, tenant) == 0  # nothing invented

    await make_prices(sessions, model="new-model", input_price=100, output_price=200)
    import asyncpg

    from market.db import plain_url

    # Usage of a model that is never priced sorts first, more of it than one pass takes: the
    # passes walk past it to the usage priced late.
    await store(settings, [usage_event(tenant, model="never-priced", request_id=f"req_00{i}") for i in range(3)])
    conn = await asyncpg.connect(plain_url(settings.require_database_url()))
    try:
        assert await ingest.rate_pending(conn, "usd", limit=2) == 1
        assert await ingest.rate_pending(conn, "usd", limit=2) == 0
    finally:
        await conn.close()
    assert await owed(settings, tenant) == 2000 * 100 + 1000 * 200


async def test_worker_rebinds_after_nats_restart_and_lost_consumer(
    servers: Servers,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    usage_stream: JetStreamContext,
) -> None:
    tenant = await make_tenant(sessions)
    await make_prices(sessions)
    worker = new_worker(settings, "restart-test")
    async with running(worker):
        first = [usage_event(tenant) for _ in range(20)]
        for event in first:
            await publish(usage_stream, event)
        await eventually(lambda: _records(settings, 20), what="the first events")

        servers.nats.stop()
        await asyncio.sleep(0.5)
        servers.nats.start()
        second = [usage_event(tenant) for _ in range(20)]
        await eventually(lambda: _published(usage_stream, second), what="publishing after the restart")
        await eventually(lambda: _records(settings, 40), timeout=30, what="events after the NATS restart")

        # A server that lost its store: the consumer is gone; the worker must make it again.
        await usage_stream.delete_consumer("USAGE", "restart-test")
        third = [usage_event(tenant) for _ in range(20)]
        for event in third:
            await publish(usage_stream, event)
        await eventually(lambda: _records(settings, 60), timeout=60, what="events after the consumer was lost")
    assert worker.stats.rebinds >= 1
    assert await count(settings, "ledger_transactions") == 60


async def _records(settings: Settings, n: int) -> bool:
    return await count(settings, "usage_records") >= n


async def _published(js: JetStreamContext, events: list[Any]) -> bool:
    try:
        for event in events:
            await publish(js, event)
    except Exception:
        return False
    return True


def _spoil(event: UsageEvent, how: str) -> None:
    if how == "huge_tokens":
        event.prompt_tokens = 2**31
    elif how == "negative_tokens":
        event.completion_tokens = event.relayed_completion_tokens = -1_000_000
    elif how == "long_request_id":
        event.request_id = "r" * 65
    elif how == "nan_time":
        event.ended_at = math.nan
    elif how == "far_time":
        event.ended_at = 1e300


async def _bill_one_bad_among_good(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    usage_stream: JetStreamContext,
    tenant: str,
    how: str,
    durable: str,
) -> tuple[UsageWorker, list[UsageEvent]]:
    """Five good events and one spoilt ``how`` among them, through a worker until it has them all;
    the worker must still be running."""
    await make_prices(sessions)
    good = [usage_event(tenant) for _ in range(5)]
    bad = usage_event(tenant)
    _spoil(bad, how)
    for event in [*good[:2], bad, *good[2:]]:
        await publish(usage_stream, event, msg_id=event.request_id[:60] + how)
    worker = new_worker(settings, durable)
    async with running(worker) as task:
        await eventually(lambda: consumer_drained(usage_stream, durable), what="the consumer drained")
        assert not task.done()
    return worker, good


@pytest.mark.parametrize("how", ["huge_tokens", "negative_tokens", "long_request_id", "nan_time", "far_time"])
async def test_an_event_that_cannot_be_billed_is_rejected_alone(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], usage_stream: JetStreamContext, how: str
) -> None:
    """One bad event among good ones: the good ones are billed, the bad one is rejected (logged
    and terminated, not redelivered), and the worker keeps running; nothing negative is posted."""
    tenant = await make_tenant(sessions)
    worker, good = await _bill_one_bad_among_good(settings, sessions, usage_stream, tenant, how, "poison-" + how)
    assert await count(settings, "usage_records") == 5
    assert worker.stats.rejected == 1
    assert await owed(settings, tenant) == 5 * await owed_for_one(settings, tenant, good[0].request_id)


@pytest.mark.parametrize("how", ["huge_tokens", "negative_tokens"])
async def test_an_event_the_database_refuses_is_found_and_rejected_alone(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    usage_stream: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """The backstop behind the checks: what PostgreSQL refuses for its values fails the batch,
    which is then stored an event at a time to reject only the one at fault."""
    monkeypatch.setattr(worker_module, "invalid", lambda event: None)
    tenant = await make_tenant(sessions)
    # too large for the column, or negative (migration 0009's check)
    worker, _ = await _bill_one_bad_among_good(settings, sessions, usage_stream, tenant, how, "refused-" + how)
    assert await count(settings, "usage_records") == 5
    assert worker.stats.rejected == 1


async def owed_for_one(settings: Settings, tenant_id: str, request_id: str) -> int:
    return int(
        await fetchval(
            settings,
            "SELECT amount_micros FROM ledger_entries WHERE account_id = $1 AND transaction_id = $2",
            f"tenant:{tenant_id}",
            request_id,
        )
    )


async def test_a_worker_busy_with_usage_still_charges_reservation_hours(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], usage_stream: JetStreamContext
) -> None:
    """Under steady traffic the worker never idles; the hours that ended are charged all the same."""
    tenant = await make_tenant(sessions)
    await make_prices(sessions, reservation_hour_minor=10)
    db_now: datetime = await fetchval(settings, "SELECT now()")
    await make_reservation(sessions, tenant, [(db_now - timedelta(hours=5), 2)])
    total = 3000
    for _ in range(total):
        await publish(usage_stream, usage_event(tenant))
    worker = new_worker(settings, "busy-test", batch_size=20, housekeeping_every_s=0.2)
    charged = "SELECT count(*) FROM ledger_transactions WHERE kind = 'reservation'"
    async with running(worker):
        while not await fetchval(settings, charged):
            await asyncio.sleep(0.02)
        recorded_then = worker.stats.recorded
        await eventually(lambda: consumer_drained(usage_stream, "busy-test"), what="the stream to drain")
    assert recorded_then < total  # charged while usage was still waiting, not once it ran dry
    assert await fetchval(settings, charged) >= 4  # five hours ago: at least four whole hours have ended


def test_an_hour_is_charged_two_minutes_after_it_ends() -> None:
    """A resize stamped 13:59:59 by its transaction's start may commit after 14:00: the 13:00 hour
    waits two minutes for it."""
    assert charge_hours_until(datetime(2026, 10, 7, 14, 1, 59, tzinfo=UTC)) == datetime(2026, 10, 7, 13, tzinfo=UTC)
    assert charge_hours_until(datetime(2026, 10, 7, 14, 2, tzinfo=UTC)) == datetime(2026, 10, 7, 14, tzinfo=UTC)

"""The spine: migrations round-trip without drift, health and readiness, error formats, ids, money."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from nats.aio.client import Client

import market.models  # noqa: F401
from market import bus, migrate
from market.aio import Drainers
from market.db import Base
from market.embedded import EmbeddedError, check_port
from market.ids import has_prefix, new_id
from market.money import Money, micros_to_minor, token_cost_micros
from tests.conftest import RunningApi, Servers


def _drift(url: str) -> list[object]:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    async def run() -> list[object]:
        from sqlalchemy.ext.asyncio import create_async_engine

        eng = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://", 1))
        async with eng.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
        await eng.dispose()
        return list(diff)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def test_migrations_round_trip_without_drift(servers: Servers) -> None:
    """upgrade heads -> downgrade base -> upgrade heads, and the ORM matches the migrations."""
    from market.embedded import EmbeddedPostgres

    scratch = EmbeddedPostgres(servers.base / "scratch-pg" / "data", fast=True)
    url = scratch.start()
    try:
        migrate.upgrade(url)
        assert _drift(url) == []
        migrate.downgrade(url, "base")
        migrate.upgrade(url)
        assert _drift(url) == []
    finally:
        scratch.stop()


async def test_healthz_and_readyz(api: RunningApi) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        health = await client.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"postgres": "ok", "nats": "ok"}
        assert health.headers["x-request-id"].startswith("req_")


async def test_readyz_names_the_missing_server(servers: Servers, api: RunningApi) -> None:
    """With PostgreSQL down, readiness is 503 and says which dependency failed."""
    servers.postgres.stop()
    try:
        async with httpx.AsyncClient(base_url=api.url) as client:
            ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["postgres"].startswith("unreachable")
        assert ready.json()["checks"]["nats"] == "ok"
    finally:
        servers.postgres.start()


async def test_openapi_metrics_and_problem_details(api: RunningApi) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        schema = await client.get("/schema/openapi.json")
        assert schema.status_code == 200
        assert schema.json()["info"]["title"] == "Compute Market"
        await client.get("/healthz")
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert "market_api" in metrics.text
        missing = await client.get("/api/nothing-here")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
        body = missing.json()
        assert body["status"] == 404
        assert body["title"] == "Not Found"
        assert "request_id" in body
        openai_missing = await client.get("/v1/nothing-here")
        assert openai_missing.status_code == 404
        assert set(openai_missing.json()["error"]) == {"message", "type", "param", "code"}


def test_port_in_use_is_a_one_line_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(EmbeddedError) as err:
            check_port(port, "the api", "--port")
    assert str(err.value) == f"port {port} for the api is already in use: stop what holds it or set --port"


def test_ids_are_prefixed_and_time_ordered() -> None:
    first, second = new_id("tenant"), new_id("tenant")
    assert has_prefix(first, "tenant")
    assert not has_prefix(first, "key")
    assert len({new_id("request") for _ in range(1000)}) == 1000
    assert first[:14] <= second[:14]


def test_money_is_integer_minor_units() -> None:
    assert str(Money(12345)) == "123.45 USD"
    assert str(Money(-5)) == "-0.05 USD"
    with pytest.raises(TypeError):
        Money(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot combine"):
        Money(1, "usd") + Money(1, "eur")
    # 1,500 tokens at 60 cents per 1M tokens = 0.09 cents = 90,000 micros
    assert token_cost_micros(1500, 60) == 90_000
    assert micros_to_minor(500_000) == 1
    assert micros_to_minor(499_999) == 0
    assert micros_to_minor(-500_000) == -1


async def test_an_inline_subscription_delivers_in_order_and_survives_its_handler(nc: Client) -> None:
    """The api's chunk inbox: every message, in order, past a handler that raises, never counted as
    pending (the client would call a slow consumer and drop messages), and drained cleanly."""
    got: list[bytes] = []

    def handler(msg: object) -> None:
        data: bytes = msg.data  # type: ignore[attr-defined]
        if data == b"boom":
            raise RuntimeError("a handler's bug")
        got.append(data)

    sub = await bus.subscribe_inline(nc, "test.inline.>", handler)
    sub._pending_bytes_limit = 4096  # 3,000 messages of 100 bytes would pass it 73 times over
    for i in range(3000):
        await nc.publish(f"test.inline.{i % 7}", f"{i:0100d}".encode() if i != 1500 else b"boom")
    await nc.flush()
    for _ in range(100):
        if len(got) == 2999:
            break
        await asyncio.sleep(0.02)
    assert [int(d) for d in got] == [i for i in range(3000) if i != 1500]
    assert sub.pending_bytes == 0
    assert sub.pending_msgs == 0
    await sub.drain()
    await nc.publish("test.inline.0", b"after")
    await nc.flush()
    assert got[-1] != b"after"


async def test_a_group_commit_task_counts_out_as_soon_as_it_returns() -> None:
    """``Drainers`` (the usage outbox's stores and the limiter's admits): an item queued right
    after every task took the queue empty and returned, before their done-callbacks ran, starts a
    task of its own. Counted out by those callbacks, it waited for a later item, for ever if none
    came: a request's last usage store hung its response (3 streams of 1,048 in a benchmark)."""
    queue: list[int] = []
    taken: list[int] = []

    async def work() -> None:
        while queue:
            taken.append(queue.pop())

    drainers = Drainers(2, work, "test-drain")
    queue.append(1)
    drainers.kick()
    queue.append(2)
    drainers.kick()
    await asyncio.sleep(0)  # both tasks run in this iteration, ahead of us, and return
    queue.append(3)
    drainers.kick()
    await drainers.wait()
    assert sorted(taken) == [1, 2, 3]

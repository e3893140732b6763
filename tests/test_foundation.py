"""The spine: migrations round-trip without drift, health and readiness, error formats, ids, money."""

from __future__ import annotations

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import market.models  # noqa: F401
from market import migrate
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

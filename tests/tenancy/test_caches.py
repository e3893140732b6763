"""The request path's caches (API keys, the model catalog): in steady use no request waits for the
database, which is shown here by locking the table they read while requests keep coming."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import httpx
import pytest

import api.auth
import api.token.service
from api.errors import Unauthorized
from api.token.service import Catalog
from market.db import plain_url
from market.settings import Settings
from tests.tenancy.conftest import Replica, count_queries, make_world

Start = Callable[[], Awaitable[Replica]]


@contextlib.asynccontextmanager
async def table_locked(settings: Settings, table: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold an exclusive lock on ``table``: every read of it waits until the block ends."""
    conn = await asyncpg.connect(plain_url(settings.require_database_url()))
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield conn
    finally:
        await conn.close()


async def timed(work: Awaitable[object]) -> float:
    started = time.monotonic()
    await asyncio.wait_for(work, 2)
    return time.monotonic() - started


def short_ttls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries live 4 s and are refreshed in their last 2 (wide margins for a slow machine)."""
    monkeypatch.setattr(api.auth, "CACHE_TTL_S", 4.0)
    monkeypatch.setattr(api.auth, "REFRESH_AHEAD_S", 2.0)
    monkeypatch.setattr(api.token.service, "CATALOG_TTL_S", 4.0)
    monkeypatch.setattr(api.token.service, "CATALOG_REFRESH_AHEAD_S", 2.0)


async def test_a_key_in_use_is_looked_up_again_before_its_entry_expires(
    admin: httpx.AsyncClient, replicas: Start, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    short_ttls(monkeypatch)
    world = await make_world(admin)
    replica = await replicas()
    await replica.principal(world.key)
    lookups = count_queries(replica, "api_keys")
    await asyncio.sleep(2.2)
    async with table_locked(settings, "api_keys"):
        # The entry is in its last seconds: the request is answered from it, and its lookup,
        # stuck behind the lock, runs in the background.
        assert await timed(replica.principal(world.key)) < 0.2
        assert await timed(replica.principal(world.key)) < 0.2
        await asyncio.sleep(0.05)
        assert len(lookups) == 1  # one lookup in flight, not one per request
    await asyncio.sleep(2.0)  # past the old entry's expiry (4 s): the refreshed one serves
    async with table_locked(settings, "api_keys"):
        assert await timed(replica.principal(world.key)) < 0.2


async def test_a_refresh_that_finds_the_key_revoked_drops_it(
    admin: httpx.AsyncClient, replicas: Start, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revocation whose broadcast this replica missed ends the key's use within the refresh."""
    short_ttls(monkeypatch)
    world = await make_world(admin)
    replica = await replicas()
    await replica.principal(world.key)
    cached_at = time.monotonic()
    conn = await asyncpg.connect(plain_url(settings.require_database_url()))
    try:  # revoked behind the api's back: no broadcast
        await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", world.key_id)
    finally:
        await conn.close()
    await asyncio.sleep(2.2)
    await replica.principal(world.key)  # still cached: served, and looked up again meanwhile
    refused: Unauthorized | None = None
    while refused is None and time.monotonic() - cached_at < 3.9:  # the entry expires at 4 s
        await asyncio.sleep(0.02)
        try:
            await replica.principal(world.key)
        except Unauthorized as exc:
            refused = exc
    assert refused is not None, "the revoked key was still served after its refresh"
    assert refused.code == "revoked_api_key"


async def test_the_model_catalog_in_use_is_reloaded_before_it_expires(
    admin: httpx.AsyncClient, replicas: Start, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    short_ttls(monkeypatch)
    world = await make_world(admin)
    catalog = Catalog((await replicas()).state)
    assert (await catalog.get(world.model)).name == world.model
    await asyncio.sleep(2.2)
    await catalog.get(world.model)  # in the catalog's last seconds: reloaded in the background
    await asyncio.sleep(2.1)  # past the first load's expiry (4 s)
    async with table_locked(settings, "models"):
        assert await timed(catalog.get(world.model)) < 0.2
    r = await admin.post("/api/admin/models", json={"name": "org/new-model", "context_length": 4096})
    assert r.status_code == 201, r.text
    # Reloaded ahead of expiry while in use, the catalog picks up a new model within a TTL.
    deadline = time.monotonic() + 6
    while "org/new-model" not in await catalog.all():
        assert time.monotonic() < deadline, "the catalog never picked up the new model"
        await asyncio.sleep(0.05)
    async with table_locked(settings, "models"):
        assert await timed(catalog.get("org/new-model")) < 0.2

"""Expired and revoked keys are refused (401), and a revocation reaches a second api replica at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from api.errors import Unauthorized
from api.main import build_app
from market.embedded import free_port
from market.settings import Settings
from tests.conftest import RunningApi
from tests.tenancy.conftest import Replica, client, count_queries, make_world, ok

Start = Callable[[], Awaitable[Replica]]


async def test_expired_key_is_refused(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin)
    expires = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    key = await ok(admin.post(f"/api/admin/tenants/{world.tenant_id}/keys", json={"expires_at": expires}), 201)
    async with client(api, key["key"]) as tenant:
        await ok(tenant.get("/api/tenant/quota"))
        await asyncio.sleep(1.6)
        r = await tenant.get("/api/tenant/quota")
    assert r.status_code == 401
    assert r.json()["code"] == "expired_api_key"


async def test_revocation_is_seen_by_a_second_replica_at_once(
    api: RunningApi, admin: httpx.AsyncClient, settings: Settings
) -> None:
    world = await make_world(admin)
    second = await RunningApi(build_app(settings), free_port()).start()
    try:
        async with client(second, world.key) as on_second:
            await ok(on_second.get("/api/tenant/quota"))  # the second replica now has the key cached
            await ok(admin.delete(f"/api/admin/tenants/{world.tenant_id}/keys/{world.key_id}"))
            started = time.monotonic()
            statuses = []
            while time.monotonic() - started < 1.0:  # far below the cache's 5 s TTL
                r = await on_second.get("/api/tenant/quota")
                statuses.append(r.status_code)
                if r.status_code == 401:
                    break
                await asyncio.sleep(0.01)
            assert statuses[-1] == 401, statuses
            assert r.json()["code"] in ("revoked_api_key", "invalid_api_key")
            assert len(statuses) <= 2  # the first request after the revocation, or the one right after
    finally:
        await second.stop()


async def test_revoked_key_cannot_be_used_on_the_same_replica(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin)
    async with client(api, world.key) as tenant:
        await ok(tenant.get("/api/tenant/quota"))
        await ok(admin.delete(f"/api/admin/tenants/{world.tenant_id}/keys/{world.key_id}"))
        r = await tenant.get("/api/tenant/quota")
    assert r.status_code == 401
    assert r.json()["code"] == "revoked_api_key"


async def test_suspending_a_tenant_takes_effect_at_once(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin)
    async with client(api, world.key) as tenant:
        await ok(tenant.get("/api/tenant/quota"))
        await ok(admin.patch(f"/api/admin/tenants/{world.tenant_id}", json={"status": "suspended"}))
        r = await tenant.get("/api/tenant/quota")
        assert r.status_code == 403
        assert r.json()["code"] == "tenant_suspended"
        await ok(admin.patch(f"/api/admin/tenants/{world.tenant_id}", json={"status": "active"}))
        await ok(tenant.get("/api/tenant/quota"))


async def test_a_burst_on_a_cold_key_costs_one_lookup(admin: httpx.AsyncClient, replicas: Start) -> None:
    """Fifty requests arriving together with an uncached key wait for one query, not fifty."""
    world = await make_world(admin, grant=100)
    replica = await replicas()
    queries = count_queries(replica, "api_keys")
    principals = await asyncio.gather(*(replica.principal(world.key) for _ in range(50)))
    assert {p.tenant_id for p in principals} == {world.tenant_id}
    assert len(queries) == 1
    with pytest.raises(Unauthorized):  # a bad key in a burst: every caller gets the refusal
        await asyncio.gather(*(replica.auth.authenticate("Bearer sk-nope") for _ in range(5)))

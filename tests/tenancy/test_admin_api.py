"""The admin API as a platform admin and an incubator admin use it: pools, tenants, grants, keys, models."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import RunningApi
from tests.tenancy.conftest import client, make_world, ok


async def test_incubator_pool_tenant_grant_and_quota(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin, pool=1000, grant=300)
    pool = await ok(admin.get(f"/api/admin/incubators/{world.incubator_id}/pool"))
    assert (pool["tokens"], pool["allocated_tokens"], pool["available_tokens"]) == (1000, 300, 700)
    incubator = await ok(admin.get(f"/api/admin/incubators/{world.incubator_id}"))
    assert incubator["pool"]["allocated_tokens"] == 300

    async with client(api, world.key) as tenant:
        quota = await ok(tenant.get("/api/tenant/quota"))
    assert (quota["granted"], quota["held"], quota["used"], quota["remaining"]) == (300, 0, 0, 300)

    # the pool can never be over-allocated, and cannot shrink below what is granted
    refused = await admin.post(f"/api/admin/tenants/{world.tenant_id}/grants", json={"tokens": 701})
    assert refused.status_code == 409
    assert refused.json()["code"] == "pool_exhausted"
    assert "700 tokens" in refused.json()["detail"]
    shrink = await admin.put(f"/api/admin/incubators/{world.incubator_id}/pool", json={"tokens": 299})
    assert shrink.status_code == 409
    await ok(admin.post(f"/api/admin/tenants/{world.tenant_id}/grants", json={"tokens": 700}), 201)
    again = await admin.post(f"/api/admin/tenants/{world.tenant_id}/grants", json={"tokens": 1})
    assert again.status_code == 409


async def test_concurrent_grants_never_over_allocate_the_pool(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin, pool=1000, grant=0)
    others = [
        (await ok(admin.post("/api/admin/tenants", json={"name": f"s{i}", "incubator_id": world.incubator_id}), 201))[
            "id"
        ]
        for i in range(4)
    ]
    results = await asyncio.gather(
        *[admin.post(f"/api/admin/tenants/{t}/grants", json={"tokens": 100}) for t in others for _ in range(5)]
    )
    assert sorted({r.status_code for r in results}) == [201, 409]
    assert sum(r.status_code == 201 for r in results) == 10
    pool = await ok(admin.get(f"/api/admin/incubators/{world.incubator_id}/pool"))
    assert pool["allocated_tokens"] == 1000


async def test_grant_shrink_and_revoke_keep_history(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin, pool=1000, grant=0)
    grant = await ok(admin.post(f"/api/admin/tenants/{world.tenant_id}/grants", json={"tokens": 500}), 201)
    resized = await ok(admin.patch(f"/api/admin/tenants/{world.tenant_id}/grants/{grant['id']}", json={"tokens": 200}))
    assert resized["tokens"] == 200
    revoked = await ok(admin.delete(f"/api/admin/tenants/{world.tenant_id}/grants/{grant['id']}"))
    assert revoked["status"] == "revoked"
    assert [e["action"] for e in revoked["history"]] == ["granted", "resized", "revoked"]
    assert [(e["tokens_before"], e["tokens_after"]) for e in revoked["history"]] == [(0, 500), (500, 200), (200, 0)]
    pool = await ok(admin.get(f"/api/admin/incubators/{world.incubator_id}/pool"))
    assert pool["allocated_tokens"] == 0
    listed = await ok(admin.get(f"/api/admin/tenants/{world.tenant_id}/grants"))
    assert [g["id"] for g in listed] == [grant["id"]]
    gone = await admin.patch(f"/api/admin/tenants/{world.tenant_id}/grants/{grant['id']}", json={"tokens": 10})
    assert gone.status_code == 409


async def test_tenant_outside_incubators_gets_grants_from_the_platform(
    api: RunningApi, admin: httpx.AsyncClient
) -> None:
    tenant = await ok(admin.post("/api/admin/tenants", json={"name": "solo"}), 201)
    assert tenant["id"].startswith("ten_")
    assert tenant["incubator_id"] is None
    grant = await ok(admin.post(f"/api/admin/tenants/{tenant['id']}/grants", json={"tokens": 5, "credits": 100}), 201)
    assert (grant["tokens"], grant["credits"], grant["incubator_id"]) == (5, 100, None)
    quota = await ok(admin.get(f"/api/admin/tenants/{tenant['id']}/quota"))
    assert (quota["granted"], quota["remaining"], quota["credits_granted"]) == (5, 5, 100)


async def test_incubator_admin_creates_tenants_in_its_own_incubator(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin, pool=1000, grant=0)
    inc_key = await ok(admin.post(f"/api/admin/incubators/{world.incubator_id}/keys", json={"name": "ops"}), 201)
    assert inc_key["key"].startswith("sk-inc-")
    async with client(api, inc_key["key"]) as inc:
        tenant = await ok(inc.post("/api/admin/tenants", json={"name": "startup"}), 201)
        assert tenant["incubator_id"] == world.incubator_id
        grant = await ok(inc.post(f"/api/admin/tenants/{tenant['id']}/grants", json={"tokens": 400}), 201)
        assert grant["incubator_id"] == world.incubator_id
        assert (
            await inc.put(f"/api/admin/incubators/{world.incubator_id}/pool", json={"tokens": 1})
        ).status_code == 403
        assert (await inc.post("/api/admin/incubators", json={"name": "mine"})).status_code == 403
        listed = await ok(inc.get("/api/admin/incubators"))
        assert [i["id"] for i in listed] == [world.incubator_id]


async def test_tenant_list_is_paginated_and_filterable(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin, grant=0)
    for i in range(5):
        await ok(admin.post("/api/admin/tenants", json={"name": f"beta-{i}"}), 201)
    suspended = await ok(admin.post("/api/admin/tenants", json={"name": "beta-x"}), 201)
    await ok(admin.patch(f"/api/admin/tenants/{suspended['id']}", json={"status": "suspended"}))

    seen: list[str] = []
    after = None
    while True:
        params = {"limit": 2, "q": "beta", **({"after": after} if after else {})}
        page = await ok(admin.get("/api/admin/tenants", params=params))
        seen += [t["name"] for t in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_after"]
    assert seen == [*[f"beta-{i}" for i in range(5)], "beta-x"]
    only = await ok(admin.get("/api/admin/tenants", params={"incubator_id": world.incubator_id}))
    assert [t["id"] for t in only["data"]] == [world.tenant_id]
    susp = await ok(admin.get("/api/admin/tenants", params={"status": "suspended"}))
    assert [t["id"] for t in susp["data"]] == [suspended["id"]]


async def test_keys_are_shown_once_listed_without_secret_and_revocable(
    api: RunningApi, admin: httpx.AsyncClient
) -> None:
    world = await make_world(admin, grant=0)
    created = await ok(
        admin.post(
            f"/api/admin/tenants/{world.tenant_id}/keys",
            json={"name": "ci", "expires_in_days": 30, "requests_per_minute": 60, "scopes": ["inference"]},
        ),
        201,
    )
    assert created["key"].startswith("sk-")
    assert created["prefix"] == created["key"][: len(created["prefix"])]
    listed = await ok(admin.get(f"/api/admin/tenants/{world.tenant_id}/keys"))
    assert {k["id"] for k in listed} == {world.key_id, created["id"]}
    assert all("key" not in k for k in listed)
    assert created["key"] not in str(listed)
    async with client(api, created["key"]) as inference_only:
        assert (await inference_only.get("/api/tenant/keys")).status_code == 403
        assert (await inference_only.get("/api/tenant/quota")).status_code == 200
    revoked = await ok(admin.delete(f"/api/admin/tenants/{world.tenant_id}/keys/{created['id']}"))
    assert revoked["revoked_at"] is not None
    async with client(api, created["key"]) as dead:
        assert (await dead.get("/api/tenant/quota")).status_code == 401


async def test_tenant_self_service_keys(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin, grant=0)
    async with client(api, world.key) as tenant:
        new = await ok(tenant.post("/api/tenant/keys", json={"name": "laptop"}), 201)
        assert new["tenant_id"] == world.tenant_id
        assert new["scopes"] == ["inference", "manage"]
        keys = await ok(tenant.get("/api/tenant/keys"))
        assert {k["id"] for k in keys} == {world.key_id, new["id"]}
        await ok(tenant.delete(f"/api/tenant/keys/{new['id']}"))
        # revoking its own calling key works, and the key stops working at once
        await ok(tenant.delete(f"/api/tenant/keys/{world.key_id}"))
        assert (await tenant.get("/api/tenant/keys")).status_code == 401


async def test_models_catalog_and_tenant_allowed_models(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin, grant=0, model="meta-llama/Llama-3.1-8B")
    models = await ok(admin.get("/api/admin/models"))
    assert [(m["name"], m["context_length"]) for m in models] == [("meta-llama/Llama-3.1-8B", 8192)]
    dup = await admin.post("/api/admin/models", json={"name": "meta-llama/Llama-3.1-8B", "context_length": 1})
    assert dup.status_code == 409
    patched = await ok(admin.patch("/api/admin/models/meta-llama/Llama-3.1-8B", json={"context_length": 4096}))
    assert patched["context_length"] == 4096
    assert await ok(admin.get(f"/api/admin/tenants/{world.tenant_id}/models")) == {"models": [], "all_active": True}
    unknown = await admin.put(f"/api/admin/tenants/{world.tenant_id}/models", json={"models": ["nope"]})
    assert unknown.status_code == 400
    assert "nope" in unknown.json()["detail"]
    allowed = await ok(
        admin.put(f"/api/admin/tenants/{world.tenant_id}/models", json={"models": ["meta-llama/Llama-3.1-8B"]})
    )
    assert allowed == {"models": ["meta-llama/Llama-3.1-8B"], "all_active": False}

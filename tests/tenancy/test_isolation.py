"""An incubator admin sees only its incubator and tenants; a tenant only its own keys.

Everything outside the caller's reach is 404 (it does not exist for them), never 403.
"""

from __future__ import annotations

import httpx

from tests.conftest import RunningApi
from tests.tenancy.conftest import World, client, make_world, ok


async def _second_world(admin: httpx.AsyncClient) -> World:
    return await make_world(admin, model="org/llama-test")


async def test_incubator_admin_gets_404_on_another_incubator(api: RunningApi, admin: httpx.AsyncClient) -> None:
    mine, theirs = await make_world(admin), await _second_world(admin)
    inc_key = await ok(admin.post(f"/api/admin/incubators/{mine.incubator_id}/keys", json={}), 201)
    their_admin = await ok(admin.post(f"/api/admin/incubators/{theirs.incubator_id}/keys", json={}), 201)
    their_grant = (await ok(admin.get(f"/api/admin/tenants/{theirs.tenant_id}/grants")))[0]["id"]
    t, i = theirs.tenant_id, theirs.incubator_id
    attempts = [
        ("GET", f"/api/admin/incubators/{i}", None),
        ("GET", f"/api/admin/incubators/{i}/pool", None),
        ("GET", f"/api/admin/incubators/{i}/keys", None),
        ("POST", f"/api/admin/incubators/{i}/keys", {}),
        ("DELETE", f"/api/admin/incubators/{i}/keys/{their_admin['id']}", None),
        ("GET", f"/api/admin/tenants/{t}", None),
        ("PATCH", f"/api/admin/tenants/{t}", {"status": "suspended"}),
        ("GET", f"/api/admin/tenants/{t}/keys", None),
        ("POST", f"/api/admin/tenants/{t}/keys", {}),
        ("DELETE", f"/api/admin/tenants/{t}/keys/{theirs.key_id}", None),
        ("GET", f"/api/admin/tenants/{t}/grants", None),
        ("POST", f"/api/admin/tenants/{t}/grants", {"tokens": 1}),
        ("PATCH", f"/api/admin/tenants/{t}/grants/{their_grant}", {"tokens": 1}),
        ("DELETE", f"/api/admin/tenants/{t}/grants/{their_grant}", None),
        ("GET", f"/api/admin/tenants/{t}/quota", None),
        ("GET", f"/api/admin/tenants/{t}/models", None),
        ("PUT", f"/api/admin/tenants/{t}/models", {"models": []}),
        ("POST", "/api/admin/tenants", {"name": "sneaky", "incubator_id": i}),
        ("GET", f"/api/admin/tenants/{t}/reservations", None),
        ("POST", f"/api/admin/tenants/{t}/reservations", {"model": theirs.model, "slots": 1}),
        ("PATCH", f"/api/admin/tenants/{t}/reservations/res_x", {"slots": 1}),
        ("DELETE", f"/api/admin/tenants/{t}/reservations/res_x", None),
    ]
    async with client(api, inc_key["key"]) as inc:
        for method, path, body in attempts:
            r = await inc.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
        listed = await ok(inc.get("/api/admin/tenants"))
        assert [x["id"] for x in listed["data"]] == [mine.tenant_id]
        filtered = await ok(inc.get("/api/admin/tenants", params={"incubator_id": i}))
        assert filtered["data"] == []
        # its own incubator's tenant works
        await ok(inc.get(f"/api/admin/tenants/{mine.tenant_id}"))
    # nothing changed on the other side
    their_tenant = await ok(admin.get(f"/api/admin/tenants/{t}"))
    assert their_tenant["status"] == "active"
    assert (await ok(admin.get(f"/api/admin/tenants/{t}/quota")))["granted"] == 100_000
    async with client(api, theirs.key) as their_tenant_client:
        await ok(their_tenant_client.get("/api/tenant/quota"))


async def test_tenant_cannot_touch_another_tenants_keys(api: RunningApi, admin: httpx.AsyncClient) -> None:
    mine, theirs = await make_world(admin), await _second_world(admin)
    async with client(api, mine.key) as tenant:
        r = await tenant.delete(f"/api/tenant/keys/{theirs.key_id}")
        assert r.status_code == 404
        keys = await ok(tenant.get("/api/tenant/keys"))
        assert [k["id"] for k in keys] == [mine.key_id]
    async with client(api, theirs.key) as other:
        await ok(other.get("/api/tenant/quota"))


async def test_roles_are_checked_on_every_area(api: RunningApi, admin: httpx.AsyncClient) -> None:
    world = await make_world(admin)
    async with client(api, world.key) as tenant:
        for path in ("/api/admin/tenants", "/api/admin/incubators", "/api/admin/models"):
            r = await tenant.get(path)
            assert r.status_code == 403
            assert r.json()["code"] == "forbidden"
    inc_key = await ok(admin.post(f"/api/admin/incubators/{world.incubator_id}/keys", json={}), 201)
    async with client(api, inc_key["key"]) as inc:
        assert (await inc.get("/api/tenant/quota")).status_code == 403
        assert (await inc.post("/api/admin/models", json={"name": "x", "context_length": 1})).status_code == 403
        # the token API is a tenant's: another role's key is refused in OpenAI's format
        r = await inc.post("/v1/completions", json={"model": "x", "prompt": "x"})
        assert r.status_code == 403
        assert r.json()["error"]["type"] == "permission_error"
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        r = await anonymous.get("/api/admin/tenants")
        assert r.status_code == 401
        assert r.json()["code"] == "invalid_api_key"

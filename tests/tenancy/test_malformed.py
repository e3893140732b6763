"""Every malformed body or parameter gets a clear 4xx problem-details response, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import RunningApi
from tests.tenancy.conftest import client, make_world, ok

BAD_BODIES: list[tuple[str, str, Any, str]] = [
    # (method, path template, body (bytes = raw), a word the message must contain)
    ("POST", "/api/admin/incubators", b"{", "truncated"),
    ("POST", "/api/admin/incubators", b"[]", "object"),
    ("POST", "/api/admin/incubators", b"null", "object"),
    ("POST", "/api/admin/incubators", {}, "name"),
    ("POST", "/api/admin/incubators", {"name": ""}, "name"),
    ("POST", "/api/admin/incubators", {"name": "   "}, "name"),
    ("POST", "/api/admin/incubators", {"name": "x" * 201}, "name"),
    ("POST", "/api/admin/incubators", {"name": "ok", "extra": 1}, "extra"),
    ("PUT", "/api/admin/incubators/{incubator}/pool", {"tokens": -1}, "tokens"),
    ("PUT", "/api/admin/incubators/{incubator}/pool", {"tokens": 10**30}, "tokens"),
    ("PUT", "/api/admin/incubators/{incubator}/pool", {"tokens": "many"}, "tokens"),
    ("PUT", "/api/admin/incubators/{incubator}/pool", {"tokens": 1.5}, "tokens"),
    ("PUT", "/api/admin/incubators/{incubator}/pool", {"tokens": 10, "credits": -5}, "credits"),
    ("POST", "/api/admin/tenants", {"name": 42}, "name"),
    ("POST", "/api/admin/tenants", {"name": "a", "requests_per_minute": 0}, "requests_per_minute"),
    ("POST", "/api/admin/tenants", {"name": "a", "tokens_per_minute": 2**40}, "tokens_per_minute"),
    ("POST", "/api/admin/tenants", {"name": "a", "incubator_id": "x" * 100}, "incubator_id"),
    ("POST", "/api/admin/tenants", {"name": "a", "allowed_providers": "prov_1"}, "allowed_providers"),
    ("PATCH", "/api/admin/tenants/{tenant}", {"status": "deleted"}, "status"),
    ("PATCH", "/api/admin/tenants/{tenant}", {"name": None}, "name"),
    ("POST", "/api/admin/tenants/{tenant}/keys", {"scopes": ["root"]}, "scopes"),
    ("POST", "/api/admin/tenants/{tenant}/keys", {"scopes": []}, "scopes"),
    ("POST", "/api/admin/tenants/{tenant}/keys", {"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ("POST", "/api/admin/tenants/{tenant}/keys", {"expires_at": "2099-01-01T00:00:00"}, "expires_at"),
    ("POST", "/api/admin/tenants/{tenant}/keys", {"expires_at": "tomorrow"}, "expires_at"),
    ("POST", "/api/admin/tenants/{tenant}/keys", {"expires_in_days": 0}, "expires_in_days"),
    (
        "POST",
        "/api/admin/tenants/{tenant}/keys",
        {"expires_in_days": 1, "expires_at": "2099-01-01T00:00:00Z"},
        "expires",
    ),
    ("POST", "/api/admin/tenants/{tenant}/grants", {}, "tokens"),
    ("POST", "/api/admin/tenants/{tenant}/grants", {"tokens": 0}, "tokens"),
    ("POST", "/api/admin/tenants/{tenant}/grants", {"tokens": -100}, "tokens"),
    ("POST", "/api/admin/tenants/{tenant}/grants", {"tokens": True}, "tokens"),
    ("POST", "/api/admin/tenants/{tenant}/grants", {"token": 5}, "token"),
    ("PATCH", "/api/admin/tenants/{tenant}/grants/{grant}", {"tokens": -1}, "tokens"),
    ("PUT", "/api/admin/tenants/{tenant}/models", {"models": "all"}, "models"),
    ("PUT", "/api/admin/tenants/{tenant}/models", {"models": ["has space"]}, "models"),
    ("POST", "/api/admin/models", {"name": "m", "context_length": 0}, "context_length"),
    ("POST", "/api/admin/models", {"name": "m"}, "context_length"),
    ("PATCH", "/api/admin/models/{model}", {"active": "yes"}, "active"),
    ("POST", "/api/tenant/keys", {"requests_per_minute": -3}, "requests_per_minute"),
    ("POST", "/api/tenant/keys", b"name=x", "json"),
]

BAD_QUERIES = [
    {"limit": "0"},
    {"limit": "1000"},
    {"limit": "ten"},
    {"status": "gone"},
    {"after": "x" * 100},
]


@pytest.fixture
async def paths(api: RunningApi, admin: httpx.AsyncClient) -> dict[str, str]:
    world = await make_world(admin)
    grant = (await ok(admin.get(f"/api/admin/tenants/{world.tenant_id}/grants")))[0]["id"]
    return {
        "incubator": world.incubator_id,
        "tenant": world.tenant_id,
        "grant": grant,
        "model": world.model,
        "tenant_key": world.key,
    }


async def test_malformed_bodies_get_clear_4xx(api: RunningApi, admin: httpx.AsyncClient, paths: dict[str, str]) -> None:
    failures = []
    async with client(api, paths["tenant_key"]) as tenant:
        for method, template, body, word in BAD_BODIES:
            path = template.format(**paths)
            caller = tenant if path.startswith("/api/tenant") else admin
            if isinstance(body, bytes):
                r = await caller.request(method, path, content=body, headers={"content-type": "application/json"})
            else:
                r = await caller.request(method, path, json=body)
            problem = r.json() if r.headers.get("content-type", "").startswith("application/problem+json") else {}
            if not (400 <= r.status_code < 500 and problem.get("status") == r.status_code):
                failures.append((method, path, body, r.status_code, r.text[:200]))
            elif word.lower() not in problem["detail"].lower():
                failures.append((method, path, body, "message lacks " + word, problem["detail"]))
    assert failures == []


async def test_malformed_queries_and_unknown_ids(
    api: RunningApi, admin: httpx.AsyncClient, paths: dict[str, str]
) -> None:
    for params in BAD_QUERIES:
        r = await admin.get("/api/admin/tenants", params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    for path in (
        "/api/admin/tenants/ten_nope",
        "/api/admin/tenants/" + "x" * 5000,
        "/api/admin/incubators/inc_nope/pool",
        f"/api/admin/tenants/{paths['tenant']}/grants/grt_nope",
    ):
        r = await admin.get(path) if "grt_" not in path else await admin.delete(path)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["status"] == 404

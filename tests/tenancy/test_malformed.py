"""Every malformed body or parameter gets a clear 4xx problem-details response, never a 500."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import httpx
import msgspec
import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

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
    ("POST", "/api/tenant/reservations", {"model": "m", "slots": 0}, "slots"),
    ("POST", "/api/tenant/reservations", {"model": "m", "slots": 1, "burst": 2}, "burst"),
    ("POST", "/api/tenant/reservations", {"slots": 1}, "model"),
    ("PATCH", "/api/tenant/reservations/res_x", {"burst_slots": -1}, "burst_slots"),
    # Strict types: Litestar alone would take "5", 1e3 or "0" for an integer or a boolean.
    ("PUT", "/api/admin/incubators/{incubator}/pool", {"tokens": "1000000"}, "tokens"),
    ("POST", "/api/admin/tenants/{tenant}/grants", {"tokens": 1e3}, "tokens"),
    ("PATCH", "/api/admin/models/{model}", {"active": "0"}, "active"),
    # What only the database refuses: a NUL character, a time past year 9999 in UTC.
    ("POST", "/api/admin/tenants", {"name": "a\u0000b"}, "value"),
    ("POST", "/api/admin/incubators", {"name": "a\u0000b"}, "value"),
    ("POST", "/api/admin/tenants/{tenant}/keys", {"expires_at": "9999-12-31T23:59:59-12:00"}, "range"),
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
    for params in ({"q": "a\u0000b"}, {"after": "a\u0000"}):
        r = await admin.get("/api/admin/tenants", params=params)
        assert r.status_code == 400, (params, r.text)
    r = await admin.get("/api/admin/tenants/ab%00c")
    assert r.status_code in (400, 404), r.text
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


async def test_one_name_created_at_once_is_one_201_and_409s(api: RunningApi, admin: httpx.AsyncClient) -> None:
    """Two requests can both find a name free; the database's unique key decides, and the loser
    hears a 409, not a 500."""
    answers = await asyncio.gather(
        *(admin.post("/api/admin/models", json={"name": "race/m", "context_length": 10}) for _ in range(8))
    )
    assert sorted(r.status_code for r in answers) == [201] + [409] * 7, [r.text for r in answers]
    assert all(r.json()["status"] == 409 for r in answers if r.status_code == 409)


async def test_a_provider_name_of_the_longest_allowed_length_is_accepted(admin: httpx.AsyncClient) -> None:
    created = await admin.post("/api/admin/providers", json={"name": "p" * 200})
    assert created.status_code == 201, created.text


async def test_a_database_out_of_reach_is_a_503_to_retry(api: RunningApi, admin: httpx.AsyncClient) -> None:
    """Key look-ups and admin reads that cannot reach PostgreSQL answer 503 with Retry-After, in
    each API's error format."""
    assert (await admin.get("/api/admin/tenants")).status_code == 200  # the admin key is now cached
    state = api.app.state.app_state
    sessions = state.sessions
    dead = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:9/nothing", connect_args={"timeout": 2})
    state.sessions = async_sessionmaker(dead, expire_on_commit=False)
    try:
        listed = await admin.get("/api/admin/tenants")
        assert listed.status_code == 503, listed.text
        assert listed.headers["retry-after"] == "1"
        assert listed.json()["status"] == 503
        async with httpx.AsyncClient(base_url=api.url) as anyone:
            models = await anyone.get("/v1/models", headers={"Authorization": "Bearer sk-not-cached-anywhere"})
        assert models.status_code == 503, models.text
        assert models.headers["retry-after"] == "1"
        assert models.json()["error"]["type"] == "server_error"
    finally:
        state.sessions = sessions
        await dead.dispose()


async def test_a_compressed_body_is_a_415_in_each_apis_format(api: RunningApi, paths: dict[str, str]) -> None:
    """Bodies are read as sent: one declared compressed is refused for that, rather than read as
    JSON and refused in words about JSON (or taken, when it happened to be plain)."""
    body = b'{"name": "zipped"}'
    async with client(api, paths["tenant_key"]) as tenant:
        for content, encoding in ((gzip.compress(body), "gzip"), (body, "br")):
            r = await tenant.post(
                "/api/tenant/keys",
                content=content,
                headers={"content-type": "application/json", "content-encoding": encoding},
            )
            assert r.status_code == 415, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert encoding in r.json()["detail"]
            chat = await tenant.post(
                "/v1/chat/completions",
                content=content,
                headers={"content-type": "application/json", "content-encoding": encoding},
            )
            assert chat.status_code == 415, chat.text
            assert chat.json()["error"]["code"] == "unsupported_media_type"
        plain = await tenant.post(
            "/api/tenant/keys",
            content=body,
            headers={"content-type": "application/json", "content-encoding": "identity"},
        )
        assert plain.status_code == 201, plain.text
        listed = await tenant.get("/v1/models", headers={"content-encoding": "gzip"})  # no body: nothing to refuse
        assert listed.status_code == 200, listed.text


async def test_an_unknown_schema_page_is_a_problem_404_and_the_schema_still_served(api: RunningApi) -> None:
    async with httpx.AsyncClient(base_url=api.url) as anyone:
        for path in ("/schema/nope", "/schema/a/b.json"):
            missing = await anyone.get(path)
            assert missing.status_code == 404, missing.text
            assert missing.headers["content-type"].startswith("application/problem+json")
            assert missing.json()["status"] == 404
        schema = await anyone.get("/schema/openapi.json")
        assert schema.status_code == 200
        assert "/v1/chat/completions" in schema.json()["paths"]
        assert (await anyone.get("/schema")).status_code == 200


@pytest.mark.parametrize(
    "request_head",
    [
        b"Content-Length: -5\r\n",
        b"Content-Length: ten\r\n",
        b"Content-Length: 2\r\nContent-Length: 3\r\n",
        b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
    ],
)
async def test_a_request_the_server_cannot_parse_gets_the_apis_error_format(
    api: RunningApi, request_head: bytes
) -> None:
    """Refused by the HTTP server before the app runs, and still answered in each API's format."""
    for path, openai in ((b"/v1/chat/completions", True), (b"/api/admin/tenants", False)):
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + request_head + b"\r\n{}")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), raw
        if openai:
            assert b"content-type: application/json" in head.lower()
            assert msgspec.json.decode(body)["error"]["code"] == "invalid_request"
        else:
            assert b"content-type: application/problem+json" in head.lower()
            problem = msgspec.json.decode(body)
            assert (problem["status"], problem["instance"]) == (400, path.decode())

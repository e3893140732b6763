"""Fixtures for tenancy: a platform-admin client on the real api, and bare limiter replicas.

``Replica`` is what one api process holds for admission (its own NATS connection, database pool,
authenticator and limiter), so tests can run two of them against one database the way two api
replicas behind a load balancer would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from api.auth import Authenticator, Principal
from api.limits import Limiter
from api.state import AppState
from market import bus, db
from market.admin_keys import create_platform_admin_key
from market.settings import Settings
from tests.conftest import RunningApi


def count_queries(replica: Replica, table: str) -> list[str]:
    """The statements naming ``table`` that ``replica`` sends from now on (the list grows)."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if table in statement:
            seen.append(statement)

    event.listen(replica.state.engine.sync_engine, "before_cursor_execute", count)
    return seen


def client(api: RunningApi, secret: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)


@pytest.fixture
async def admin(api: RunningApi, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client holding a platform-admin key."""
    secret = await create_platform_admin_key(settings)
    async with client(api, secret) as c:
        yield c


async def ok(response: Awaitable[httpx.Response], status: int = 200) -> Any:
    r = await response
    assert r.status_code == status, r.text
    return r.json()


@dataclass
class World:
    """A model, an incubator with a pool, and a tenant in it with a grant and a key."""

    model: str
    incubator_id: str
    tenant_id: str
    key: str
    key_id: str


async def make_world(
    admin: httpx.AsyncClient,
    *,
    pool: int = 1_000_000,
    grant: int = 100_000,
    tenant_limits: dict[str, int] | None = None,
    key_limits: dict[str, int] | None = None,
    model: str = "org/llama-test",
) -> World:
    r = await admin.post("/api/admin/models", json={"name": model, "context_length": 8192})
    assert r.status_code in (201, 409), r.text
    incubator = await ok(admin.post("/api/admin/incubators", json={"name": "Station F"}), 201)
    await ok(admin.put(f"/api/admin/incubators/{incubator['id']}/pool", json={"tokens": pool}))
    tenant = await ok(
        admin.post(
            "/api/admin/tenants",
            json={"name": "acme", "incubator_id": incubator["id"], **(tenant_limits or {})},
        ),
        201,
    )
    if grant:
        await ok(admin.post(f"/api/admin/tenants/{tenant['id']}/grants", json={"tokens": grant}), 201)
    key = await ok(admin.post(f"/api/admin/tenants/{tenant['id']}/keys", json={**(key_limits or {})}), 201)
    return World(model, incubator["id"], tenant["id"], key["key"], key["id"])


@dataclass
class Replica:
    state: AppState
    auth: Authenticator
    limiter: Limiter

    async def principal(self, secret: str) -> Principal:
        return await self.auth.authenticate(f"Bearer {secret}")


@pytest.fixture
async def replicas(settings: Settings) -> AsyncIterator[Callable[[], Awaitable[Replica]]]:
    """Start bare api replicas (authenticator + limiter); all are stopped after the test."""
    made: list[Replica] = []

    async def start() -> Replica:
        engine = db.create_engine(settings, pool_size=4, max_overflow=4)
        nc = await bus.connect(settings, name="test-replica")
        state = AppState(
            settings=settings, engine=engine, sessions=db.session_factory(engine), nc=nc, js=nc.jetstream()
        )
        auth = Authenticator(state)
        await auth.start()
        state.services["auth"] = auth
        limiter = Limiter(state)
        await limiter.start()
        state.services["limiter"] = limiter
        replica = Replica(state, auth, limiter)
        made.append(replica)
        return replica

    yield start
    for replica in made:
        await replica.limiter.close()
        await replica.state.nc.drain()
        await replica.state.engine.dispose()

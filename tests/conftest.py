"""Test harness: real PostgreSQL and NATS, started once per session on free ports.

The schema is built by running the Alembic migrations. Tests that touch the database get a clean
one afterwards (every table truncated), so each test sees only what it made. Helpers here start
the real api over HTTP (uvicorn on a free port) so end-to-end tests go through the same stack a
tenant's ``openai`` SDK does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.client import Client
from sqlalchemy.ext.asyncio import AsyncEngine

from market import db, migrate, natsauth
from market.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from market.settings import Settings

pytest_plugins = ["tests.fixtures_vllm"]


@dataclass
class Servers:
    """The session's servers. NATS runs with authorization on, as in production: services and
    tests log in as a service user; nodes enrolled through the api get their own nkey users."""

    postgres: EmbeddedPostgres
    nats: EmbeddedNats
    base: Path

    @property
    def nats_passwords(self) -> dict[str, str]:
        return natsauth.load_or_create_service_passwords(self.base / "nats" / "services.json")


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    base = tmp_path_factory.mktemp("servers")
    postgres = EmbeddedPostgres(base / "postgres" / "data", fast=True)
    passwords = natsauth.load_or_create_service_passwords(base / "nats" / "services.json")
    nats_server = EmbeddedNats(base / "nats", service_passwords=passwords)
    postgres.start()
    nats_server.start()
    try:
        migrate.upgrade(postgres.url)
        yield Servers(postgres, nats_server, base)
    finally:
        nats_server.stop()
        postgres.stop()


@pytest.fixture(scope="session")
def settings(servers: Servers) -> Settings:
    return replace(
        Settings(),
        data_dir=servers.base / "data",
        database_url=servers.postgres.url,
        nats_url=servers.nats.url,
        nats_user="admin",
        nats_password=servers.nats_passwords["admin"],
        nats_auth_dir=servers.nats.data_dir,
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=1.5,
        accept_timeout_s=1.0,
        queue_timeout_s=0.5,
        first_token_timeout_s=60.0,
        log_level=os.environ.get("MARKET_LOG_LEVEL", "WARNING"),
    )


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = db.create_engine(settings)
    yield eng
    await eng.dispose()


async def truncate_all(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        names = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        )
        if names:
            await conn.execute("TRUNCATE " + ", ".join(f'"{r[0]}"' for r in names) + " RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture(autouse=True)
async def _clean_database(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After any test that used the servers, leave an empty database for the next one."""
    used = "servers" in request.fixturenames
    url = request.getfixturevalue("settings").database_url if used else None
    yield
    if url is not None:
        await truncate_all(url)


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(
        settings.require_nats_url(), user=settings.nats_user, password=settings.nats_password or ""
    )
    yield client
    with contextlib.suppress(Exception):
        await client.drain()


class RunningApi:
    """A real api on a free port, served by uvicorn inside the test's event loop."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.app = app
        from api.server import server_options

        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=port, loop="none", timeout_graceful_shutdown=2, **server_options()
            )
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> RunningApi:
        self.task = asyncio.create_task(self.server.serve())
        for _ in range(400):
            if self.server.started:
                return self
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.025)
        raise RuntimeError("api did not start")

    @contextlib.contextmanager
    def token_settings(self, **changes: Any) -> Iterator[None]:
        """The token service with some settings changed (a production value, a short timeout)."""
        service = self.app.state.app_state.services["token"]
        saved = service.settings
        service.settings = replace(saved, **changes)
        try:
            yield
        finally:
            service.settings = saved

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, 15)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[RunningApi]:
    """The full api (every route) over real HTTP."""
    from api.main import build_app

    running = await RunningApi(build_app(settings), free_port()).start()
    yield running
    await running.stop()


@pytest.fixture
async def hosting_api(settings: Settings) -> AsyncIterator[RunningApi]:
    """The full api hosting a scheduler replica (``MARKET_API_SCHEDULER``): see ``hosted``."""
    from api.main import build_app

    running = await RunningApi(build_app(replace(settings, api_scheduler=True)), free_port()).start()
    yield running
    await running.stop()


def hosted(api: RunningApi) -> Any:
    """The scheduler replica an api hosts (a ``SchedulerService``)."""
    return api.app.state.app_state.services["scheduler"]


@pytest.fixture
async def scheduler(settings: Settings) -> AsyncIterator[Any]:
    """One real scheduler replica on the session's NATS and PostgreSQL."""
    from scheduler.service import SchedulerService

    service = SchedulerService(settings)
    await service.start()
    yield service
    await service.stop()


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a service process of its own (``python -m api``, ``-m scheduler``) on the
    session's servers: this one's, without any MARKET_* of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}
    env.update(
        MARKET_DATABASE_URL=settings.require_database_url(),
        MARKET_NATS_URL=settings.require_nats_url(),
        MARKET_NATS_USER=settings.nats_user or "",
        MARKET_NATS_PASSWORD=settings.nats_password or "",
        MARKET_DATA_DIR=str(settings.data_dir),
        MARKET_LOG_LEVEL="WARNING",
        **extra,
    )
    return env


async def wait_healthy(scheduler: Any, node_ids: list[str], timeout: float = 120) -> None:
    """Until the scheduler counts every one of ``node_ids`` healthy (heard from and ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states, now = scheduler.fleet.nodes, time.monotonic()
        if all(n in states and states[n].healthy(now, scheduler.settings.heartbeat_timeout_s) for n in node_ids):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"nodes {node_ids} did not become healthy")


@contextlib.asynccontextmanager
async def row_locked(engine: AsyncEngine, query: str, *args: Any) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Hold row locks (``query``: a ``SELECT ... FOR UPDATE``) from a connection of its own, so
    that an admission needing the rows waits; yields ``release``, which lets them go (as does
    leaving the block)."""
    conn = await asyncpg.connect(db.plain_url(engine.url.render_as_string(hide_password=False)))
    try:
        lock = conn.transaction()
        await lock.start()
        await conn.execute(query, *args)
        yield lock.rollback
    finally:
        await conn.close()

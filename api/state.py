"""Process-wide resources of one api replica, built in the app's lifespan."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from market.settings import Settings


class AppState:
    """Not a dataclass on purpose: Litestar's signature modelling would try to introspect it."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession],
        nc: Client,
        js: JetStreamContext,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.sessions = sessions
        self.nc = nc
        self.js = js
        self.services: dict[str, Any] = {}
        self.closers: list[Callable[[], Awaitable[None]]] = []

"""The full api: every area's routes and start-up hooks on the app skeleton.

Each area adds its controllers to ``route_handlers()`` and its services to ``startup_hooks()``.
"""

from __future__ import annotations

import importlib
from typing import Any

from litestar import Litestar

from api.admin import admin_router
from api.app import Startup, create_app
from api.auth import Authenticator
from api.billing_routes import ROUTES as BILLING_ROUTES
from api.fleet.routes import ROUTES as FLEET_ROUTES
from api.fleet.routes import start_fleet_service
from api.limits import start_limiter
from api.state import AppState
from api.tenant import tenant_router
from api.token.routes import TokenController, start_token_service
from market.settings import Settings


async def _start_auth(state: AppState) -> None:
    auth = Authenticator(state)
    await auth.start()
    state.services["auth"] = auth
    state.closers.append(auth.close)


async def _host_scheduler(state: AppState) -> None:
    """``MARKET_API_SCHEDULER``: run a scheduler replica in this process, by module name (the api
    never calls it: its submissions on ``jobs.submit`` are delivered to it in-process)."""
    if state.settings.api_scheduler:
        service = await importlib.import_module("scheduler.hosted").start(state.settings, state.nc)
        state.services["scheduler"] = service
        state.closers.append(service.stop)


def route_handlers() -> list[Any]:
    return [TokenController, *FLEET_ROUTES, admin_router(), tenant_router(), *BILLING_ROUTES]


def startup_hooks() -> list[Startup]:
    # Closers run in reverse: the token service (finishing requests, flushing usage) stops before
    # the limiter whose settles it still needs, and before the scheduler replica hosted here.
    return [_start_auth, start_limiter, _host_scheduler, start_token_service, start_fleet_service]


def build_app(settings: Settings) -> Litestar:
    return create_app(settings, route_handlers=route_handlers(), on_startup=startup_hooks())

"""The full api: every area's routes and start-up hooks on the app skeleton.

Each area adds its controllers to ``route_handlers()`` and its services to ``startup_hooks()``.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar

from api.app import Startup, create_app
from api.auth import Authenticator
from api.state import AppState
from api.token.routes import TokenController, start_token_service
from market.settings import Settings


async def _start_auth(state: AppState) -> None:
    auth = Authenticator(state)
    await auth.start()
    state.services["auth"] = auth


def route_handlers() -> list[Any]:
    return [TokenController]


def startup_hooks() -> list[Startup]:
    return [_start_auth, start_token_service]


def build_app(settings: Settings) -> Litestar:
    return create_app(settings, route_handlers=route_handlers(), on_startup=startup_hooks())

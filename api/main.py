"""The full api: every area's routes on the app skeleton."""

from __future__ import annotations

from litestar import Litestar

from api.app import create_app
from market.settings import Settings


def build_app(settings: Settings) -> Litestar:
    return create_app(settings, route_handlers=[], on_startup=[])

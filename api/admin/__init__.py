"""The admin API under ``/api/admin/`` (platform-admin and incubator-admin keys)."""

from __future__ import annotations

from litestar import Router
from litestar.di import Provide

from api.admin.access import provide_principal
from api.admin.incubators import IncubatorController
from api.admin.models import ModelController
from api.admin.tenants import TenantController
from api.auth import require_admin
from api.reservations import AdminReservationController


def admin_router() -> Router:
    return Router(
        path="/api/admin",
        route_handlers=[IncubatorController, TenantController, ModelController, AdminReservationController],
        guards=[require_admin],
        dependencies={"principal": Provide(provide_principal)},
    )

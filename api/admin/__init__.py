"""The admin API under ``/api/admin/`` (platform-admin and incubator-admin keys)."""

from __future__ import annotations

from litestar import Router
from litestar.di import Provide

from api.admin.access import provide_principal
from api.admin.incubators import IncubatorController
from api.admin.models import ModelController
from api.admin.tenants import TenantController
from api.auth import require_admin


def admin_router() -> Router:
    # api.reservations builds on api.admin.access: importing it here, not above, keeps either
    # importable first.
    from api.reservations import AdminReservationController

    return Router(
        path="/api/admin",
        route_handlers=[IncubatorController, TenantController, ModelController, AdminReservationController],
        guards=[require_admin],
        dependencies={"principal": Provide(provide_principal)},
    )

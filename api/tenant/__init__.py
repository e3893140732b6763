"""Tenant self-service under ``/api/tenant/`` (tenant keys): keys, quota and reservations.

Usage, balance and invoices belong to billing (``api/billing_routes.py``).
"""

from __future__ import annotations

from litestar import Router
from litestar.di import Provide

from api.admin.access import provide_principal
from api.auth import require_tenant
from api.reservations import TenantReservationController
from api.tenant.routes import TenantSelfController


def tenant_router() -> Router:
    return Router(
        path="/api/tenant",
        route_handlers=[TenantSelfController, TenantReservationController],
        guards=[require_tenant],
        dependencies={"principal": Provide(provide_principal)},
    )

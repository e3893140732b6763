"""Who may see what: platform admins see everything, an incubator admin only its incubator and tenants.

Anything outside the caller's reach is reported as missing (404), never as forbidden, so that an
incubator admin cannot learn that another incubator's tenant exists.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.auth import Principal, principal_of
from api.errors import Forbidden, NotFound
from market.models import Incubator, Tenant


async def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    """The caller, authenticated once per request (guards have usually done it already)."""
    return await principal_of(request)


def require_scope(scope: str) -> Any:
    """Guard: the key must carry ``scope``; keys minted before scopes existed (none) carry all."""

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        principal = await principal_of(connection)  # type: ignore[arg-type]
        if principal.scopes and scope not in principal.scopes and "admin" not in principal.scopes:
            raise Forbidden(f"this API key lacks the '{scope}' scope", code="missing_scope")

    return guard


def is_platform(principal: Principal) -> bool:
    return principal.role == "platform_admin"


async def visible_incubator(session: AsyncSession, principal: Principal, incubator_id: str) -> Incubator:
    if not is_platform(principal) and principal.incubator_id != incubator_id:
        raise NotFound("incubator not found", code="incubator_not_found")
    incubator = await session.get(Incubator, incubator_id)
    if incubator is None:
        raise NotFound("incubator not found", code="incubator_not_found")
    return incubator


async def visible_tenant(
    session: AsyncSession, principal: Principal, tenant_id: str, *, for_update: bool = False
) -> Tenant:
    query = select(Tenant).where(Tenant.id == tenant_id)
    if not is_platform(principal):
        query = query.where(Tenant.incubator_id == principal.incubator_id)
    if for_update:
        # FOR NO KEY UPDATE, as an update of its columns takes: the foreign-key checks of rows
        # referring to the tenant (admission's quota updates among them) do not wait on it.
        query = query.with_for_update(key_share=True)
    tenant = (await session.execute(query)).scalar_one_or_none()
    if tenant is None:
        raise NotFound("tenant not found", code="tenant_not_found")
    return tenant

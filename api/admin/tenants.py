"""``/api/admin/tenants``: tenants, their keys, grants, allowed models and quota.

An incubator admin works only inside its incubator: tenants it creates land there, and every
other tenant is "not found".
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, delete, get, patch, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from sqlalchemy import delete as sql_delete
from sqlalchemy import select

from api import reservations
from api.admin import keys as key_service
from api.admin import quota as quota_service
from api.admin.access import is_platform, visible_incubator, visible_tenant
from api.admin.schemas import (
    GrantCreate,
    GrantOut,
    GrantResize,
    KeyCreate,
    KeyCreated,
    KeyOut,
    QuotaOut,
    TenantCreate,
    TenantModelsOut,
    TenantModelsSet,
    TenantOut,
    TenantPage,
    TenantStatus,
    TenantUpdate,
    is_set,
)
from api.auth import Principal
from api.errors import InvalidRequest
from api.state import AppState
from market.ids import new_id
from market.models import Model, Tenant, TenantModel

_LIMIT_FIELDS = (
    "status",
    "requests_per_minute",
    "tokens_per_minute",
    "max_price_minor_per_million",
    "allowed_providers",
)


def tenant_out(tenant: Tenant) -> TenantOut:
    return TenantOut(
        id=tenant.id,
        name=tenant.name,
        incubator_id=tenant.incubator_id,
        status=tenant.status,
        requests_per_minute=tenant.requests_per_minute,
        tokens_per_minute=tenant.tokens_per_minute,
        max_price_minor_per_million=tenant.max_price_minor_per_million,
        allowed_providers=list(tenant.allowed_providers) if tenant.allowed_providers is not None else None,
        created_at=tenant.created_at,
        updated_at=tenant.updated_at,
    )


async def allowed_models(app_state: AppState, tenant_id: str) -> TenantModelsOut:
    async with app_state.sessions() as session:
        names = (
            await session.scalars(
                select(TenantModel.model_name)
                .where(TenantModel.tenant_id == tenant_id)
                .order_by(TenantModel.model_name)
            )
        ).all()
    return TenantModelsOut(models=list(names), all_active=not names)


class TenantController(Controller):
    path = "/tenants"
    tags = ["admin: tenants"]

    @post("/")
    async def create(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], data: JSONBody[TenantCreate]
    ) -> TenantOut:
        """Create a tenant; an incubator admin's tenants always belong to its incubator."""
        incubator_id = data.incubator_id
        if not is_platform(principal):
            incubator_id = incubator_id or principal.incubator_id
        async with app_state.sessions.begin() as session:
            if incubator_id is not None:
                await visible_incubator(session, principal, incubator_id)
            tenant = Tenant(
                id=new_id("tenant"),
                name=data.name,
                incubator_id=incubator_id,
                requests_per_minute=data.requests_per_minute,
                tokens_per_minute=data.tokens_per_minute,
                max_price_minor_per_million=data.max_price_minor_per_million,
                allowed_providers=data.allowed_providers,
            )
            session.add(tenant)
            await session.flush()
            await session.refresh(tenant)
            return tenant_out(tenant)

    @get("/")
    async def list_tenants(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        incubator_id: FromQuery[str | None] = None,
        status: FromQuery[TenantStatus | None] = None,
        q: Annotated[str | None, QueryParameter(max_length=200)] = None,
        after: Annotated[str | None, QueryParameter(max_length=40)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
    ) -> TenantPage:
        """Tenants in id (creation) order; filter by ``incubator_id``, ``status`` or a name fragment ``q``."""
        query = select(Tenant).order_by(Tenant.id).limit(limit + 1)
        if not is_platform(principal):
            query = query.where(Tenant.incubator_id == principal.incubator_id)
        if incubator_id is not None:
            query = query.where(Tenant.incubator_id == incubator_id)
        if status is not None:
            query = query.where(Tenant.status == status)
        if q:
            escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(Tenant.name.ilike(f"%{escaped}%", escape="\\"))
        if after is not None:
            query = query.where(Tenant.id > after)
        async with app_state.sessions() as session:
            rows = list((await session.scalars(query)).all())
        page = rows[:limit]
        has_more = len(rows) > limit
        return TenantPage(
            data=[tenant_out(t) for t in page], has_more=has_more, next_after=page[-1].id if has_more else None
        )

    @get("/{tenant_id:str}")
    async def get_tenant(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], tenant_id: FromPath[str]
    ) -> TenantOut:
        async with app_state.sessions() as session:
            return tenant_out(await visible_tenant(session, principal, tenant_id))

    @patch("/{tenant_id:str}")
    async def update_tenant(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        tenant_id: FromPath[str],
        data: JSONBody[TenantUpdate],
    ) -> TenantOut:
        """Change name, status or limits; a suspension or new limit applies on every replica at once.

        Suspending ends the tenant's reservations (reinstating does not bring them back)."""
        changes: dict[str, Any] = {f: getattr(data, f) for f in data.__struct_fields__ if is_set(getattr(data, f))}
        async with app_state.sessions.begin() as session:
            tenant = await visible_tenant(session, principal, tenant_id, for_update=True)
            if changes.get("status") == "suspended" and tenant.status != "suspended":
                await reservations.end_all(session, principal.key_id, tenant_id=tenant_id)
            for name, value in changes.items():
                setattr(tenant, name, value)
            await session.flush()
            await session.refresh(tenant)
            out = tenant_out(tenant)
        if any(f in changes for f in _LIMIT_FIELDS):
            await key_service.forget_tenant_keys(app_state, tenant_id)
        return out

    # keys

    @post("/{tenant_id:str}/keys")
    async def create_key(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        tenant_id: FromPath[str],
        data: JSONBody[KeyCreate],
    ) -> KeyCreated:
        """A tenant key (``sk-...``); the secret is in ``key`` and shown only now."""
        async with app_state.sessions.begin() as session:
            await visible_tenant(session, principal, tenant_id)
            return await key_service.create_key(session, data, tenant_id=tenant_id)

    @get("/{tenant_id:str}/keys")
    async def list_keys(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], tenant_id: FromPath[str]
    ) -> list[KeyOut]:
        async with app_state.sessions() as session:
            await visible_tenant(session, principal, tenant_id)
            return await key_service.list_keys(session, tenant_id=tenant_id)

    @delete("/{tenant_id:str}/keys/{key_id:str}", status_code=200)
    async def revoke_key(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        tenant_id: FromPath[str],
        key_id: FromPath[str],
    ) -> KeyOut:
        """Revoke at once on every replica; the key stays listed with ``revoked_at``."""
        async with app_state.sessions() as session:
            await visible_tenant(session, principal, tenant_id)
        return await key_service.revoke_key(app_state, key_id, tenant_id=tenant_id)

    # grants and quota

    @post("/{tenant_id:str}/grants")
    async def create_grant(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        tenant_id: FromPath[str],
        data: JSONBody[GrantCreate],
    ) -> GrantOut:
        """Grant tokens for the current period; 409 if the incubator's pool cannot cover them."""
        async with app_state.sessions.begin() as session:
            tenant = await visible_tenant(session, principal, tenant_id)
            grant = await quota_service.create_grant(
                session, tenant, data.tokens, data.credits, data.note, principal.key_id
            )
            return (await quota_service.grants_out(session, [grant]))[0]

    @get("/{tenant_id:str}/grants")
    async def list_grants(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], tenant_id: FromPath[str]
    ) -> list[GrantOut]:
        """Every grant of the tenant, each with its history (granted, resized, revoked)."""
        async with app_state.sessions() as session:
            await visible_tenant(session, principal, tenant_id)
            grants = await quota_service.list_grants(session, tenant_id)
            return await quota_service.grants_out(session, grants)

    @patch("/{tenant_id:str}/grants/{grant_id:str}")
    async def resize_grant(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        tenant_id: FromPath[str],
        grant_id: FromPath[str],
        data: JSONBody[GrantResize],
    ) -> GrantOut:
        """Grow or shrink a grant of the current period; it never shrinks below what is used or held."""
        credits = data.credits if is_set(data.credits) else None
        async with app_state.sessions.begin() as session:
            tenant = await visible_tenant(session, principal, tenant_id)
            grant = await quota_service.resize_grant(
                session,
                tenant,
                grant_id,
                data.tokens,
                credits if isinstance(credits, int) else None,
                principal.key_id,
            )
            return (await quota_service.grants_out(session, [grant]))[0]

    @delete("/{tenant_id:str}/grants/{grant_id:str}", status_code=200)
    async def revoke_grant(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        tenant_id: FromPath[str],
        grant_id: FromPath[str],
    ) -> GrantOut:
        """Revoke: the unspent part goes back to the pool; the grant and its history are kept."""
        async with app_state.sessions.begin() as session:
            tenant = await visible_tenant(session, principal, tenant_id)
            grant = await quota_service.revoke_grant(session, tenant, grant_id, principal.key_id)
            return (await quota_service.grants_out(session, [grant]))[0]

    @get("/{tenant_id:str}/quota")
    async def quota(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], tenant_id: FromPath[str]
    ) -> QuotaOut:
        async with app_state.sessions() as session:
            await visible_tenant(session, principal, tenant_id)
            return await quota_service.quota_of(session, tenant_id)

    # allowed models

    @get("/{tenant_id:str}/models")
    async def get_models(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], tenant_id: FromPath[str]
    ) -> TenantModelsOut:
        async with app_state.sessions() as session:
            await visible_tenant(session, principal, tenant_id)
        return await allowed_models(app_state, tenant_id)

    @put("/{tenant_id:str}/models")
    async def set_models(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        tenant_id: FromPath[str],
        data: JSONBody[TenantModelsSet],
    ) -> TenantModelsOut:
        """Replace the tenant's allowed models (empty: every active model); effective at once."""
        wanted = sorted(set(data.models))
        async with app_state.sessions.begin() as session:
            await visible_tenant(session, principal, tenant_id, for_update=True)
            known = set((await session.scalars(select(Model.name).where(Model.name.in_(wanted)))).all())
            unknown = [m for m in wanted if m not in known]
            if unknown:
                raise InvalidRequest(f"unknown models: {', '.join(unknown)}", code="model_not_found", param="models")
            await session.execute(sql_delete(TenantModel).where(TenantModel.tenant_id == tenant_id))
            session.add_all([TenantModel(tenant_id=tenant_id, model_name=m) for m in wanted])
        return await allowed_models(app_state, tenant_id)

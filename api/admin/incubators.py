"""``/api/admin/incubators``: programmes, their pool per period, and their admins' keys."""

from __future__ import annotations

from litestar import Controller, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from sqlalchemy import select

from api.admin import keys as key_service
from api.admin import quota as quota_service
from api.admin.access import is_platform, visible_incubator
from api.admin.schemas import IncubatorCreate, IncubatorOut, KeyCreate, KeyCreated, KeyOut, PoolOut, PoolSet
from api.auth import Principal, require_platform_admin
from api.state import AppState
from market.ids import new_id
from market.models import Incubator, IncubatorPool


def _out(incubator: Incubator, pool: IncubatorPool | None) -> IncubatorOut:
    return IncubatorOut(
        id=incubator.id,
        name=incubator.name,
        created_at=incubator.created_at,
        pool=quota_service.pool_out(pool) if pool else None,
    )


class IncubatorController(Controller):
    path = "/incubators"
    tags = ["admin: incubators"]

    @post("/", guards=[require_platform_admin])
    async def create(self, app_state: NamedDependency[AppState], data: JSONBody[IncubatorCreate]) -> IncubatorOut:
        async with app_state.sessions.begin() as session:
            incubator = Incubator(id=new_id("incubator"), name=data.name)
            session.add(incubator)
            await session.flush()
            await session.refresh(incubator)
            return _out(incubator, None)

    @get("/")
    async def list_incubators(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal]
    ) -> list[IncubatorOut]:
        """Platform admins see every incubator; an incubator admin sees its own."""
        async with app_state.sessions() as session:
            period = await quota_service.current_period(session)
            query = (
                select(Incubator, IncubatorPool)
                .outerjoin(
                    IncubatorPool,
                    (IncubatorPool.incubator_id == Incubator.id) & (IncubatorPool.period == period),
                )
                .order_by(Incubator.id)
            )
            if not is_platform(principal):
                query = query.where(Incubator.id == principal.incubator_id)
            return [_out(inc, pool) for inc, pool in (await session.execute(query)).all()]

    @get("/{incubator_id:str}")
    async def get_incubator(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], incubator_id: FromPath[str]
    ) -> IncubatorOut:
        async with app_state.sessions() as session:
            incubator = await visible_incubator(session, principal, incubator_id)
            return _out(incubator, await quota_service.get_pool(session, incubator_id))

    @get("/{incubator_id:str}/pool")
    async def get_pool(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], incubator_id: FromPath[str]
    ) -> PoolOut:
        async with app_state.sessions() as session:
            await visible_incubator(session, principal, incubator_id)
            pool = await quota_service.get_pool(session, incubator_id)
            if pool is None:
                period = quota_service.period_label(await quota_service.current_period(session))
                return PoolOut(
                    incubator_id=incubator_id,
                    period=period,
                    tokens=0,
                    credits=0,
                    allocated_tokens=0,
                    allocated_credits=0,
                    available_tokens=0,
                    available_credits=0,
                )
            return quota_service.pool_out(pool)

    @put("/{incubator_id:str}/pool", guards=[require_platform_admin])
    async def set_pool(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        incubator_id: FromPath[str],
        data: JSONBody[PoolSet],
    ) -> PoolOut:
        """Set the current period's pool; 409 if it would fall below what is already granted."""
        async with app_state.sessions.begin() as session:
            await visible_incubator(session, principal, incubator_id)
            pool = await quota_service.set_pool(session, incubator_id, data.tokens, data.credits)
            return quota_service.pool_out(pool)

    @post("/{incubator_id:str}/keys")
    async def create_admin_key(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        incubator_id: FromPath[str],
        data: JSONBody[KeyCreate],
    ) -> KeyCreated:
        """An incubator-admin key (``sk-inc-...``); the secret is in ``key`` and shown only now."""
        async with app_state.sessions.begin() as session:
            await visible_incubator(session, principal, incubator_id)
            return await key_service.create_key(session, data, incubator_id=incubator_id)

    @get("/{incubator_id:str}/keys")
    async def list_admin_keys(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], incubator_id: FromPath[str]
    ) -> list[KeyOut]:
        async with app_state.sessions() as session:
            await visible_incubator(session, principal, incubator_id)
            return await key_service.list_keys(session, incubator_id=incubator_id)

    @delete("/{incubator_id:str}/keys/{key_id:str}", status_code=200)
    async def revoke_admin_key(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        incubator_id: FromPath[str],
        key_id: FromPath[str],
    ) -> KeyOut:
        """Revoke at once on every replica; the key stays listed with ``revoked_at``."""
        async with app_state.sessions() as session:
            await visible_incubator(session, principal, incubator_id)
        return await key_service.revoke_key(app_state, key_id, incubator_id=incubator_id)

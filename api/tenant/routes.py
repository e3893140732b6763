"""A tenant manages its own keys and sees its quota; another tenant's keys are simply not found."""

from __future__ import annotations

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from api.admin import keys as key_service
from api.admin import quota as quota_service
from api.admin.access import require_scope
from api.admin.schemas import KeyCreate, KeyCreated, KeyOut, QuotaOut
from api.auth import Principal
from api.state import AppState


def _tenant_id(principal: Principal) -> str:
    assert principal.tenant_id is not None  # the router's guard admits tenant keys only
    return principal.tenant_id


class TenantSelfController(Controller):
    tags = ["tenant"]

    @post("/keys", guards=[require_scope("manage")])
    async def create_key(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], data: JSONBody[KeyCreate]
    ) -> KeyCreated:
        """A new key for this tenant; the secret is in ``key`` and shown only now."""
        async with app_state.sessions.begin() as session:
            return await key_service.create_key(session, data, tenant_id=_tenant_id(principal))

    @get("/keys", guards=[require_scope("manage")])
    async def list_keys(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal]
    ) -> list[KeyOut]:
        async with app_state.sessions() as session:
            return await key_service.list_keys(session, tenant_id=_tenant_id(principal))

    @delete("/keys/{key_id:str}", status_code=200, guards=[require_scope("manage")])
    async def revoke_key(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], key_id: FromPath[str]
    ) -> KeyOut:
        """Revoke one of this tenant's keys, at once on every replica (it may be the calling key)."""
        return await key_service.revoke_key(app_state, key_id, tenant_id=_tenant_id(principal))

    @get("/quota")
    async def quota(self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal]) -> QuotaOut:
        """``granted``, ``held`` (by requests in flight), ``used`` and ``remaining`` for this period."""
        async with app_state.sessions() as session:
            return await quota_service.quota_of(session, _tenant_id(principal))

"""Minting, listing and revoking API keys (tenant keys and incubator-admin keys).

The secret is returned once and never stored or logged; only its sha256 is kept. Revocation is
written first and then broadcast, so every api replica drops its cached copy of the key at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.admin.schemas import KeyCreate, KeyCreated, KeyOut
from api.auth import authenticator
from api.errors import InvalidRequest, NotFound
from api.state import AppState
from market import keys
from market.ids import new_id
from market.models import ApiKey

TENANT_SCOPES = ["inference", "manage"]


def key_out(key: ApiKey) -> KeyOut:
    return KeyOut(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        role=key.role,
        tenant_id=key.tenant_id,
        incubator_id=key.incubator_id,
        scopes=list(key.scopes or []),
        requests_per_minute=key.requests_per_minute,
        tokens_per_minute=key.tokens_per_minute,
        created_at=key.created_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
    )


def _expiry(body: KeyCreate) -> datetime | None:
    if body.expires_at is not None and body.expires_in_days is not None:
        raise InvalidRequest("give expires_at or expires_in_days, not both", param="expires_at")
    now = datetime.now(UTC)
    if body.expires_in_days is not None:
        return now + timedelta(days=body.expires_in_days)
    if body.expires_at is not None and body.expires_at <= now:
        raise InvalidRequest("expires_at must be in the future", param="expires_at")
    return body.expires_at


async def create_key(
    session: AsyncSession,
    body: KeyCreate,
    *,
    tenant_id: str | None = None,
    incubator_id: str | None = None,
) -> KeyCreated:
    """A tenant key (``tenant_id``) or an incubator-admin key (``incubator_id``)."""
    role = "tenant" if tenant_id is not None else "incubator_admin"
    if role == "incubator_admin" and body.scopes is not None:
        raise InvalidRequest("scopes apply to tenant keys only", param="scopes")
    if role == "incubator_admin" and (body.requests_per_minute or body.tokens_per_minute):
        raise InvalidRequest("rate limits apply to tenant keys only", param="requests_per_minute")
    secret, digest, prefix = keys.generate(role)
    key = ApiKey(
        id=new_id("key"),
        role=role,
        name=body.name,
        tenant_id=tenant_id,
        incubator_id=incubator_id,
        prefix=prefix,
        secret_hash=digest,
        scopes=sorted(set(body.scopes or TENANT_SCOPES)) if role == "tenant" else ["admin"],
        requests_per_minute=body.requests_per_minute,
        tokens_per_minute=body.tokens_per_minute,
        expires_at=_expiry(body),
    )
    session.add(key)
    await session.flush()
    await session.refresh(key)
    out = key_out(key)
    return KeyCreated(key=secret, **{f: getattr(out, f) for f in out.__struct_fields__})


async def list_keys(
    session: AsyncSession, *, tenant_id: str | None = None, incubator_id: str | None = None
) -> list[KeyOut]:
    query = select(ApiKey).order_by(ApiKey.id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    else:
        query = query.where(ApiKey.incubator_id == incubator_id, ApiKey.role == "incubator_admin")
    return [key_out(k) for k in (await session.scalars(query)).all()]


async def revoke_key(
    state: AppState,
    key_id: str,
    *,
    tenant_id: str | None = None,
    incubator_id: str | None = None,
) -> KeyOut:
    """Revoke a key of this tenant (or incubator); another owner's key is simply not found."""
    async with state.sessions.begin() as session:
        query = select(ApiKey).where(ApiKey.id == key_id).with_for_update()
        if tenant_id is not None:
            query = query.where(ApiKey.tenant_id == tenant_id)
        else:
            query = query.where(ApiKey.incubator_id == incubator_id, ApiKey.role == "incubator_admin")
        key = (await session.execute(query)).scalar_one_or_none()
        if key is None:
            raise NotFound("API key not found", code="key_not_found")
        if key.revoked_at is None:
            key.revoked_at = datetime.now(UTC)
        out = key_out(key)
    await authenticator(state).announce_revoked(key_id)
    return out


async def forget_tenant_keys(state: AppState, tenant_id: str) -> None:
    """Make every replica re-read this tenant's keys now (status or limits changed)."""
    async with state.sessions() as session:
        ids = (await session.scalars(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id))).all()
    auth = authenticator(state)
    for key_id in ids:
        await auth.announce_revoked(key_id)

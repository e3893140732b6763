"""Pools, grants and the tenant's period quota.

Invariants, each kept by a conditional UPDATE under a row lock (so they hold under concurrency and
across replicas, and the database's check constraints back them up):

- an incubator pool's ``allocated`` (the sum of its tenants' grants) never exceeds the pool;
- a tenant's ``granted`` is the sum of its grants for the period, and is never shrunk below what
  is already used or held by requests in flight, so tokens given back to a pool were never spent.

Locks are always taken in the order grant -> pool -> tenant quota, which admission (quota only)
cannot invert, so these never deadlock.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.admin.schemas import GrantEventOut, GrantOut, PoolOut, QuotaOut
from api.errors import Conflict, NotFound
from market.ids import new_id
from market.models import Grant, GrantEvent, IncubatorPool, Tenant, TenantQuota


async def current_period(session: AsyncSession) -> date:
    """The current calendar month (UTC) by the database's clock, the one admission uses."""
    period = await session.scalar(select(func.market_current_period()))
    assert isinstance(period, date)
    return period


def period_label(period: date) -> str:
    return period.strftime("%Y-%m")


def pool_out(pool: IncubatorPool) -> PoolOut:
    return PoolOut(
        incubator_id=pool.incubator_id,
        period=period_label(pool.period),
        tokens=pool.tokens,
        credits=pool.credits_minor,
        allocated_tokens=pool.allocated_tokens,
        allocated_credits=pool.allocated_credits_minor,
        available_tokens=pool.tokens - pool.allocated_tokens,
        available_credits=pool.credits_minor - pool.allocated_credits_minor,
    )


async def get_pool(session: AsyncSession, incubator_id: str) -> IncubatorPool | None:
    period = await current_period(session)
    return await session.get(IncubatorPool, (incubator_id, period))


async def set_pool(session: AsyncSession, incubator_id: str, tokens: int, credits: int) -> IncubatorPool:
    """Set this period's pool; it may not drop below what is already granted from it."""
    period = await current_period(session)
    values = insert(IncubatorPool).values(
        incubator_id=incubator_id, period=period, tokens=tokens, credits_minor=credits
    )
    stmt = values.on_conflict_do_update(
        index_elements=[IncubatorPool.incubator_id, IncubatorPool.period],
        set_={"tokens": tokens, "credits_minor": credits, "updated_at": func.now()},
        where=(IncubatorPool.allocated_tokens <= tokens) & (IncubatorPool.allocated_credits_minor <= credits),
    ).returning(IncubatorPool.incubator_id)
    if (await session.execute(stmt)).first() is None:
        pool = await session.get(IncubatorPool, (incubator_id, period))
        allocated = (pool.allocated_tokens, pool.allocated_credits_minor) if pool else (0, 0)
        raise Conflict(
            f"the pool cannot be smaller than what is already granted from it: {allocated[0]} tokens"
            f" and {allocated[1]} credits",
            code="pool_below_allocated",
        )
    pool = await session.get(IncubatorPool, (incubator_id, period), populate_existing=True)
    assert pool is not None
    return pool


async def draw_from_pool(session: AsyncSession, incubator_id: str, period: date, tokens: int, credits: int) -> None:
    """Move ``tokens``/``credits`` (may be negative: a give-back) between the pool and its grants."""
    stmt = (
        update(IncubatorPool)
        .where(
            IncubatorPool.incubator_id == incubator_id,
            IncubatorPool.period == period,
            IncubatorPool.allocated_tokens + tokens <= IncubatorPool.tokens,
            IncubatorPool.allocated_credits_minor + credits <= IncubatorPool.credits_minor,
        )
        .values(
            allocated_tokens=IncubatorPool.allocated_tokens + tokens,
            allocated_credits_minor=IncubatorPool.allocated_credits_minor + credits,
        )
        .returning(IncubatorPool.incubator_id)
    )
    if (await session.execute(stmt)).first() is not None:
        return
    pool = await session.get(IncubatorPool, (incubator_id, period))
    if pool is None:
        raise Conflict(
            f"the incubator has no pool for {period_label(period)}: the platform admin sets one first",
            code="no_pool",
        )
    raise Conflict(
        f"the incubator's pool would be over-allocated: {tokens} tokens and {credits} credits requested,"
        f" {pool.tokens - pool.allocated_tokens} tokens and {pool.credits_minor - pool.allocated_credits_minor}"
        " credits left",
        code="pool_exhausted",
    )


async def _change_granted(session: AsyncSession, tenant_id: str, period: date, tokens: int, credits: int) -> None:
    """Add to (or take from) the tenant's period quota; taking never goes below used + held."""
    values = insert(TenantQuota).values(
        tenant_id=tenant_id, period=period, granted=max(tokens, 0), credits_granted_minor=max(credits, 0)
    )
    stmt = values.on_conflict_do_update(
        index_elements=[TenantQuota.tenant_id, TenantQuota.period],
        set_={
            "granted": TenantQuota.granted + tokens,
            "credits_granted_minor": TenantQuota.credits_granted_minor + credits,
        },
        where=(TenantQuota.granted + tokens >= TenantQuota.used + TenantQuota.held)
        & (TenantQuota.credits_granted_minor + credits >= 0),
    ).returning(TenantQuota.tenant_id)
    if (await session.execute(stmt)).first() is None:
        quota = await session.get(TenantQuota, (tenant_id, period))
        spent = (quota.used + quota.held) if quota else 0
        raise Conflict(
            f"the tenant has already used or holds {spent} tokens this period; a grant cannot shrink below that",
            code="grant_in_use",
        )


def _event(grant: Grant, action: str, tokens_before: int, credits_before: int, actor: str | None) -> GrantEvent:
    return GrantEvent(
        grant_id=grant.id,
        action=action,
        tokens_before=tokens_before,
        tokens_after=grant.tokens,
        credits_before_minor=credits_before,
        credits_after_minor=grant.credits_minor,
        actor_key_id=actor,
    )


async def create_grant(
    session: AsyncSession, tenant: Tenant, tokens: int, credits: int, note: str, actor: str | None
) -> Grant:
    period = await current_period(session)
    if tenant.incubator_id is not None:
        await draw_from_pool(session, tenant.incubator_id, period, tokens, credits)
    await _change_granted(session, tenant.id, period, tokens, credits)
    grant = Grant(
        id=new_id("grant"),
        tenant_id=tenant.id,
        incubator_id=tenant.incubator_id,
        period=period,
        tokens=tokens,
        credits_minor=credits,
        note=note,
        created_by=actor,
    )
    session.add(grant)
    await session.flush()
    session.add(_event(grant, "granted", 0, 0, actor))
    return grant


async def _locked_grant(session: AsyncSession, tenant: Tenant, grant_id: str) -> Grant:
    grant = (
        await session.execute(select(Grant).where(Grant.id == grant_id, Grant.tenant_id == tenant.id).with_for_update())
    ).scalar_one_or_none()
    if grant is None:
        raise NotFound("grant not found", code="grant_not_found")
    if grant.status != "active":
        raise Conflict("the grant is revoked", code="grant_revoked")
    if grant.period != await current_period(session):
        raise Conflict("only grants of the current period can change", code="grant_period_closed")
    return grant


async def resize_grant(
    session: AsyncSession, tenant: Tenant, grant_id: str, tokens: int, credits: int | None, actor: str | None
) -> Grant:
    """Grow (drawing from the pool) or shrink (giving back, but never what is used or held)."""
    grant = await _locked_grant(session, tenant, grant_id)
    new_credits = grant.credits_minor if credits is None else credits
    d_tokens, d_credits = tokens - grant.tokens, new_credits - grant.credits_minor
    if grant.incubator_id is not None:
        await draw_from_pool(session, grant.incubator_id, grant.period, d_tokens, d_credits)
    await _change_granted(session, tenant.id, grant.period, d_tokens, d_credits)
    before = (grant.tokens, grant.credits_minor)
    grant.tokens, grant.credits_minor = tokens, new_credits
    session.add(_event(grant, "resized", before[0], before[1], actor))
    await session.flush()
    return grant


async def revoke_grant(session: AsyncSession, tenant: Tenant, grant_id: str, actor: str | None) -> Grant:
    """Take back what is left of the grant; tokens already used or held stay counted against it."""
    grant = await _locked_grant(session, tenant, grant_id)
    if grant.incubator_id is not None:  # lock order: pool before quota
        await session.execute(
            select(IncubatorPool.incubator_id)
            .where(IncubatorPool.incubator_id == grant.incubator_id, IncubatorPool.period == grant.period)
            .with_for_update()
        )
    quota = (
        await session.execute(
            select(TenantQuota)
            .where(TenantQuota.tenant_id == tenant.id, TenantQuota.period == grant.period)
            .with_for_update()
        )
    ).scalar_one()
    unspent = max(0, quota.granted - quota.used - quota.held)
    take_tokens = min(grant.tokens, unspent)
    take_credits = grant.credits_minor
    if grant.incubator_id is not None:
        await draw_from_pool(session, grant.incubator_id, grant.period, -take_tokens, -take_credits)
    await _change_granted(session, tenant.id, grant.period, -take_tokens, -take_credits)
    before = (grant.tokens, grant.credits_minor)
    grant.tokens -= take_tokens
    grant.credits_minor -= take_credits
    grant.status = "revoked"
    grant.revoked_at = datetime.now(UTC)
    session.add(_event(grant, "revoked", before[0], before[1], actor))
    await session.flush()
    return grant


async def grants_out(session: AsyncSession, grants: list[Grant]) -> list[GrantOut]:
    ids = [g.id for g in grants]
    events: dict[str, list[GrantEventOut]] = {i: [] for i in ids}
    if ids:
        rows = await session.scalars(select(GrantEvent).where(GrantEvent.grant_id.in_(ids)).order_by(GrantEvent.id))
        for e in rows:
            events[e.grant_id].append(
                GrantEventOut(
                    action=e.action,
                    tokens_before=e.tokens_before,
                    tokens_after=e.tokens_after,
                    credits_before=e.credits_before_minor,
                    credits_after=e.credits_after_minor,
                    actor_key_id=e.actor_key_id,
                    at=e.at,
                )
            )
    return [
        GrantOut(
            id=g.id,
            tenant_id=g.tenant_id,
            incubator_id=g.incubator_id,
            period=period_label(g.period),
            tokens=g.tokens,
            credits=g.credits_minor,
            status=g.status,
            note=g.note,
            created_by=g.created_by,
            created_at=g.created_at,
            revoked_at=g.revoked_at,
            history=events[g.id],
        )
        for g in grants
    ]


async def list_grants(session: AsyncSession, tenant_id: str) -> list[Grant]:
    rows = await session.scalars(select(Grant).where(Grant.tenant_id == tenant_id).order_by(Grant.id))
    return list(rows.all())


async def quota_of(session: AsyncSession, tenant_id: str) -> QuotaOut:
    period = await current_period(session)
    quota = await session.get(TenantQuota, (tenant_id, period), populate_existing=True)
    granted, held, used = (quota.granted, quota.held, quota.used) if quota else (0, 0, 0)
    return QuotaOut(
        period=period_label(period),
        granted=granted,
        held=held,
        used=used,
        remaining=max(0, granted - held - used),
        credits_granted=quota.credits_granted_minor if quota else 0,
        soft_threshold_reached=bool(quota and quota.soft_notified_at),
    )

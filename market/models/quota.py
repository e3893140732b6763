"""Quotas: incubator pools, grants with their history, allowed models and the admission counters.

Periods are calendar months in UTC, stored as the first day of the month (``date``). The counters
that admission touches (``tenant_quotas``, ``rate_limit_buckets``, ``quota_holds``) are changed only
by the PL/pgSQL functions of migration 0003, so that every api replica enforces one shared limit in
one round trip; the admin API changes ``granted`` under the same row locks.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, CheckConstraint, Double, ForeignKey, Identity, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from market.db import Base, Timestamped


class IncubatorPool(Timestamped, Base):
    """What the platform gives an incubator for one period, and how much of it is already granted.

    ``allocated_*`` is the sum of the incubator's active grants for the period; the check
    constraint is the last line of defence against over-allocation (the API refuses with 409 first).
    """

    __tablename__ = "incubator_pools"
    __table_args__ = (
        CheckConstraint(
            "allocated_tokens >= 0 AND allocated_tokens <= tokens"
            " AND allocated_credits_minor >= 0 AND allocated_credits_minor <= credits_minor",
            name="within_pool",
        ),
    )

    incubator_id: Mapped[str] = mapped_column(ForeignKey("incubators.id", ondelete="CASCADE"), primary_key=True)
    period: Mapped[date] = mapped_column(primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger)
    credits_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    allocated_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    allocated_credits_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")


class Grant(Timestamped, Base):
    """Tokens (and optionally credits) given to a tenant for one period, drawn from its incubator's pool.

    ``tokens`` is the current size; resizing and revoking keep the row and append a ``GrantEvent``.
    Tenants outside any incubator have ``incubator_id`` NULL: the platform grants to them directly.
    """

    __tablename__ = "grants"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'revoked')", name="status"),
        CheckConstraint("tokens >= 0 AND credits_minor >= 0", name="non_negative"),
        Index("ix_grants_tenant_id_period", "tenant_id", "period"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    incubator_id: Mapped[str | None] = mapped_column(ForeignKey("incubators.id", ondelete="CASCADE"))
    period: Mapped[date]
    tokens: Mapped[int] = mapped_column(BigInteger)
    credits_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    note: Mapped[str] = mapped_column(String(500), server_default="")
    created_by: Mapped[str | None] = mapped_column(String(40))
    """The key id that made the grant (no foreign key: the audit trail outlives keys)."""
    revoked_at: Mapped[datetime | None]


class GrantEvent(Base):
    """Append-only history of a grant: created, resized, revoked, by whom and from what to what."""

    __tablename__ = "grant_events"
    __table_args__ = (CheckConstraint("action IN ('granted', 'resized', 'revoked')", name="action"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    tokens_before: Mapped[int] = mapped_column(BigInteger)
    tokens_after: Mapped[int] = mapped_column(BigInteger)
    credits_before_minor: Mapped[int] = mapped_column(BigInteger)
    credits_after_minor: Mapped[int] = mapped_column(BigInteger)
    actor_key_id: Mapped[str | None] = mapped_column(String(40))
    at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class TenantQuota(Base):
    """A tenant's budget for one period: granted (sum of active grants), held by in-flight requests, used.

    Admission holds ``prompt + max_tokens`` only while ``used + held + hold <= granted``, under the
    row lock, so concurrent requests on any number of replicas can never overrun the grant.
    """

    __tablename__ = "tenant_quotas"
    __table_args__ = (
        CheckConstraint("granted >= 0 AND held >= 0 AND used >= 0", name="non_negative"),
        CheckConstraint("credits_granted_minor >= 0", name="credits_non_negative"),
    )

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    period: Mapped[date] = mapped_column(primary_key=True)
    granted: Mapped[int] = mapped_column(BigInteger, server_default="0")
    held: Mapped[int] = mapped_column(BigInteger, server_default="0")
    used: Mapped[int] = mapped_column(BigInteger, server_default="0")
    credits_granted_minor: Mapped[int] = mapped_column(BigInteger, server_default="0")
    soft_notified_at: Mapped[datetime | None]
    """When usage first crossed the soft threshold this period (the event is sent once)."""


class TenantModel(Base):
    """A model a tenant may call. A tenant with no rows may call every active model."""

    __tablename__ = "tenant_models"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    model_name: Mapped[str] = mapped_column(
        ForeignKey("models.name", ondelete="CASCADE", onupdate="CASCADE"), primary_key=True
    )


class RateLimitBucket(Base):
    """GCRA state of one key's or tenant's per-minute limits: the theoretical arrival time per limit.

    One timestamp per limit is the whole state of a smooth sliding-window limiter, so the row is
    tiny and updated in place (``scope`` is a ``key_...`` or ``ten_...`` id). The table is UNLOGGED:
    no WAL on the hot path, and a database crash merely forgives the current minute.
    """

    __tablename__ = "rate_limit_buckets"
    __table_args__ = {"prefixes": ["UNLOGGED"]}

    scope: Mapped[str] = mapped_column(String(40), primary_key=True)
    requests_tat: Mapped[float] = mapped_column(Double, server_default="0")
    tokens_tat: Mapped[float] = mapped_column(Double, server_default="0")


class QuotaHold(Base):
    """Tokens one api process currently holds for a tenant, so a crashed process's holds can be released."""

    __tablename__ = "quota_holds"
    __table_args__ = (CheckConstraint("held >= 0", name="non_negative"),)

    holder: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    period: Mapped[date] = mapped_column(primary_key=True)
    held: Mapped[int] = mapped_column(BigInteger, server_default="0")


class LimiterInstance(Base):
    """A live api process's limiter; one silent for too long is presumed dead and its holds released."""

    __tablename__ = "limiter_instances"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    seen_at: Mapped[datetime] = mapped_column(server_default=text("now()"))

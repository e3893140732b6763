"""Incubators, tenants and API keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from market.db import Base, Timestamped

KEY_ROLES = ("platform_admin", "incubator_admin", "tenant", "provider")


class Incubator(Timestamped, Base):
    """A programme that receives a pool of capacity and splits it among its startups."""

    __tablename__ = "incubators"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))


class Tenant(Timestamped, Base):
    """A customer calling the token API (a startup, possibly inside an incubator)."""

    __tablename__ = "tenants"
    __table_args__ = (CheckConstraint("status IN ('active', 'suspended')", name="status"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    incubator_id: Mapped[str | None] = mapped_column(ForeignKey("incubators.id", ondelete="RESTRICT"), index=True)
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    max_price_minor_per_million: Mapped[int | None]
    """Routing preference: never place on a node whose offer is dearer than this."""
    allowed_providers: Mapped[list[str] | None] = mapped_column(ARRAY(String(40)))
    requests_per_minute: Mapped[int | None]
    tokens_per_minute: Mapped[int | None]


class ApiKey(Base):
    """A bearer key. Only the sha256 of the secret is stored; ``prefix`` is what users see."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("role IN ('platform_admin', 'incubator_admin', 'tenant', 'provider')", name="role"),
        CheckConstraint(
            "(role = 'tenant') = (tenant_id IS NOT NULL)"
            " AND (role = 'incubator_admin') = (incubator_id IS NOT NULL)"
            " AND (role = 'provider') = (provider_id IS NOT NULL)",
            name="owner",
        ),
        Index("ix_api_keys_tenant_id", "tenant_id", postgresql_where=text("tenant_id IS NOT NULL")),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    role: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(200), server_default="")
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    incubator_id: Mapped[str | None] = mapped_column(ForeignKey("incubators.id", ondelete="CASCADE"))
    provider_id: Mapped[str | None] = mapped_column(ForeignKey("providers.id", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(40)), server_default="{}")
    requests_per_minute: Mapped[int | None]
    tokens_per_minute: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]

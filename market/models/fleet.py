"""Providers, their nodes and one-time node enrolment tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, String, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from market.db import Base, Timestamped


class Provider(Timestamped, Base):
    """A third party that lends GPU machines to the marketplace and is paid for tokens served."""

    __tablename__ = "providers"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    payout_account: Mapped[str | None] = mapped_column(String(100))
    """Stripe Connect account id that payouts are transferred to."""


class Node(Timestamped, Base):
    """One provider machine running the agent. ``status`` is the last known one."""

    __tablename__ = "nodes"
    __table_args__ = (
        CheckConstraint("status IN ('starting', 'healthy', 'unhealthy', 'draining', 'revoked')", name="status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider_id: Mapped[str] = mapped_column(ForeignKey("providers.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(200), server_default="")
    status: Mapped[str] = mapped_column(String(16), server_default="starting")
    engine: Mapped[str] = mapped_column(String(16), server_default="vllm")
    models: Mapped[list[str]] = mapped_column(ARRAY(String(200)), server_default="{}")
    profile: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    hardware: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    nats_user: Mapped[str | None] = mapped_column(String(100), unique=True)
    nats_secret_hash: Mapped[str | None] = mapped_column(String(64))
    last_seen_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class EnrolmentToken(Base):
    """A one-time, expiring token a provider mints so that one machine can join."""

    __tablename__ = "enrolment_tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider_id: Mapped[str] = mapped_column(ForeignKey("providers.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id", ondelete="SET NULL"))


class ProviderOffer(Timestamped, Base):
    """What a provider asks to be paid per 1M tokens of a model served on its nodes.

    Offers feed the market twice: schedulers route tenants with a price ceiling only to providers
    whose offer fits it, and each new price-book version takes the offers current when it is
    posted as the providers' payout rates (unless the admin sets a payout explicitly).
    """

    __tablename__ = "provider_offers"
    __table_args__ = (
        CheckConstraint("input_minor_per_million >= 0 AND output_minor_per_million >= 0", name="non_negative"),
    )

    provider_id: Mapped[str] = mapped_column(ForeignKey("providers.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(ForeignKey("models.name", ondelete="CASCADE"), primary_key=True)
    input_minor_per_million: Mapped[int] = mapped_column(BigInteger)
    output_minor_per_million: Mapped[int] = mapped_column(BigInteger)

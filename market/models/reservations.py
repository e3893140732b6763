"""Elastic reservations: capacity a tenant holds for one model, with burst above it billed as used.

A reservation guarantees ``slots`` requests in flight for its model (admitted in the ``reserved``
class, which schedulers serve first and which may use the headroom other classes leave free);
``burst_slots`` more run in the ``burst`` class at the price book's burst prices; beyond both, a
request gets a 429. It is elastic: a tenant resizes it at any time, and each hour is charged for
the most slots it held during that hour (``reservation_changes``), so a business that grows pays
for the larger size only from the hour it takes it.

The in-flight counts live in ``reservation_holds``, one row per api process (like
``quota_holds``), changed only by the admission functions of migration 0012 under the
tenant's quota row lock, so every api replica enforces one count and a crashed process's
requests are given back by the dead-holder sweep.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Identity, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from market.db import Base, Timestamped

RESERVATION_STATUSES = ("active", "ended")


class Reservation(Timestamped, Base):
    """One tenant's reservation for one model; at most one active per tenant and model."""

    __tablename__ = "reservations"
    __table_args__ = (
        CheckConstraint("slots >= 1 AND burst_slots >= 0", name="sizes"),
        CheckConstraint("status IN ('active', 'ended')", name="status"),
        Index(
            "uq_reservations_active_tenant_model",
            "tenant_id",
            "model",
            unique=True,
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(ForeignKey("models.name", ondelete="RESTRICT", onupdate="CASCADE"))
    slots: Mapped[int] = mapped_column(Integer)
    """Requests in flight admitted as ``reserved``: the committed capacity, charged per hour."""
    burst_slots: Mapped[int] = mapped_column(Integer, server_default="0")
    """Requests in flight above ``slots`` admitted as ``burst`` (billed per token at burst prices)."""
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    created_by: Mapped[str | None] = mapped_column(String(40))
    """The key id that made it (no foreign key: the audit trail outlives keys)."""
    ended_at: Mapped[datetime | None]


class ReservationChange(Base):
    """Append-only sizes of a reservation: created, resized, ended (``slots`` 0), by whom and when.

    Billing charges each hour for the largest ``slots`` in force during it."""

    __tablename__ = "reservation_changes"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    reservation_id: Mapped[str] = mapped_column(ForeignKey("reservations.id", ondelete="CASCADE"), index=True)
    slots: Mapped[int] = mapped_column(Integer)
    burst_slots: Mapped[int] = mapped_column(Integer)
    actor_key_id: Mapped[str | None] = mapped_column(String(40))
    at: Mapped[datetime] = mapped_column(server_default=text("clock_timestamp()"))


class ReservationHold(Base):
    """Requests one api process has in flight under a reservation, per class: a reserved slot
    freed is taken by the next request even while burst ones still run."""

    __tablename__ = "reservation_holds"
    __table_args__ = (CheckConstraint("reserved >= 0 AND burst >= 0", name="non_negative"),)

    holder: Mapped[str] = mapped_column(String(40), primary_key=True)
    reservation_id: Mapped[str] = mapped_column(
        ForeignKey("reservations.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    reserved: Mapped[int] = mapped_column(Integer, server_default="0")
    burst: Mapped[int] = mapped_column(Integer, server_default="0")

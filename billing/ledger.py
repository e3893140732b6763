"""Ledger postings the billing worker owns beyond usage: reservation commitments, and balances.

Every amount here is micros of the minor unit unless the name says ``_minor``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from market.models.billing import (
    PLATFORM_REVENUE,
    LedgerEntry,
    PriceBook,
    PriceBookEntry,
    post_transaction,
    tenant_account,
)
from market.money import MICROS_PER_MINOR


class NoReservationPrice(LookupError):
    """No reservation price is in force for the model at that hour."""


def hour_start(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return at.replace(minute=0, second=0, microsecond=0)


def reservation_hour_id(reservation_id: str, hour: datetime) -> str:
    return f"resv:{reservation_id}:{hour_start(hour):%Y%m%dT%H}"


async def reservation_hour_price(session: AsyncSession, model: str, hour: datetime, currency: str) -> int:
    """The committed price per reserved slot per hour (minor units) in force at ``hour``."""
    book_id = (
        await session.execute(
            select(PriceBook.id)
            .where(PriceBook.currency == currency, PriceBook.effective_from <= hour)
            .order_by(PriceBook.effective_from.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    price = None
    if book_id is not None:
        price = (
            await session.execute(
                select(PriceBookEntry.reservation_hour_minor).where(
                    PriceBookEntry.price_book_id == book_id,
                    PriceBookEntry.model == model,
                    PriceBookEntry.admission_class == "reserved",
                )
            )
        ).scalar_one_or_none()
    if price is None:
        raise NoReservationPrice(f"no reservation price for {model} at {hour.isoformat()}")
    return price


async def post_reservation_hour(
    session: AsyncSession,
    *,
    reservation_id: str,
    tenant_id: str,
    model: str,
    slots: int,
    hour: datetime,
    currency: str,
    hourly_minor: int | None = None,
) -> bool:
    """Charge one hour of a reservation's committed capacity, once per reservation-hour.

    ``hourly_minor`` overrides the price book's per-slot hourly price (a negotiated contract).
    The commitment is platform revenue: providers are paid per token served, reserved or not.
    Returns False if that hour was already charged. The caller commits.
    """
    if slots <= 0:
        raise ValueError("a reservation has at least one slot")
    start = hour_start(hour)
    per_slot = (
        hourly_minor if hourly_minor is not None else await reservation_hour_price(session, model, start, currency)
    )
    micros = per_slot * slots * MICROS_PER_MINOR
    return await post_transaction(
        session,
        transaction_id=reservation_hour_id(reservation_id, start),
        kind="reservation",
        currency=currency,
        occurred_at=start,
        legs={tenant_account(tenant_id): micros, PLATFORM_REVENUE: -micros},
        tenant_id=tenant_id,
        model=model,
        memo=f"reservation {reservation_id}: {slots} slot(s) for the hour from {start:%Y-%m-%d %H}:00 UTC",
    )


async def balance(session: AsyncSession, account_id: str) -> int:
    """An account's balance in micros (debits positive), derived from its entries."""
    total = (
        await session.execute(
            select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0)).where(LedgerEntry.account_id == account_id)
        )
    ).scalar_one()
    return int(total)

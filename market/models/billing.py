"""Billing: usage records, the price book, the double-entry ledger, invoices, statements, Stripe ids.

Amounts:
- Per-request amounts are integer *micros of the minor unit* (``*_micros``; 1 cent = 1,000,000
  micros, see ``market.money``), because one request costs a tiny fraction of a cent.
- Invoices, statements, credits and Stripe amounts are integer minor units (``*_minor``).
- Prices are integer minor units per 1M tokens, so ``tokens * price`` is exactly the cost in micros.

The ledger is double-entry: a transaction's entries sum to zero. ``amount_micros`` is positive for a
debit and negative for a credit; so a tenant account's balance is what the tenant owes (negative on
its credit account: prepaid credit still available), and a provider account's balance is minus what
we owe the provider. Balances are never stored, only derived from entries.

The hot ledger tables (``usage_records``, ``ledger_transactions``, ``ledger_entries``) carry no
foreign keys: the billing worker writes several rows per usage event at tens of thousands of events
per second, and a per-row foreign-key trigger would halve that. ``market billing reconcile`` checks
their integrity instead (every entry's transaction exists, every transaction balances).

The api and the billing worker both write ledger transactions (credit grants, Stripe payments), so
the one function that posts a balanced transaction lives here, beside the tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Literal

import msgspec
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ColumnElement,
    Date,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Select,
    String,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from market.db import Base, Timestamped
from market.ids import new_id
from market.money import MICROS_PER_MINOR

ADMISSION_CLASSES = ("reserved", "burst", "on_demand")
ACCOUNT_KINDS = ("tenant", "credit", "provider", "platform", "grant_pool", "external")
TRANSACTION_KINDS = ("usage", "reservation", "credit_grant", "top_up", "invoice", "payment", "payout")

PLATFORM_REVENUE = "platform:revenue"
"""Platform margin on usage, reservation commitments, and invoice rounding."""
PLATFORM_GRANTS = "platform:grants"
"""Promotional credit granted to tenants that belong to no incubator."""
EXTERNAL_PAYMENTS = "external:payments"
"""Money received from tenants (Stripe payments, top-ups)."""
EXTERNAL_PAYOUTS = "external:payouts"
"""Money sent to providers (Stripe Connect transfers)."""


def tenant_account(tenant_id: str) -> str:
    """What the tenant owes for usage (debited by usage, credited by credit and payments)."""
    return f"tenant:{tenant_id}"


def credit_account(tenant_id: str) -> str:
    """The tenant's prepaid credit (grants and top-ups); drawn down when an invoice is issued."""
    return f"credit:{tenant_id}"


def provider_account(provider_id: str) -> str:
    return f"provider:{provider_id}"


def grant_pool_account(incubator_id: str) -> str:
    return f"grant_pool:{incubator_id}"


class UnbalancedTransaction(ValueError):
    """A transaction whose entries do not sum to zero; never written."""


class PriceBook(Base):
    """One version of the price book. A version is complete: the version in force at time ``t`` is
    the one with the latest ``effective_from <= t``, and a model missing from it is unpriced.
    Versions are append-only, so rated usage can always be re-rated to the same amounts."""

    __tablename__ = "price_books"
    __table_args__ = (
        UniqueConstraint("currency", "effective_from"),
        CheckConstraint("platform_margin_bps BETWEEN 0 AND 10000", name="margin"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, Identity(), unique=True)
    currency: Mapped[str] = mapped_column(String(3))
    effective_from: Mapped[datetime]
    platform_margin_bps: Mapped[int] = mapped_column(Integer)
    """Platform share (basis points) of the tenant charge when a model has no explicit payout."""
    note: Mapped[str] = mapped_column(String(500), server_default="")
    created_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


def price_book_in_force(currency: str, at: datetime | ColumnElement[datetime]) -> Select[str]:
    """The id of the price book version in force at ``at`` (a time, or an SQL expression such as
    ``now()``) for ``currency``: the latest ``effective_from <= at``; no row when none is."""
    return (
        select(PriceBook.id)
        .where(PriceBook.currency == currency, PriceBook.effective_from <= at)
        .order_by(PriceBook.effective_from.desc())
        .limit(1)
    )


class PriceBookEntry(Base):
    """The tenant price of one model in one admission class, per 1M tokens."""

    __tablename__ = "price_book_entries"
    __table_args__ = (
        CheckConstraint("admission_class IN ('reserved', 'burst', 'on_demand')", name="admission_class"),
        CheckConstraint(
            "input_minor_per_million >= 0 AND output_minor_per_million >= 0"
            " AND (reservation_hour_minor IS NULL OR reservation_hour_minor >= 0)",
            name="non_negative",
        ),
    )

    price_book_id: Mapped[str] = mapped_column(ForeignKey("price_books.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    admission_class: Mapped[str] = mapped_column(String(16), primary_key=True)
    input_minor_per_million: Mapped[int] = mapped_column(BigInteger)
    output_minor_per_million: Mapped[int] = mapped_column(BigInteger)
    reservation_hour_minor: Mapped[int | None] = mapped_column(BigInteger)
    """Reserved class only: the commitment charge per reserved slot per hour."""


class PayoutRate(Base):
    """What a provider earns per 1M tokens served of a model; ``provider_id = '*'`` is the rate
    for every provider without an offer of its own. Without any rate, the provider earns the
    tenant charge minus the platform margin."""

    __tablename__ = "price_book_payouts"
    __table_args__ = (
        CheckConstraint("input_minor_per_million >= 0 AND output_minor_per_million >= 0", name="non_negative"),
    )

    price_book_id: Mapped[str] = mapped_column(ForeignKey("price_books.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    provider_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    input_minor_per_million: Mapped[int] = mapped_column(BigInteger)
    output_minor_per_million: Mapped[int] = mapped_column(BigInteger)


class UsageRecord(Base):
    """One request's usage, keyed by request id so a redelivered event changes nothing, with its
    rating. ``tenant_micros`` is NULL while no price applies (rated later, flagged by reconcile).

    ``billed_completion_tokens`` is the engine's count, but never more than the api relayed, and
    the relayed count when the engine reported nothing: a tenant pays only for what it received.
    """

    __tablename__ = "usage_records"
    __table_args__ = (
        CheckConstraint(
            "(tenant_micros IS NULL AND provider_micros IS NULL AND platform_micros IS NULL)"
            " OR tenant_micros = provider_micros + platform_micros",
            name="balanced",
        ),
        CheckConstraint(
            "prompt_tokens >= 0 AND completion_tokens >= 0 AND relayed_completion_tokens >= 0"
            " AND billed_completion_tokens >= 0",
            name="tokens_non_negative",
        ),
        Index("ix_usage_records_tenant_id_ended_at", "tenant_id", "ended_at"),
        Index("ix_usage_records_provider_id_ended_at", "provider_id", "ended_at"),
        Index("ix_usage_records_unrated", "request_id", postgresql_where=text("tenant_micros IS NULL")),
    )

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    admission_class: Mapped[str] = mapped_column(String(16))
    node_id: Mapped[str | None] = mapped_column(String(40))
    provider_id: Mapped[str | None] = mapped_column(String(40))
    reservation_id: Mapped[str | None] = mapped_column(String(40))
    outcome: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    relayed_completion_tokens: Mapped[int] = mapped_column(Integer)
    billed_completion_tokens: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime]
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    engine_ttft_ms: Mapped[float | None] = mapped_column(Float)
    """The engine's part of ``ttft_ms``, as the node timed it; the rest is the marketplace's."""
    duration_ms: Mapped[float] = mapped_column(Float)
    currency: Mapped[str] = mapped_column(String(3))
    price_book_id: Mapped[str | None] = mapped_column(String(40))
    tenant_micros: Mapped[int | None] = mapped_column(BigInteger)
    provider_micros: Mapped[int | None] = mapped_column(BigInteger)
    platform_micros: Mapped[int | None] = mapped_column(BigInteger)
    ingested_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class UsageOutboxEntry(Base):
    """A usage event the api has finished a request with and JetStream has not acknowledged yet.

    Written (group-committed) before the client sees its response end and deleted once JetStream
    has the event, so an api process that dies, or NATS out of reach, delays an event rather than
    losing it: another replica (or the restarted one) publishes rows left behind. Publishing twice
    is harmless: JetStream drops a repeated ``Nats-Msg-Id`` and the ledger a repeated request id.
    """

    __tablename__ = "usage_outbox"
    __table_args__ = (Index("ix_usage_outbox_stored_at", "stored_at"),)

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(200))
    event: Mapped[bytes] = mapped_column(LargeBinary)
    stored_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    """When stored, or last claimed by a replica publishing what another left behind."""


class UsageInFlight(Base):
    """The usage event a stream in flight would end with if it ended now, checkpointed by the api
    process relaying it (``holder``, its limiter's id) every few seconds.

    The statement that stores the request's final event in the outbox marks this row ``final``: a
    tombstone that a checkpoint still in flight cannot overwrite (the ordering is the database's,
    through the primary key), removed after ten minutes. The non-final rows of an api process
    that stopped heartbeating, not rewritten for as long, are copied to the outbox and published,
    so a stream whose api died mid-way is billed for what it had relayed by the last checkpoint,
    and its provider paid for it; they stay, ``claimed``, for two days.
    """

    __tablename__ = "usage_in_flight"
    __table_args__ = (Index("ix_usage_in_flight_holder", "holder"),)

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(40))
    subject: Mapped[str] = mapped_column(String(200))
    event: Mapped[bytes] = mapped_column(LargeBinary)
    final: Mapped[bool] = mapped_column(server_default="false")
    claimed: Mapped[bool] = mapped_column(server_default="false")
    """Published by another replica (its holder was taken for dead): kept, with its event, so the
    final event's store, should the holder have been alive after all, bills only the rest."""
    updated_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class LedgerAccount(Base):
    """A ledger account, named ``<kind>:<owner>`` (``tenant:ten_...``, ``platform:revenue``)."""

    __tablename__ = "ledger_accounts"
    __table_args__ = (
        CheckConstraint("kind IN ('tenant', 'credit', 'provider', 'platform', 'grant_pool', 'external')", name="kind"),
    )

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    owner_id: Mapped[str] = mapped_column(String(64))
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class LedgerTransaction(Base):
    """A balanced set of entries. The id is the idempotency key: the request id for usage,
    ``resv:<reservation>:<hour>``, ``invoice:<invoice>``, ``payment:<invoice>``, ``payout:<statement>``."""

    __tablename__ = "ledger_transactions"
    __table_args__ = (
        CheckConstraint(
            "kind IN ('usage', 'reservation', 'credit_grant', 'top_up', 'invoice', 'payment', 'payout')",
            name="kind",
        ),
        # Usage transactions are found through usage_records; indexing them here would only slow ingest.
        Index(
            "ix_ledger_transactions_kind_occurred_at",
            "kind",
            "occurred_at",
            postgresql_where=text("kind <> 'usage'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    currency: Mapped[str] = mapped_column(String(3))
    tenant_id: Mapped[str | None] = mapped_column(String(40))
    provider_id: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str | None] = mapped_column(String(200))
    occurred_at: Mapped[datetime]
    posted_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    memo: Mapped[str] = mapped_column(String(500), server_default="")


class LedgerEntry(Base):
    """One leg of a transaction: ``amount_micros`` > 0 debits the account, < 0 credits it.

    The key leads with the account so balances are an index range scan, and it is the only index:
    each rated request writes three entries, so every index here costs ingest throughput.
    """

    __tablename__ = "ledger_entries"

    account_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    transaction_id: Mapped[str] = mapped_column(String(120), primary_key=True)
    amount_micros: Mapped[int] = mapped_column(BigInteger)


class Invoice(Timestamped, Base):
    """A tenant's invoice for one calendar month (UTC); ``total_minor`` is what Stripe collects."""

    __tablename__ = "invoices"
    __table_args__ = (
        UniqueConstraint("tenant_id", "period_start", "currency"),
        CheckConstraint("status IN ('open', 'paid', 'void', 'uncollectible')", name="status"),
        CheckConstraint("total_minor = subtotal_minor - credit_applied_minor", name="total"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)
    period_start: Mapped[date] = mapped_column(Date)
    period_end: Mapped[date] = mapped_column(Date)
    """Exclusive: the first day of the next period."""
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), server_default="open")
    subtotal_minor: Mapped[int] = mapped_column(BigInteger)
    credit_applied_minor: Mapped[int] = mapped_column(BigInteger)
    total_minor: Mapped[int] = mapped_column(BigInteger)
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    stripe_status: Mapped[str | None] = mapped_column(String(32))
    paid_at: Mapped[datetime | None]


class InvoiceLine(Base):
    """A line of an invoice: usage of one model in one class, a reservation commitment, or the
    prepaid credit applied (negative). ``amount_minor`` is ``amount_micros`` rounded half up."""

    __tablename__ = "invoice_lines"
    __table_args__ = (CheckConstraint("kind IN ('usage', 'reservation', 'credit')", name="kind"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(200))
    admission_class: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(String(300))
    requests: Mapped[int] = mapped_column(BigInteger, server_default="0")
    input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    stripe_invoice_item_id: Mapped[str | None] = mapped_column(String(100), unique=True)


class ProviderStatement(Base):
    """What a provider earned in one calendar month (UTC), and whether it was paid out."""

    __tablename__ = "provider_statements"
    __table_args__ = (
        UniqueConstraint("provider_id", "period_start", "currency"),
        CheckConstraint("status IN ('pending', 'paid')", name="status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider_id: Mapped[str] = mapped_column(ForeignKey("providers.id", ondelete="RESTRICT"), index=True)
    period_start: Mapped[date] = mapped_column(Date)
    period_end: Mapped[date] = mapped_column(Date)
    currency: Mapped[str] = mapped_column(String(3))
    requests: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    earnings_micros: Mapped[int] = mapped_column(BigInteger)
    earnings_minor: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    stripe_transfer_id: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    paid_at: Mapped[datetime | None]


class StripeCustomer(Base):
    """A tenant's Stripe customer and the $0 subscription that anchors its invoices."""

    __tablename__ = "stripe_customers"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(100), unique=True)
    subscription_id: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class StripeEvent(Base):
    """Stripe webhook events already handled (Stripe delivers at least once)."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    received_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


def account_kind(account_id: str) -> tuple[str, str]:
    kind, _, owner = account_id.partition(":")
    if kind not in ACCOUNT_KINDS or not owner:
        raise ValueError(f"not a ledger account id: {account_id!r}")
    return kind, owner


async def post_transaction(
    db: AsyncSession | AsyncConnection,
    *,
    transaction_id: str,
    kind: str,
    currency: str,
    occurred_at: datetime,
    legs: Mapping[str, int],
    tenant_id: str | None = None,
    provider_id: str | None = None,
    model: str | None = None,
    memo: str = "",
) -> bool:
    """Write a balanced transaction once, in the caller's database transaction.

    Returns False, writing nothing, when a transaction with this id already exists, so callers
    derive ``transaction_id`` from what they record (a request, a reservation-hour, an invoice)
    and can repeat the call safely. Zero legs are dropped.
    """
    if sum(legs.values()) != 0:
        raise UnbalancedTransaction(f"transaction {transaction_id} does not balance: {dict(legs)}")
    if kind not in TRANSACTION_KINDS:
        raise ValueError(f"unknown transaction kind {kind!r}")
    inserted = (
        await db.execute(
            insert(LedgerTransaction)
            .values(
                id=transaction_id,
                kind=kind,
                currency=currency,
                tenant_id=tenant_id,
                provider_id=provider_id,
                model=model,
                occurred_at=occurred_at,
                memo=memo,
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(LedgerTransaction.id)
        )
    ).scalar_one_or_none()
    if inserted is None:
        return False
    nonzero = sorted((account, amount) for account, amount in legs.items() if amount != 0)
    if nonzero:
        accounts = []
        for account, _ in nonzero:
            kind_, owner = account_kind(account)
            accounts.append({"id": account, "kind": kind_, "owner_id": owner, "currency": currency})
        await db.execute(insert(LedgerAccount).values(accounts).on_conflict_do_nothing(index_elements=["id"]))
        await db.execute(
            insert(LedgerEntry).values(
                [{"transaction_id": transaction_id, "account_id": a, "amount_micros": m} for a, m in nonzero]
            )
        )
    return True


class PriceSpec(msgspec.Struct, kw_only=True, frozen=True):
    """A tenant price in a new price-book version (integer minor units per 1M tokens)."""

    model: str
    admission_class: Literal["reserved", "burst", "on_demand"]
    input_minor_per_million: int
    output_minor_per_million: int
    reservation_hour_minor: int | None = None


class PayoutSpec(msgspec.Struct, kw_only=True, frozen=True):
    """A provider payout rate in a new price-book version; no ``provider_id`` means every provider."""

    model: str
    input_minor_per_million: int
    output_minor_per_million: int
    provider_id: str | None = None


async def create_price_book(
    session: AsyncSession,
    *,
    currency: str,
    effective_from: datetime,
    platform_margin_bps: int,
    prices: Sequence[PriceSpec],
    payouts: Sequence[PayoutSpec] = (),
    note: str = "",
    created_by: str | None = None,
) -> PriceBook:
    """Add a complete price-book version (the caller commits). Versions are never edited."""
    book = PriceBook(
        id=new_id("price"),
        currency=currency,
        effective_from=effective_from,
        platform_margin_bps=platform_margin_bps,
        note=note,
        created_by=created_by,
    )
    session.add(book)
    await session.flush()
    if prices:
        await session.execute(
            insert(PriceBookEntry).values(
                [
                    {
                        "price_book_id": book.id,
                        "model": p.model,
                        "admission_class": p.admission_class,
                        "input_minor_per_million": p.input_minor_per_million,
                        "output_minor_per_million": p.output_minor_per_million,
                        "reservation_hour_minor": p.reservation_hour_minor,
                    }
                    for p in prices
                ]
            )
        )
    if payouts:
        await session.execute(
            insert(PayoutRate).values(
                [
                    {
                        "price_book_id": book.id,
                        "model": p.model,
                        "provider_id": p.provider_id or "*",
                        "input_minor_per_million": p.input_minor_per_million,
                        "output_minor_per_million": p.output_minor_per_million,
                    }
                    for p in payouts
                ]
            )
        )
    return book


async def grant_credit(
    session: AsyncSession,
    *,
    transaction_id: str,
    tenant_id: str,
    amount_minor: int,
    kind: Literal["credit_grant", "top_up"],
    currency: str,
    incubator_id: str | None,
    occurred_at: datetime,
    memo: str = "",
) -> bool:
    """Prepaid credit for a tenant: a grant comes out of its incubator's grant pool (or the
    platform's promotional credit), a top-up is money received. Idempotent by ``transaction_id``."""
    if amount_minor <= 0:
        raise ValueError("credit must be a positive amount")
    if kind == "credit_grant":
        source = grant_pool_account(incubator_id) if incubator_id else PLATFORM_GRANTS
    else:
        source = EXTERNAL_PAYMENTS
    micros = amount_minor * MICROS_PER_MINOR
    return await post_transaction(
        session,
        transaction_id=transaction_id,
        kind=kind,
        currency=currency,
        occurred_at=occurred_at,
        legs={source: micros, credit_account(tenant_id): -micros},
        tenant_id=tenant_id,
        memo=memo,
    )

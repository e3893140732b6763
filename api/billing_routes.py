"""Billing over HTTP: tenant usage, balance and invoices; provider earnings; admin revenue, price
book and credits; the Stripe webhook.

Everything here reads the billing tables through SQLAlchemy; the api never imports the ``billing``
package (domain packages meet in the schema). The few writes (a price-book version, a credit grant,
a paid invoice) go through ``market.models.billing``, the same helpers the billing worker uses, so
every ledger transaction balances and is idempotent whoever posts it.

Money in responses is integers: ``*_minor`` in minor units (cents), ``*_micros`` in millionths of a
minor unit (per-request amounts are fractions of a cent), always with ``currency`` beside them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal

import msgspec
import stripe
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy import ColumnElement, Date, Select, cast, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api.admin import quota as quota_service
from api.auth import Principal, principal_of, require_admin, require_platform_admin, require_provider, require_tenant
from api.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unavailable
from api.state import AppState
from market.ids import new_id
from market.models import (
    Invoice,
    InvoiceLine,
    LedgerEntry,
    LedgerTransaction,
    PayoutRate,
    PriceBook,
    PriceBookEntry,
    ProviderOffer,
    ProviderStatement,
    StripeEvent,
    Tenant,
    UsageRecord,
)
from market.models.billing import (
    EXTERNAL_PAYMENTS,
    PLATFORM_REVENUE,
    PayoutSpec,
    PriceSpec,
    create_price_book,
    credit_account,
    grant_credit,
    post_transaction,
    provider_account,
    tenant_account,
)
from market.money import MICROS_PER_MINOR

log = logging.getLogger(__name__)

Minor = Annotated[int, msgspec.Meta(ge=0, le=10**12)]
DateFrom = Annotated[date | None, QueryParameter(name="from", description="first day (UTC), inclusive")]
DateTo = Annotated[date | None, QueryParameter(name="to", description="last day (UTC), exclusive")]
MAX_RANGE_DAYS = 400


# ---- schemas -------------------------------------------------------------------------------------


class UsageRow(msgspec.Struct):
    day: date
    model: str
    key_id: str
    admission_class: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_micros: int


class UsageReport(msgspec.Struct):
    tenant_id: str
    currency: str
    start: date
    end: date
    rows: list[UsageRow]
    total_cost_micros: int


class LatencyRow(msgspec.Struct):
    """A tenant's requests of one day (UTC) and model, as it saw them. Times are milliseconds,
    ``None`` where no request of the row had one (no first token: failed before any output)."""

    day: date
    model: str
    requests: int
    failed: int
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    """From the request's arrival at the api to its first token leaving for the client."""
    marketplace_ttft_p50_ms: float | None
    marketplace_ttft_p99_ms: float | None
    """The part of the TTFT not spent in the engine (admission, placement, relay), per request."""
    duration_p50_ms: float | None
    duration_p99_ms: float | None


class LatencyReport(msgspec.Struct):
    tenant_id: str
    start: date
    end: date
    rows: list[LatencyRow]


class BalanceOut(msgspec.Struct):
    tenant_id: str
    currency: str
    prepaid_credit_minor: int
    """Credit granted or topped up and not yet applied to an invoice."""
    unbilled_usage_micros: int
    """Usage and reservation charges not yet on an invoice."""
    available_credit_minor: int
    """Prepaid credit left once unbilled usage is drawn from it."""
    outstanding_minor: int
    """Open invoices not yet paid."""


class InvoiceLineOut(msgspec.Struct):
    kind: str
    description: str
    model: str | None
    admission_class: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    amount_minor: int


class InvoiceOut(msgspec.Struct):
    id: str
    tenant_id: str
    period_start: date
    period_end: date
    currency: str
    status: str
    subtotal_minor: int
    credit_applied_minor: int
    total_minor: int
    lines: list[InvoiceLineOut]
    paid_at: datetime | None = None


class EarningsRow(msgspec.Struct):
    day: date
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    earnings_micros: int


class EarningsOut(msgspec.Struct):
    provider_id: str
    currency: str
    start: date
    end: date
    rows: list[EarningsRow]
    total_earnings_micros: int
    unpaid_balance_micros: int
    """Everything earned and not yet paid out, all periods."""


class NodeLatencyRow(msgspec.Struct):
    """One node's requests of one day (UTC) and model: the engine's time to first token as the
    node's agent timed it (its request to the engine to the first output), and the duration."""

    day: date
    node_id: str
    model: str
    requests: int
    failed: int
    engine_ttft_p50_ms: float | None
    engine_ttft_p90_ms: float | None
    engine_ttft_p99_ms: float | None
    duration_p50_ms: float | None
    duration_p99_ms: float | None


class NodeLatencyReport(msgspec.Struct):
    provider_id: str
    start: date
    end: date
    rows: list[NodeLatencyRow]


class StatementOut(msgspec.Struct):
    id: str
    period_start: date
    period_end: date
    currency: str
    requests: int
    input_tokens: int
    output_tokens: int
    earnings_minor: int
    status: str
    paid_at: datetime | None


class RevenueRow(msgspec.Struct):
    day: date
    model: str
    requests: int
    tenant_charges_micros: int
    provider_payouts_micros: int
    platform_revenue_micros: int


class RevenueOut(msgspec.Struct):
    currency: str
    start: date
    end: date
    rows: list[RevenueRow]
    usage_revenue_micros: int
    reservation_revenue_micros: int


class PriceIn(msgspec.Struct, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    admission_class: Literal["reserved", "burst", "on_demand"]
    input_minor_per_million: Minor
    output_minor_per_million: Minor
    reservation_hour_minor: Minor | None = None


class PayoutIn(msgspec.Struct, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    input_minor_per_million: Minor
    output_minor_per_million: Minor
    provider_id: Annotated[str, msgspec.Meta(min_length=1, max_length=40)] | None = None


class PriceBookCreate(msgspec.Struct, forbid_unknown_fields=True):
    prices: Annotated[list[PriceIn], msgspec.Meta(min_length=1, max_length=5000)]
    payouts: Annotated[list[PayoutIn], msgspec.Meta(max_length=5000)] = msgspec.field(default_factory=list)
    platform_margin_bps: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 2000
    effective_from: datetime | None = None
    """Defaults to now; may not be in the past (rated usage is never re-rated)."""
    note: Annotated[str, msgspec.Meta(max_length=500)] = ""


class PriceBookOut(msgspec.Struct):
    id: str
    version: int
    currency: str
    effective_from: datetime
    platform_margin_bps: int
    note: str
    prices: list[PriceIn]
    payouts: list[PayoutIn]


class CreditCreate(msgspec.Struct, forbid_unknown_fields=True):
    amount_minor: Annotated[int, msgspec.Meta(gt=0, le=10**12)]
    kind: Literal["grant", "top_up"] = "grant"
    """``grant``: from the tenant's incubator grant pool (or platform promotions); ``top_up``: paid."""
    memo: Annotated[str, msgspec.Meta(max_length=300)] = ""
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None


class CreditOut(msgspec.Struct):
    transaction_id: str
    tenant_id: str
    kind: str
    amount_minor: int
    currency: str
    created: bool
    """False when the idempotency key was already used (nothing new was credited)."""
    prepaid_credit_minor: int


# ---- shared queries ------------------------------------------------------------------------------


def _range(start: date | None, end: date | None) -> tuple[date, date]:
    today = datetime.now(UTC).date()
    start = start or today.replace(day=1)
    end = end or today + timedelta(days=1)
    if end <= start:
        raise InvalidRequest("'to' must be after 'from'", param="to")
    if (end - start).days > MAX_RANGE_DAYS:
        raise InvalidRequest(f"at most {MAX_RANGE_DAYS} days at once", param="from")
    return start, end


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def _day(column: Any) -> ColumnElement[date]:
    return cast(func.timezone("UTC", column), Date)


def _daily(
    first: date, last: date, where: Sequence[ColumnElement[bool]], keys: Sequence[Any], values: Sequence[Any]
) -> Select[Any]:
    """Usage records ending in [first, last) that match ``where``, grouped and ordered by day (UTC)
    and ``keys``: a row of the day, the keys and the aggregate ``values``."""
    day = _day(UsageRecord.ended_at).label("day")
    return (
        select(day, *keys, *values)
        .where(*where, UsageRecord.ended_at >= _midnight(first), UsageRecord.ended_at < _midnight(last))
        .group_by(day, *keys)
        .order_by(day, *keys)
    )


def _percentile(q: float, column: Any) -> ColumnElement[float]:
    return func.percentile_cont(q).within_group(column)


def _ms(value: Any) -> float | None:
    return None if value is None else round(float(value), 1)


async def _balance(session: AsyncSession, account_id: str) -> int:
    total = await session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0)).where(LedgerEntry.account_id == account_id)
    )
    return int(total or 0)


def _tenant(principal: Principal) -> str:
    assert principal.tenant_id is not None  # require_tenant admits tenant keys only
    return principal.tenant_id


def _provider(principal: Principal) -> str:
    assert principal.provider_id is not None  # require_provider admits provider keys only
    return principal.provider_id


async def _invoice_out(session: AsyncSession, invoices: Sequence[Invoice]) -> list[InvoiceOut]:
    lines: dict[str, list[InvoiceLineOut]] = {i.id: [] for i in invoices}
    if invoices:
        rows = await session.execute(
            select(InvoiceLine).where(InvoiceLine.invoice_id.in_(list(lines))).order_by(InvoiceLine.id)
        )
        for line in rows.scalars():
            lines[line.invoice_id].append(
                InvoiceLineOut(
                    line.kind,
                    line.description,
                    line.model,
                    line.admission_class,
                    line.requests,
                    line.input_tokens,
                    line.output_tokens,
                    line.amount_minor,
                )
            )
    return [
        InvoiceOut(
            id=i.id,
            tenant_id=i.tenant_id,
            period_start=i.period_start,
            period_end=i.period_end,
            currency=i.currency,
            status=i.status,
            subtotal_minor=i.subtotal_minor,
            credit_applied_minor=i.credit_applied_minor,
            total_minor=i.total_minor,
            lines=lines[i.id],
            paid_at=i.paid_at,
        )
        for i in invoices
    ]


def _csv(rows: Sequence[msgspec.Struct], filename: str) -> Response[str]:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fields = rows[0].__struct_fields__ if rows else UsageRow.__struct_fields__
    writer.writerow(fields)
    for row in rows:
        writer.writerow([getattr(row, f) for f in fields])
    return Response(
        out.getvalue(),
        media_type="text/csv",  # Litestar adds the charset
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )


# ---- tenant --------------------------------------------------------------------------------------


class TenantBillingController(Controller):
    """A tenant's own usage, balance and invoices; another tenant's are simply not found."""

    path = "/api/tenant"
    guards = [require_tenant]
    tags = ["tenant", "billing"]

    @get("/usage")
    async def usage(
        self,
        request: Request[Any, Any, Any],
        app_state: NamedDependency[AppState],
        start: DateFrom = None,
        end: DateTo = None,
        output: Annotated[Literal["json", "csv"], QueryParameter(name="format")] = "json",
    ) -> UsageReport | Response[str]:
        """Usage by day (UTC), model, key and admission class; ``?format=csv`` downloads it."""
        tenant_id = _tenant(await principal_of(request))
        first, last = _range(start, end)
        query = _daily(
            first,
            last,
            [UsageRecord.tenant_id == tenant_id, UsageRecord.outcome != "refused"],  # see billing.ingest
            [UsageRecord.model, UsageRecord.key_id, UsageRecord.admission_class],
            [
                func.count(),
                func.sum(UsageRecord.prompt_tokens),
                func.sum(UsageRecord.billed_completion_tokens),
                func.coalesce(func.sum(UsageRecord.tenant_micros), 0),
            ],
        )
        async with app_state.sessions() as session:
            rows = [UsageRow(*(r[:4]), *(int(v or 0) for v in r[4:])) for r in await session.execute(query)]
        if output == "csv":
            return _csv(rows, f"usage-{tenant_id}-{first}-{last}.csv")
        return UsageReport(tenant_id, app_state.settings.currency, first, last, rows, sum(r.cost_micros for r in rows))

    @get("/latency")
    async def latency(
        self,
        request: Request[Any, Any, Any],
        app_state: NamedDependency[AppState],
        start: DateFrom = None,
        end: DateTo = None,
    ) -> LatencyReport:
        """Time to first token and duration percentiles by day (UTC) and model."""
        tenant_id = _tenant(await principal_of(request))
        first, last = _range(start, end)
        own = UsageRecord.ttft_ms - UsageRecord.engine_ttft_ms
        query = _daily(
            first,
            last,
            [UsageRecord.tenant_id == tenant_id, UsageRecord.outcome != "refused"],  # see billing.ingest
            [UsageRecord.model],
            [
                func.count(),
                func.count().filter(UsageRecord.outcome == "failed"),
                _percentile(0.5, UsageRecord.ttft_ms),
                _percentile(0.9, UsageRecord.ttft_ms),
                _percentile(0.99, UsageRecord.ttft_ms),
                _percentile(0.5, own),
                _percentile(0.99, own),
                _percentile(0.5, UsageRecord.duration_ms),
                _percentile(0.99, UsageRecord.duration_ms),
            ],
        )
        async with app_state.sessions() as session:
            rows = [LatencyRow(r[0], r[1], r[2], r[3], *(_ms(v) for v in r[4:])) for r in await session.execute(query)]
        return LatencyReport(tenant_id, first, last, rows)

    @get("/balance")
    async def balance(self, request: Request[Any, Any, Any], app_state: NamedDependency[AppState]) -> BalanceOut:
        """Prepaid credit, usage not yet invoiced, and what open invoices still ask for."""
        tenant_id = _tenant(await principal_of(request))
        async with app_state.sessions() as session:
            owed = await _balance(session, tenant_account(tenant_id))
            credit = -await _balance(session, credit_account(tenant_id))
            outstanding = int(
                await session.scalar(
                    select(func.coalesce(func.sum(Invoice.total_minor), 0)).where(
                        Invoice.tenant_id == tenant_id, Invoice.status == "open"
                    )
                )
                or 0
            )
        unbilled = owed - outstanding * MICROS_PER_MINOR
        available = max(0, credit - max(0, unbilled)) // MICROS_PER_MINOR
        return BalanceOut(
            tenant_id=tenant_id,
            currency=app_state.settings.currency,
            prepaid_credit_minor=credit // MICROS_PER_MINOR,
            unbilled_usage_micros=unbilled,
            available_credit_minor=available,
            outstanding_minor=outstanding,
        )

    @get("/invoices")
    async def invoices(self, request: Request[Any, Any, Any], app_state: NamedDependency[AppState]) -> list[InvoiceOut]:
        """This tenant's invoices, newest period first, with their lines."""
        tenant_id = _tenant(await principal_of(request))
        async with app_state.sessions() as session:
            found = (
                await session.execute(
                    select(Invoice).where(Invoice.tenant_id == tenant_id).order_by(Invoice.period_start.desc())
                )
            ).scalars()
            return await _invoice_out(session, list(found))

    @get("/invoices/{invoice_id:str}")
    async def invoice(
        self, request: Request[Any, Any, Any], app_state: NamedDependency[AppState], invoice_id: FromPath[str]
    ) -> InvoiceOut:
        tenant_id = _tenant(await principal_of(request))
        async with app_state.sessions() as session:
            found = await session.scalar(
                select(Invoice).where(Invoice.id == invoice_id, Invoice.tenant_id == tenant_id)
            )
            if found is None:
                raise NotFound(f"no invoice {invoice_id}")
            return (await _invoice_out(session, [found]))[0]


# ---- provider ------------------------------------------------------------------------------------


class ProviderBillingController(Controller):
    """What a provider earned from the tokens its nodes served, and its monthly statements."""

    path = "/api/provider"
    guards = [require_provider]
    tags = ["provider", "billing"]

    @get("/earnings")
    async def earnings(
        self,
        request: Request[Any, Any, Any],
        app_state: NamedDependency[AppState],
        start: DateFrom = None,
        end: DateTo = None,
    ) -> EarningsOut:
        provider_id = _provider(await principal_of(request))
        first, last = _range(start, end)
        query = _daily(
            first,
            last,
            [UsageRecord.provider_id == provider_id],
            [UsageRecord.model],
            [
                func.count(),
                func.sum(UsageRecord.prompt_tokens),
                func.sum(UsageRecord.billed_completion_tokens),
                func.coalesce(func.sum(UsageRecord.provider_micros), 0),
            ],
        )
        async with app_state.sessions() as session:
            rows = [EarningsRow(r[0], r[1], *(int(v or 0) for v in r[2:])) for r in await session.execute(query)]
            unpaid = -await _balance(session, provider_account(provider_id))
        return EarningsOut(
            provider_id=provider_id,
            currency=app_state.settings.currency,
            start=first,
            end=last,
            rows=rows,
            total_earnings_micros=sum(r.earnings_micros for r in rows),
            unpaid_balance_micros=unpaid,
        )

    @get("/latency")
    async def latency(
        self,
        request: Request[Any, Any, Any],
        app_state: NamedDependency[AppState],
        start: DateFrom = None,
        end: DateTo = None,
    ) -> NodeLatencyReport:
        """The engine's time to first token and the duration, by day (UTC), node and model."""
        provider_id = _provider(await principal_of(request))
        first, last = _range(start, end)
        query = _daily(
            first,
            last,
            # Refused jobs were cut short by their cancel: their durations are not the node's.
            [
                UsageRecord.provider_id == provider_id,
                UsageRecord.node_id.is_not(None),
                UsageRecord.outcome != "refused",
            ],
            [UsageRecord.node_id, UsageRecord.model],
            [
                func.count(),
                func.count().filter(UsageRecord.outcome == "failed"),
                _percentile(0.5, UsageRecord.engine_ttft_ms),
                _percentile(0.9, UsageRecord.engine_ttft_ms),
                _percentile(0.99, UsageRecord.engine_ttft_ms),
                _percentile(0.5, UsageRecord.duration_ms),
                _percentile(0.99, UsageRecord.duration_ms),
            ],
        )
        async with app_state.sessions() as session:
            rows = [
                NodeLatencyRow(r[0], r[1] or "", r[2], r[3], r[4], *(_ms(v) for v in r[5:]))
                for r in await session.execute(query)
            ]
        return NodeLatencyReport(provider_id, first, last, rows)

    @get("/statements")
    async def statements(
        self, request: Request[Any, Any, Any], app_state: NamedDependency[AppState]
    ) -> list[StatementOut]:
        provider_id = _provider(await principal_of(request))
        async with app_state.sessions() as session:
            found = (
                await session.execute(
                    select(ProviderStatement)
                    .where(ProviderStatement.provider_id == provider_id)
                    .order_by(ProviderStatement.period_start.desc())
                )
            ).scalars()
            return [
                StatementOut(
                    s.id,
                    s.period_start,
                    s.period_end,
                    s.currency,
                    s.requests,
                    s.input_tokens,
                    s.output_tokens,
                    s.earnings_minor,
                    s.status,
                    s.paid_at,
                )
                for s in found
            ]


# ---- admin ---------------------------------------------------------------------------------------


class AdminBillingController(Controller):
    """Platform revenue, the price book, and prepaid credit."""

    path = "/api/admin"
    tags = ["admin", "billing"]

    @get("/revenue", guards=[require_platform_admin])
    async def revenue(
        self, app_state: NamedDependency[AppState], start: DateFrom = None, end: DateTo = None
    ) -> RevenueOut:
        """Charges, payouts and platform margin by day and model; reservation commitments beside."""
        first, last = _range(start, end)
        query = _daily(
            first,
            last,
            [],
            [UsageRecord.model],
            [
                func.count(),
                func.coalesce(func.sum(UsageRecord.tenant_micros), 0),
                func.coalesce(func.sum(UsageRecord.provider_micros), 0),
                func.coalesce(func.sum(UsageRecord.platform_micros), 0),
            ],
        )
        reservations = (
            select(func.coalesce(-func.sum(LedgerEntry.amount_micros), 0))
            .join(LedgerTransaction, LedgerTransaction.id == LedgerEntry.transaction_id)
            .where(
                LedgerTransaction.kind == "reservation",
                LedgerEntry.account_id == PLATFORM_REVENUE,
                LedgerTransaction.occurred_at >= _midnight(first),
                LedgerTransaction.occurred_at < _midnight(last),
            )
        )
        async with app_state.sessions() as session:
            rows = [RevenueRow(r[0], r[1], *(int(v or 0) for v in r[2:])) for r in await session.execute(query)]
            reserved = int(await session.scalar(reservations) or 0)
        return RevenueOut(
            currency=app_state.settings.currency,
            start=first,
            end=last,
            rows=rows,
            usage_revenue_micros=sum(r.platform_revenue_micros for r in rows),
            reservation_revenue_micros=reserved,
        )

    @get("/prices", guards=[require_platform_admin])
    async def prices(self, app_state: NamedDependency[AppState]) -> list[PriceBookOut]:
        """Every price-book version, newest first; the one in force is the latest already effective."""
        async with app_state.sessions() as session:
            books = list((await session.execute(select(PriceBook).order_by(PriceBook.effective_from.desc()))).scalars())
            return [await _book_out(session, book) for book in books]

    @post("/prices", guards=[require_platform_admin], status_code=201)
    async def create_prices(
        self, request: Request[Any, Any, Any], app_state: NamedDependency[AppState], data: JSONBody[PriceBookCreate]
    ) -> PriceBookOut:
        """A new, complete price-book version. Versions are never edited; post a new one."""
        principal = await principal_of(request)
        now = datetime.now(UTC)
        effective = data.effective_from or now
        if effective.tzinfo is None:
            raise InvalidRequest("effective_from needs a timezone (e.g. ...Z)", param="effective_from")
        if effective < now - timedelta(seconds=60):
            raise InvalidRequest(
                "a price-book version cannot take effect in the past: usage already rated stays as rated",
                param="effective_from",
            )
        seen: set[tuple[str, str]] = set()
        for price in data.prices:
            if (price.model, price.admission_class) in seen:
                raise InvalidRequest(f"{price.model} ({price.admission_class}) is priced twice", param="prices")
            seen.add((price.model, price.admission_class))
        payout_keys = {(p.model, p.provider_id or "*") for p in data.payouts}
        if len(payout_keys) != len(data.payouts):
            raise InvalidRequest("a payout rate is given twice for the same model and provider", param="payouts")
        try:
            async with app_state.sessions.begin() as session:
                payouts = [PayoutSpec(**msgspec.structs.asdict(p)) for p in data.payouts]
                payouts += await _offered_payouts(session, data.prices, payout_keys)
                book = await create_price_book(
                    session,
                    currency=app_state.settings.currency,
                    effective_from=effective,
                    platform_margin_bps=data.platform_margin_bps,
                    prices=[PriceSpec(**msgspec.structs.asdict(p)) for p in data.prices],
                    payouts=payouts,
                    note=data.note,
                    created_by=principal.key_id,
                )
                return await _book_out(session, book)
        except IntegrityError as exc:
            raise Conflict("a price-book version already takes effect at that instant") from exc

    @post("/tenants/{tenant_id:str}/credits", guards=[require_admin], status_code=201)
    async def credit(
        self,
        request: Request[Any, Any, Any],
        app_state: NamedDependency[AppState],
        tenant_id: FromPath[str],
        data: JSONBody[CreditCreate],
    ) -> CreditOut:
        """Prepaid credit in minor units, drawn down before anything is invoiced. Incubator admins
        may grant their own tenants credit from their incubator's pool; top-ups are platform-only."""
        principal = await principal_of(request)
        currency = app_state.settings.currency
        async with app_state.sessions.begin() as session:
            tenant = await session.get(Tenant, tenant_id)
            if tenant is None or (
                principal.role == "incubator_admin" and tenant.incubator_id != principal.incubator_id
            ):
                raise NotFound(f"no tenant {tenant_id}")
            if data.kind == "top_up" and principal.role != "platform_admin":
                raise Forbidden("only the platform records top-ups (money received)")
            transaction_id = (
                f"credit:{tenant_id}:{data.idempotency_key}" if data.idempotency_key else new_id("transaction")
            )
            kind: Literal["credit_grant", "top_up"] = "credit_grant" if data.kind == "grant" else "top_up"
            created = await grant_credit(
                session,
                transaction_id=transaction_id,
                tenant_id=tenant_id,
                amount_minor=data.amount_minor,
                kind=kind,
                currency=currency,
                incubator_id=tenant.incubator_id,
                occurred_at=datetime.now(UTC),
                memo=data.memo or f"{data.kind} by {principal.key_id}",
            )
            if not created:
                await _same_credit(session, transaction_id, kind, tenant_id, data.amount_minor)
            elif kind == "credit_grant" and tenant.incubator_id is not None:
                # The grant comes out of the incubator's pool (the ledger's source account says so):
                # never more than the pool has left this period; a refusal rolls the posting back.
                period = await quota_service.current_period(session)
                await quota_service.draw_from_pool(session, tenant.incubator_id, period, 0, data.amount_minor)
            remaining = -await _balance(session, credit_account(tenant_id))
        return CreditOut(
            transaction_id=transaction_id,
            tenant_id=tenant_id,
            kind=data.kind,
            amount_minor=data.amount_minor,
            currency=currency,
            created=created,
            prepaid_credit_minor=remaining // MICROS_PER_MINOR,
        )


async def _same_credit(
    session: AsyncSession, transaction_id: str, kind: str, tenant_id: str, amount_minor: int
) -> None:
    """A repeated idempotency key must name the same credit: 409 rather than report the new request as done."""
    stored = await session.get(LedgerTransaction, transaction_id)
    leg = await session.get(LedgerEntry, (credit_account(tenant_id), transaction_id))
    if stored is None or leg is None or stored.kind != kind or -leg.amount_micros != amount_minor * MICROS_PER_MINOR:
        raise Conflict(
            "this idempotency key was already used for a different credit; use a new key",
            code="idempotency_key_reused",
            param="idempotency_key",
        )


async def _book_out(session: AsyncSession, book: PriceBook) -> PriceBookOut:
    prices = (
        await session.execute(
            select(PriceBookEntry)
            .where(PriceBookEntry.price_book_id == book.id)
            .order_by(PriceBookEntry.model, PriceBookEntry.admission_class)
        )
    ).scalars()
    payouts = (
        await session.execute(
            select(PayoutRate)
            .where(PayoutRate.price_book_id == book.id)
            .order_by(PayoutRate.model, PayoutRate.provider_id)
        )
    ).scalars()
    return PriceBookOut(
        id=book.id,
        version=book.version,
        currency=book.currency,
        effective_from=book.effective_from,
        platform_margin_bps=book.platform_margin_bps,
        note=book.note,
        prices=[
            PriceIn(
                p.model,
                p.admission_class,  # type: ignore[arg-type]
                p.input_minor_per_million,
                p.output_minor_per_million,
                p.reservation_hour_minor,
            )
            for p in prices
        ],
        payouts=[
            PayoutIn(
                p.model,
                p.input_minor_per_million,
                p.output_minor_per_million,
                None if p.provider_id == "*" else p.provider_id,
            )
            for p in payouts
        ],
    )


# ---- Stripe webhook ------------------------------------------------------------------------------

_INVOICE_STATUS = {
    "invoice.paid": "paid",
    "invoice.payment_succeeded": "paid",
    "invoice.voided": "void",
    "invoice.marked_uncollectible": "uncollectible",
}


class StripeWebhookController(Controller):
    """``POST /api/stripe/webhook``: Stripe tells us what happened to the invoices we pushed.

    The signature is verified (``stripe.Webhook.construct_event``) before anything is read; a bad or
    missing one is a 400. Stripe delivers at least once, so handled event ids are stored and a
    repeat is acknowledged without effect.
    """

    path = "/api/stripe"
    tags = ["billing"]

    @post("/webhook", status_code=200)
    async def webhook(self, request: Request[Any, Any, Any], app_state: NamedDependency[AppState]) -> dict[str, Any]:
        secret = app_state.settings.stripe.webhook_secret
        if not secret:
            raise Unavailable("Stripe webhooks are not configured here", code="webhooks_not_configured")
        payload = await request.body()
        signature = request.headers.get("stripe-signature")
        if not signature:
            raise InvalidRequest("missing Stripe-Signature header", code="invalid_signature")
        try:
            stripe.Webhook.construct_event(payload, signature, secret)
        except stripe.SignatureVerificationError as exc:
            raise InvalidRequest("invalid Stripe signature", code="invalid_signature") from exc
        except ValueError as exc:
            raise InvalidRequest("the webhook body is not a Stripe event") from exc
        event = json.loads(payload)
        event_id, event_type = str(event.get("id", "")), str(event.get("type", ""))
        if not event_id:
            raise InvalidRequest("the webhook body is not a Stripe event")
        async with app_state.sessions.begin() as session:
            fresh = await session.scalar(
                insert(StripeEvent)
                .values(id=event_id, type=event_type[:100])
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(StripeEvent.id)
            )
            if fresh is None:
                return {"received": True, "duplicate": True}
            if event_type.startswith("invoice."):
                await _on_invoice_event(session, event_type, event.get("data", {}).get("object", {}))
        return {"received": True}


async def _on_invoice_event(session: AsyncSession, event_type: str, obj: dict[str, Any]) -> None:
    stripe_id = str(obj.get("id", ""))
    ours = (obj.get("metadata") or {}).get("invoice_id")
    invoice = await session.scalar(select(Invoice).where(Invoice.stripe_invoice_id == stripe_id).with_for_update())
    if invoice is None and ours:
        invoice = await session.scalar(select(Invoice).where(Invoice.id == ours).with_for_update())
    if invoice is None:
        log.warning("stripe event for an invoice we do not know", extra={"stripe_invoice": stripe_id})
        return
    stripe_status = obj.get("status")
    values: dict[str, Any] = {
        "stripe_status": "payment_failed" if event_type == "invoice.payment_failed" else stripe_status
    }
    status = _INVOICE_STATUS.get(event_type)
    if status == "paid" and invoice.status != "paid":
        paid = obj.get("amount_paid")
        if paid is not None and int(paid) != invoice.total_minor:
            log.error("stripe paid a different amount", extra={"invoice": invoice.id, "amount_paid": paid})
        values |= {"status": "paid", "paid_at": datetime.now(UTC)}
        micros = invoice.total_minor * MICROS_PER_MINOR
        await post_transaction(
            session,
            transaction_id=f"payment:{invoice.id}",
            kind="payment",
            currency=invoice.currency,
            occurred_at=datetime.now(UTC),
            legs={EXTERNAL_PAYMENTS: micros, tenant_account(invoice.tenant_id): -micros},
            tenant_id=invoice.tenant_id,
            memo=f"Stripe invoice {stripe_id} paid",
        )
    elif status in ("void", "uncollectible") and invoice.status == "open":
        values["status"] = status
    await session.execute(update(Invoice).where(Invoice.id == invoice.id).values(**values))


ROUTES = [TenantBillingController, ProviderBillingController, AdminBillingController, StripeWebhookController]
"""What ``api.main.route_handlers()`` registers."""


async def _offered_payouts(
    session: AsyncSession, prices: list[PriceIn], explicit: set[tuple[str, str]]
) -> list[PayoutSpec]:
    """Providers' current offers become their payout rates in the new version, except where the
    admin set one explicitly, and never above what tenants pay for the model (no loss-making rate)."""
    floor: dict[str, tuple[int, int]] = {}
    for price in prices:
        low = floor.get(price.model, (price.input_minor_per_million, price.output_minor_per_million))
        floor[price.model] = (min(low[0], price.input_minor_per_million), min(low[1], price.output_minor_per_million))
    offers = (await session.scalars(select(ProviderOffer).where(ProviderOffer.model.in_(list(floor))))).all()
    return [
        PayoutSpec(
            model=o.model,
            provider_id=o.provider_id,
            input_minor_per_million=o.input_minor_per_million,
            output_minor_per_million=o.output_minor_per_million,
        )
        for o in offers
        if (o.model, o.provider_id) not in explicit
        and o.input_minor_per_million <= floor[o.model][0]
        and o.output_minor_per_million <= floor[o.model][1]
    ]

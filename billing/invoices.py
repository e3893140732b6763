"""Invoices per tenant and statements per provider for one calendar month (UTC).

An invoice run is set-based: a few aggregate queries over the period's usage and reservation
charges, then bulk inserts, so a month of a million requests for a thousand tenants takes seconds.
Lines are rounded half up from micros to minor units (``market.money.micros_to_minor``); the
rounding difference is posted to the ledger with the invoice, so after the run the tenant account
holds exactly the invoice total in whole minor units. Prepaid credit is drawn down first: a negative
``credit`` line and a ledger transfer from the tenant's credit account.

A period is invoiced once (unique tenant + period); rerunning the command skips invoiced tenants.
Usage that arrives after its period was invoiced is not on any invoice, and reconcile reports it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from billing.ledger import post_reservation_hours
from market.ids import new_id, ulid
from market.models import (
    Invoice,
    InvoiceLine,
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    Provider,
    ProviderStatement,
    Tenant,
)
from market.models.billing import (
    PLATFORM_REVENUE,
    UnbalancedTransaction,
    account_kind,
    credit_account,
    tenant_account,
)
from market.money import MICROS_PER_MINOR, micros_to_minor

log = logging.getLogger(__name__)

INVOICE_LOCK = 0x62696C6C  # advisory lock: one invoice run at a time ("bill")


class PeriodError(ValueError):
    """A period string that is not ``YYYY-MM``."""


def month(period: str) -> tuple[date, date]:
    """``"2026-11"`` -> (2026-11-01, 2026-12-01): start inclusive, end exclusive."""
    try:
        year, mon = (int(part) for part in period.split("-"))
        start = date(year, mon, 1)
    except ValueError as exc:
        raise PeriodError(f"period must be YYYY-MM, got {period!r}") from exc
    end = date(year + 1, 1, 1) if mon == 12 else date(year, mon + 1, 1)
    return start, end


def utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


@dataclass
class _Line:
    kind: str
    model: str | None
    admission_class: str | None
    description: str
    requests: int
    input_tokens: int
    output_tokens: int
    amount_micros: int

    @property
    def amount_minor(self) -> int:
        return micros_to_minor(self.amount_micros)


@dataclass
class RunResult:
    invoices: list[str] = field(default_factory=list)
    skipped_tenants: int = 0
    unknown_tenants: list[str] = field(default_factory=list)
    unknown_providers: list[str] = field(default_factory=list)
    """Providers owed for the period's usage that are not in ``providers``: no statement is made."""
    statements: list[str] = field(default_factory=list)


_USAGE_BY_LINE = text(
    """
    SELECT tenant_id, model, admission_class, count(*) AS requests, sum(prompt_tokens) AS input_tokens,
           sum(billed_completion_tokens) AS output_tokens, sum(tenant_micros) AS micros
    FROM usage_records
    WHERE currency = :currency AND ended_at >= :start AND ended_at < :end AND tenant_micros IS NOT NULL
      AND outcome <> 'refused'  -- the provider's work on a refused request: the platform's cost
    GROUP BY tenant_id, model, admission_class
    """
)

_RESERVATIONS_BY_LINE = text(
    """
    SELECT t.tenant_id, t.model, count(*) AS hours, sum(e.amount_micros) AS micros
    FROM ledger_transactions t
    JOIN ledger_entries e ON e.transaction_id = t.id AND e.account_id = 'tenant:' || t.tenant_id
    WHERE t.kind = 'reservation' AND t.currency = :currency AND t.occurred_at >= :start AND t.occurred_at < :end
    GROUP BY t.tenant_id, t.model
    """
)


async def _lines_by_tenant(session: AsyncSession, params: dict[str, object]) -> dict[str, list[_Line]]:
    lines: dict[str, list[_Line]] = defaultdict(list)
    for row in await session.execute(_USAGE_BY_LINE, params):
        klass = row.admission_class.replace("_", "-")
        lines[row.tenant_id].append(
            _Line(
                "usage",
                row.model,
                row.admission_class,
                f"{row.model} ({klass}): {row.input_tokens:,} input + {row.output_tokens:,} output tokens",
                int(row.requests),
                int(row.input_tokens),
                int(row.output_tokens),
                int(row.micros),
            )
        )
    for row in await session.execute(_RESERVATIONS_BY_LINE, params):
        lines[row.tenant_id].append(
            _Line(
                "reservation",
                row.model,
                "reserved",
                f"{row.model} reserved capacity: {row.hours} reservation-hour(s)",
                0,
                0,
                0,
                int(row.micros),
            )
        )
    for tenant_lines in lines.values():
        tenant_lines.sort(key=lambda line: (line.kind, line.model or "", line.admission_class or ""))
    return lines


async def _credit_available_micros(session: AsyncSession, tenant_ids: list[str]) -> dict[str, int]:
    """Prepaid credit still available per tenant (micros, positive)."""
    if not tenant_ids:
        return {}
    rows = await session.execute(
        text(
            "SELECT account_id, sum(amount_micros) AS balance FROM ledger_entries"
            " WHERE account_id = ANY(:accounts) GROUP BY account_id"
        ),
        {"accounts": [credit_account(t) for t in tenant_ids]},
    )
    return {row.account_id.partition(":")[2]: -int(row.balance) for row in rows}


LATE_USAGE_GRACE = timedelta(hours=1)
"""How long after a period ends its usage may still be arriving (a usage outbox publishing what an
api process left behind, a billing worker catching up): a period is invoiced only after it."""


async def run_invoices(session: AsyncSession, period: str, currency: str) -> RunResult:
    """Issue the period's invoices and provider statements in one database transaction.

    A tenant's invoice and a provider's statement are made once per period, so a period that has
    not ended (plus ``LATE_USAGE_GRACE``) is refused: usage recorded after its invoice would never
    be billed."""
    start, end = month(period)
    if utc_midnight(end) + LATE_USAGE_GRACE > datetime.now(UTC):
        raise PeriodError(
            f"period {period} has not ended, or ended less than {LATE_USAGE_GRACE} ago: invoice it after"
            f" {(utc_midnight(end) + LATE_USAGE_GRACE).isoformat()}"
        )
    params: dict[str, object] = {"currency": currency, "start": utc_midnight(start), "end": utc_midnight(end)}
    result = RunResult()
    async with session.begin():
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": INVOICE_LOCK})
        raw = (await (await session.connection()).get_raw_connection()).driver_connection
        assert raw is not None  # asyncpg's, in this session's transaction
        await post_reservation_hours(raw, currency, utc_midnight(start), utc_midnight(end))
        lines = await _lines_by_tenant(session, params)
        invoiced = set(
            (
                await session.execute(
                    select(Invoice.tenant_id).where(Invoice.period_start == start, Invoice.currency == currency)
                )
            ).scalars()
        )
        known = set((await session.execute(select(Tenant.id).where(Tenant.id.in_(list(lines))))).scalars())
        result.unknown_tenants = sorted(set(lines) - known)
        if result.unknown_tenants:
            log.error("usage for unknown tenants not invoiced", extra={"tenants": result.unknown_tenants[:20]})
        todo = sorted((known & set(lines)) - invoiced)
        result.skipped_tenants = len(invoiced & set(lines))
        credit = await _credit_available_micros(session, todo)
        now = datetime.now(UTC)
        invoice_rows: list[dict[str, object]] = []
        line_rows: list[dict[str, object]] = []
        postings: list[tuple[dict[str, object], dict[str, int]]] = []
        for tenant_id in todo:
            invoice_id = new_id("invoice")
            tenant_lines = lines[tenant_id]
            charged_micros = sum(line.amount_micros for line in tenant_lines)
            subtotal = sum(line.amount_minor for line in tenant_lines)
            applied = max(0, min(subtotal, credit.get(tenant_id, 0) // MICROS_PER_MINOR))
            if applied:
                tenant_lines = [
                    *tenant_lines,
                    _Line("credit", None, None, "Prepaid credit applied", 0, 0, 0, -applied * MICROS_PER_MINOR),
                ]
            total = subtotal - applied
            invoice_rows.append(
                {
                    "id": invoice_id,
                    "tenant_id": tenant_id,
                    "period_start": start,
                    "period_end": end,
                    "currency": currency,
                    "status": "paid" if total == 0 else "open",
                    "subtotal_minor": subtotal,
                    "credit_applied_minor": applied,
                    "total_minor": total,
                    "paid_at": now if total == 0 else None,
                }
            )
            line_rows.extend(
                {
                    "invoice_id": invoice_id,
                    "kind": line.kind,
                    "model": line.model,
                    "admission_class": line.admission_class,
                    "description": line.description,
                    "requests": line.requests,
                    "input_tokens": line.input_tokens,
                    "output_tokens": line.output_tokens,
                    "amount_micros": line.amount_micros,
                    "amount_minor": line.amount_minor,
                }
                for line in tenant_lines
            )
            rounding = subtotal * MICROS_PER_MINOR - charged_micros
            applied_micros = applied * MICROS_PER_MINOR
            postings.append(
                (
                    {
                        "id": f"invoice:{invoice_id}",
                        "kind": "invoice",
                        "currency": currency,
                        "tenant_id": tenant_id,
                        "occurred_at": utc_midnight(end),
                        "memo": f"invoice {invoice_id} for {period}: rounding and prepaid credit applied",
                    },
                    {
                        tenant_account(tenant_id): rounding - applied_micros,
                        credit_account(tenant_id): applied_micros,
                        PLATFORM_REVENUE: -rounding,
                    },
                )
            )
            result.invoices.append(invoice_id)
        for chunk in range(0, len(invoice_rows), 1000):
            await session.execute(insert(Invoice).values(invoice_rows[chunk : chunk + 1000]))
        await post_transactions(session, postings)
        for chunk in range(0, len(line_rows), 1000):
            await session.execute(insert(InvoiceLine).values(line_rows[chunk : chunk + 1000]))
        result.statements, result.unknown_providers = await _run_statements(session, params, start, end, currency)
        if result.unknown_providers:
            log.error(
                "usage served by unknown providers: no statement made",
                extra={"providers": result.unknown_providers[:20]},
            )
    return result


async def post_transactions(session: AsyncSession, postings: list[tuple[dict[str, object], dict[str, int]]]) -> None:
    """Many new balanced transactions in a few bulk statements (``post_transaction`` one at a time
    would be thousands of round trips in an invoice run). Ids must be new: invoice ids are."""
    entries: list[dict[str, object]] = []
    accounts: dict[str, dict[str, object]] = {}
    for header, legs in postings:
        if sum(legs.values()) != 0:
            raise UnbalancedTransaction(f"transaction {header['id']} does not balance: {legs}")
        for account, amount in legs.items():
            if amount:
                kind, owner = account_kind(account)
                accounts[account] = {"id": account, "kind": kind, "owner_id": owner, "currency": header["currency"]}
                entries.append({"transaction_id": header["id"], "account_id": account, "amount_micros": amount})
    headers = [header for header, _ in postings]
    rows = sorted(accounts.values(), key=lambda a: str(a["id"]))
    for chunk in range(0, len(rows), 1000):
        await session.execute(
            insert(LedgerAccount).values(rows[chunk : chunk + 1000]).on_conflict_do_nothing(index_elements=["id"])
        )
    for chunk in range(0, len(headers), 1000):
        await session.execute(insert(LedgerTransaction).values(headers[chunk : chunk + 1000]))
    for chunk in range(0, len(entries), 1000):
        await session.execute(insert(LedgerEntry).values(entries[chunk : chunk + 1000]))


_EARNINGS_BY_PROVIDER = text(
    """
    SELECT u.provider_id, count(*) AS requests, sum(u.prompt_tokens) AS input_tokens,
           sum(u.billed_completion_tokens) AS output_tokens, sum(u.provider_micros) AS micros
    FROM usage_records u
    WHERE u.currency = :currency AND u.ended_at >= :start AND u.ended_at < :end AND u.tenant_micros IS NOT NULL
      AND u.provider_id IS NOT NULL
    GROUP BY u.provider_id
    """
)


async def _run_statements(
    session: AsyncSession, params: dict[str, object], start: date, end: date, currency: str
) -> tuple[list[str], list[str]]:
    """The period's provider statements (new ones' ids), and the providers owed that do not exist."""
    earnings = list(await session.execute(_EARNINGS_BY_PROVIDER, params))
    owed = [row.provider_id for row in earnings]
    known = set((await session.execute(select(Provider.id).where(Provider.id.in_(owed)))).scalars())
    rows = [
        {
            "id": f"stm_{ulid().lower()}",
            "provider_id": row.provider_id,
            "period_start": start,
            "period_end": end,
            "currency": currency,
            "requests": int(row.requests),
            "input_tokens": int(row.input_tokens),
            "output_tokens": int(row.output_tokens),
            "earnings_micros": int(row.micros),
            "earnings_minor": micros_to_minor(int(row.micros)),
        }
        for row in earnings
        if row.provider_id in known
    ]
    unknown = sorted(set(owed) - known)
    if not rows:
        return [], unknown
    inserted = await session.execute(
        insert(ProviderStatement)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["provider_id", "period_start", "currency"])
        .returning(ProviderStatement.id)
    )
    return list(inserted.scalars()), unknown


async def pending_statements(session: AsyncSession, period: str, currency: str) -> list[tuple[ProviderStatement, str]]:
    """Statements of the period not yet paid, with the provider's Stripe Connect account."""
    start, _ = month(period)
    rows = await session.execute(
        select(ProviderStatement, Provider.payout_account)
        .join(Provider, Provider.id == ProviderStatement.provider_id)
        .where(
            ProviderStatement.period_start == start,
            ProviderStatement.currency == currency,
            ProviderStatement.status == "pending",
            ProviderStatement.earnings_minor > 0,
            Provider.payout_account.is_not(None),
        )
        .order_by(ProviderStatement.id)
    )
    return [(statement, account) for statement, account in rows.tuples() if account]


async def count_invoices(session: AsyncSession, period: str, currency: str) -> int:
    start, _ = month(period)
    return int(
        (
            await session.execute(
                select(func.count())
                .select_from(Invoice)
                .where(Invoice.period_start == start, Invoice.currency == currency)
            )
        ).scalar_one()
    )

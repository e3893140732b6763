"""Invoices, provider statements, reservation charges and reconcile, as a tenant, a provider and
an operator would check them."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing.invoices import PeriodError, run_invoices
from billing.reconcile import reconcile
from market.models import Invoice, InvoiceLine, ProviderStatement
from market.models.billing import grant_credit
from market.money import MICROS_PER_MINOR
from market.settings import Settings
from tests.billing.conftest import (
    fetch,
    fetchval,
    make_prices,
    make_provider,
    make_reservation,
    make_tenant,
    post_hours,
    store,
    usage_event,
)


async def test_invoice_lines_by_model_and_class_with_prepaid_credit_drawn_first(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions, incubator=True)
    provider = await make_provider(sessions)
    await make_prices(sessions)  # on_demand 30/60, burst 45/90, reserved 15/30 per 1M; payout 20/40
    events = [
        *(usage_event(tenant, provider_id=provider, prompt=333_333, completion=111_111) for _ in range(3)),
        usage_event(tenant, provider_id=provider, prompt=1_000_000, completion=0, relayed=0, admission_class="burst"),
        # outside October: not on this invoice
        usage_event(tenant, provider_id=provider, at=datetime(2026, 11, 2, tzinfo=UTC).timestamp()),
    ]
    await store(settings, events)
    async with sessions.begin() as session:
        await grant_credit(
            session,
            transaction_id="credit:test-grant",
            tenant_id=tenant,
            amount_minor=50,
            kind="credit_grant",
            currency="usd",
            incubator_id=(await _incubator_of(sessions, tenant)),
            occurred_at=datetime.now(UTC),
        )

    async with sessions() as session:
        result = await run_invoices(session, "2026-10", "usd")
    assert len(result.invoices) == 1
    async with sessions() as session:
        invoice = (await session.execute(select(Invoice))).scalar_one()
        lines = list((await session.execute(select(InvoiceLine).order_by(InvoiceLine.id))).scalars())

    # on_demand: 3 x (333,333 x 30 + 111,111 x 60) micros = 49,999,950 micros = 50 cents (half up)
    # burst: 1,000,000 x 45 = 45,000,000 micros = 45 cents
    assert [(line.kind, line.admission_class, line.amount_minor) for line in lines] == [
        ("usage", "burst", 45),
        ("usage", "on_demand", 50),
        ("credit", None, -50),
    ]
    assert lines[1].requests == 3
    assert (lines[1].input_tokens, lines[1].output_tokens) == (999_999, 333_333)
    assert (invoice.period_start.isoformat(), invoice.period_end.isoformat()) == ("2026-10-01", "2026-11-01")
    assert (invoice.subtotal_minor, invoice.credit_applied_minor, invoice.total_minor) == (95, 50, 45)
    assert invoice.status == "open"

    # After the invoice the tenant owes exactly the invoice total (rounding posted), plus November.
    november = 1000 * 30 + 500 * 60
    assert await _balance(settings, f"tenant:{tenant}") == 45 * 1_000_000 + november
    assert await _balance(settings, f"credit:{tenant}") == 0

    rerun = await _run(sessions, "2026-10")
    assert (rerun.invoices, rerun.skipped_tenants) == ([], 1)
    assert await fetchval(settings, "SELECT count(*) FROM invoices") == 1

    report = await _reconcile(sessions)
    assert report.ok, report.render()


async def test_provider_statement_pays_for_tokens_served(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)
    first, second = await make_provider(sessions), await make_provider(sessions)
    await make_prices(sessions)
    await make_prices(
        sessions, model="other", payout=None, margin_bps=2500, effective_from=datetime(2026, 2, 1, tzinfo=UTC)
    )
    await store(
        settings,
        [
            usage_event(tenant, provider_id=first, model="other", prompt=1_000_000, completion=0, relayed=0),
            usage_event(tenant, provider_id=second, model="other", prompt=0, completion=1_000_000),
            usage_event(tenant, provider_id="prov_nobody_knows", model="other", prompt=1_000_000, completion=0),
        ],
    )
    result = await _run(sessions, "2026-10")
    assert result.unknown_providers == ["prov_nobody_knows"]  # owed, but no statement can be made: reported
    async with sessions() as session:
        statements = {s.provider_id: s for s in (await session.execute(select(ProviderStatement))).scalars()}
    # no payout rate for "other": providers earn the tenant charge minus the 25% margin
    assert statements[first].earnings_minor == 23  # 30 x 0.75 = 22.5 cents, half up
    assert statements[second].earnings_minor == 45  # 60 x 0.75
    assert statements[first].status == "pending"
    report = await _reconcile(sessions)
    assert [(f.check, f.rows) for f in report.findings] == [
        ("usage_of_unknown_providers", [{"provider_id": "prov_nobody_knows", "requests": 1}])
    ]


async def test_a_refused_requests_work_is_paid_to_its_provider_and_charged_to_nobody(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """A request refused by the admission that ran beside its placement, after its node began on
    it: the provider is paid for the prefill it did, the platform bears it, and the tenant neither
    pays nor sees it (not on its invoice)."""
    tenant = await make_tenant(sessions)
    provider = await make_provider(sessions)
    await make_prices(sessions)  # on_demand 30/60 per 1M; payout 20/40
    served = usage_event(tenant, provider_id=provider, prompt=1_000_000, completion=0, relayed=0)
    refused = msgspec.structs.replace(
        usage_event(tenant, provider_id=provider, prompt=1_000_000, completion=3, relayed=3), outcome="refused"
    )
    await store(settings, [served, refused])
    [row] = await fetch(
        settings,
        "SELECT tenant_micros, provider_micros, platform_micros FROM usage_records WHERE request_id = $1",
        refused.request_id,
    )
    assert (row["tenant_micros"], row["provider_micros"], row["platform_micros"]) == (0, 20_000_120, -20_000_120)
    assert await _balance(settings, f"tenant:{tenant}") == 30_000_000  # the served request alone
    assert await _balance(settings, f"provider:{provider}") == -(20_000_000 + 20_000_120)

    result = await _run(sessions, "2026-10")
    assert len(result.invoices) == 1
    async with sessions() as session:
        [line] = (await session.execute(select(InvoiceLine))).scalars()
        [statement] = (await session.execute(select(ProviderStatement))).scalars()
    assert (line.requests, line.input_tokens, line.amount_minor) == (1, 1_000_000, 30)
    assert statement.earnings_minor == 40  # 20 + 20.00012 cents
    report = await _reconcile(sessions)
    assert report.ok, report.render()


async def test_reservation_hours_are_charged_once_and_invoiced(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)
    await make_prices(sessions, reservation_hour_minor=150)
    day = datetime(2026, 10, 5, tzinfo=UTC)
    # 2 slots from 13:27 to 14:30: two started hours; and one for a model the price book leaves out
    held = [(day + timedelta(hours=13, minutes=27), 2), (day + timedelta(hours=14, minutes=30), 0)]
    await make_reservation(sessions, tenant, held)
    unpriced = await make_reservation(sessions, tenant, [(day + timedelta(hours=13), 1)], model="unpriced")
    for _ in range(3):  # the worker looks again and again, as it does every half minute
        await post_hours(settings, day, day + timedelta(days=1))
    assert await fetchval(settings, "SELECT count(*) FROM ledger_transactions WHERE kind = 'reservation'") == 2
    unpriced_hours = "SELECT count(*) FROM ledger_transactions WHERE id LIKE 'resv:' || $1 || ':%'"
    assert await fetchval(settings, unpriced_hours, unpriced) == 0  # left for when it has a price
    await _run(sessions, "2026-10")
    async with sessions() as session:
        invoice = (await session.execute(select(Invoice))).scalar_one()
        line = (await session.execute(select(InvoiceLine))).scalar_one()
    assert (line.kind, line.amount_minor) == ("reservation", 600)  # 2 hours x 2 slots x 150
    assert invoice.total_minor == 600


async def test_an_elastic_reservation_is_charged_each_hour_for_the_most_slots_it_held(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)
    await make_prices(sessions, reservation_hour_minor=100)
    day = datetime(2026, 10, 7, tzinfo=UTC)
    # created with 2 slots at 10:30, grown to 5 at 11:15, shrunk to 1 at 12:40, ended at 13:10
    at = [day + timedelta(hours=10, minutes=30), day + timedelta(hours=11, minutes=15)]
    at += [day + timedelta(hours=12, minutes=40), day + timedelta(hours=13, minutes=10)]
    await make_reservation(sessions, tenant, list(zip(at, (2, 5, 1, 0), strict=True)))

    assert await post_hours(settings, day, day + timedelta(hours=12, minutes=59)) == 2  # 10:00, 11:00 ended
    assert await post_hours(settings, day, day + timedelta(days=1)) == 2  # 12:00 and 13:00; none after the end
    assert await post_hours(settings, day, day + timedelta(days=1)) == 0  # once, however often the worker looks
    memos = await fetch(settings, "SELECT memo FROM ledger_transactions WHERE kind = 'reservation' ORDER BY id")
    assert [m["memo"].split(": ")[1] for m in memos] == [
        "2 slot(s) for the hour from 2026-10-07 10:00 UTC",  # a started hour is charged
        "5 slot(s) for the hour from 2026-10-07 11:00 UTC",  # grown mid-hour: the larger size
        "5 slot(s) for the hour from 2026-10-07 12:00 UTC",  # shrunk mid-hour: still the larger
        "1 slot(s) for the hour from 2026-10-07 13:00 UTC",
    ]
    assert await _balance(settings, f"tenant:{tenant}") == 13 * 100 * MICROS_PER_MINOR
    await _run(sessions, "2026-10")
    async with sessions() as session:
        line = (await session.execute(select(InvoiceLine))).scalar_one()
    assert (line.kind, line.amount_minor) == ("reservation", 1300)
    report = await _reconcile(sessions)
    assert report.ok, report.render()


async def test_an_invoice_run_charges_the_reservation_hours_the_worker_has_not(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)
    await make_prices(sessions, reservation_hour_minor=40)
    await make_reservation(sessions, tenant, [(datetime(2026, 10, 31, 21, 5, tzinfo=UTC), 3)])
    await _run(sessions, "2026-10")  # 21:00, 22:00 and 23:00 of October's last day, still running
    async with sessions() as session:
        line = (await session.execute(select(InvoiceLine))).scalar_one()
    assert (line.kind, line.amount_minor) == ("reservation", 3 * 3 * 40)


async def test_reconcile_finds_planted_mismatches_and_exits_non_zero(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)
    provider = await make_provider(sessions)
    await make_prices(sessions)
    honest = [usage_event(tenant, provider_id=provider) for _ in range(5)]
    await store(settings, honest)
    assert _reconcile_cli(settings).returncode == 0

    # a node that claims more tokens than the api relayed
    inflated = usage_event(tenant, provider_id=provider, completion=900, relayed=700)
    await store(settings, [inflated, usage_event("ten_nobody_knows", provider_id=provider)])
    # and someone edits a ledger entry behind our back
    await fetch(
        settings,
        "UPDATE ledger_entries SET amount_micros = amount_micros + 1 WHERE transaction_id = $1 AND account_id = $2",
        honest[0].request_id,
        f"tenant:{tenant}",
    )

    report = await _reconcile(sessions)
    found = {f.check: f for f in report.findings}
    assert found["token_count_mismatches"].rows[0]["request_id"] == inflated.request_id
    assert found["token_count_mismatches"].rows[0]["billed_completion_tokens"] == 700  # billed what was relayed
    assert found["unbalanced_transactions"].rows == [{"transaction_id": honest[0].request_id, "off_by_micros": 1}]
    assert found["ledger_differs_from_rating"].count == 1
    assert found["usage_of_unknown_tenants"].rows == [{"tenant_id": "ten_nobody_knows", "requests": 1}]

    cli = _reconcile_cli(settings)
    assert cli.returncode == 1
    assert inflated.request_id in cli.stdout
    assert "DIFFERENCE token_count_mismatches: 1" in cli.stdout


def _reconcile_cli(settings: Settings) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MARKET_DATABASE_URL=settings.require_database_url(), MARKET_LOG_LEVEL="WARNING")
    return subprocess.run(
        [sys.executable, "-m", "market.cli", "billing", "reconcile"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _run(sessions: async_sessionmaker[AsyncSession], period: str):  # type: ignore[no-untyped-def]
    async with sessions() as session:
        return await run_invoices(session, period, "usd")


async def _reconcile(sessions: async_sessionmaker[AsyncSession]):  # type: ignore[no-untyped-def]
    async with sessions() as session:
        return await reconcile(session)


async def _balance(settings: Settings, account: str) -> int:
    return int(
        await fetchval(
            settings, "SELECT coalesce(sum(amount_micros), 0) FROM ledger_entries WHERE account_id = $1", account
        )
    )


async def _incubator_of(sessions: async_sessionmaker[AsyncSession], tenant_id: str) -> str | None:
    from market.models import Tenant

    async with sessions() as session:
        return (await session.get(Tenant, tenant_id)).incubator_id  # type: ignore[union-attr]


async def test_invoice_command_rates_late_priced_usage_then_invoices(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)
    await store(settings, [usage_event(tenant, model="late-model", prompt=1_000_000, completion=0, relayed=0)])
    await make_prices(sessions, model="late-model", input_price=70)
    env = dict(os.environ, MARKET_DATABASE_URL=settings.require_database_url(), MARKET_LOG_LEVEL="WARNING")
    run = subprocess.run(
        [sys.executable, "-m", "billing", "invoice", "--period", "2026-10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "1 invoice(s) issued" in run.stdout
    assert "1 late-priced request(s) rated" in run.stdout
    async with sessions() as session:
        invoice = (await session.execute(select(Invoice))).scalar_one()
    assert invoice.total_minor == 70
    bad = subprocess.run(
        [sys.executable, "-m", "billing", "invoice", "--period", "October"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert "period must be YYYY-MM" in bad.stderr


async def test_a_period_is_invoiced_only_after_it_has_ended(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Invoices and statements are made once per period: usage recorded after an early run would
    never be billed, so the current month (and the hour after it) is refused."""
    now = datetime.now(UTC)
    with pytest.raises(PeriodError, match="has not ended"):
        await _run(sessions, f"{now.year}-{now.month:02d}")
    async with sessions() as session:
        assert (await session.execute(select(Invoice))).first() is None

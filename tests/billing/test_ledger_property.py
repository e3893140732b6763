"""Whatever happens, in whatever order, the books balance: a property test over random sequences of
usage (duplicated, unpriced, from unknown providers), credit, reservation hours and invoice runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing.invoices import run_invoices
from billing.reconcile import reconcile
from market.models.billing import grant_credit
from market.settings import Settings
from tests.billing.conftest import (
    MODEL,
    OCTOBER,
    fetch,
    make_prices,
    make_provider,
    make_reservation,
    make_tenant,
    post_hours,
    store,
    usage_event,
)
from tests.conftest import truncate_all

usage_ops = st.tuples(
    st.just("usage"),
    st.integers(0, 2),  # tenant
    st.sampled_from([0, 1, None]),  # provider
    st.integers(0, 3_000_000),  # prompt tokens
    st.integers(0, 500_000),  # engine completion tokens
    st.integers(0, 500_000),  # relayed completion tokens
    st.sampled_from(["on_demand", "burst", "reserved"]),
    st.sampled_from([MODEL, MODEL, "unpriced-model"]),
    st.integers(1, 3),  # times the event arrives
    st.sampled_from(["completed", "completed", "cancelled", "refused"]),
)
credit_ops = st.tuples(
    st.just("credit"), st.integers(0, 2), st.integers(1, 5000), st.sampled_from(["credit_grant", "top_up"])
)
reservation_ops = st.tuples(st.just("reservation"), st.integers(0, 2), st.integers(1, 4), st.integers(0, 5))
invoice_ops = st.tuples(st.just("invoice"))
operations = st.lists(st.one_of(usage_ops, usage_ops, credit_ops, reservation_ops, invoice_ops), max_size=25)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
async def test_ledger_balances_after_any_sequence(
    ops: list[tuple[Any, ...]], settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    await truncate_all(settings.require_database_url())
    tenants = [await make_tenant(sessions, incubator=i == 0) for i in range(3)]
    providers = [await make_provider(sessions) for _ in range(2)]
    await make_prices(sessions)
    seen: set[str] = set()
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "usage":
            _, t, p, prompt, completion, relayed, klass, model, copies, outcome = op
            event = usage_event(
                tenants[t],
                provider_id=None if p is None else providers[p],
                prompt=prompt,
                completion=completion,
                relayed=relayed,
                admission_class=klass,
                model=model,
                at=OCTOBER + 3600 * n,
            )
            event = msgspec.structs.replace(event, outcome=outcome)
            seen.add(event.request_id)
            for _ in range(copies):
                await store(settings, [event])
        elif kind == "credit":
            _, t, amount, credit_kind = op
            async with sessions.begin() as session:
                await grant_credit(
                    session,
                    transaction_id=f"credit:{n}",
                    tenant_id=tenants[t],
                    amount_minor=amount,
                    kind=credit_kind,
                    currency="usd",
                    incubator_id=None,
                    occurred_at=datetime.now(UTC),
                )
        elif kind == "reservation":
            _, t, slots, hour = op
            start = datetime(2026, 10, 10, tzinfo=UTC) + timedelta(hours=hour)
            await make_reservation(sessions, tenants[t], [(start, slots), (start + timedelta(minutes=59), 0)])
            await post_hours(settings, start, start + timedelta(days=1))
        else:
            async with sessions() as session:
                await run_invoices(session, "2026-10", "usd")

    unbalanced = await fetch(
        settings, "SELECT transaction_id FROM ledger_entries GROUP BY 1 HAVING sum(amount_micros) <> 0"
    )
    assert unbalanced == []
    counts = (await fetch(settings, "SELECT count(*), count(tenant_micros) FROM usage_records"))[0]
    assert counts[0] == len(seen)  # every request recorded once, however often it arrived
    invoices = await fetch(settings, "SELECT subtotal_minor, credit_applied_minor, total_minor FROM invoices")
    assert all(total >= 0 and applied >= 0 for _, applied, total in invoices)

    async with sessions() as session:
        report = await reconcile(session)
    tolerated = {"token_count_mismatches", "unrated_usage", "invoice_differs_from_usage"}
    assert {f.check for f in report.findings} <= tolerated, report.render()
    # usage that landed after its month was invoiced is the only way an invoice can miss usage
    late = {f.check for f in report.findings} & {"invoice_differs_from_usage"}
    if late:
        assert any(op[0] == "invoice" for op in ops)
    assert report.totals["ledger_sum_micros"] == 0
    assert report.totals["rated_tenant_micros"] == report.totals["ledger_usage_tenant_micros"]

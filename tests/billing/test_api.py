"""Billing over HTTP, as tenants, providers and the platform use it (real api over real HTTP)."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing.invoices import run_invoices
from market.embedded import free_port
from market.models import Invoice, Tenant
from market.settings import Settings, StripeSettings
from tests.billing.conftest import fetchval, make_key, make_prices, make_provider, make_tenant, store, usage_event
from tests.conftest import RunningApi

WEBHOOK_SECRET = "whsec_test_billing"
OCT = {"from": "2026-10-01", "to": "2026-11-01"}


@pytest.fixture
async def billing_api(settings: Settings) -> AsyncIterator[RunningApi]:
    """The full api, with a Stripe webhook secret configured."""
    from api.main import build_app

    configured = replace(settings, stripe=StripeSettings(webhook_secret=WEBHOOK_SECRET))
    running = await RunningApi(build_app(configured), free_port()).start()
    yield running
    await running.stop()


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def test_a_tenant_sees_only_its_own_usage_and_invoices(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], billing_api: RunningApi
) -> None:
    alice, bob = await make_tenant(sessions), await make_tenant(sessions)
    provider = await make_provider(sessions)
    await make_prices(sessions)
    alice_key, bob_key = (
        await make_key(sessions, "tenant", tenant_id=alice),
        await make_key(sessions, "tenant", tenant_id=bob),
    )
    day1 = datetime(2026, 10, 3, 12, tzinfo=UTC).timestamp()
    day2 = datetime(2026, 10, 4, 12, tzinfo=UTC).timestamp()
    await store(
        settings,
        [
            usage_event(alice, provider_id=provider, at=day1, key_id="key_a1", prompt=1000, completion=100),
            usage_event(alice, provider_id=provider, at=day1, key_id="key_a1", prompt=3000, completion=300),
            usage_event(alice, provider_id=provider, at=day2, key_id="key_a2", admission_class="burst"),
            usage_event(bob, provider_id=provider, at=day1, key_id="key_b", prompt=99_999),
            # work on a request refused beside its placement: the provider's pay, not alice's usage
            msgspec.structs.replace(
                usage_event(alice, provider_id=provider, at=day1, key_id="key_a1", prompt=777), outcome="refused"
            ),
        ],
    )
    async with sessions() as session:
        await run_invoices(session, "2026-10", "usd")
        bob_invoice = (await session.execute(select(Invoice.id).where(Invoice.tenant_id == bob))).scalar_one()

    async with httpx.AsyncClient(base_url=billing_api.url, headers=bearer(alice_key)) as client:
        usage = (await client.get("/api/tenant/usage", params=OCT)).json()
        assert usage["tenant_id"] == alice
        assert [(r["day"], r["key_id"], r["admission_class"], r["requests"]) for r in usage["rows"]] == [
            ("2026-10-03", "key_a1", "on_demand", 2),
            ("2026-10-04", "key_a2", "burst", 1),
        ]
        assert usage["rows"][0]["input_tokens"] == 4000
        assert usage["rows"][0]["cost_micros"] == 4000 * 30 + 400 * 60
        assert usage["total_cost_micros"] == 4000 * 30 + 400 * 60 + 1000 * 45 + 500 * 90

        exported = await client.get("/api/tenant/usage", params={**OCT, "format": "csv"})
        assert exported.status_code == 200
        assert exported.headers["content-type"].startswith("text/csv")
        assert "attachment" in exported.headers["content-disposition"]
        table = list(csv.DictReader(io.StringIO(exported.text)))
        assert [(r["day"], r["model"], r["key_id"], r["requests"]) for r in table] == [
            ("2026-10-03", "llama-3-8b", "key_a1", "2"),
            ("2026-10-04", "llama-3-8b", "key_a2", "1"),
        ]

        invoices = (await client.get("/api/tenant/invoices")).json()
        assert [i["tenant_id"] for i in invoices] == [alice]
        assert {line["admission_class"] for line in invoices[0]["lines"]} == {"on_demand", "burst"}
        assert invoices[0]["total_minor"] == sum(line["amount_minor"] for line in invoices[0]["lines"])
        stolen = await client.get(f"/api/tenant/invoices/{bob_invoice}")
        assert stolen.status_code == 404
        assert stolen.headers["content-type"].startswith("application/problem+json")

        bad_range = await client.get("/api/tenant/usage", params={"from": "2026-10-05", "to": "2026-10-01"})
        assert bad_range.status_code == 400
        assert bad_range.json()["status"] == 400

    async with httpx.AsyncClient(base_url=billing_api.url, headers=bearer(bob_key)) as client:
        rows = (await client.get("/api/tenant/usage", params=OCT)).json()["rows"]
        assert [(r["key_id"], r["input_tokens"]) for r in rows] == [("key_b", 99_999)]
        assert (await client.get("/api/admin/revenue")).status_code == 403


async def test_credit_grants_and_balance(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], billing_api: RunningApi
) -> None:
    tenant = await make_tenant(sessions, incubator=True)
    other = await make_tenant(sessions, incubator=True)
    async with sessions() as session:
        incubator = (await session.get(Tenant, tenant)).incubator_id  # type: ignore[union-attr]
    await make_prices(sessions, effective_from=datetime.now(UTC) - timedelta(days=1))
    admin = await make_key(sessions, "platform_admin")
    incubator_admin = await make_key(sessions, "incubator_admin", incubator_id=incubator)
    tenant_key = await make_key(sessions, "tenant", tenant_id=tenant)
    await store(settings, [usage_event(tenant, prompt=1_000_000, completion=0, relayed=0, at=time.time() - 60)])

    async with httpx.AsyncClient(base_url=billing_api.url) as client:
        credit = f"/api/admin/tenants/{tenant}/credits"
        no_pool = await client.post(credit, json={"amount_minor": 500}, headers=bearer(incubator_admin))
        assert (no_pool.status_code, no_pool.json()["code"]) == (409, "no_pool")
        pool = await client.put(
            f"/api/admin/incubators/{incubator}/pool", json={"tokens": 0, "credits": 600}, headers=bearer(admin)
        )
        assert pool.status_code == 200, pool.text
        granted = await client.post(
            credit, json={"amount_minor": 500, "idempotency_key": "welcome"}, headers=bearer(incubator_admin)
        )
        assert granted.status_code == 201, granted.text
        assert granted.json()["created"] is True
        repeat = await client.post(
            credit, json={"amount_minor": 500, "idempotency_key": "welcome"}, headers=bearer(incubator_admin)
        )
        assert repeat.json()["created"] is False
        assert repeat.json()["prepaid_credit_minor"] == 500
        # A replay draws nothing more from the pool: 100 of its 600 are left, not 101.
        over_pool = await client.post(credit, json={"amount_minor": 101}, headers=bearer(incubator_admin))
        assert (over_pool.status_code, over_pool.json()["code"]) == (409, "pool_exhausted")
        assert "100 credits left" in over_pool.json()["detail"]
        other_amount = await client.post(
            credit, json={"amount_minor": 900, "idempotency_key": "welcome"}, headers=bearer(incubator_admin)
        )
        assert (other_amount.status_code, other_amount.json()["code"]) == (409, "idempotency_key_reused")
        as_text = await client.post(credit, json={"amount_minor": "100"}, headers=bearer(incubator_admin))
        assert (as_text.status_code, as_text.json()["code"]) == (400, "invalid_request")
        assert "amount_minor" in as_text.json()["detail"]
        topped = await client.post(
            f"/api/admin/tenants/{tenant}/credits",
            json={"amount_minor": 250, "kind": "top_up"},
            headers=bearer(admin),
        )
        assert topped.json()["prepaid_credit_minor"] == 750

        not_theirs = await client.post(
            f"/api/admin/tenants/{other}/credits", json={"amount_minor": 1}, headers=bearer(incubator_admin)
        )
        assert not_theirs.status_code == 404
        no_top_up = await client.post(
            f"/api/admin/tenants/{tenant}/credits",
            json={"amount_minor": 1, "kind": "top_up"},
            headers=bearer(incubator_admin),
        )
        assert no_top_up.status_code == 403
        negative = await client.post(
            f"/api/admin/tenants/{tenant}/credits", json={"amount_minor": -5}, headers=bearer(admin)
        )
        assert negative.status_code == 400
        assert negative.headers["content-type"].startswith("application/problem+json")
        forbidden = await client.post(
            f"/api/admin/tenants/{tenant}/credits", json={"amount_minor": 5}, headers=bearer(tenant_key)
        )
        assert forbidden.status_code == 403

        balance = (await client.get("/api/tenant/balance", headers=bearer(tenant_key))).json()
    assert balance == {
        "tenant_id": tenant,
        "currency": "usd",
        "prepaid_credit_minor": 750,
        "unbilled_usage_micros": 30_000_000,  # 1M input tokens at 30 cents per 1M
        "available_credit_minor": 720,
        "outstanding_minor": 0,
    }
    # the grant came out of the incubator's pool
    assert (
        await fetchval(
            settings, "SELECT sum(amount_micros) FROM ledger_entries WHERE account_id = $1", f"grant_pool:{incubator}"
        )
        == 500 * 1_000_000
    )


async def test_admin_price_book_versions(sessions: async_sessionmaker[AsyncSession], billing_api: RunningApi) -> None:
    admin = await make_key(sessions, "platform_admin")
    tenant_key = await make_key(sessions, "tenant", tenant_id=await make_tenant(sessions))
    body = {
        "prices": [
            {
                "model": "m",
                "admission_class": "on_demand",
                "input_minor_per_million": 20,
                "output_minor_per_million": 80,
            },
            {
                "model": "m",
                "admission_class": "reserved",
                "input_minor_per_million": 0,
                "output_minor_per_million": 0,
                "reservation_hour_minor": 90,
            },
        ],
        "payouts": [{"model": "m", "input_minor_per_million": 10, "output_minor_per_million": 50}],
        "platform_margin_bps": 1500,
    }
    async with httpx.AsyncClient(base_url=billing_api.url, headers=bearer(admin)) as client:
        first = await client.post("/api/admin/prices", json=body)
        assert first.status_code == 201, first.text
        later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
        second = await client.post("/api/admin/prices", json={**body, "effective_from": later, "note": "december"})
        assert second.status_code == 201
        assert second.json()["version"] > first.json()["version"]
        listed = (await client.get("/api/admin/prices")).json()
        assert [b["note"] for b in listed] == ["december", ""]
        assert listed[1]["payouts"] == [
            {"model": "m", "input_minor_per_million": 10, "output_minor_per_million": 50, "provider_id": None}
        ]

        past = await client.post("/api/admin/prices", json={**body, "effective_from": "2020-01-01T00:00:00Z"})
        assert past.status_code == 400
        assert "past" in past.json()["detail"]
        same_instant = await client.post("/api/admin/prices", json={**body, "effective_from": later})
        assert same_instant.status_code == 409
        twice = await client.post("/api/admin/prices", json={"prices": body["prices"] * 2})
        assert twice.status_code == 400
        negative = await client.post(
            "/api/admin/prices",
            json={"prices": [{**body["prices"][0], "input_minor_per_million": -1}]},
        )
        assert negative.status_code == 400
        assert (await client.get("/api/admin/prices", headers=bearer(tenant_key))).status_code == 403


async def test_provider_earnings_and_platform_revenue(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], billing_api: RunningApi
) -> None:
    tenant = await make_tenant(sessions)
    provider, rival = await make_provider(sessions), await make_provider(sessions)
    await make_prices(sessions)  # payout 20/40 per 1M
    admin = await make_key(sessions, "platform_admin")
    provider_key = await make_key(sessions, "provider", provider_id=provider)
    at = datetime(2026, 10, 9, tzinfo=UTC).timestamp()
    await store(
        settings,
        [
            usage_event(tenant, provider_id=provider, prompt=1_000_000, completion=1_000_000, at=at),
            usage_event(tenant, provider_id=rival, prompt=5, completion=5, at=at),
        ],
    )
    async with httpx.AsyncClient(base_url=billing_api.url) as client:
        earnings = (await client.get("/api/provider/earnings", params=OCT, headers=bearer(provider_key))).json()
        revenue = (await client.get("/api/admin/revenue", params=OCT, headers=bearer(admin))).json()
        assert (await client.get("/api/provider/earnings", headers=bearer(admin))).status_code == 403
    assert earnings["rows"] == [
        {
            "day": "2026-10-09",
            "model": "llama-3-8b",
            "requests": 1,
            "input_tokens": 1_000_000,
            "output_tokens": 1_000_000,
            "earnings_micros": 60_000_000,
        }
    ]
    assert earnings["unpaid_balance_micros"] == 60_000_000
    row = revenue["rows"][0]
    assert row["requests"] == 2
    assert row["tenant_charges_micros"] == row["provider_payouts_micros"] + row["platform_revenue_micros"]
    assert revenue["usage_revenue_micros"] == 90_000_000 + 5 * 90 - 60_000_000 - 5 * 60


async def test_latency_reports_for_tenants_and_providers(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], billing_api: RunningApi
) -> None:
    """A tenant sees its requests' TTFT (and the marketplace's part of it) and durations by day and
    model; a provider its nodes' engine TTFT; neither sees anyone else's."""
    tenant, other = await make_tenant(sessions), await make_tenant(sessions)
    provider, rival = await make_provider(sessions), await make_provider(sessions)
    tenant_key = await make_key(sessions, "tenant", tenant_id=tenant)
    provider_key = await make_key(sessions, "provider", provider_id=provider)
    at = datetime(2026, 10, 9, 12, tzinfo=UTC).timestamp()
    events = [
        msgspec.structs.replace(
            usage_event(tenant, provider_id=provider, at=at),
            node_id="node_a" if ttft <= 500 else "node_b",
            ttft_ms=float(ttft),
            engine_ttft_ms=ttft - 4.0,
            duration_ms=ttft + 1000.0,
        )
        for ttft in range(100, 1001, 100)
    ]
    failed = msgspec.structs.replace(
        usage_event(tenant, provider_id=provider, at=at, completion=0),
        node_id="node_a",
        outcome="failed",
        ttft_ms=None,
        engine_ttft_ms=None,
        duration_ms=50.0,
    )
    elsewhere = [
        msgspec.structs.replace(usage_event(other, provider_id=provider, at=at), node_id="node_a", ttft_ms=9999.0),
        msgspec.structs.replace(usage_event(tenant, provider_id=rival, at=at), node_id="node_r"),
        # work on a refused request (cut short by its cancel): in neither report
        msgspec.structs.replace(
            usage_event(tenant, provider_id=provider, at=at),
            node_id="node_a",
            outcome="refused",
            ttft_ms=9999.0,
            engine_ttft_ms=9998.0,
            duration_ms=99999.0,
        ),
    ]
    await store(settings, [*events, failed, *elsewhere])
    async with httpx.AsyncClient(base_url=billing_api.url) as client:
        seen = (await client.get("/api/tenant/latency", params=OCT, headers=bearer(tenant_key))).json()
        nodes = (await client.get("/api/provider/latency", params=OCT, headers=bearer(provider_key))).json()
        assert (await client.get("/api/provider/latency", headers=bearer(tenant_key))).status_code == 403
        backwards = {"from": "2026-10-05", "to": "2026-10-01"}
        bad = await client.get("/api/tenant/latency", params=backwards, headers=bearer(tenant_key))
        assert bad.status_code == 400
    [row] = seen["rows"]
    assert (row["day"], row["model"], row["requests"], row["failed"]) == ("2026-10-09", "llama-3-8b", 12, 1)
    # The rival's request is the tenant's too (120 ms, as the helper makes it); the failed one has no TTFT.
    assert (row["ttft_p50_ms"], row["ttft_p90_ms"]) == (500.0, 900.0)
    assert row["marketplace_ttft_p50_ms"] == 4.0
    assert row["duration_p99_ms"] is not None
    assert [(r["node_id"], r["requests"], r["failed"]) for r in nodes["rows"]] == [
        ("node_a", 7, 1),  # five of the tenant's, its failure, and the other tenant's
        ("node_b", 5, 0),
    ]
    node_b = nodes["rows"][1]
    assert (node_b["engine_ttft_p50_ms"], node_b["engine_ttft_p99_ms"]) == (796.0, 992.0)
    assert nodes["provider_id"] == provider


def _signed(payload: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    stamp = int(time.time())
    signature = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"stripe-signature": f"t={stamp},v1={signature}", "content-type": "application/json"}


async def test_stripe_webhook_verifies_signatures_and_marks_invoices_paid(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], billing_api: RunningApi
) -> None:
    tenant = await make_tenant(sessions)
    await make_prices(sessions)
    await store(settings, [usage_event(tenant, prompt=10_000_000, completion=0, relayed=0)])
    async with sessions() as session:
        await run_invoices(session, "2026-10", "usd")
    async with sessions.begin() as session:
        invoice = (await session.execute(select(Invoice))).scalar_one()
        invoice.stripe_invoice_id = "in_test_123"
    event = {
        "id": "evt_test_1",
        "object": "event",
        "type": "invoice.payment_succeeded",
        "data": {"object": {"id": "in_test_123", "object": "invoice", "status": "paid", "amount_paid": 300}},
    }
    payload = json.dumps(event).encode()
    async with httpx.AsyncClient(base_url=billing_api.url) as client:
        forged = await client.post("/api/stripe/webhook", content=payload, headers=_signed(payload, "whsec_wrong"))
        assert forged.status_code == 400
        assert forged.json()["code"] == "invalid_signature"
        unsigned = await client.post("/api/stripe/webhook", content=payload)
        assert unsigned.status_code == 400
        tampered = await client.post(
            "/api/stripe/webhook", content=payload.replace(b"300", b"1"), headers=_signed(payload)
        )
        assert tampered.status_code == 400
        async with sessions() as session:
            assert (await session.get(Invoice, invoice.id)).status == "open"  # type: ignore[union-attr]

        accepted = await client.post("/api/stripe/webhook", content=payload, headers=_signed(payload))
        assert accepted.status_code == 200, accepted.text
        again = await client.post("/api/stripe/webhook", content=payload, headers=_signed(payload))
        assert again.json() == {"received": True, "duplicate": True}

    async with sessions() as session:
        paid = await session.get(Invoice, invoice.id)
    assert paid is not None
    assert (paid.status, paid.total_minor) == ("paid", 300)
    assert paid.paid_at is not None
    owed = await fetchval(
        settings, "SELECT sum(amount_micros) FROM ledger_entries WHERE account_id = $1", f"tenant:{tenant}"
    )
    assert owed == 0  # the payment settled the tenant's account, once

"""Stripe sync against a real localstripe process: our invoices arrive as Stripe invoices with the
same amounts, and rerunning the sync (even after a crash that lost a Stripe id) creates nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import stripe
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing.invoices import run_invoices
from billing.stripe_sync import StripeSync, stripe_client
from market.embedded import free_port
from market.models import Invoice, InvoiceLine, StripeCustomer
from market.settings import Settings, StripeSettings
from tests.billing.conftest import make_prices, make_tenant, store, usage_event

pytestmark = [
    pytest.mark.stripe,
    # stripe's own HTTPX adapter posts form bodies with data=..., which httpx deprecates
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def localstripe() -> Iterator[str]:
    binary = shutil.which("localstripe") or str(Path(sys.executable).parent / "localstripe")
    port = free_port()
    # --from-scratch: localstripe otherwise loads /tmp/localstripe.pickle, the state any earlier
    # run left (so tests would not start clean), and fails to start when two runs wrote it at once.
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--from-scratch"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        import socket

        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("localstripe did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def stripe_settings(settings: Settings, localstripe: str) -> Settings:
    return replace(settings, stripe=StripeSettings(api_key="sk_test_localstripe", api_base=localstripe))


async def _stripe_counts(client: stripe.StripeClient, customer_ids: list[str]) -> dict[str, int]:
    invoices = 0
    items = 0
    for customer in customer_ids:
        listed = await client.v1.invoices.list_async({"customer": customer, "limit": 100})
        invoices += len(listed.data)
        for invoice in listed.data:
            items += len(invoice.lines.data)
    customers = await client.v1.customers.list_async({"limit": 100})
    return {"customers": len(customers.data), "invoices": invoices, "lines": items}


async def test_stripe_sync_pushes_invoices_and_a_rerun_creates_nothing(
    stripe_settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    alice, bob = await make_tenant(sessions), await make_tenant(sessions)
    await make_prices(sessions)
    await store(
        stripe_settings,
        [
            usage_event(alice, prompt=10_000_000, completion=1_000_000),  # 300 + 60 cents
            usage_event(alice, prompt=1_000_000, completion=0, relayed=0, admission_class="burst"),  # 45 cents
            usage_event(bob, prompt=2_000_000, completion=0, relayed=0),  # 60 cents
        ],
    )
    async with sessions() as session:
        await run_invoices(session, "2026-10", "usd")

    first = await StripeSync(stripe_settings, sessions).run()
    assert (first.customers, first.invoices, first.invoice_items) == (2, 2, 3)

    client = stripe_client(stripe_settings)
    async with sessions() as session:
        ours = {i.tenant_id: i for i in (await session.execute(select(Invoice))).scalars()}
        customers = {c.tenant_id: c.customer_id for c in (await session.execute(select(StripeCustomer))).scalars()}
        lines = list((await session.execute(select(InvoiceLine))).scalars())
    assert all(line.stripe_invoice_item_id for line in lines)
    pushed = await client.v1.invoices.retrieve_async(ours[alice].stripe_invoice_id or "")
    assert pushed.customer == customers[alice]
    assert pushed.total == ours[alice].total_minor == 405
    assert sorted(line.amount for line in pushed.lines.data) == [0, 45, 360]  # 0: the anchoring subscription
    assert (await client.v1.invoices.retrieve_async(ours[bob].stripe_invoice_id or "")).total == 60

    before = await _stripe_counts(client, list(customers.values()))
    second = await StripeSync(stripe_settings, sessions).run()
    assert (second.customers, second.invoices, second.invoice_items) == (0, 0, 0)
    assert await _stripe_counts(client, list(customers.values())) == before

    # A crash after Stripe made the invoice but before we stored its id: the rerun finds it.
    async with sessions.begin() as session:
        await session.execute(update(Invoice).where(Invoice.tenant_id == alice).values(stripe_invoice_id=None))
    third = await StripeSync(stripe_settings, sessions).run()
    assert third.invoices == 0
    async with sessions() as session:
        restored = (await session.execute(select(Invoice).where(Invoice.tenant_id == alice))).scalar_one()
    assert restored.stripe_invoice_id == ours[alice].stripe_invoice_id
    assert await _stripe_counts(client, list(customers.values())) == before


class _Crash(Exception):
    pass


async def test_a_sync_that_died_after_creating_an_invoice_item_does_not_charge_it_twice(
    stripe_settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Stripe made the item and the process died before storing its id: the rerun finds the item
    by our line id (localstripe ignores idempotency keys, as Stripe does after 24 hours)."""
    alice = await make_tenant(sessions)
    await make_prices(sessions)
    await store(stripe_settings, [usage_event(alice, prompt=10_000_000, completion=1_000_000)])
    async with sessions() as session:
        await run_invoices(session, "2026-10", "usd")
    crashing = StripeSync(stripe_settings, sessions)
    create = crashing.client.v1.invoice_items.create_async

    async def create_then_die(*args: object, **kwargs: object) -> None:
        await create(*args, **kwargs)  # type: ignore[arg-type]
        raise _Crash

    crashing.client.v1.invoice_items.create_async = create_then_die  # type: ignore[method-assign,assignment]
    with pytest.raises(_Crash):
        await crashing.run()
    await StripeSync(stripe_settings, sessions).run()
    async with sessions() as session:
        ours = (await session.execute(select(Invoice))).scalar_one()
    assert ours.stripe_invoice_id is not None
    pushed = await stripe_client(stripe_settings).v1.invoices.retrieve_async(ours.stripe_invoice_id)
    assert pushed.total == ours.total_minor > 0

"""Push our invoices to Stripe, idempotently, and pay providers out through Stripe Connect.

Our ledger is the source of truth; Stripe collects. Idempotency is enforced twice:
- every create carries an idempotency key derived from our ids (``customer-<tenant>``,
  ``invoice-item-<line>``, ``invoice-<invoice>``, ``transfer-<statement>``), which real Stripe honours;
- every Stripe id is stored beside the row it mirrors and committed right after the call, and a
  rerun creates only what has no id yet. Before creating invoice items or an invoice we also look
  for ones already carrying our ids on the customer, which closes the crash window between create
  and store even where idempotency keys are ignored or have expired (localstripe; Stripe after 24 h).

Each tenant gets a customer and a $0 monthly subscription that anchors its invoices (some Stripe
implementations, localstripe among them, only invoice customers with a subscription). Our invoice
lines become invoice items, then one Stripe invoice collects them; Stripe's own automatic
collection finalises and charges it, and ``POST /api/stripe/webhook`` records the outcome.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import stripe
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing.invoices import pending_statements
from market.models import Invoice, InvoiceLine, ProviderStatement, StripeCustomer, Tenant
from market.models.billing import EXTERNAL_PAYOUTS, post_transaction, provider_account
from market.money import MICROS_PER_MINOR
from market.settings import Settings, SettingsError

log = logging.getLogger(__name__)

SYNC_LOCK = 0x73747269  # advisory lock: one Stripe sync at a time ("stri")


class SyncBusy(RuntimeError):
    """Another Stripe sync holds the lock."""


@dataclass
class SyncResult:
    customers: int = 0
    invoice_items: int = 0
    invoices: int = 0
    transfers: int = 0


def stripe_client(settings: Settings) -> stripe.StripeClient:
    if not settings.stripe.api_key:
        raise SettingsError("MARKET_STRIPE_API_KEY is not set")
    options: dict[str, Any] = {"http_client": stripe.HTTPXClient(), "max_network_retries": 2}
    if settings.stripe.api_base:
        options["base_addresses"] = {"api": settings.stripe.api_base}
    return stripe.StripeClient(settings.stripe.api_key, **options)


def plan_id(currency: str) -> str:
    return f"compute-market-usage-{currency}"


def invoice_description(invoice: Invoice) -> str:
    return f"Compute Market {invoice.period_start:%Y-%m} ({invoice.id})"


class StripeSync:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.client = stripe_client(settings)
        self.result = SyncResult()

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self) -> AsyncIterator[None]:
        """The sync's advisory lock, for as long as the block runs; ``SyncBusy`` if another holds it."""
        async with self.sessions() as lock_session:
            locked = (
                await lock_session.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": SYNC_LOCK})
            ).scalar_one()
            if not locked:
                raise SyncBusy("another stripe-sync is running")
            try:
                yield
            finally:
                await lock_session.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SYNC_LOCK})

    async def run(self) -> SyncResult:
        """Push every open invoice not yet fully in Stripe; safe to rerun at any point."""
        async with self._one_at_a_time():
            async with self.sessions() as session:
                todo = list(
                    (
                        await session.execute(
                            select(Invoice.id)
                            .where(
                                Invoice.status == "open",
                                Invoice.total_minor > 0,
                                Invoice.stripe_invoice_id.is_(None),
                            )
                            .order_by(Invoice.id)
                        )
                    ).scalars()
                )
            for invoice_id in todo:
                await self.push_invoice(invoice_id)
        return self.result

    async def push_invoice(self, invoice_id: str) -> str:
        async with self.sessions() as session:
            invoice = (await session.execute(select(Invoice).where(Invoice.id == invoice_id))).scalar_one()
            if invoice.stripe_invoice_id:
                return invoice.stripe_invoice_id
            customer = await self.ensure_customer(session, invoice.tenant_id, invoice.currency)
            lines = (
                await session.execute(
                    select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id).order_by(InvoiceLine.id)
                )
            ).scalars()
            made: dict[str, str] | None = None
            for line in lines:
                if line.stripe_invoice_item_id is None and line.amount_minor != 0:
                    if made is None:
                        made = await self._existing_items(customer.customer_id, invoice.id)
                    if (found := made.get(str(line.id))) is not None:
                        line.stripe_invoice_item_id = found
                        await session.commit()
                        continue
                    item = await self.client.v1.invoice_items.create_async(
                        {
                            "customer": customer.customer_id,
                            "amount": line.amount_minor,
                            "currency": invoice.currency,
                            "description": line.description,
                            "metadata": {"invoice_id": invoice.id, "invoice_line_id": str(line.id)},
                        },
                        {"idempotency_key": f"invoice-item-{line.id}"},
                    )
                    line.stripe_invoice_item_id = item.id
                    await session.commit()
                    self.result.invoice_items += 1
            stripe_invoice_id = await self._existing_invoice(customer.customer_id, invoice)
            if stripe_invoice_id is None:
                params: dict[str, Any] = {
                    "customer": customer.customer_id,
                    "description": invoice_description(invoice),
                    "metadata": {"invoice_id": invoice.id, "tenant_id": invoice.tenant_id},
                    "pending_invoice_items_behavior": "include",
                }
                if customer.subscription_id:
                    params["subscription"] = customer.subscription_id
                created = await self.client.v1.invoices.create_async(
                    params,  # type: ignore[arg-type]
                    {"idempotency_key": f"invoice-{invoice.id}"},
                )
                stripe_invoice_id = created.id
                self.result.invoices += 1
                invoice.stripe_status = created.status
            invoice.stripe_invoice_id = stripe_invoice_id
            await session.commit()
            return stripe_invoice_id

    async def _existing_items(self, customer_id: str, invoice_id: str) -> dict[str, str]:
        """Invoice items already made for our invoice's lines (a crash after create, before we
        stored the id), by line id: Stripe keeps idempotency keys for 24 hours only, localstripe not at all."""
        found: dict[str, str] = {}
        items = self.client.v1.invoice_items
        after: str | None = None
        while True:
            listing = await (
                items.list_async({"customer": customer_id, "limit": 100})
                if after is None
                else items.list_async({"customer": customer_id, "limit": 100, "starting_after": after})
            )
            for item in listing.data:
                metadata: dict[str, Any] = item.to_dict().get("metadata") or {}
                if metadata.get("invoice_id") == invoice_id and metadata.get("invoice_line_id"):
                    found[str(metadata["invoice_line_id"])] = item.id
            if not listing.has_more or not listing.data:
                return found
            after = listing.data[-1].id

    async def _existing_invoice(self, customer_id: str, invoice: Invoice) -> str | None:
        """A Stripe invoice already made for ours (a crash after create, before we stored its id)."""
        listing = await self.client.v1.invoices.list_async({"customer": customer_id, "limit": 100})
        wanted = invoice_description(invoice)
        for candidate in listing.data:
            metadata: dict[str, Any] = candidate.to_dict().get("metadata") or {}
            ours = metadata.get("invoice_id")
            if ours == invoice.id or candidate.description == wanted:
                return candidate.id
        return None

    async def ensure_customer(self, session: AsyncSession, tenant_id: str, currency: str) -> StripeCustomer:
        existing = await session.get(StripeCustomer, tenant_id)
        if existing is None:
            tenant = (await session.execute(select(Tenant).where(Tenant.id == tenant_id))).scalar_one()
            created = await self.client.v1.customers.create_async(
                {"name": tenant.name, "metadata": {"tenant_id": tenant_id}},
                {"idempotency_key": f"customer-{tenant_id}"},
            )
            existing = StripeCustomer(tenant_id=tenant_id, customer_id=created.id)
            session.add(existing)
            await session.commit()
            self.result.customers += 1
        if existing.subscription_id is None:
            await self._ensure_plan(currency)
            subscription = await self.client.v1.subscriptions.create_async(
                {"customer": existing.customer_id, "items": [{"plan": plan_id(currency)}]},
                {"idempotency_key": f"subscription-{tenant_id}"},
            )
            existing.subscription_id = subscription.id
            await session.commit()
        return existing

    async def _ensure_plan(self, currency: str) -> None:
        try:
            await self.client.v1.plans.retrieve_async(plan_id(currency))
        except stripe.InvalidRequestError as exc:
            if exc.http_status != 404:
                raise
            await self.client.v1.plans.create_async(
                {
                    "id": plan_id(currency),
                    "amount": 0,
                    "currency": currency,
                    "interval": "month",
                    "product": {"name": "Compute Market usage"},
                },
                {"idempotency_key": plan_id(currency)},
            )

    async def pay_providers(self, period: str) -> int:
        """Transfer each pending provider statement of ``period`` to the provider's Connect account.

        UNTESTED HERE: localstripe implements no Connect, so nothing in the test suite exercises
        ``transfers.create``; nothing fakes its answer either. Under the sync's lock (two payout
        runs never race), a transfer already made for the statement (its ``transfer_group``: a
        crash after the transfer, before the ledger, more than the 24 hours Stripe keeps
        idempotency keys ago) is reused; otherwise it is made with an idempotency key from the
        statement id. Then the payout is posted to the ledger and the statement marked paid in one
        transaction.
        """
        async with self._one_at_a_time():
            return await self._pay_providers(period)

    async def _pay_providers(self, period: str) -> int:
        async with self.sessions() as session:
            todo = await pending_statements(session, period, self.settings.currency)
        for statement, account in todo:
            made = await self.client.v1.transfers.list_async({"transfer_group": statement.id, "limit": 1})
            transfer = (
                made.data[0]
                if made.data
                else await self.client.v1.transfers.create_async(
                    {
                        "amount": statement.earnings_minor,
                        "currency": statement.currency,
                        "destination": account,
                        "transfer_group": statement.id,
                        "metadata": {"statement_id": statement.id, "provider_id": statement.provider_id},
                    },
                    {"idempotency_key": f"transfer-{statement.id}"},
                )
            )
            micros = statement.earnings_minor * MICROS_PER_MINOR
            async with self.sessions() as session, session.begin():
                await post_transaction(
                    session,
                    transaction_id=f"payout:{statement.id}",
                    kind="payout",
                    currency=statement.currency,
                    occurred_at=datetime.now(UTC),
                    legs={provider_account(statement.provider_id): micros, EXTERNAL_PAYOUTS: -micros},
                    provider_id=statement.provider_id,
                    memo=f"Stripe transfer {transfer.id}",
                )
                await session.execute(
                    update(ProviderStatement)
                    .where(ProviderStatement.id == statement.id)
                    .values(status="paid", stripe_transfer_id=transfer.id, paid_at=datetime.now(UTC))
                )
            self.result.transfers += 1
        return self.result.transfers

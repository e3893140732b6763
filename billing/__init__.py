"""Billing: usage events in, an exactly-once double-entry ledger, invoices, statements, Stripe out.

- ``worker``: the durable JetStream consumer (``market billing``) that feeds ``ingest``.
- ``ingest``: one set-based statement records, rates and posts a batch, keyed by request id.
- ``ledger``: reservation-hour commitments and balances (the tables live in ``market.models.billing``).
- ``invoices``: monthly invoices per tenant and statements per provider.
- ``reconcile``: proves ledger = rated usage = usage records (``market billing reconcile``).
- ``stripe_sync``: customers, invoices and provider transfers in Stripe, idempotently.

Amounts per request are integer micros of the minor unit (1 cent = 1,000,000 micros); invoices,
statements and Stripe use whole minor units, rounded half up per line (``market.money``).
"""

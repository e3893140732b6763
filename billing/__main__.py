"""``market billing``: the usage worker and the billing commands.

market billing                          run the worker (usage events -> ledger) until SIGTERM
market billing reconcile                prove the books; exit 1 on any difference
market billing invoice --period YYYY-MM issue invoices and provider statements for a month
market billing stripe-sync              push open invoices to Stripe (idempotent)
market billing payouts --period YYYY-MM transfer provider statements (Stripe Connect)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

from market import db, logs
from market.settings import Settings, SettingsError


async def _worker(settings: Settings, count: int) -> int:
    from billing.worker import run_workers

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_workers(settings, count, stop)
    return 0


async def _reconcile(settings: Settings) -> int:
    from billing.reconcile import reconcile

    engine = db.create_engine(settings, pool_size=1)
    try:
        async with db.session_factory(engine)() as session:
            report = await reconcile(session)
    finally:
        await engine.dispose()
    print(report.render())
    return 0 if report.ok else 1


async def _invoice(settings: Settings, period: str) -> int:
    from billing.ingest import rate_pending
    from billing.invoices import run_invoices

    engine = db.create_engine(settings, pool_size=1)
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            posted = await rate_pending(raw.driver_connection, settings.currency)  # type: ignore[arg-type]
            await conn.commit()
        async with db.session_factory(engine)() as session:
            result = await run_invoices(session, period, settings.currency)
    finally:
        await engine.dispose()
    print(
        f"period {period}: {len(result.invoices)} invoice(s) issued, {result.skipped_tenants} tenant(s) already"
        f" invoiced, {len(result.statements)} provider statement(s); {posted} late-priced request(s) rated"
    )
    failed = 0
    if result.unknown_tenants:
        print(f"usage of unknown tenants not invoiced: {', '.join(result.unknown_tenants[:20])}", file=sys.stderr)
        failed = 1
    if result.unknown_providers:
        print(
            f"usage served by unknown providers, no statement: {', '.join(result.unknown_providers[:20])}",
            file=sys.stderr,
        )
        failed = 1
    return failed


async def _stripe(settings: Settings, period: str | None) -> int:
    from billing.stripe_sync import StripeSync

    engine = db.create_engine(settings, pool_size=2)
    try:
        sync = StripeSync(settings, db.session_factory(engine))
        if period is None:
            result = await sync.run()
            print(
                f"stripe: {result.customers} customer(s), {result.invoice_items} invoice item(s),"
                f" {result.invoices} invoice(s) created"
            )
        else:
            print(f"stripe: {await sync.pay_providers(period)} provider transfer(s) made")
    finally:
        await engine.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="market billing", description="Usage ledger, invoices, Stripe.")
    parser.add_argument("--workers", type=int, default=1, help="worker count in this process (default 1)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("reconcile", help="prove ledger = rated usage = usage records; exit 1 on any difference")
    invoice = sub.add_parser("invoice", help="issue a month's invoices and provider statements")
    invoice.add_argument("--period", required=True, help="YYYY-MM (UTC calendar month)")
    sub.add_parser("stripe-sync", help="push open invoices to Stripe (safe to rerun)")
    payouts = sub.add_parser("payouts", help="pay a month's provider statements through Stripe Connect")
    payouts.add_argument("--period", required=True, help="YYYY-MM")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    logs.setup("billing", settings.log_level)
    from billing.invoices import PeriodError

    try:
        if args.command == "reconcile":
            return asyncio.run(_reconcile(settings))
        if args.command == "invoice":
            return asyncio.run(_invoice(settings, args.period))
        if args.command == "stripe-sync":
            return asyncio.run(_stripe(settings, None))
        if args.command == "payouts":
            return asyncio.run(_stripe(settings, args.period))
        return asyncio.run(_worker(settings, args.workers))
    except (SettingsError, PeriodError) as exc:
        print(f"market billing: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

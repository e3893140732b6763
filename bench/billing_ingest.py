"""Billing throughput: JetStream -> PostgreSQL ingest, and a month's invoice run.

Starts its own embedded PostgreSQL and NATS (``market.embedded``) in a temporary directory, so it
measures the same code paths production runs, on this machine:

1. publish N usage events to the USAGE stream (as the api does: ``usage.<tenant>``, Nats-Msg-Id);
2. drain them with the billing worker (in this process, or ``--worker-processes`` subprocesses
   running ``python -m billing``), timing from the first fetch to the last ack;
3. write a month of usage (``--invoice-events``, default 1,000,000, for ``--tenants`` tenants)
   straight through the worker's batch statement, then time ``run_invoices`` for that month and a
   full ``reconcile``.

    python bench/billing_ingest.py [--events 200000] [--invoice-events 1000000] [--tenants 1000]

Targets: >= 20,000 events/s ingest; the invoice run for 1,000 tenants over 1,000,000 events <= 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import nats.js.errors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from billing import ingest
from billing.invoices import run_invoices
from billing.reconcile import reconcile
from billing.worker import UsageWorker
from market import bus, db, migrate, subjects
from market.embedded import EmbeddedNats, EmbeddedPostgres
from market.ids import ulid
from market.models.billing import PayoutSpec, PriceSpec, create_price_book
from market.settings import Settings
from market.wire import UsageEvent, encode

MODELS = ["llama-3-8b", "llama-3-70b", "qwen-2.5-7b", "mistral-7b"]
CLASSES = ["on_demand", "burst", "reserved"]
MONTH_START = datetime(2026, 10, 1, tzinfo=UTC).timestamp()
MONTH_SECONDS = 31 * 86400


def make_event(rng: random.Random, tenants: list[str], providers: list[str], at: float) -> UsageEvent:
    completion = rng.randint(1, 800)
    return UsageEvent(
        request_id=f"req_{ulid().lower()}{rng.randrange(1_000_000):06d}",
        tenant_id=rng.choice(tenants),
        key_id="key_bench",
        model=rng.choice(MODELS),
        admission_class=rng.choice(CLASSES),  # type: ignore[arg-type]
        node_id="node_bench",
        provider_id=rng.choice(providers),
        prompt_tokens=rng.randint(10, 4000),
        completion_tokens=completion,
        relayed_completion_tokens=completion,
        outcome="completed",
        started_at=at - 2.0,
        ended_at=at,
        ttft_ms=150.0,
        duration_ms=2000.0,
    )


async def seed(settings: Settings, n_tenants: int, n_providers: int) -> tuple[list[str], list[str]]:
    tenants = [f"ten_bench{i:06d}" for i in range(n_tenants)]
    providers = [f"prov_bench{i:04d}" for i in range(n_providers)]
    conn = await asyncpg.connect(db.plain_url(settings.require_database_url()))
    try:
        await conn.executemany("INSERT INTO tenants (id, name) VALUES ($1, $1)", [(t,) for t in tenants])
        await conn.executemany("INSERT INTO providers (id, name) VALUES ($1, $1)", [(p,) for p in providers])
    finally:
        await conn.close()
    engine = db.create_engine(settings, pool_size=1)
    async with db.session_factory(engine).begin() as session:
        await create_price_book(
            session,
            currency="usd",
            effective_from=datetime(2020, 1, 1, tzinfo=UTC),
            platform_margin_bps=2000,
            prices=[
                PriceSpec(
                    model=m,
                    admission_class=c,  # type: ignore[arg-type]
                    input_minor_per_million=10 + 5 * i,
                    output_minor_per_million=30 + 10 * i,
                )
                for i, m in enumerate(MODELS)
                for c in CLASSES
            ],
            payouts=[PayoutSpec(model=MODELS[0], input_minor_per_million=8, output_minor_per_million=24)],
        )
    await engine.dispose()
    return tenants, providers


async def publish_events(settings: Settings, events: list[UsageEvent]) -> float:
    """Core publishes into the stream's subjects (JetStream stores them), then wait until stored."""
    nc = await bus.connect(settings, name="bench-publisher")
    js = nc.jetstream()
    await bus.ensure_usage_stream(js)
    started = time.perf_counter()
    for i, event in enumerate(events):
        await nc.publish(subjects.usage(event.tenant_id), encode(event), headers={"Nats-Msg-Id": event.request_id})
        if i % 5000 == 4999:
            await nc.flush()
    await nc.flush()
    while (await js.stream_info(subjects.USAGE_STREAM)).state.messages < len(events):  # noqa: ASYNC110 - polling the server  # noqa: ASYNC110 - polling the server
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    await nc.close()
    return elapsed


async def drain_in_process(settings: Settings, n: int, workers: int, batch: int) -> float:
    stop = asyncio.Event()
    pool = [UsageWorker(settings, durable="billing", batch_size=batch, name=f"bench-{i}") for i in range(workers)]
    started = time.perf_counter()
    tasks = [asyncio.create_task(w.run(stop)) for w in pool]
    while sum(w.stats.received for w in pool) < n:  # noqa: ASYNC110 - a benchmark samples, it does not wait  # noqa: ASYNC110 - a benchmark samples
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*tasks)
    return elapsed


async def drain_subprocesses(settings: Settings, n: int, processes: int) -> float:
    env = dict(os.environ)
    env.update(
        MARKET_DATABASE_URL=settings.require_database_url(),
        MARKET_NATS_URL=settings.require_nats_url(),
        MARKET_LOG_LEVEL="WARNING",
    )
    nc = await bus.connect(settings, name="bench-watch")
    js = nc.jetstream()
    root = Path(__file__).resolve().parent.parent
    started = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, "-m", "billing"], env=env, cwd=root)  # noqa: ASYNC220 - start-up only
        for _ in range(processes)
    ]
    try:
        while True:
            try:
                info = await js.consumer_info(subjects.USAGE_STREAM, "billing")
            except nats.js.errors.NotFoundError:  # the workers have not created it yet
                await asyncio.sleep(0.05)
                continue
            if info.ack_floor.stream_seq >= n and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        await nc.close()
    return elapsed


async def load_month(settings: Settings, tenants: list[str], providers: list[str], n: int) -> float:
    rng = random.Random(7)
    conn = await asyncpg.connect(db.plain_url(settings.require_database_url()))
    started = time.perf_counter()
    try:
        for offset in range(0, n, 10_000):
            size = min(10_000, n - offset)
            batch = [
                make_event(rng, tenants, providers, MONTH_START + rng.random() * MONTH_SECONDS) for _ in range(size)
            ]
            await ingest.store_batch(conn, batch, "usd")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events to ingest through JetStream")
    parser.add_argument("--workers", type=int, default=1, help="in-process workers")
    parser.add_argument("--worker-processes", type=int, default=0, help="also drain with N `python -m billing`")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--invoice-events", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--providers", type=int, default=50)
    parser.add_argument("--fast", action="store_true", help="PostgreSQL without fsync (as the test suite)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="billing-bench-") as tmp:
        base = Path(tmp)
        pg = EmbeddedPostgres(base / "pg" / "data", fast=args.fast)
        nats_server = EmbeddedNats(base / "nats")
        settings = replace(Settings(), data_dir=base, log_level="WARNING")
        settings = settings.with_servers(database_url=pg.start(), nats_url=nats_server.start())
        try:
            migrate.upgrade(settings.require_database_url())
            tenants, providers = await seed(settings, args.tenants, args.providers)
            rng = random.Random(1)
            now = time.time()
            events = [make_event(rng, tenants, providers, now) for _ in range(args.events)]
            figures: list[tuple[str, str]] = []

            publish_s = await publish_events(settings, events)
            figures.append(("publish to JetStream", f"{args.events / publish_s:>12,.0f} events/s"))
            drain_s = await drain_in_process(settings, args.events, args.workers, args.batch)
            figures.append(
                (
                    f"ingest JetStream->PostgreSQL ({args.workers} worker, in-process)",
                    f"{args.events / drain_s:>12,.0f} events/s",
                )
            )
            if args.worker_processes:
                nc = await bus.connect(settings, name="bench-reset")
                js = nc.jetstream()
                await js.delete_consumer(subjects.USAGE_STREAM, "billing")
                await nc.close()
                await _truncate(settings)
                drain_p = await drain_subprocesses(settings, args.events, args.worker_processes)
                figures.append(
                    (
                        f"ingest ({args.worker_processes} `python -m billing` processes, incl. start-up)",
                        f"{args.events / drain_p:>12,.0f} events/s",
                    )
                )
            recorded = await _scalar(settings, "SELECT count(*) FROM usage_records")
            figures.append(("usage records after ingest (must equal events)", f"{recorded:>12,}"))

            await _truncate(settings)
            load_s = await load_month(settings, tenants, providers, args.invoice_events)
            figures.append(
                (
                    f"direct batch write, {args.invoice_events:,} events",
                    f"{args.invoice_events / load_s:>12,.0f} events/s",
                )
            )
            engine = db.create_engine(settings, pool_size=2)
            sessions = db.session_factory(engine)
            started = time.perf_counter()
            async with sessions() as session:
                result = await run_invoices(session, "2026-10", "usd")
            invoice_s = time.perf_counter() - started
            figures.append(
                (
                    f"invoice run: {len(result.invoices):,} invoices, {len(result.statements)} statements",
                    f"{invoice_s:>12.2f} s",
                )
            )
            started = time.perf_counter()
            async with sessions() as session:
                report = await reconcile(session)
            figures.append(
                (f"reconcile ({'clean' if report.ok else 'DIFFERENCES'})", f"{time.perf_counter() - started:>12.2f} s")
            )
            await engine.dispose()
        finally:
            nats_server.stop()
            pg.stop()

    width = max(len(name) for name, _ in figures)
    print(f"\nbilling benchmark ({os.cpu_count()} CPUs, PostgreSQL fsync {'off' if args.fast else 'on'})")
    print("-" * (width + 24))
    for name, value in figures:
        print(f"{name:<{width}}  {value}")


async def _scalar(settings: Settings, sql: str) -> int:
    conn = await asyncpg.connect(db.plain_url(settings.require_database_url()))
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def _truncate(settings: Settings) -> None:
    conn = await asyncpg.connect(db.plain_url(settings.require_database_url()))
    try:
        await conn.execute("TRUNCATE usage_records, ledger_transactions, ledger_entries, ledger_accounts")
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())

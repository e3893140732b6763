"""Admission benchmark: authentication + limits + quota hold and settle, per api process.

Starts its own embedded PostgreSQL and NATS in a temporary directory, applies the migrations,
creates a model, an incubator with a pool, a tenant with a grant and a key, then measures in one
process (as one api replica would run it):

- sequential: one request at a time, latency of authenticate + admit + settle (p50/p99), the two
  cases interleaved in ``--rounds`` rounds so that a slow moment of the machine hits both alike;
- concurrent: N requests in flight, admissions per second and their latencies;

each once without rate limits (quota only), once with requests- and tokens-per-minute limits
on both the key and the tenant (all four GCRA buckets touched), and once for a tenant holding a
reservation for the model (each admission also locks the reservation, counts what runs under it
and takes a slot; each settle gives it back). Prints a table.

    python bench/admission.py [--seconds 5] [--concurrency 32] [--sequential 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy import func, select

from api.auth import Authenticator
from api.limits import Limiter
from api.state import AppState
from market import aio, bus, db, keys, migrate
from market.embedded import EmbeddedNats, EmbeddedPostgres
from market.ids import new_id
from market.models import ApiKey, Grant, Incubator, IncubatorPool, Model, Reservation, Tenant, TenantQuota
from market.settings import Settings

MODEL = "bench/model"
HUGE = 10**15
NO_LIMIT = None
HIGH_LIMIT = 1_000_000_000  # limits that are checked on every request but never bind


async def _tenant(state: AppState, limits: int | None, reserved: bool = False) -> str:
    """A tenant in an incubator, with a grant and a key; returns the key's secret."""
    async with state.sessions.begin() as session:
        period = await session.scalar(select(func.market_current_period()))
        if await session.get(Model, MODEL) is None:
            session.add(Model(name=MODEL, context_length=1_000_000))
        incubator = Incubator(id=new_id("incubator"), name="bench")
        tenant = Tenant(
            id=new_id("tenant"),
            name="bench",
            incubator_id=incubator.id,
            requests_per_minute=limits,
            tokens_per_minute=limits,
        )
        session.add(incubator)
        await session.flush()
        session.add(IncubatorPool(incubator_id=incubator.id, period=period, tokens=HUGE, allocated_tokens=HUGE))
        session.add(tenant)
        await session.flush()
        session.add(
            Grant(id=new_id("grant"), tenant_id=tenant.id, incubator_id=incubator.id, period=period, tokens=HUGE)
        )
        session.add(TenantQuota(tenant_id=tenant.id, period=period, granted=HUGE))
        if reserved:  # room for every request in flight: each is admitted ``reserved``
            session.add(Reservation(id=new_id("reservation"), tenant_id=tenant.id, model=MODEL, slots=100_000))
        secret, digest, prefix = keys.generate("tenant")
        session.add(
            ApiKey(
                id=new_id("key"),
                role="tenant",
                tenant_id=tenant.id,
                prefix=prefix,
                secret_hash=digest,
                scopes=["inference", "manage"],
                requests_per_minute=limits,
                tokens_per_minute=limits,
            )
        )
    return secret


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(auth: Authenticator, limiter: Limiter, header: str) -> float:
    started = time.perf_counter()
    principal = await auth.authenticate(header)
    admission = await limiter.admit(principal, MODEL, 100, 200)
    await limiter.settle(admission, 250)
    return time.perf_counter() - started


async def _sequential(auth: Authenticator, limiter: Limiter, header: str, n: int) -> list[float]:
    for _ in range(200):  # warm up: prepared statements, pool connections, the key cache
        await _one(auth, limiter, header)
    return [await _one(auth, limiter, header) for _ in range(n)]


async def _concurrent(
    auth: Authenticator, limiter: Limiter, header: str, concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            latencies.append(await _one(auth, limiter, header))

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return len(latencies) / (time.perf_counter() - started), latencies


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=3000, help="per case, over all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="market-bench-") as tmp:
        base = Path(tmp)
        postgres = EmbeddedPostgres(base / "postgres" / "data")
        nats_server = EmbeddedNats(base / "nats")
        postgres.start()
        nats_server.start()
        try:
            migrate.upgrade(postgres.url)
            settings = replace(Settings(), data_dir=base / "data").with_servers(
                database_url=postgres.url, nats_url=nats_server.url
            )
            engine = db.create_engine(settings)
            nc = await bus.connect(settings, name="bench")
            state = AppState(settings, engine, db.session_factory(engine), nc, nc.jetstream())
            auth = Authenticator(state)
            await auth.start()
            state.services["auth"] = auth
            limiter = Limiter(state)
            await limiter.start()
            cases = [
                (label, "Bearer " + await _tenant(state, limits, reserved))
                for label, limits, reserved in (
                    ("quota only", NO_LIMIT, False),
                    ("quota + 4 rate limits", HIGH_LIMIT, False),
                    ("quota + reservation", NO_LIMIT, True),
                )
            ]
            seqs: dict[str, list[float]] = {label: [] for label, _ in cases}
            for _ in range(args.rounds):
                for label, header in cases:
                    seqs[label] += await _sequential(auth, limiter, header, args.sequential // args.rounds)
            rows = []
            for label, header in cases:
                rate, conc = await _concurrent(auth, limiter, header, args.concurrency, args.seconds)
                rows.append((label, seqs[label], rate, conc))
            await limiter.close()
            await nc.drain()
            await engine.dispose()
        finally:
            nats_server.stop()
            postgres.stop()

    print()
    print("authenticate + admit + settle, one api process, real PostgreSQL and NATS")
    print(
        f"{'case':<24}{'seq p50 ms':>12}{'seq p99 ms':>12}{'seq adm/s':>11}"
        f"{'conc':>6}{'adm/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
    )
    for label, seq, rate, conc in rows:
        print(
            f"{label:<24}{statistics.median(seq) * 1000:>12.3f}{_pct(seq, 0.99) * 1000:>12.3f}"
            f"{1 / statistics.mean(seq):>11.0f}{args.concurrency:>6}{rate:>9.0f}"
            f"{statistics.median(conc) * 1000:>9.2f}{_pct(conc, 0.99) * 1000:>9.2f}"
        )


if __name__ == "__main__":
    aio.run(main())  # uvloop, as the api runs under uvicorn

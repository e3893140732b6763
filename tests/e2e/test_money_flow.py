"""Traffic to money through every real part: the openai SDK -> api -> scheduler -> node agent
(simulated engine) -> usage on JetStream -> billing worker -> ledger; then the tenant's balance,
the provider's earnings and the platform's revenue add up, and reconcile finds no difference."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.reconcile import reconcile
from billing.worker import UsageWorker
from market import subjects
from market.admin_keys import create_platform_admin_key
from market.db import session_factory
from market.models import Provider
from market.models.billing import PriceSpec, UsageRecord, create_price_book
from market.settings import Settings
from market.wire import ProfileInfo
from nodes.agent import AgentConfig, NodeAgent
from nodes.engines.sim import SimConfig, SimEngine
from scheduler.service import SchedulerService
from tests.conftest import RunningApi, wait_healthy
from tests.token.conftest import make_tenant

MODEL = "sim-llama-3-8b"


@pytest.fixture
async def fleet(settings: Settings, engine: AsyncEngine, scheduler: SchedulerService) -> AsyncIterator[str]:
    """One simulated node of a real provider row, healthy in the scheduler; yields the provider id."""
    async with session_factory(engine)() as session, session.begin():
        session.add(Provider(id="prov_money", name="money rigs"))
    agent = NodeAgent(
        AgentConfig(
            node_id="node_money",
            provider_id="prov_money",
            settings=settings,
            models=[MODEL],
            profile=ProfileInfo(max_num_seqs=64, max_model_len=8192),
        ),
        SimEngine(SimConfig(speedup=50.0)),
    )
    await agent.start()
    await wait_healthy(scheduler, ["node_money"], timeout=30)
    yield "prov_money"
    await agent.stop(drain=False)


async def test_traffic_becomes_balanced_money(
    api: RunningApi, fleet: str, settings: Settings, engine: AsyncEngine
) -> None:
    async with session_factory(engine)() as session, session.begin():
        await create_price_book(
            session,
            currency=settings.currency,
            effective_from=datetime.now(UTC) - timedelta(days=1),
            platform_margin_bps=2000,
            prices=[
                PriceSpec(
                    model=MODEL,
                    admission_class="on_demand",
                    input_minor_per_million=150_000,
                    output_minor_per_million=600_000,
                )
            ],
        )
    tenant = await make_tenant(engine, "payer", models=((MODEL, 8192),))
    worker = UsageWorker(
        settings, durable="e2e_money", filter_subject=subjects.usage(tenant.tenant_id), fetch_timeout_s=0.2
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        sdk = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key=tenant.secret, max_retries=0)
        answers = await asyncio.gather(
            *(
                sdk.completions.create(model=MODEL, prompt="the price of tokens " * (i + 1), max_tokens=20 + i)
                for i in range(6)
            )
        )
        billed_tokens = sum(a.usage.prompt_tokens + a.usage.completion_tokens for a in answers if a.usage)
        ids = {"req_" + a.id.removeprefix("cmpl-") for a in answers}

        deadline = time.monotonic() + 20
        while True:
            async with session_factory(engine)() as session:
                rated = await session.scalar(
                    select(func.count())
                    .select_from(UsageRecord)
                    .where(UsageRecord.request_id.in_(ids), UsageRecord.tenant_micros.is_not(None))
                )
            if rated == len(ids):
                break
            assert time.monotonic() < deadline, f"only {rated} of {len(ids)} requests reached the ledger"
            await asyncio.sleep(0.1)

        async with session_factory(engine)() as session:
            records = (await session.scalars(select(UsageRecord).where(UsageRecord.request_id.in_(ids)))).all()
        async with session_factory(engine)() as session:
            report = await reconcile(session)
        assert report.ok, report.render()
        assert sum(r.prompt_tokens + r.billed_completion_tokens for r in records) == billed_tokens
        tenant_micros = sum(r.tenant_micros or 0 for r in records)
        expected = sum(r.prompt_tokens * 150_000 + r.billed_completion_tokens * 600_000 for r in records)
        assert tenant_micros == expected  # minor units per 1M tokens * tokens = micros, exactly
        assert {r.provider_id for r in records} == {fleet}

        admin = await create_platform_admin_key(settings)
        async with httpx.AsyncClient(base_url=api.url) as client:
            balance = (
                await client.get("/api/tenant/balance", headers={"Authorization": f"Bearer {tenant.secret}"})
            ).json()
            revenue = (await client.get("/api/admin/revenue", headers={"Authorization": f"Bearer {admin}"})).json()
        assert balance["unbilled_usage_micros"] == tenant_micros
        provider_micros = sum(r.provider_micros or 0 for r in records)
        assert revenue["usage_revenue_micros"] == tenant_micros - provider_micros
        assert provider_micros > 0
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)

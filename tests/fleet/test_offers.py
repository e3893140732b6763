"""Provider offers: set through the provider API, routed by the schedulers against tenants' price
ceilings, taken into the next price-book version as payouts; per-node tokens served and earnings."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import openai
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from market.admin_keys import create_platform_admin_key
from market.db import session_factory
from market.models import Node, Tenant, UsageRecord
from market.settings import Settings
from market.wire import ProfileInfo
from nodes.agent import AgentConfig, NodeAgent
from nodes.engines.sim import SimConfig, SimEngine
from scheduler.service import SchedulerService
from tests.conftest import RunningApi, wait_healthy
from tests.fleet.helpers import create_provider
from tests.token.conftest import make_tenant

MODEL = "sim-llama-3-8b"


async def test_offers_route_tenants_by_price_and_feed_the_price_book(
    api: RunningApi, settings: Settings, engine: AsyncEngine, scheduler: SchedulerService
) -> None:
    admin = await create_platform_admin_key(settings)
    tenant = await make_tenant(engine, "thrifty", models=((MODEL, 8192),))
    async with httpx.AsyncClient(base_url=api.url) as client:
        cheap_id, cheap = await create_provider(client, admin, "cheap rigs")
        dear_id, dear = await create_provider(client, admin, "dear rigs")
        ok = await client.put(
            "/api/provider/offers",
            headers=cheap,
            json={"model": MODEL, "input_minor_per_million": 10_000, "output_minor_per_million": 40_000},
        )
        assert ok.status_code == 200, ok.text
        await client.put(
            "/api/provider/offers",
            headers=dear,
            json={"model": MODEL, "input_minor_per_million": 90_000, "output_minor_per_million": 900_000},
        )
        assert [
            o["output_minor_per_million"] for o in (await client.get("/api/provider/offers", headers=cheap)).json()
        ] == [40_000]
        unknown = await client.put(
            "/api/provider/offers",
            headers=cheap,
            json={"model": "nope", "input_minor_per_million": 1, "output_minor_per_million": 1},
        )
        assert unknown.status_code == 404
        negative = await client.put(
            "/api/provider/offers",
            headers=cheap,
            json={"model": MODEL, "input_minor_per_million": -1, "output_minor_per_million": 1},
        )
        assert negative.status_code == 400

        # The tenant will pay at most 100,000 per 1M tokens: only the cheap provider qualifies.
        async with session_factory(engine)() as session, session.begin():
            await session.execute(
                update(Tenant).where(Tenant.id == tenant.tenant_id).values(max_price_minor_per_million=100_000)
            )
        api.app.state.app_state.services["auth"].forget(tenant.key_id)
        agents = [
            NodeAgent(
                AgentConfig(
                    node_id=f"node_{name}",
                    provider_id=provider_id,
                    settings=settings,
                    models=[MODEL],
                    profile=ProfileInfo(max_num_seqs=32, max_model_len=8192),
                ),
                SimEngine(SimConfig(speedup=100.0)),
            )
            for name, provider_id in (("cheap", cheap_id), ("dear", dear_id))
        ]
        try:
            for agent in agents:
                await agent.start()
            await wait_healthy(scheduler, ["node_cheap", "node_dear"], timeout=20)
            assert await scheduler.load_offers()
            sdk = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key=tenant.secret, max_retries=0)
            await asyncio.gather(*(sdk.completions.create(model=MODEL, prompt="x", max_tokens=3) for _ in range(8)))
            assert scheduler.placements["node_cheap"] == 8
            assert scheduler.placements["node_dear"] == 0
        finally:
            for agent in agents:
                await agent.stop(drain=False)

        # A new price-book version takes the offers as payouts, except one above what tenants pay.
        book = await client.post(
            "/api/admin/prices",
            headers={"Authorization": f"Bearer {admin}"},
            json={
                "prices": [
                    {
                        "model": MODEL,
                        "admission_class": "on_demand",
                        "input_minor_per_million": 50_000,
                        "output_minor_per_million": 200_000,
                    }
                ],
                "effective_from": (datetime.now(UTC) + timedelta(seconds=5)).isoformat(),
            },
        )
        assert book.status_code == 201, book.text
        payouts = {p["provider_id"]: p for p in book.json()["payouts"]}
        assert set(payouts) == {cheap_id}
        assert payouts[cheap_id]["output_minor_per_million"] == 40_000

        # Per-node tokens served and earnings come from the rated usage.
        now = datetime.now(UTC)
        async with session_factory(engine)() as session, session.begin():
            session.add(Node(id="node_cheap", provider_id=cheap_id, name="cheap-1"))
            session.add(
                UsageRecord(
                    request_id="req_offer_test",
                    tenant_id=tenant.tenant_id,
                    key_id=tenant.key_id,
                    model=MODEL,
                    admission_class="on_demand",
                    node_id="node_cheap",
                    provider_id=cheap_id,
                    outcome="completed",
                    prompt_tokens=100,
                    completion_tokens=50,
                    relayed_completion_tokens=50,
                    billed_completion_tokens=50,
                    started_at=now,
                    ended_at=now,
                    duration_ms=1.0,
                    currency="usd",
                    tenant_micros=30,
                    provider_micros=20,
                    platform_micros=10,
                )
            )
        withdrawn = await client.delete(f"/api/provider/offers/{MODEL}", headers=cheap)
        assert withdrawn.status_code == 200
        assert (await client.get("/api/provider/offers", headers=cheap)).json() == []
        listed = (await client.get("/api/provider/nodes", headers=cheap)).json()
        assert [(n["id"], n["tokens_served"], n["earnings_micros"]) for n in listed] == [("node_cheap", 150, 20)]
        assert (await client.get("/api/provider/nodes", headers=dear)).json() == []

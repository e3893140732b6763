"""Requests beyond a fleet's capacity wait at the scheduler and start in arrival order as slots
free up, through every real part: the openai SDK -> api -> scheduler -> node agent (simulated
engine with room for one sequence at a time)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import nats.js.errors
import openai
import pytest
from nats.aio.client import Client
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from api.admin.quota import quota_of
from api.token import service as token_service
from market import subjects, wire
from market.db import session_factory
from market.models import ApiKey
from market.settings import Settings
from market.wire import ProfileInfo
from nodes.agent import AgentConfig, NodeAgent
from nodes.engines.sim import SimConfig, SimEngine
from scheduler.service import SchedulerService
from tests.billing.conftest import make_prices
from tests.conftest import RunningApi, row_locked, service_env, wait_healthy
from tests.token.conftest import KEY_BUCKET, TenantKey, make_tenant, use_up_quota

MODEL = "sim-llama-3-8b"
ROOT = Path(__file__).resolve().parents[2]


def one_slot_agent(settings: Settings, node_id: str) -> NodeAgent:
    """A node with room for one sequence and no queue in its engine: a second request has to wait
    for the slot at the scheduler."""
    return NodeAgent(
        AgentConfig(
            node_id=node_id,
            provider_id="prov_queue",
            settings=settings,
            models=[MODEL],
            profile=ProfileInfo(max_num_seqs=1, max_model_len=8192),
            queue_share=0.0,
        ),
        SimEngine(SimConfig(max_num_seqs=1, speedup=1.0)),
    )


async def long_stream(client: openai.AsyncOpenAI, i: int, started: list[int]) -> str:
    """Request ``i`` streamed whole: 192 tokens hold the one slot well over a second, so requests sent
    0.1 s apart all arrive while the first runs, however slowly a loaded machine sends them. ``i``
    joins ``started`` at its first token: the order in which the requests got the slot."""
    stream = await client.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=192, stream=True)
    text = []
    async for event in stream:
        if event.choices and event.choices[0].text:
            if i not in started:
                started.append(i)
            text.append(event.choices[0].text)
    return "".join(text)


@pytest.fixture
async def one_slot_node(settings: Settings, scheduler: SchedulerService) -> AsyncIterator[NodeAgent]:
    agent = one_slot_agent(settings, "node_one_slot")
    await agent.start()
    await wait_healthy(scheduler, ["node_one_slot"], timeout=30)
    yield agent
    await agent.stop(drain=False)


async def test_requests_over_capacity_wait_and_start_in_arrival_order(
    api: RunningApi, engine: AsyncEngine, scheduler: SchedulerService, one_slot_node: NodeAgent
) -> None:
    tenant = await make_tenant(engine, "queued", models=((MODEL, 8192),))
    client = openai.AsyncOpenAI(api_key=tenant.secret, base_url=f"{api.url}/v1", max_retries=0)
    started: list[int] = []

    with api.token_settings(queue_timeout_s=30.0):
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(long_stream(client, i, started)))
            await asyncio.sleep(0.1)  # arrival order: 0, 1, 2, 3
        texts = await asyncio.gather(*tasks)

    assert all(texts), "every request got its answer"
    assert started == [0, 1, 2, 3]  # the order of their first tokens
    assert scheduler.counters["queued"] >= 3  # the later three each waited for the one slot


async def test_a_reserved_request_starts_before_the_on_demand_ones_waiting_for_the_slot(
    api: RunningApi, engine: AsyncEngine, scheduler: SchedulerService, one_slot_node: NodeAgent
) -> None:
    """What a reservation buys when the fleet is full: the next free slot, ahead of the queue."""
    await make_prices(session_factory(engine), model=MODEL, reservation_hour_minor=5)
    crowd = await make_tenant(engine, "crowd", models=((MODEL, 8192),))
    holder = await make_tenant(engine, "holder", models=((MODEL, 8192),))
    state = api.app.state.app_state
    saved = state.settings
    state.settings = replace(saved, reservable_share=1.0)  # the one slot may be reserved
    try:
        async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {holder.secret}"}) as http:
            made = await http.post("/api/tenant/reservations", json={"model": MODEL, "slots": 1})
        assert made.status_code == 201, made.text
    finally:
        state.settings = saved
    first_token_at: dict[str, float] = {}

    async def ask(who: TenantKey, name: str, max_tokens: int = 48) -> None:
        client = openai.AsyncOpenAI(api_key=who.secret, base_url=f"{api.url}/v1", max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt=name, max_tokens=max_tokens, stream=True)
        async for event in stream:
            if event.choices and event.choices[0].text:
                first_token_at.setdefault(name, time.monotonic())

    with api.token_settings(queue_timeout_s=30.0):
        tasks = [asyncio.create_task(ask(crowd, "busy", max_tokens=600))]  # the slot, for seconds
        await asyncio.sleep(0.3)
        for name in ("waiting 1", "waiting 2"):
            tasks.append(asyncio.create_task(ask(crowd, name)))
            await asyncio.sleep(0.1)
        tasks.append(asyncio.create_task(ask(holder, "reserved")))
        await asyncio.gather(*tasks)
    assert sorted(first_token_at, key=first_token_at.__getitem__) == ["busy", "reserved", "waiting 1", "waiting 2"]


async def test_a_client_that_leaves_while_queued_gives_up_its_place(
    api: RunningApi, engine: AsyncEngine, scheduler: SchedulerService, one_slot_node: NodeAgent, nc: Client
) -> None:
    """The waiting job is withdrawn from the scheduler: the node never runs it, nothing is billed
    and the quota hold is released."""
    tenant = await make_tenant(engine, "impatient", models=((MODEL, 8192),))
    client = openai.AsyncOpenAI(api_key=tenant.secret, base_url=f"{api.url}/v1", max_retries=0)
    impatient = openai.AsyncOpenAI(api_key=tenant.secret, base_url=f"{api.url}/v1", max_retries=0, timeout=0.5)
    with api.token_settings(queue_timeout_s=30.0):
        busy = asyncio.create_task(client.completions.create(model=MODEL, prompt="long", max_tokens=200))
        await asyncio.sleep(0.2)
        with pytest.raises(openai.APITimeoutError):
            await impatient.completions.create(model=MODEL, prompt="short", max_tokens=5)
        for _ in range(100):
            if scheduler.counters["withdrawn"]:
                break
            await asyncio.sleep(0.02)
        assert scheduler.counters["withdrawn"] == 1
        await busy
        after = await client.completions.create(model=MODEL, prompt="next", max_tokens=5)
    assert after.choices[0].text
    assert scheduler.counters["placed"] == 2  # the busy request and the one after: never the withdrawn one
    async with session_factory(engine)() as session:
        assert (await quota_of(session, tenant.tenant_id)).held == 0
    usage = subjects.usage(tenant.tenant_id)
    for _ in range(100):
        info = await nc.jetstream().stream_info(subjects.USAGE_STREAM, subjects_filter=usage)
        if (info.state.subjects or {}).get(usage) == 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    info = await nc.jetstream().stream_info(subjects.USAGE_STREAM, subjects_filter=usage)
    assert (info.state.subjects or {}).get(usage) == 2  # no usage event for the request that never ran


async def test_a_request_refused_beside_its_placement_is_aborted_on_its_node(
    api: RunningApi, engine: AsyncEngine, scheduler: SchedulerService, one_slot_node: NodeAgent, nc: Client
) -> None:
    """A key admitted with room has its next job placed while its admission runs. When the quota
    ran out meanwhile, the client gets the 429, the node aborts the job, so its one slot is free
    for the next request at once (not after 2,000 tokens: that request would find no slot within
    its queue time), and the refused request holds nothing and is not billed."""
    tenant = await make_tenant(engine, "refused", models=((MODEL, 8192),))
    client = openai.AsyncOpenAI(api_key=tenant.secret, base_url=f"{api.url}/v1", max_retries=0)
    await client.completions.create(model=MODEL, prompt="first", max_tokens=5)  # admitted, with room
    used = text("UPDATE tenant_quotas SET used = :used WHERE tenant_id = :t")
    async with session_factory(engine)() as session, session.begin():
        await session.execute(used.bindparams(used=10**12, t=tenant.tenant_id))
    # The tenant's quota row locked: the admission waits until the job is placed and running (were
    # it refused while the placement's answer was on its way, the job would be cancelled on its
    # node when the answer came, and that node's work would not be paid: the README's known gaps).
    quota_row = "SELECT 1 FROM tenant_quotas WHERE tenant_id = $1 FOR UPDATE"
    async with row_locked(engine, quota_row, tenant.tenant_id) as release:
        asking = asyncio.create_task(
            client.completions.create(model=MODEL, prompt="refused", max_tokens=2000, stream=True)
        )
        for _ in range(250):
            if scheduler.counters["placed"] == 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        await release()
        with pytest.raises(openai.RateLimitError) as refused:
            await asking
    assert refused.value.code == "insufficient_quota"
    assert scheduler.counters["placed"] == 2  # the refused job was placed while its admission ran
    async with session_factory(engine)() as session, session.begin():
        await session.execute(used.bindparams(used=0, t=tenant.tenant_id))
    after = await client.completions.create(model=MODEL, prompt="next", max_tokens=5)
    assert after.choices[0].text
    async with session_factory(engine)() as session:
        assert (await quota_of(session, tenant.tenant_id)).held == 0
    # Three events: the first, the refused one's work (its provider's pay, charged to nobody: the
    # node's count after its cancel, a prompt and a handful of tokens at most, not 2,000), the last.
    # A node cancelled before its engine took the job has no work to report, and then no event (a
    # loaded run sees that now and then): the refused job must never have run to its 2,000 tokens.
    usage = subjects.usage(tenant.tenant_id)
    deadline = time.monotonic() + 5
    while True:  # the refused one's is published in the background, once its node's count is in
        outcomes: list[str] = []
        refused_events: list[wire.UsageEvent] = []
        seq = 1
        with contextlib.suppress(nats.js.errors.NotFoundError):
            while True:  # the tenant's events, oldest first
                msg = await nc.jetstream().get_msg(subjects.USAGE_STREAM, seq, usage, next=True)
                event = wire.decoder(wire.UsageEvent).decode(msg.data or b"")
                outcomes.append(event.outcome)
                refused_events += [event] if event.outcome == "refused" else []
                seq = (msg.seq or seq) + 1
        if len(outcomes) >= 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert sorted(outcomes) in (["completed", "completed", "refused"], ["completed", "completed"])
    for paid in refused_events:
        assert paid.node_id == "node_one_slot"
        assert paid.prompt_tokens > 0
        assert paid.completion_tokens < 100


async def test_a_request_refused_while_it_waits_for_a_slot_is_withdrawn_at_once(
    api: RunningApi,
    engine: AsyncEngine,
    scheduler: SchedulerService,
    one_slot_node: NodeAgent,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Placed beside its admission, a request waiting at the scheduler for the one busy slot is
    withdrawn the moment its admission refuses: the client gets the 429 then, not after its 30 s
    of queue time, and the job never runs."""
    # A loaded CI run once took over the 10 s window between the busy request's admission and the
    # refused one's arrival, which then was admitted before placement: the test is of withdrawal.
    monkeypatch.setattr(token_service, "SPECULATE_WINDOW_S", 600.0)
    tenant = await make_tenant(engine, "withdrawn", models=((MODEL, 8192),))
    async with session_factory(engine)() as session, session.begin():
        await session.execute(update(ApiKey).where(ApiKey.id == tenant.key_id).values(requests_per_minute=100))
    client = openai.AsyncOpenAI(api_key=tenant.secret, base_url=f"{api.url}/v1", max_retries=0)
    await client.completions.create(model=MODEL, prompt="first", max_tokens=5)  # admitted, with room
    with api.token_settings(queue_timeout_s=30.0):
        busy = asyncio.create_task(client.completions.create(model=MODEL, prompt="long", max_tokens=4000))
        # Placed, and its admission (beside placement) answered: were the quota used up before
        # that, it would be refused, and the key's next admission would no longer run beside
        # placement (a loaded CI run saw exactly that).
        runs = api.app.state.app_state.services["token"].placed

        def busy_admitted() -> bool:
            return scheduler.counters["placed"] == 2 and all(r.admitting is None or r.admitting.done() for r in runs)

        for _ in range(500):  # a loaded machine can take seconds
            if busy_admitted():
                break
            await asyncio.sleep(0.02)
        assert busy_admitted(), "the busy request holds the one slot, admitted"
        await use_up_quota(engine, tenant.tenant_id)
        # The key's rate-limit row locked: the next admission waits while its job queues for the slot.
        async with row_locked(engine, KEY_BUCKET, tenant.key_id) as release:
            service = api.app.state.app_state.services["token"]
            assert (tenant.key_id, MODEL) in service.room, "the busy admission left room: the next runs beside"
            refused = asyncio.create_task(client.completions.create(model=MODEL, prompt="refused", max_tokens=5))
            for _ in range(500):
                if scheduler.counters["queued"]:
                    break
                await asyncio.sleep(0.02)
            assert scheduler.counters["queued"] == 1
            await release()
            started = time.monotonic()
            with pytest.raises(openai.RateLimitError) as error:
                await refused
            assert time.monotonic() - started < 5
        assert error.value.code == "insufficient_quota"
        for _ in range(100):
            if scheduler.counters["withdrawn"]:
                break
            await asyncio.sleep(0.02)
        assert scheduler.counters["withdrawn"] == 1
        assert scheduler.counters["placed"] == 2  # the first and the busy one: never the refused one
        busy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await busy


async def test_a_request_waiting_at_a_scheduler_replica_that_dies_is_submitted_again(
    api: RunningApi, engine: AsyncEngine, settings: Settings
) -> None:
    """A request waits for the one busy slot at a scheduler replica, a process of its own, which
    is then killed: its answer died with it. The api sees the replica's beats stop and submits
    the job again, to the live replica, which places it when the slot frees: the client gets its
    answer then, not a 503 after its 30 s of queue time."""
    env = service_env(
        settings,
        MARKET_HEARTBEAT_INTERVAL=str(settings.heartbeat_interval_s),
        MARKET_HEARTBEAT_TIMEOUT=str(settings.heartbeat_timeout_s),
    )
    doomed = subprocess.Popen(
        [sys.executable, "-m", "scheduler"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    agent = one_slot_agent(settings, "node_one_slot_left")
    await agent.start()
    live: SchedulerService | None = None
    try:
        tenant = await make_tenant(engine, "replica-died", models=((MODEL, 8192),))
        client = openai.AsyncOpenAI(api_key=tenant.secret, base_url=f"{api.url}/v1", max_retries=0)
        deadline = time.monotonic() + 60
        while True:  # until the doomed replica (the only one) has heard from the node
            with contextlib.suppress(openai.APIStatusError):
                await client.completions.create(model=MODEL, prompt="warm", max_tokens=1)
                break
            assert doomed.poll() is None, "the scheduler process stopped"
            assert time.monotonic() < deadline, "the scheduler process did not start"
            await asyncio.sleep(0.2)
        with api.token_settings(queue_timeout_s=30.0):
            busy = await client.completions.create(model=MODEL, prompt="long", max_tokens=4000, stream=True)
            await anext(aiter(busy))  # running on the one slot
            waiting = asyncio.create_task(client.completions.create(model=MODEL, prompt="next", max_tokens=5))
            await asyncio.sleep(0.5)  # at the doomed replica, waiting for the slot
            assert not waiting.done()
            live = SchedulerService(settings)
            await live.start()
            doomed.kill()
            for _ in range(500):  # the api gives up on the dead replica after its heartbeat timeout
                if live.counters["queued"]:
                    break
                await asyncio.sleep(0.02)
            assert live.counters["queued"] == 1, "the waiting job was submitted again to the live replica"
            await busy.close()  # the slot frees: the live replica places the job
            answer = await asyncio.wait_for(waiting, 10)
        assert answer.choices[0].text
        assert live.counters["placed"] == 1
    finally:
        doomed.kill()
        doomed.wait()
        if live is not None:
            await live.stop()
        await agent.stop(drain=False)

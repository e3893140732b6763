"""An api process that hosts a scheduler replica (``MARKET_API_SCHEDULER``): its own jobs reach the
replica in-process, past the NATS server, while the replica serves every other api through the
queue group; waiting for a slot and giving it up work as with a replica of its own. Through every
real part: the openai SDK -> api (hosting the replica) -> node agent (simulated engine)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from nats.aio.client import Client
from sqlalchemy.ext.asyncio import AsyncEngine

from market import bus, subjects
from market.settings import Settings, SettingsError
from nodes.agent import NodeAgent
from tests.conftest import RunningApi, hosted, wait_healthy
from tests.e2e.test_capacity_queue import MODEL, long_stream, one_slot_agent
from tests.token.conftest import make_tenant


@pytest.fixture
async def node(settings: Settings, hosting_api: RunningApi) -> AsyncIterator[NodeAgent]:
    agent = one_slot_agent(settings, "node_hosted")
    await agent.start()
    await wait_healthy(hosted(hosting_api), ["node_hosted"], timeout=30)
    yield agent
    await agent.stop(drain=False)


@pytest.fixture
async def submissions(nc: Client) -> AsyncIterator[list[Any]]:
    """Every submission that goes through the NATS server (a plain subscriber hears them all)."""
    seen: list[Any] = []

    async def on_submit(msg: Any) -> None:
        seen.append(msg)

    sub = await nc.subscribe(subjects.JOBS_SUBMIT, cb=on_submit)
    await nc.flush()
    yield seen
    await sub.unsubscribe()


async def test_an_api_hosting_a_replica_places_its_own_jobs_in_process_and_serves_other_apis(
    hosting_api: RunningApi, api: RunningApi, node: NodeAgent, engine: AsyncEngine, submissions: list[Any], nc: Client
) -> None:
    tenant = await make_tenant(engine, "hosted", models=((MODEL, 8192),))
    replica = hosted(hosting_api)
    own = openai.AsyncOpenAI(api_key=tenant.secret, base_url=f"{hosting_api.url}/v1", max_retries=0)
    stream = await own.completions.create(
        model=MODEL, prompt="hosted", max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    text, usage = [], None
    async for event in stream:
        text += [c.text for c in event.choices]
        usage = event.usage or usage
    assert "".join(text)
    assert usage is not None
    assert usage.completion_tokens == 8
    await nc.flush()
    assert submissions == [], "the hosting api's submission never went through the NATS server"
    assert replica.counters["placed"] == 1
    assert replica.placements["node_hosted"] == 1

    # Another api (no replica of its own, and no other replica anywhere): the hosted one serves it.
    other = openai.AsyncOpenAI(api_key=tenant.secret, base_url=f"{api.url}/v1", max_retries=0)
    answer = await other.completions.create(model=MODEL, prompt="other", max_tokens=4)
    assert answer.choices[0].text
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 4
    assert len(submissions) == 1
    assert replica.counters["placed"] == 2

    # Stopped, the replica leaves the hosting api's connection and the queue group alike.
    connection = hosting_api.app.state.app_state.nc
    assert bus.local_handler(connection, subjects.JOBS_SUBMIT) is not None
    await replica.stop()
    assert bus.local_handler(connection, subjects.JOBS_SUBMIT) is None
    with pytest.raises(openai.APIStatusError) as refused:
        await other.completions.create(model=MODEL, prompt="nobody", max_tokens=4)
    assert refused.value.status_code == 503


async def test_jobs_wait_at_the_hosted_replica_in_order_and_a_client_that_leaves_gives_up_its_place(
    hosting_api: RunningApi, node: NodeAgent, engine: AsyncEngine, submissions: list[Any]
) -> None:
    tenant = await make_tenant(engine, "hosted-queue", models=((MODEL, 8192),))
    replica = hosted(hosting_api)
    client = openai.AsyncOpenAI(api_key=tenant.secret, base_url=f"{hosting_api.url}/v1", max_retries=0)
    impatient = openai.AsyncOpenAI(api_key=tenant.secret, base_url=f"{hosting_api.url}/v1", max_retries=0, timeout=0.5)
    started: list[int] = []
    with hosting_api.token_settings(queue_timeout_s=30.0):
        tasks = []
        for i in range(3):
            tasks.append(asyncio.create_task(long_stream(client, i, started)))
            await asyncio.sleep(0.1)  # arrival order: 0, 1, 2
        with pytest.raises(openai.APITimeoutError):
            await impatient.completions.create(model=MODEL, prompt="short", max_tokens=5)
        texts = await asyncio.gather(*tasks)
    assert all(texts)
    assert started == [0, 1, 2]
    assert replica.counters["queued"] >= 3  # requests 1 and 2 and the impatient one each waited
    assert replica.counters["withdrawn"] == 1
    assert replica.counters["placed"] == 3  # never the withdrawn one
    assert submissions == []


def test_the_api_scheduler_setting_takes_yes_or_no_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKET_API_SCHEDULER", "1")
    assert Settings.from_env().api_scheduler
    monkeypatch.setenv("MARKET_API_SCHEDULER", "off")
    assert not Settings.from_env().api_scheduler
    monkeypatch.setenv("MARKET_API_SCHEDULER", "maybe")
    with pytest.raises(SettingsError, match="MARKET_API_SCHEDULER"):
        Settings.from_env()

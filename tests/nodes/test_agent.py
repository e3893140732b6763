"""The node agent over real NATS with the simulated engine: what the api and scheduler observe."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from market import subjects, wire
from market.ids import new_id
from market.settings import Settings
from market.wire import Hardware, ProfileInfo
from nodes.agent import AGENT_VERSION, QUICK_REPORT_FULL_S, QUICK_REPORT_S, AgentConfig, NodeAgent
from nodes.engines import SimConfig, SimEngine
from nodes.engines.base import EngineLoad
from tests.nodes.helpers import HeartbeatWatch, JobWatch, make_job

MODEL = "sim-llama-3-8b"
AgentFactory = Callable[..., Awaitable[NodeAgent]]


@pytest.fixture
async def make_agent(settings: Settings) -> AsyncIterator[AgentFactory]:
    """Start agents with a SimEngine; whatever a test leaves running is stopped afterwards."""
    agents: list[NodeAgent] = []

    async def factory(
        speedup: float = 20.0, flush_interval_s: float = 0.002, relay_window_s: float = 0.002, **sim: object
    ) -> NodeAgent:
        engine = SimEngine(SimConfig(speedup=speedup, **sim))  # type: ignore[arg-type]
        config = AgentConfig(
            node_id=new_id("node"),
            provider_id="prov_test",
            settings=replace(settings, heartbeat_interval_s=0.1),
            models=[MODEL],
            profile=ProfileInfo(mode="unified", max_num_seqs=engine.max_num_seqs),
            hardware=Hardware(accelerator="H100", memory_gib=80.0),
            flush_interval_s=flush_interval_s,
            relay_window_s=relay_window_s,
        )
        agent = NodeAgent(config, engine)
        await agent.start()
        agents.append(agent)
        return agent

    yield factory
    for agent in agents:
        await agent.stop(drain=False)


async def test_job_streams_data_then_end_with_usage(nc: Client, make_agent: AgentFactory) -> None:
    agent = await make_agent()
    watch = await JobWatch(nc, make_job(MODEL, prompt="x" * 400, max_tokens=12)).submit(agent.node_id)
    end = await watch.done()

    kinds = [c.kind for c in watch.chunks]
    assert kinds[-1] == "end"
    # the first token comes at once, so normally no separate "accepted" (a stalled machine may send one)
    assert kinds[0] in ("accepted", "data")
    assert set(kinds[1:-1]) <= {"data"}
    assert [c.seq for c in watch.chunks] == list(range(len(watch.chunks)))
    assert all(c.node_id == agent.node_id and c.job_id == watch.job.id for c in watch.chunks)
    assert end.usage is not None
    assert end.usage.completion_tokens == 12 == watch.relayed_tokens
    assert end.usage.prompt_tokens == 100  # estimated from the body by the simulator
    assert watch.data[-1].pieces[-1].finish_reason == "length"
    assert len(watch.text.split()) == 12


async def test_a_slow_first_token_is_preceded_by_accepted(nc: Client, make_agent: AgentFactory) -> None:
    """A long prefill (4,000 tokens, ~115 ms simulated): the api hears "accepted" after 50 ms."""
    agent = await make_agent(speedup=1.0)
    watch = await JobWatch(nc, make_job(MODEL, prompt="x" * 16_000, max_tokens=3)).submit(agent.node_id)
    end = await watch.done()
    kinds = [c.kind for c in watch.chunks]
    assert kinds[0] == "accepted"
    assert kinds[-1] == end.kind == "end"
    assert set(kinds[1:-1]) <= {"data"}
    assert [c.seq for c in watch.chunks] == list(range(len(watch.chunks)))
    assert end.usage is not None
    assert watch.relayed_tokens == 3 == end.usage.completion_tokens
    # the first output says how long the engine took to it (the prefill), so the api can tell its own share
    outputs = [c for c in watch.chunks if c.kind != "accepted"]
    assert outputs[0].engine_ttft_ms is not None
    assert 90 <= outputs[0].engine_ttft_ms < 2000
    assert all(c.engine_ttft_ms is None for c in outputs[1:])


async def test_fast_tokens_are_coalesced(nc: Client, make_agent: AgentFactory) -> None:
    agent = await make_agent(speedup=200.0, flush_interval_s=0.02)
    watch = await JobWatch(nc, make_job(MODEL, max_tokens=300)).submit(agent.node_id)
    await watch.done()
    assert watch.relayed_tokens == 300
    assert len(watch.data) < 300 / 5  # ~30 us per simulated token, flushed every 20 ms
    assert all(len(c.pieces) == 1 for c in watch.data)  # pieces of one choice are joined


async def test_first_token_is_not_held_back(nc: Client, make_agent: AgentFactory) -> None:
    agent = await make_agent(speedup=1.0, flush_interval_s=0.5)
    started = time.monotonic()
    watch = await JobWatch(nc, make_job(MODEL, max_tokens=150)).submit(agent.node_id)
    await asyncio.wait_for(watch.first_data.wait(), 5)
    first_after = time.monotonic() - started
    await watch.done()
    assert first_after < 0.3  # not after the 0.5 s flush interval
    assert watch.data[0].pieces[0].tokens == 1
    assert 2 <= len(watch.data) <= 5  # ~0.9 s of 6 ms tokens in 0.5 s batches
    assert watch.relayed_tokens == 150


async def test_cancel_ends_with_usage_so_far_and_frees_the_engine(nc: Client, make_agent: AgentFactory) -> None:
    agent = await make_agent(speedup=1.0)
    watch = await JobWatch(nc, make_job(MODEL, prompt="y" * 80, max_tokens=5000)).submit(agent.node_id)
    await asyncio.wait_for(watch.first_data.wait(), 10)
    await asyncio.sleep(0.1)
    await watch.cancel(agent.node_id)
    end = await watch.done(5)

    assert end.kind == "end"
    assert end.usage is not None
    assert 1 <= end.usage.completion_tokens < 5000
    assert end.usage.completion_tokens == watch.relayed_tokens
    assert end.usage.prompt_tokens == 20
    await asyncio.sleep(0.05)
    assert (await agent.engine.load()).running == 0


async def test_deadline_stops_the_job(nc: Client, make_agent: AgentFactory) -> None:
    agent = await make_agent(speedup=1.0)
    watch = await JobWatch(nc, make_job(MODEL, max_tokens=5000, deadline_s=0.5)).submit(agent.node_id)
    end = await watch.done(5)
    assert end.kind == "end"
    assert end.usage is not None
    assert 0 < end.usage.completion_tokens < 5000

    late = await JobWatch(nc, make_job(MODEL, deadline_s=-1)).submit(agent.node_id)
    error = await late.done()
    assert (error.kind, error.error_code, error.seq) == ("error", "deadline_exceeded", 0)


async def test_engine_errors_reach_the_api(nc: Client, make_agent: AgentFactory) -> None:
    agent = await make_agent(max_model_len=64)
    refused = await JobWatch(nc, make_job(MODEL, max_tokens=500)).submit(agent.node_id)
    error = await refused.done()
    assert [c.kind for c in refused.chunks] in (["error"], ["accepted", "error"])
    assert (error.error_code, error.status) == ("invalid_request", 400)

    unknown = await JobWatch(nc, make_job("some-other-model")).submit(agent.node_id)
    assert (await unknown.done()).error_code == "invalid_request"

    beats = await HeartbeatWatch(nc, agent.node_id).start()
    assert isinstance(agent.engine, SimEngine)
    agent.engine.set_down(True)
    down = await JobWatch(nc, make_job(MODEL)).submit(agent.node_id)
    error = await down.done()
    assert (error.kind, error.seq, error.error_code) == ("error", 0, "engine_unavailable")
    beat = await beats.wait_for("unhealthy", since=len(beats.beats))
    assert beat.slots == 0
    agent.engine.set_down(False)
    await beats.wait_for("healthy", since=len(beats.beats))
    ok = await JobWatch(nc, make_job(MODEL)).submit(agent.node_id)
    assert (await ok.done()).kind == "end"


async def test_heartbeats_describe_the_node(nc: Client, make_agent: AgentFactory) -> None:
    agent = await make_agent(speedup=1.0, max_num_seqs=8)
    beats = await HeartbeatWatch(nc, agent.node_id).start()
    first = await beats.wait_for("healthy")
    assert first.models == [MODEL]
    assert first.engine == "sim"
    assert first.provider_id == "prov_test"
    assert first.hardware.accelerator == "H100"
    assert first.agent_version == AGENT_VERSION
    assert first.slots == 16  # max_num_seqs 8, plus a queue of the same size waiting in the engine

    watches = [await JobWatch(nc, make_job(MODEL, max_tokens=2000)).submit(agent.node_id) for _ in range(3)]
    await asyncio.gather(*(asyncio.wait_for(w.first_data.wait(), 10) for w in watches))
    busy = await beats.wait_for("healthy", since=len(beats.beats))
    assert busy.running == 3
    assert busy.slots == 13
    assert busy.kv_cache_usage > 0
    assert busy.seq > first.seq
    assert busy.sent_at > first.sent_at
    for watch in watches:
        await watch.cancel(agent.node_id)
    await asyncio.gather(*(w.done() for w in watches))


async def test_drain_finishes_in_flight_jobs_and_refuses_new_ones(nc: Client, make_agent: AgentFactory) -> None:
    agent = await make_agent(speedup=1.0)
    beats = await HeartbeatWatch(nc, agent.node_id).start()
    in_flight = await JobWatch(nc, make_job(MODEL, max_tokens=40)).submit(agent.node_id)
    await asyncio.wait_for(in_flight.first_data.wait(), 10)

    stopping = asyncio.create_task(agent.stop(drain=True))
    await beats.wait_for("draining")
    refused = await JobWatch(nc, make_job(MODEL)).submit(agent.node_id)
    error = await refused.done()
    assert (error.kind, error.error_code, error.seq) == ("error", "draining", 0)

    end = await in_flight.done()
    assert end.kind == "end"
    assert end.usage is not None
    assert end.usage.completion_tokens == 40
    await asyncio.wait_for(stopping, 10)
    assert beats.beats[-1].status == "draining"  # the last word
    count = len(beats.beats)
    await asyncio.sleep(0.3)
    assert len(beats.beats) == count  # gone: no more heartbeats


async def test_drain_order_over_control_subject(nc: Client, make_agent: AgentFactory) -> None:
    agent = await make_agent()
    beats = await HeartbeatWatch(nc, agent.node_id).start()
    await nc.publish(subjects.node_control(agent.node_id), msgspec.msgpack.encode({"action": "drain"}))
    beat = await beats.wait_for("draining")
    assert beat.slots == 0
    await asyncio.wait_for(agent.stopped.wait(), 10)  # nothing in flight: it leaves at once


async def test_kill_goes_silent(nc: Client, make_agent: AgentFactory) -> None:
    agent = await make_agent(speedup=1.0)
    beats = await HeartbeatWatch(nc, agent.node_id).start()
    await beats.wait_for("healthy")
    watch = await JobWatch(nc, make_job(MODEL, max_tokens=5000)).submit(agent.node_id)
    await asyncio.wait_for(watch.first_data.wait(), 10)

    await agent.kill()
    chunks, count = len(watch.chunks), len(beats.beats)
    await asyncio.sleep(0.5)
    assert len(watch.chunks) == chunks
    assert not any(c.kind in ("end", "error") for c in watch.chunks)
    assert len(beats.beats) == count
    late = await JobWatch(nc, make_job(MODEL)).submit(agent.node_id)
    await asyncio.sleep(0.2)
    assert late.chunks == []  # nobody answers for a dead node


async def test_a_fleet_of_sim_nodes_on_one_connection(nc: Client, settings: Settings) -> None:
    agents = [
        NodeAgent(
            AgentConfig(node_id=new_id("node"), provider_id="prov_fleet", settings=settings, models=[MODEL]),
            SimEngine(SimConfig(speedup=50.0)),
            nc=nc,
        )
        for _ in range(100)
    ]
    await asyncio.gather(*(a.start() for a in agents))
    try:
        watches = [await JobWatch(nc, make_job(MODEL, max_tokens=10)).submit(a.node_id) for a in agents]
        ends = await asyncio.gather(*(w.done(20) for w in watches))
        assert all(e.kind == "end" and e.usage is not None and e.usage.completion_tokens == 10 for e in ends)
        assert {e.node_id for e in ends} == {a.node_id for a in agents}
    finally:
        await asyncio.gather(*(a.stop(drain=False) for a in agents))
    assert nc.is_connected  # leaving unsubscribed; the shared connection stays


async def test_a_slow_engine_scrape_does_not_hold_heartbeats_back(nc: Client, make_agent: AgentFactory) -> None:
    """An engine that takes 2 s to report its load (a busy vLLM's /metrics): heartbeats keep their
    0.1 s interval with the last known load, so the schedulers never take the node for lost."""
    agent = await make_agent()
    engine_load = agent.engine.load

    async def slow_load() -> object:
        await asyncio.sleep(2.0)
        return await engine_load()

    agent.engine.load = slow_load  # type: ignore[method-assign]
    arrivals: list[float] = []

    async def on_beat(_msg: object) -> None:
        arrivals.append(time.monotonic())

    sub = await nc.subscribe(subjects.heartbeat(agent.node_id), cb=on_beat)
    await asyncio.sleep(1.5)
    await sub.unsubscribe()
    assert len(arrivals) >= 5
    assert max(b - a for a, b in itertools.pairwise(arrivals)) < 0.5


async def test_jobs_for_one_api_replica_share_chunk_batches(nc: Client, make_agent: AgentFactory) -> None:
    """Jobs naming their api replica (``relay_to``): the tokens of one engine step travel together
    on the node's relay subject, each job's chunks complete and in order, nothing to the inboxes."""
    agent = await make_agent(speedup=5.0)
    batches: list[wire.ChunkBatch] = []
    direct: list[str] = []

    async def on_batch(msg: Any) -> None:
        batches.append(wire.decoder(wire.ChunkBatch).decode(msg.data))

    async def on_direct(msg: Any) -> None:
        if not msg.data and (msg.headers or {}).get("Status") == "503":
            # "No responders": the server had not yet seen the new agent's subscription (as in JobWatch)
            job = next(j for j in jobs if j.reply == msg.subject)
            await nc.publish(subjects.node_jobs(agent.node_id), wire.encode(job), reply=job.reply)
            return
        direct.append(msg.subject)

    await nc.subscribe(subjects.node_relay(agent.node_id, "apitest"), cb=on_batch)
    await nc.subscribe("_INBOX.test.>", cb=on_direct)
    jobs = [msgspec.structs.replace(make_job(MODEL, max_tokens=20), relay_to="apitest") for _ in range(8)]
    for job in jobs:
        await nc.publish(subjects.node_jobs(agent.node_id), wire.encode(job), reply=job.reply)
    await nc.flush()

    def ended() -> int:
        return sum(1 for b in batches for item in b.items if item.chunk.kind == "end")

    for _ in range(300):
        if ended() == len(jobs):
            break
        await asyncio.sleep(0.02)
    assert ended() == len(jobs)
    assert direct == []
    for job in jobs:
        chunks = [item.chunk for b in batches for item in b.items if item.reply == job.reply]
        assert all(c.job_id == job.id and c.node_id == agent.node_id for c in chunks)
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert sum(p.tokens for c in chunks for p in c.pieces) == 20
        assert chunks[-1].kind == "end"
    chunk_count = sum(len(b.items) for b in batches)
    assert len(batches) * 3 <= chunk_count  # eight streams decode in lockstep: a message per step, not per chunk


async def test_free_slots_count_our_jobs_now_and_only_lasting_foreign_load(
    nc: Client, make_agent: AgentFactory
) -> None:
    """Engine gauges lag: a wave of requests that just ended can still show. The node's free slots
    (what schedulers place against) count its own jobs as they are now, and other clients' load on
    a shared engine only when its gauges show it in several scrapes running."""
    agent = await make_agent(max_num_seqs=8)  # 16 slots: 8 running and as many queued in the engine
    gauge = {"running": 0}

    async def load() -> EngineLoad:
        return EngineLoad(running=gauge["running"], waiting=0, kv_cache_usage=0.0)

    agent.engine.load = load  # type: ignore[method-assign]
    await asyncio.sleep(0.4)
    gauge["running"] = 10  # a finished wave, still in the gauges: not ours any more, not anyone's
    assert (await agent.heartbeat()).slots == 16
    gauge["running"] = 5  # another client of the same engine, for good
    await asyncio.sleep(0.5)  # a few heartbeats (0.1 s) scrape it
    assert (await agent.heartbeat()).slots == 11
    gauge["running"] = 0
    assert (await agent.heartbeat()).slots == 16


async def test_heartbeats_acknowledge_each_schedulers_last_placement_with_the_slots_it_took(
    nc: Client, make_agent: AgentFactory
) -> None:
    """A report tells each scheduler replica the last of its placements counted in its ``slots``:
    the replica keeps counting the ones sent after against the node (``FleetView.observe``)."""
    agent = await make_agent(speedup=1.0, max_num_seqs=8)
    watch = await HeartbeatWatch(nc, agent.node_id).start()
    await watch.wait_for("healthy")
    before = await agent.heartbeat()
    assert before.placements == {}
    watches = []
    for header in ("sched-a 3", "sched-b 7", "sched-a 9", "sched-a nine", " 4", "sched-c"):
        job = make_job(MODEL, max_tokens=2000)
        watches.append(await JobWatch(nc, job).submit(agent.node_id, headers={wire.PLACEMENT_HEADER: header}))
    await asyncio.gather(*(asyncio.wait_for(w.first_data.wait(), 10) for w in watches))
    beat = await agent.heartbeat()
    assert beat.placements == {"sched-b": 7, "sched-a": 9}  # malformed ones acknowledge nothing
    assert beat.slots == before.slots - len(watches)  # every job counts, acknowledged or not
    for w in watches:
        await w.cancel(agent.node_id)
    await asyncio.gather(*(w.done() for w in watches))


async def test_a_batch_window_never_holds_a_first_token_back(nc: Client, make_agent: AgentFactory) -> None:
    """Batched chunks wait ``relay_window_s`` for company, but not a job's first token."""
    agent = await make_agent(speedup=1.0, relay_window_s=0.5)
    arrivals: list[tuple[float, wire.ChunkBatch]] = []

    async def on_batch(msg: Any) -> None:
        arrivals.append((time.monotonic(), wire.decoder(wire.ChunkBatch).decode(msg.data)))

    job = msgspec.structs.replace(make_job(MODEL, max_tokens=150), relay_to="apitest")

    async def on_no_responders(msg: Any) -> None:  # the new agent's subscription not seen yet (as in JobWatch)
        await nc.publish(subjects.node_jobs(agent.node_id), wire.encode(job), reply=job.reply)

    await nc.subscribe(subjects.node_relay(agent.node_id, "apitest"), cb=on_batch)
    await nc.subscribe(job.reply, cb=on_no_responders)
    await nc.flush()
    started = time.monotonic()
    await nc.publish(subjects.node_jobs(agent.node_id), wire.encode(job), reply=job.reply)
    for _ in range(250):
        if any(item.chunk.kind == "end" for _, b in arrivals for item in b.items):
            break
        await asyncio.sleep(0.02)
    first_at = next(t for t, b in arrivals if any(item.chunk.kind == "data" for item in b.items))
    assert first_at - started < 0.3  # not after the 0.5 s window
    chunks = [item.chunk for _, b in arrivals for item in b.items]
    assert chunks[-1].kind == "end"
    assert sum(p.tokens for c in chunks for p in c.pieces) == 150
    assert len(arrivals) <= 6  # ~0.9 s of 6 ms tokens: the first at once, then a message per window


async def test_a_job_end_is_reported_at_once_while_schedulers_take_the_node_for_full(
    make_agent: AgentFactory,
) -> None:
    """Extra load reports after job ends are spaced ``QUICK_REPORT_S`` apart, except while the
    schedulers take the node for full (the jobs placed since the last report took all but their
    reserved headroom of the slots it offered): then a freed slot is reported within
    ``QUICK_REPORT_FULL_S``, since jobs waiting at a scheduler need exactly it (and a report
    already pending for later is brought forward)."""
    agent = await make_agent()
    # As just after a report that offered 20 slots, 10 of them taken since: room left.
    agent._last_beat_at = time.monotonic()
    agent._reported_slots, agent._jobs_since_beat = 20, 10
    agent._load_changed()
    assert agent._quick_at is not None
    assert agent._quick_at - agent._last_beat_at == pytest.approx(QUICK_REPORT_S, abs=1e-3)
    agent._jobs_since_beat = 18  # what is left is the headroom schedulers keep for reserved jobs
    agent._load_changed()
    assert agent._quick_at - agent._last_beat_at == pytest.approx(QUICK_REPORT_FULL_S, abs=1e-3)


async def _one_streaming_and_one_queued(nc: Client, agent: NodeAgent) -> tuple[JobWatch, JobWatch]:
    """A long job streaming on a one-seat engine, and one queued behind it (no output yet)."""
    busy = await JobWatch(nc, make_job(MODEL, max_tokens=5000)).submit(agent.node_id)
    await asyncio.wait_for(busy.first_data.wait(), 10)
    queued = await JobWatch(nc, make_job(MODEL, max_tokens=5)).submit(agent.node_id)
    await asyncio.sleep(0.2)
    assert not queued.first_data.is_set()
    return busy, queued


async def test_an_engine_that_stops_answering_fails_the_jobs_still_waiting_for_output(
    nc: Client, make_agent: AgentFactory
) -> None:
    """Retryable at once (the api places them elsewhere) instead of a wait for the api's
    first-token timeout on an engine that may be hung; streams already flowing go on."""
    agent = await make_agent(speedup=1.0, max_num_seqs=1)
    busy, queued = await _one_streaming_and_one_queued(nc, agent)
    assert isinstance(agent.engine, SimEngine)
    agent.engine.set_down(True)
    error = await queued.done(5)
    assert (error.kind, error.error_code) == ("error", "engine_unavailable")
    assert not busy.finished.is_set()


async def test_a_node_that_leaves_mid_job_says_so_rather_than_ending_it(nc: Client, make_agent: AgentFactory) -> None:
    """Revoked (or out of drain time): an error the api acts on, never an ``end`` that would pass
    for a finished completion (and an empty one for a job with no output yet)."""
    agent = await make_agent(speedup=1.0, max_num_seqs=1)
    busy, queued = await _one_streaming_and_one_queued(nc, agent)
    await agent.stop(drain=False)
    for watch in (queued, busy):
        last = await watch.done(5)
        assert (last.kind, last.error_code) == ("error", "engine_unavailable")


async def test_a_job_its_api_stopped_asking_for_is_aborted(nc: Client, make_agent: AgentFactory) -> None:
    """An api process that died sends no more keepalives: its node stops generating for nobody
    (with an error, should the api only have stalled), while the jobs still asked for go on, and
    a job from an api that never sends keepalives (``keepalive_s`` 0) is left alone."""
    agent = await make_agent(speedup=1.0)
    forgotten, asked_for, unannounced = (
        msgspec.structs.replace(make_job(MODEL, max_tokens=5000), keepalive_s=every) for every in (0.3, 0.3, 0.0)
    )
    watches = [await JobWatch(nc, job).submit(agent.node_id) for job in (forgotten, asked_for, unannounced)]
    for watch in watches:
        await asyncio.wait_for(watch.first_data.wait(), 10)
    keepalive = wire.encode(wire.Keepalive(job_ids=[asked_for.id]))
    deadline = time.monotonic() + 3.0  # twice the 1.5 s a job waits for its keepalive
    while time.monotonic() < deadline:
        await nc.publish(subjects.node_keepalive(agent.node_id), keepalive)
        await asyncio.sleep(0.05)
    last = await watches[0].done(5)
    assert (last.kind, last.error_code) == ("error", "engine_unavailable")
    assert "api stopped asking" in (last.error or "")
    assert not watches[1].finished.is_set()
    assert not watches[2].finished.is_set()
    for watch in watches[1:]:
        await watch.cancel(agent.node_id)
        await watch.done(5)

"""Streams in flight are checkpointed: one whose api process dies mid-way is still billed (as of its
last checkpoint) and its provider paid; one that ends has its checkpoint turned into a tombstone
that no late checkpoint overwrites; a whole (not streamed) response is never checkpointed."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats.js.errors
from nats.aio.client import Client
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.token.outbox import REST_SUFFIX, StoredEvent
from api.token.service import KEEPALIVE_S
from billing import ingest
from market import subjects, wire
from market.db import plain_url
from market.embedded import free_port
from market.settings import Settings
from tests.conftest import RunningApi, service_env
from tests.token.conftest import FakeFleet, NodeBehaviour, TenantKey, echo_node
from tests.token.test_token_api import usage_event

ROOT = Path(__file__).resolve().parents[2]
Fleet = Callable[[dict[str, NodeBehaviour]], Awaitable[FakeFleet]]


async def _in_flight(engine: AsyncEngine, request_id: str) -> list[tuple[str, wire.UsageEvent | None]]:
    """The request's row in ``usage_in_flight``, if any: its holder and its event (None: a tombstone)."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT holder, event, final FROM usage_in_flight WHERE request_id = :id"), {"id": request_id}
            )
        ).all()
    return [(r[0], None if r[2] else wire.decoder(wire.UsageEvent).decode(r[1])) for r in rows]


async def _holder_silent(engine: AsyncEngine, holder: str) -> None:
    """As if ``holder``'s heartbeats, and its checkpoints, had stopped an hour ago."""
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE limiter_instances SET seen_at = now() - interval '1 hour' WHERE id = :id"), {"id": holder}
        )
        await conn.execute(
            text("UPDATE usage_in_flight SET updated_at = now() - interval '1 hour' WHERE holder = :id"), {"id": holder}
        )


async def _read_tokens(lines: Any, count: int) -> int:
    """Read the stream until ``count`` tokens have come (one per event from the echo node)."""
    seen = 0
    async for line in lines:
        if line.startswith("data: {"):
            seen += 1
            if seen == count:
                return seen
    raise AssertionError(f"the stream ended after {seen} tokens")


def _body(max_tokens: int) -> dict[str, Any]:
    return {"model": "fake-model", "prompt": "tell me a long story", "max_tokens": max_tokens, "stream": True}


@contextlib.asynccontextmanager
async def _streaming(url: str, secret: str, max_tokens: int) -> AsyncIterator[tuple[str, AsyncIterator[str]]]:
    """A streamed completion in progress: its request id and its lines, until the block ends."""
    headers = {"Authorization": f"Bearer {secret}"}
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=_body(max_tokens)) as response,
    ):
        yield response.headers["x-request-id"], response.aiter_lines()


async def test_a_streams_checkpoint_gives_way_to_its_final_event(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client, engine: AsyncEngine
) -> None:
    await fleet({"slow": echo_node("slow", words=200, delay=0.02)})  # a 4 s stream
    service = api.app.state.app_state.services["token"]
    async with _streaming(api.url, tenant.secret, 200) as (request_id, lines):
        await _read_tokens(lines, 5)
        assert await service.checkpoint() >= 1
        [(holder, checkpoint)] = await _in_flight(engine, request_id)
        assert holder == service.limiter.holder
        assert checkpoint is not None
        assert checkpoint.outcome == "failed"  # what it would be if this process died now
        assert 5 <= checkpoint.relayed_completion_tokens < 200
        assert (checkpoint.node_id, checkpoint.tenant_id) == ("slow", tenant.tenant_id)
        async for _ in lines:
            pass
    final, _ = await usage_event(nc, tenant.tenant_id, request_id=request_id)
    assert (final.outcome, final.completion_tokens, final.relayed_completion_tokens) == ("completed", 200, 200)
    assert await _in_flight(engine, request_id) == [(holder, None)]  # a tombstone

    # A checkpoint statement that ran late (as one cancelled mid-way at shutdown may) finds the
    # tombstone and changes nothing; were this process then taken for dead, nothing is billed again.
    late = StoredEvent(request_id, subjects.usage(tenant.tenant_id), wire.encode(checkpoint))
    await service.usage.outbox.checkpoint(holder, [late])
    assert await _in_flight(engine, request_id) == [(holder, None)]
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE usage_in_flight SET updated_at = now() - interval '1 hour' WHERE request_id = :id"),
            {"id": request_id},
        )
    assert [e.request_id for e in await service.usage.outbox.claim_orphaned(0.0)] == []
    assert await _in_flight(engine, request_id) == []  # an hour-old tombstone is dropped


async def test_a_stream_whose_api_was_taken_for_dead_is_billed_in_full(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client, engine: AsyncEngine, settings: Settings
) -> None:
    """A replica cut off from PostgreSQL for a minute while it relays looks dead: another replica
    bills the stream as of its last checkpoint. The replica was alive after all and relays the
    stream to its end: what it relayed after that checkpoint is billed too, as the request's
    ``.rest``, so the two events add up to the whole stream, each token billed once."""
    await fleet({"slow": echo_node("slow", words=200, delay=0.02)})  # a 4 s stream
    service = api.app.state.app_state.services["token"]
    async with _streaming(api.url, tenant.secret, 200) as (request_id, lines):
        await _read_tokens(lines, 5)
        assert await service.checkpoint() >= 1
        await _holder_silent(engine, service.limiter.holder)
        await service.usage.sweep()  # another replica's sweep would do the same
        async for _ in lines:
            pass
    js = nc.jetstream()
    events: dict[str, wire.UsageEvent] = {}
    deadline = time.monotonic() + 10
    while len(events) < 2:  # every usage event of the tenant's, oldest first
        assert time.monotonic() < deadline, f"usage events published: {sorted(events)}"
        events.clear()
        seq = 1
        with contextlib.suppress(nats.js.errors.NotFoundError):
            while True:
                msg = await js.get_msg(subjects.USAGE_STREAM, seq, subjects.usage(tenant.tenant_id), next=True)
                event = wire.decoder(wire.UsageEvent).decode(msg.data or b"")
                events[event.request_id] = event
                seq = (msg.seq or seq) + 1
        await asyncio.sleep(0.05)
    assert sorted(events) == [request_id, request_id + REST_SUFFIX]
    billed, rest = events[request_id], events[request_id + REST_SUFFIX]
    assert billed.outcome == "failed"  # the checkpoint, as published for a process taken for dead
    assert rest.outcome == "completed"
    # Through billing's own ingest: the two records charge the 200 tokens, each once, and the
    # rest's engine and relayed counts agree (reconciliation flags no mismatch).
    conn = await asyncpg.connect(plain_url(engine.url.render_as_string(hide_password=False)))
    try:
        await ingest.store_batch(conn, [billed, rest], settings.currency)
        charged = await conn.fetchval(
            "SELECT sum(billed_completion_tokens) FROM usage_records WHERE request_id = ANY($1::text[])",
            [request_id, request_id + REST_SUFFIX],
        )
    finally:
        await conn.close()
    assert charged == 200
    assert rest.completion_tokens == rest.relayed_completion_tokens
    # The prompt as the checkpoint counted it (the api's estimate until the engine reports), and
    # no more: the rest never takes back what was billed.
    assert rest.prompt_tokens == max(0, 7 - billed.prompt_tokens)
    assert rest.ttft_ms is None  # the request's latency is counted once


async def test_a_whole_response_is_not_checkpointed(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, engine: AsyncEngine
) -> None:
    """Its client gets nothing until the end: if the api died before, nothing was delivered to bill."""
    nodes = await fleet({"slow": echo_node("slow", words=100, delay=0.02)})  # 2 s of output
    service = api.app.state.app_state.services["token"]
    headers = {"Authorization": f"Bearer {tenant.secret}"}
    async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=30) as client:
        whole = asyncio.create_task(client.post("/v1/completions", json={**_body(100), "stream": False}))
        for _ in range(500):
            if nodes.placed:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # well into its output
        assert not whole.done()
        assert await service.checkpoint() == 0
        response = await whole
    assert response.status_code == 200
    assert await _in_flight(engine, response.headers["x-request-id"]) == []


async def test_a_stream_whose_api_process_dies_is_billed_as_of_its_last_checkpoint(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client, engine: AsyncEngine, settings: Settings
) -> None:
    await fleet({"slow": echo_node("slow", words=1000, delay=0.02)})  # a 20 s stream
    port = free_port()
    env = service_env(settings, MARKET_USAGE_CHECKPOINT="0.2")
    doomed = subprocess.Popen(
        [sys.executable, "-m", "api", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    usage = api.app.state.app_state.services["token"].usage
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await probe.get("/readyz")).status_code == 200:
                        break
                assert doomed.poll() is None, "the api process stopped"
                assert time.monotonic() < deadline, "the api process did not start"
                await asyncio.sleep(0.1)
        async with _streaming(url, tenant.secret, 1000) as (request_id, lines):
            received = await _read_tokens(lines, 20)
            deadline = time.monotonic() + 10
            while True:  # a checkpoint (one every 0.2 s) with at least what the client has read
                rows = await _in_flight(engine, request_id)
                if rows and rows[0][1] is not None and rows[0][1].relayed_completion_tokens >= received:
                    break
                assert time.monotonic() < deadline, f"no checkpoint with {received} tokens: {rows}"
                await asyncio.sleep(0.1)
            await usage.sweep()  # the process lives: its streams are nobody else's to bill
            [(holder, _)] = await _in_flight(engine, request_id)
            doomed.kill()  # mid-stream: no final event, no settle, no goodbye
            doomed.wait()
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()
    await _holder_silent(engine, holder)  # a minute later, as far as the sweep can tell
    await usage.sweep()
    event, _ = await usage_event(nc, tenant.tenant_id, request_id=request_id, timeout=10)
    assert event.outcome == "failed"
    assert (event.node_id, event.provider_id, event.key_id) == ("slow", "prov_fake", tenant.key_id)
    assert event.prompt_tokens > 0
    assert received <= event.relayed_completion_tokens < 1000  # at least what the client had read
    assert await _in_flight(engine, request_id) == [(holder, None)]  # kept, claimed: no checkpoint overwrites it


async def test_the_api_tells_nodes_which_of_their_jobs_it_still_relays(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client
) -> None:
    """So a node can stop a job whose api process died (the agent's side: tests/nodes)."""
    jobs: list[wire.Job] = []
    slow = echo_node("slow", words=100, delay=0.02)

    async def recorded(job: wire.Job, reply: str, client: Client) -> None:
        jobs.append(job)
        await slow(job, reply, client)

    await fleet({"slow": recorded})
    heard: list[wire.Keepalive] = []

    async def on_keepalive(msg: Any) -> None:
        heard.append(wire.decoder(wire.Keepalive).decode(msg.data))

    sub = await nc.subscribe(subjects.node_keepalive("slow"), cb=on_keepalive)
    service = api.app.state.app_state.services["token"]
    try:
        async with _streaming(api.url, tenant.secret, 100) as (request_id, lines):
            await _read_tokens(lines, 3)
            assert await service.keepalive() >= 1
            async for _ in lines:
                pass
        await nc.flush()
        await asyncio.sleep(0.1)
        assert any(request_id in k.job_ids for k in heard)
        assert [job.keepalive_s for job in jobs] == [KEEPALIVE_S]
        heard.clear()
        await service.keepalive()
        await nc.flush()
        await asyncio.sleep(0.1)
        assert not any(request_id in k.job_ids for k in heard)  # ended: no longer asked for
    finally:
        await sub.unsubscribe()

"""The token API's own behaviour through the official ``openai`` SDK and raw HTTP.

Placement and nodes are scripted (``FakeFleet``) so each failure rule can be forced; the same
paths through the real scheduler, node agent and vLLM are in tests/e2e.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest
from nats.aio.client import Client
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from api.token.outbox import StoredEvent, UsageOutbox
from api.token.relay import Inboxes, SchedulerWatch, UsagePublisher
from market import bus, subjects, wire
from market.db import plain_url, session_factory
from market.models import ApiKey, TenantModel
from market.settings import Settings
from tests.billing.conftest import usage_event as make_usage_event
from tests.conftest import RunningApi, row_locked
from tests.token.conftest import (
    KEY_BUCKET,
    FakeFleet,
    NodeBehaviour,
    TenantKey,
    chunk,
    echo_node,
    make_tenant,
    use_up_quota,
)

Fleet = Callable[..., Awaitable[FakeFleet]]


def sdk(api: RunningApi, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=api.url + "/v1", api_key=key, max_retries=0, timeout=30)


async def usage_event(
    nc: Client, tenant_id: str, timeout: float = 5.0, request_id: str | None = None
) -> tuple[wire.UsageEvent, dict[str, str]]:
    """The newest usage event the api published for ``tenant_id`` on JetStream; with
    ``request_id``, waits until the newest is that request's."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = await js.get_last_msg(subjects.USAGE_STREAM, subjects.usage(tenant_id))
            event = wire.decoder(wire.UsageEvent).decode(msg.data or b"")
            assert request_id in (None, event.request_id), f"no usage event for {request_id}"
            return event, dict(msg.headers or {})
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def stream_until_error(api: RunningApi, tenant: TenantKey, error: str) -> tuple[str, float]:
    """A streamed chat that must end in an APIError matching ``error``: the text received before
    it, and the seconds it took."""
    stream = await sdk(api, tenant.secret).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=10, stream=True
    )
    received: list[str] = []
    started = time.monotonic()
    with pytest.raises(openai.APIError, match=error):
        async for event in stream:
            received.extend(c.delta.content or "" for c in event.choices)
    return "".join(received), time.monotonic() - started


async def cancels_sent(fleet: FakeFleet) -> list[str]:
    """The job ids the nodes were told to cancel, once the first has arrived (or after 1 s)."""
    for _ in range(50):
        if fleet.cancels:
            break
        await asyncio.sleep(0.02)
    return fleet.cancels


async def test_chat_completion_and_usage_event(api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client) -> None:
    await fleet({"node_a": echo_node("node_a")})
    result = await sdk(api, tenant.secret).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0.5, seed=1
    )
    assert result.choices[0].message.content == "w0 w1 w2 w3 w4 "
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (7, 5, 12)
    assert result.model == "fake-model"
    event, headers = await usage_event(nc, tenant.tenant_id)
    assert headers["Nats-Msg-Id"] == event.request_id
    assert result.id == "chatcmpl-" + event.request_id.removeprefix("req_")
    assert (event.prompt_tokens, event.completion_tokens, event.relayed_completion_tokens) == (7, 5, 5)
    assert event.outcome == "completed"
    assert event.node_id == "node_a"
    assert event.key_id == tenant.key_id
    assert event.ttft_ms is not None
    assert event.ttft_ms <= event.duration_ms


async def test_one_request_id_names_the_response_and_the_usage(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client
) -> None:
    await fleet({"node_a": echo_node("node_a")})
    async with httpx.AsyncClient(base_url=api.url) as client:
        response = await client.post(
            "/v1/completions",
            headers={"Authorization": f"Bearer {tenant.secret}"},
            json={"model": "fake-model", "prompt": "x", "max_tokens": 2},
        )
    assert response.status_code == 200
    ids = response.headers.get_list("x-request-id")
    event, _ = await usage_event(nc, tenant.tenant_id)
    assert ids == [event.request_id]


async def test_streamed_chat_with_usage(api: RunningApi, tenant: TenantKey, fleet: Fleet) -> None:
    await fleet({"node_a": echo_node("node_a", words=4)})
    stream = await sdk(api, tenant.secret).chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, usage, roles = [], None, []
    async for event in stream:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            texts.append(choice.delta.content or "")
            roles.append(choice.delta.role)
    assert "".join(texts) == "w0 w1 w2 w3 "
    assert roles[0] == "assistant"
    assert usage is not None
    assert usage.completion_tokens == 4


async def test_completions_streamed_and_not(api: RunningApi, tenant: TenantKey, fleet: Fleet) -> None:
    await fleet({"node_a": echo_node("node_a", words=3)})
    client = sdk(api, tenant.secret)
    whole = await client.completions.create(model="fake-model", prompt="once upon", max_tokens=3, stop=["\n"])
    assert whole.choices[0].text == "w0 w1 w2 "
    assert whole.object == "text_completion"
    parts = [
        c.choices[0].text
        async for c in await client.completions.create(
            model="fake-model", prompt="once upon", max_tokens=3, stream=True
        )
        if c.choices
    ]
    assert "".join(parts) == "w0 w1 w2 "


async def test_fails_over_before_first_token(api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client) -> None:
    """A node whose engine is down, and one that never answers: the client never notices."""

    async def broken(job: wire.Job, reply: str, client: Client) -> None:
        await client.publish(reply, chunk(job, "broken", 0, "accepted"))
        await client.publish(
            reply, chunk(job, "broken", 1, "error", error="engine down", error_code="engine_unavailable")
        )

    async def silent(job: wire.Job, reply: str, client: Client) -> None:
        return None

    f = await fleet({"broken": broken, "silent": silent, "good": echo_node("good")})
    result = await sdk(api, tenant.secret).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=5
    )
    assert result.choices[0].message.content == "w0 w1 w2 w3 w4 "
    assert [node for _, node in f.placed] == ["broken", "silent", "good"]
    event, _ = await usage_event(nc, tenant.tenant_id)
    assert event.node_id == "good"


async def test_a_job_placed_twice_is_cancelled_on_the_node_it_was_not_placed_on(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client
) -> None:
    """A scheduler replica taken for dead that wakes may place a job the api has since had placed
    by another: the client gets the output of the node its placement named, and the other node,
    running the job for nobody, is told to cancel it at its first output."""
    f = await fleet(
        {"placed": echo_node("placed", words=5, delay=0.02), "twice": echo_node("twice", words=200, delay=0.02)}
    )
    f.also_to = "twice"
    result = await sdk(api, tenant.secret).completions.create(model="fake-model", prompt="x", max_tokens=5)
    assert result.choices[0].text == "w0 w1 w2 w3 w4 "
    [(job_id, _)] = f.placed
    for _ in range(100):
        if f.cancelled_on:
            break
        await asyncio.sleep(0.02)
    assert f.cancelled_on == [("twice", job_id)]
    event, _ = await usage_event(nc, tenant.tenant_id)
    assert (event.node_id, event.completion_tokens) == ("placed", 5)


async def test_a_submission_no_scheduler_answers_is_sent_once_more(
    api: RunningApi, tenant: TenantKey, fleet: Fleet
) -> None:
    """A replica that dies with a job it has not answered: the api sends the job again after
    twice the accept timeout, and the client gets its answer; unanswered twice, a 503."""
    f = await fleet({"good": echo_node("good")})
    f.unanswered = 1
    result = await sdk(api, tenant.secret).completions.create(model="fake-model", prompt="x", max_tokens=5)
    assert result.choices[0].text == "w0 w1 w2 w3 w4 "
    assert f.submissions == 2
    f.unanswered = 2
    with pytest.raises(openai.APIStatusError) as unanswered:
        await sdk(api, tenant.secret).completions.create(model="fake-model", prompt="x", max_tokens=5)
    assert unanswered.value.status_code == 503
    assert f.submissions == 4


async def test_a_refusal_while_no_scheduler_answers_is_told_at_once(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, engine: AsyncEngine
) -> None:
    """The admission (running beside placement) refuses while the submission waits for a scheduler
    that never answers: the client gets the refusal now, not after the submission's timeouts
    (twice the accept timeout, 1 s in tests, then as long again for the one resend)."""
    async with session_factory(engine)() as session, session.begin():
        await session.execute(update(ApiKey).where(ApiKey.id == tenant.key_id).values(requests_per_minute=100))
    f = await fleet({"good": echo_node("good")})
    client = sdk(api, tenant.secret)
    await client.completions.create(model="fake-model", prompt="x", max_tokens=5)  # the key has room
    await use_up_quota(engine, tenant.tenant_id)  # the grant is used up meanwhile
    f.unanswered = 2
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        await client.completions.create(model="fake-model", prompt="x", max_tokens=5)
    assert refused.value.code == "insufficient_quota"
    assert time.monotonic() - started < 1.0
    assert f.submissions == 2  # sent beside its admission, and not again


async def test_a_scheduler_replica_is_taken_for_dead_only_while_the_others_are_heard(nc: Client) -> None:
    """A replica whose beats stop while the others' go on is gone (its waiting jobs are submitted
    again); when this api heard nobody for a while (its own connection or loop stalled), nobody
    is, until the beats have come again for a whole timeout."""
    watch = SchedulerWatch(nc, timeout_s=1.0)
    for step in range(30):  # both replicas beat every 0.1 s for 3 s
        watch.heard("a", 100.0 + step * 0.1)
        watch.heard("b", 100.0 + step * 0.1)
    assert not watch.gone("a", since=100.0, now=103.0)
    stalled = SchedulerWatch(nc, timeout_s=1.0)
    stalled.seen, stalled.last_any, stalled.hearing_since = dict(watch.seen), watch.last_any, watch.hearing_since
    for step in range(1, 17):  # "b" beats on to 104.5, "a" is silent
        watch.heard("b", 102.9 + step * 0.1)
    assert watch.gone("a", since=100.0, now=104.5)
    assert not watch.gone("b", since=100.0, now=104.5)
    assert not watch.gone("a", since=104.0, now=104.5)  # a job queued there lately: not yet
    stalled.heard("b", 104.5)  # the first beat this api hears after 1.6 s of silence
    assert not stalled.gone("a", since=100.0, now=104.6)
    for step in range(1, 12):
        stalled.heard("b", 104.5 + step * 0.1)
    assert stalled.gone("a", since=100.0, now=105.6)


async def test_node_failure_mid_stream_ends_with_error_and_bills_what_was_delivered(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client
) -> None:
    async def dies(job: wire.Job, reply: str, client: Client) -> None:
        await client.publish(reply, chunk(job, "n", 0, "accepted"))
        await client.publish(reply, chunk(job, "n", 1, "data", pieces=[wire.Piece(0, "a", 1)]))
        await client.publish(reply, chunk(job, "n", 2, "data", pieces=[wire.Piece(0, "b", 1)]))
        await client.publish(reply, chunk(job, "n", 3, "error", error="gpu fell off", error_code="engine_error"))

    await fleet({"n": dies})
    stream = await sdk(api, tenant.secret).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=10, stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="gpu fell off"):
        async for event in stream:
            received.extend(c.delta.content for c in event.choices)
    assert "".join(received) == "ab"
    event, _ = await usage_event(nc, tenant.tenant_id)
    assert event.outcome == "failed"
    assert event.relayed_completion_tokens == 2


async def test_a_node_silent_mid_stream_is_given_up_on_and_cancelled(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output stops without an end: the client gets an error, the node a cancel, the tenant a bill."""
    monkeypatch.setattr("api.token.service.INTER_CHUNK_TIMEOUT_S", 1.0)

    async def hangs(job: wire.Job, reply: str, client: Client) -> None:
        await client.publish(reply, chunk(job, "n", 0, "accepted"))
        await client.publish(reply, chunk(job, "n", 1, "data", pieces=[wire.Piece(0, "a", 1)]))
        await asyncio.sleep(0.3)  # slower than usual, within the timeout
        await client.publish(reply, chunk(job, "n", 2, "data", pieces=[wire.Piece(0, "b", 1)]))

    f = await fleet({"n": hangs})
    received, took = await stream_until_error(api, tenant, "stopped sending")
    assert received == "ab"
    assert 1.0 <= took < 6
    event, _ = await usage_event(nc, tenant.tenant_id)
    assert (event.outcome, event.relayed_completion_tokens) == ("failed", 2)
    assert await cancels_sent(f) == [event.request_id]


async def first_token_then_reported_lost(job: wire.Job, reply: str, client: Client) -> None:
    """Node ``n`` sends its first token ``a``; then a scheduler announces ``n`` lost."""
    await client.publish(reply, chunk(job, "n", 0, "accepted"))
    await client.publish(reply, chunk(job, "n", 1, "data", pieces=[wire.Piece(0, "a", 1)]))
    lost = wire.FleetEvent(kind="node_lost", node_id="n", at=time.time())
    await client.publish(subjects.FLEET_EVENTS, wire.encode(lost))


async def test_a_node_reported_lost_that_keeps_streaming_finishes_its_stream(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler that missed a busy node's heartbeats does not cut off the streams it is serving."""
    monkeypatch.setattr("api.token.service.LOST_GRACE_S", 0.5)

    async def slow_heartbeats(job: wire.Job, reply: str, client: Client) -> None:
        await first_token_then_reported_lost(job, reply, client)
        await asyncio.sleep(0.3)  # within the grace: the output proves the node alive
        await client.publish(reply, chunk(job, "n", 2, "data", pieces=[wire.Piece(0, "b", 1)]))
        await asyncio.sleep(0.7)  # longer than the grace, but the report was answered already
        await client.publish(reply, chunk(job, "n", 3, "data", pieces=[wire.Piece(0, "c", 1, "length")]))
        await client.publish(reply, chunk(job, "n", 4, "end", usage=wire.Usage(7, 3)))

    await fleet({"n": slow_heartbeats})
    stream = await sdk(api, tenant.secret).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True
    )
    received = [c.delta.content async for event in stream for c in event.choices]
    assert "".join(x for x in received if x) == "abc"
    event, _ = await usage_event(nc, tenant.tenant_id)
    assert (event.outcome, event.completion_tokens) == ("completed", 3)


async def test_a_node_reported_lost_and_silent_ends_the_stream_with_an_error(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost and silent: the client learns within the grace, long before the stall timeout."""
    monkeypatch.setattr("api.token.service.LOST_GRACE_S", 0.5)

    f = await fleet({"n": first_token_then_reported_lost})  # and silent from then on
    received, took = await stream_until_error(api, tenant, "was lost")
    assert received == "a"
    assert took < 5  # not the 60 s stall timeout
    event, _ = await usage_event(nc, tenant.tenant_id)
    assert (event.outcome, event.relayed_completion_tokens) == ("failed", 1)
    assert await cancels_sent(f) == [event.request_id]


async def test_a_node_that_accepts_but_never_answers_is_a_504_and_a_cancel(
    api: RunningApi, tenant: TenantKey, fleet: Fleet
) -> None:
    """Accepted, then no first token within ``MARKET_FIRST_TOKEN_TIMEOUT``: the client is not left
    hanging, and the node is told to stop."""

    async def stuck(job: wire.Job, reply: str, client: Client) -> None:
        await client.publish(reply, chunk(job, "n", 0, "accepted"))

    with api.token_settings(first_token_timeout_s=1.0):
        f = await fleet({"n": stuck})
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            await (
                sdk(api, tenant.secret)
                .with_options(max_retries=0)
                .chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=3)
            )
        waited = time.monotonic() - started
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "timeout"  # type: ignore[index]
    assert 1.0 <= waited < 5
    assert len(await cancels_sent(f)) == 1


async def test_chunk_batches_reach_their_jobs_and_no_node_speaks_for_another(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client
) -> None:
    """Chunks in batches (``fleet.relay.<node>.<api>``) are relayed, but a chunk counts only from
    the node the job was placed on: not one sent in another node's name, nor one a node sends for
    a job it was not given (NATS lets a node publish only under its own id)."""

    def item(job: wire.Job, reply: str, node: str, seq: int, kind: str, **kw: Any) -> wire.RelayedChunk:
        return wire.RelayedChunk(reply, wire.Chunk(job_id=job.id, node_id=node, seq=seq, kind=kind, **kw))

    async def honest(job: wire.Job, reply: str, client: Client) -> None:
        assert job.relay_to
        forged = wire.Piece(0, "FORGED ", 1)
        for sender, claimed in (("rogue", "honest"), ("rogue", "rogue")):
            batch = wire.ChunkBatch([item(job, reply, claimed, 0, "data", pieces=[forged])])
            await client.publish(subjects.node_relay(sender, job.relay_to), wire.encode(batch))
        await client.flush()
        await asyncio.sleep(0.05)
        batch = wire.ChunkBatch(
            [
                item(job, reply, "honest", 0, "data", pieces=[wire.Piece(0, "ok ", 1)]),
                item(job, reply, "honest", 1, "end", pieces=[wire.Piece(0, "fine", 1, "stop")], usage=wire.Usage(3, 2)),
            ]
        )
        await client.publish(subjects.node_relay("honest", job.relay_to), wire.encode(batch))

    await fleet({"honest": honest})
    result = await sdk(api, tenant.secret).completions.create(model="fake-model", prompt="x", max_tokens=5)
    assert result.choices[0].text == "ok fine"
    event, _ = await usage_event(nc, tenant.tenant_id)
    assert (event.completion_tokens, event.relayed_completion_tokens) == (2, 2)


async def test_client_disconnect_cancels_on_the_node(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client
) -> None:
    f = await fleet({"slow": echo_node("slow", words=200, delay=0.02)})
    async with (
        httpx.AsyncClient(base_url=api.url) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {tenant.secret}"},
            json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": True},
        ) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break
    for _ in range(100):
        if f.cancels:
            break
        await asyncio.sleep(0.05)
    assert len(f.cancels) == 1
    event, _ = await usage_event(nc, tenant.tenant_id)
    assert event.outcome == "cancelled"
    assert event.request_id == f.cancels[0]
    assert 1 <= event.relayed_completion_tokens < 200


async def test_no_capacity_is_503_with_retry_after(api: RunningApi, tenant: TenantKey, fleet: Fleet) -> None:
    await fleet({})
    async with httpx.AsyncClient(base_url=api.url) as client:
        response = await client.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {tenant.secret}"},
            json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]},
        )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["code"] == "no_capacity"


async def test_a_burst_waits_briefly_for_a_free_slot(api: RunningApi, tenant: TenantKey, fleet: Fleet) -> None:
    """Every node busy for a moment: the request waits at the gateway instead of failing."""
    f = await fleet({"node_a": echo_node("node_a")})
    f.busy_answers = 3
    result = await sdk(api, tenant.secret).completions.create(model="fake-model", prompt="x", max_tokens=5)
    assert result.choices[0].text == "w0 w1 w2 w3 w4 "
    assert f.busy_answers == 0


async def test_an_admission_beside_placement_refuses_before_any_output(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client, engine: AsyncEngine
) -> None:
    """A key admitted with room left has its next job placed while its admission runs. When that
    admission refuses (the quota ran out meanwhile), the client gets the refusal and no output,
    the node is told to abort, nothing stays held, and the work the node did is recorded as
    ``refused`` (its provider is paid, the tenant not charged); the key's next request is judged
    before it is placed. Over quota with no capacity either, the quota is the error."""
    async with session_factory(engine)() as session, session.begin():
        await session.execute(update(ApiKey).where(ApiKey.id == tenant.key_id).values(requests_per_minute=100))
    f = await fleet({"node_a": echo_node("node_a", delay=0.05)})
    remaining = []
    async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {tenant.secret}"}) as client:
        for stream in (False, True):
            response = await client.post(
                "/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 2, "stream": stream}
            )
            assert response.status_code == 200
            remaining.append(response.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["99", "98"]  # the second was admitted beside its placement, headers and all
    await usage_event(nc, tenant.tenant_id, request_id=response.headers["x-request-id"])  # the second: billed
    assert len(f.placed) == 2

    await use_up_quota(engine, tenant.tenant_id)
    tenant_sdk = sdk(api, tenant.secret)
    # The key's rate-limit row locked: the admission waits until the job is placed and running.
    async with row_locked(engine, KEY_BUCKET, tenant.key_id) as release:
        asking = asyncio.create_task(
            tenant_sdk.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
            )
        )
        for _ in range(250):
            if len(f.placed) == 3:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the placement answered, the node's output coming
        await release()
        with pytest.raises(openai.RateLimitError) as refused:
            await asking
    assert refused.value.code == "insufficient_quota"
    assert len(f.placed) == 3  # placed while its admission ran...
    refused_job = f.placed[-1][0]
    for _ in range(100):  # ...and aborted on its node
        if refused_job in f.cancels:
            break
        await asyncio.sleep(0.02)
    assert refused_job in f.cancels

    with pytest.raises(openai.RateLimitError):
        await tenant_sdk.completions.create(model="fake-model", prompt="x", max_tokens=2)
    assert len(f.placed) == 3  # the refusal closed the way: this one was judged first

    await asyncio.sleep(0.3)
    # The node's work on the refused job is recorded for its provider's pay (the tenant is charged
    # nothing: see tests/billing), with the node's own count; the refusal judged first has no event.
    paid, _ = await usage_event(nc, tenant.tenant_id, request_id=refused_job)
    assert (paid.outcome, paid.node_id, paid.prompt_tokens, paid.completion_tokens) == ("refused", "node_a", 7, 5)
    assert paid.relayed_completion_tokens == 5  # what reached the api (this node ignores cancels)
    async with session_factory(engine)() as session:
        held = await session.scalar(
            text("SELECT sum(held) FROM tenant_quotas WHERE tenant_id = :t"), {"t": tenant.tenant_id}
        )
    assert held == 0

    async with session_factory(engine)() as session, session.begin():
        await session.execute(text("UPDATE tenant_quotas SET used = 0 WHERE tenant_id = :t"), {"t": tenant.tenant_id})
    await tenant_sdk.completions.create(model="fake-model", prompt="x", max_tokens=2)  # room again
    await use_up_quota(engine, tenant.tenant_id)
    f.busy_answers = 1000
    with pytest.raises(openai.RateLimitError) as both:
        await tenant_sdk.completions.create(model="fake-model", prompt="x", max_tokens=2)
    assert both.value.code == "insufficient_quota"


async def test_admissions_beside_placement_go_only_as_far_as_the_room_left_for_that_model(
    api: RunningApi, engine: AsyncEngine, fleet: Fleet
) -> None:
    """The room a key's last admission left (two more requests here) is taken by each request
    placed while its admission runs: of a burst of five into a quota that ran out meanwhile, two
    are placed (and refused), three are refused before placement. The room is the model's: a
    request for a model the tenant may not use is judged before it is placed."""
    tenant = await make_tenant(engine, "burst", models=(("fake-model", 2048), ("other-model", 2048)))
    async with session_factory(engine)() as session, session.begin():
        await session.execute(update(ApiKey).where(ApiKey.id == tenant.key_id).values(requests_per_minute=3))
        await session.execute(
            text("INSERT INTO tenant_models (tenant_id, model_name) VALUES (:t, 'fake-model')"),
            {"t": tenant.tenant_id},
        )
    f = await fleet({"node_a": echo_node("node_a", delay=0.05)})
    tenant_sdk = sdk(api, tenant.secret)
    await tenant_sdk.completions.create(model="fake-model", prompt="x", max_tokens=2)  # two requests of room left
    with pytest.raises(openai.PermissionDeniedError):
        await tenant_sdk.completions.create(model="other-model", prompt="x", max_tokens=2)
    assert len(f.placed) == 1  # not placed: no room was ever left for that model
    await use_up_quota(engine, tenant.tenant_id)

    async def refused() -> str:
        with pytest.raises(openai.RateLimitError) as error:
            await tenant_sdk.completions.create(model="fake-model", prompt="x", max_tokens=2)
        return str(error.value.code)

    # The key's rate-limit row locked: every admission of the burst waits, so all five find the same room.
    async with row_locked(engine, KEY_BUCKET, tenant.key_id) as release:
        burst = asyncio.gather(*(refused() for _ in range(5)))
        await asyncio.sleep(0.5)
        placed_while_admitting = len(f.placed) - 1
        await release()
        codes = await burst
    assert placed_while_admitting == 2  # the two the room let through; the rest wait for their admission
    assert codes == ["insufficient_quota"] * 5
    assert len(f.placed) == 3


async def test_a_job_placed_as_its_refused_admission_withdraws_it_is_cancelled_on_its_node(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, engine: AsyncEngine
) -> None:
    """The admission refuses while the scheduler's answer is on its way: the client gets the 429
    at once, and when the answer comes, placing the job after all, the job is cancelled on the
    node it names (a node answering the api's inbox directly has no other way to learn it)."""
    async with session_factory(engine)() as session, session.begin():
        await session.execute(update(ApiKey).where(ApiKey.id == tenant.key_id).values(requests_per_minute=100))
    f = await fleet({"node_a": echo_node("node_a", words=50, delay=0.05)})
    tenant_sdk = sdk(api, tenant.secret)
    await tenant_sdk.completions.create(model="fake-model", prompt="x", max_tokens=2)  # admitted, with room
    await use_up_quota(engine, tenant.tenant_id)
    f.answer_delay = 0.8
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        await tenant_sdk.completions.create(model="fake-model", prompt="x", max_tokens=5)
    assert refused.value.code == "insufficient_quota"
    assert time.monotonic() - started < 0.8  # not held back until the answer came
    assert len(f.placed) == 2
    refused_job = f.placed[-1][0]
    for _ in range(150):
        if refused_job in f.cancels:
            break
        await asyncio.sleep(0.02)
    assert f.cancelled_on == [("node_a", refused_job)]


async def test_an_engine_that_finds_the_request_too_long_is_context_length_exceeded(
    api: RunningApi, tenant: TenantKey, fleet: Fleet
) -> None:
    """vLLM says in words only that a request does not fit its context: the client gets OpenAI's
    code for it, which frameworks check before trimming a conversation."""

    async def too_long(job: wire.Job, reply: str, nc: Client) -> None:
        message = "This model's maximum context length is 2048 tokens. However, your request has 3000 input tokens."
        await nc.publish(
            reply, chunk(job, "node_a", 0, "error", error=message, error_code="invalid_request", status=400)
        )

    await fleet({"node_a": too_long})
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(api, tenant.secret).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}]
        )
    assert (refused.value.code, refused.value.param) == ("context_length_exceeded", "messages")
    assert "maximum context length is 2048" in str(refused.value)


async def test_no_scheduler_is_503(api: RunningApi, tenant: TenantKey) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        await sdk(api, tenant.secret).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.status_code == 503
    assert err.value.response.headers["retry-after"] == "1"


async def post_raw(api: RunningApi, tenant: TenantKey, path: str, body: bytes | str) -> httpx.Response:
    """POST ``body`` as it is (no SDK to tidy it up) with the tenant's key."""
    async with httpx.AsyncClient(base_url=api.url) as client:
        return await client.post(
            path, content=body, headers={"Authorization": f"Bearer {tenant.secret}", "content-type": "application/json"}
        )


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_request", None),
        (b"", 400, "invalid_request", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "invalid_request", None),
        (b'{"model": "fake-model", "messages": []}', 400, "invalid_request", "messages"),
        (b'{"model": "fake-model", "messages": [{"role": "robot", "content": "x"}]}', 400, "invalid_request", None),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "temperature": 5}',
            400,
            "invalid_request",
            "temperature",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            400,
            "invalid_request",
            "max_tokens",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}',
            400,
            "context_length_exceeded",
            "max_tokens",
        ),
        (
            b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model_not_found",
            "model",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551616}',
            400,
            "invalid_request",
            "seed",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "seed": 9223372036854775808}',
            400,
            "invalid_request",
            "seed",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}],'
            b' "stream_options": {"include_usage": true}}',
            400,
            "invalid_request",
            "stream_options",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "function_call": "auto"}',
            400,
            "unsupported_parameter",
            "function_call",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "logprobs": true,'
            b' "top_logprobs": 21}',
            400,
            "invalid_request",
            "top_logprobs",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}],'
            b' "response_format": {"type": "yaml"}}',
            400,
            "invalid_request",
            "response_format.type",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}],'
            b' "response_format": {"type": "json_schema", "json_schema": {"name": "has spaces"}}}',
            400,
            "invalid_request",
            "response_format.json_schema.name",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"7": 101}}',
            400,
            "invalid_request",
            "logit_bias",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"seven": 1}}',
            400,
            "invalid_request",
            "logit_bias",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"},'
            b' {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}',
            400,
            "unsupported_parameter",
            "messages[0].content[1]",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "guided_json": {}}',
            400,
            "unsupported_parameter",
            "guided_json",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}],'
            b' "chat_template_kwargs": {"enable_thinking": false}}',
            400,
            "unsupported_parameter",
            "chat_template_kwargs",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low"}',
            400,
            "unsupported_parameter",
            "reasoning_effort",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3,'
            b' "min_tokens": 4}',
            400,
            "invalid_request",
            "min_tokens",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "top_k": -2}',
            400,
            "invalid_request",
            "top_k",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}',
            400,
            "invalid_request",
            "repetition_penalty",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stop_token_ids": [-1]}',
            400,
            "invalid_request",
            "stop_token_ids[0]",
        ),
        (  # past what msgpack carries to the scheduler: refused by name, not where the job is encoded
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "top_k": 18446744073709551616}',
            400,
            "invalid_request",
            "top_k",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}],'
            b' "stop_token_ids": [18446744073709551616]}',
            400,
            "invalid_request",
            "stop_token_ids[0]",
        ),
        (  # free-form JSON, as deep as it goes
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function",'
            b' "function": {"name": "f", "parameters": {"type": "object",'
            b' "x": [{"maximum": -18446744073709551616}]}}}]}',
            400,
            "invalid_request",
            "tools[0].function.parameters",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "response_format": {"type":'
            b' "json_schema", "json_schema": {"name": "s", "schema": {"maximum": 18446744073709551616}}}}',
            400,
            "invalid_request",
            "response_format.json_schema.schema",
        ),
        (b'{"model": "fake-model", "messages": [{"role": "user"}]}', 400, "invalid_request", "messages[0].content"),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}',
            400,
            "invalid_request",
            "messages[1].content",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "tool", "content": "42"}]}',
            400,
            "invalid_request",
            "messages[0].tool_call_id",
        ),
        (  # the legacy function calling in the history: refused by name, as at the top
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}, {"role": "assistant",'
            b' "content": null, "function_call": {"name": "f", "arguments": "{}"}}]}',
            400,
            "unsupported_parameter",
            "messages[1].function_call",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "x": '
            + b"[" * 5000
            + b"]" * 5000
            + b"}",
            400,
            "invalid_request",
            None,
        ),
    ],
)
async def test_bad_requests_get_openai_errors(
    api: RunningApi, tenant: TenantKey, body: bytes, status: int, code: str, param: str | None
) -> None:
    response = await post_raw(api, tenant, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "fake-model", "prompt": ["a", "b"]}', "prompt"),
        (b'{"model": "fake-model", "prompt": [[1, 2], [3]]}', "prompt"),
        (b'{"model": "fake-model", "prompt": [1, 2.5]}', "prompt"),
        (b'{"model": "fake-model", "prompt": [1, true]}', "prompt"),
        (b'{"model": "fake-model", "prompt": [-1]}', "prompt"),
        (b'{"model": "fake-model", "prompt": [18446744073709551616]}', "prompt"),
        (b'{"model": "fake-model", "prompt": []}', "prompt"),
        (b'{"model": "fake-model", "prompt": [[]]}', "prompt"),
        (b'{"model": "fake-model", "prompt": "x", "best_of": 3}', "best_of"),
        (b'{"model": "fake-model", "prompt": "x", "best_of": "x"}', "best_of"),
        (b'{"model": "fake-model", "prompt": "x", "min_tokens": 18446744073709551616}', "min_tokens"),
        (b'{"model": "fake-model", "prompt": ' + b"[" + b"1, " * 3000 + b"1]}", "max_tokens"),
    ],
)
async def test_bad_completion_requests_name_the_field(
    api: RunningApi, tenant: TenantKey, body: bytes, param: str
) -> None:
    response = await post_raw(api, tenant, "/v1/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_a_prompt_of_token_ids_reaches_the_engine_as_sent_and_counts_exactly(
    api: RunningApi, tenant: TenantKey, fleet: Fleet
) -> None:
    """OpenAI's and vLLM's completions take token ids for a prompt (a list, or a list of one list):
    the engine gets them as they came, and the quota hold and placement count them, not guess."""
    f = await fleet({"node_a": echo_node("node_a", words=2)})
    client = sdk(api, tenant.secret)
    ids = [5, 17, 300, 2]
    completion = await client.completions.create(model="fake-model", prompt=ids, max_tokens=3)
    assert completion.choices[0].text == "w0 w1 "
    assert (f.jobs[-1].body["prompt"], f.jobs[-1].prompt_tokens) == (ids, 4)
    await client.completions.create(model="fake-model", prompt=[ids], max_tokens=3, best_of=1)
    assert f.jobs[-1].body["prompt"] == ids
    await client.completions.create(model="fake-model", prompt=["as text"], max_tokens=3)
    assert f.jobs[-1].body["prompt"] == "as text"


async def test_an_unpaired_surrogate_escape_is_named_as_such(api: RunningApi, tenant: TenantKey) -> None:
    """msgspec calls it truncated input; the client is told what is wrong with its JSON."""
    body = rb'{"model": "fake-model", "messages": [{"role": "user", "content": "a\ud800b"}]}'
    response = await post_raw(api, tenant, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert "surrogate" in response.json()["error"]["message"]


async def test_nulls_the_sdk_sends_for_unset_parameters_mean_the_defaults(
    api: RunningApi, tenant: TenantKey, fleet: Fleet
) -> None:
    """The SDK's types allow ``n=None``, ``stream=None``, ``echo=None`` and send them as JSON nulls."""
    await fleet({"node_a": echo_node("node_a", words=2)})
    client = sdk(api, tenant.secret)
    chat = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], n=None, stream=None, seed=-(2**63)
    )
    assert chat.choices[0].message.content == "w0 w1 "
    completion = await client.completions.create(model="fake-model", prompt="x", echo=None, n=None, stream=None)
    assert completion.choices[0].text == "w0 w1 "


async def test_structured_output_and_logit_bias_go_to_the_engine_and_empty_tool_fields_are_no_request(
    api: RunningApi, tenant: TenantKey, fleet: Fleet
) -> None:
    """What the SDK and agent frameworks send: the format and the bias reach the node as given;
    ``tools=[]``, ``tool_choice="none"`` and ``logprobs=False`` ask for nothing and are not refused."""
    f = await fleet({"node_a": echo_node("node_a", words=2)})
    client = sdk(api, tenant.secret)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    await client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "x"}],
        response_format=fmt,
        logit_bias={"42": -100},
        tools=[],
        tool_choice="none",
        logprobs=False,
    )
    body = f.jobs[-1].body
    assert body["response_format"] == fmt
    assert body["logit_bias"] == {"42": -100}
    assert not {"tools", "tool_choice", "logprobs"} & body.keys()
    await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], response_format={"type": "text"}
    )
    assert "response_format" not in f.jobs[-1].body  # plain text is what the engine does anyway
    await client.completions.create(model="fake-model", prompt="x", logit_bias={"3": 5})
    assert f.jobs[-1].body["logit_bias"] == {"3": 5}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.completions.create(model="fake-model", prompt="x", suffix="y")
    assert refused.value.body["param"] == "suffix"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        await client.completions.create(model="fake-model", prompt="x", extra_body={"response_format": fmt})
    assert refused.value.body["param"] == "response_format"  # type: ignore[index]


async def test_vllm_sampling_extensions_reach_the_engine_and_text_parts_join_as_vllm_joins_them(
    api: RunningApi, tenant: TenantKey, fleet: Fleet
) -> None:
    """Tenants coming from vLLM send its sampling extensions: each reaches the engine as sent
    (ignoring one would change the answer without a word); a message's text parts join with a
    newline, as vLLM's own server joins them."""
    f = await fleet({"node_a": echo_node("node_a")})
    client = sdk(api, tenant.secret)
    extras = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2, "stop_token_ids": [7, 9]}
    parts: Any = [{"type": "text", "text": "Summarize:"}, {"type": "text", "text": "the report"}]
    await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": parts}], max_tokens=5, extra_body=extras
    )
    body = f.jobs[-1].body
    assert {name: body[name] for name in extras} == extras
    assert body["messages"] == [{"role": "user", "content": "Summarize:\nthe report"}]
    await client.completions.create(model="fake-model", prompt="x", max_tokens=5, extra_body={"top_k": -1})
    assert f.jobs[-1].body["top_k"] == -1
    await client.completions.create(model="fake-model", prompt="x", max_tokens=5)
    assert not set(extras) & f.jobs[-1].body.keys()


async def test_without_max_tokens_a_request_may_use_a_minute_of_its_token_limit(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, engine: AsyncEngine
) -> None:
    """A key allowed fewer tokens a minute than the model's context: a chat request without
    max_tokens is not refused as too large for good; it may generate what one minute of the limit
    allows. What it leaves unused is credited back at its end, so the next such request waits
    only for the tokens actually used to drain (seconds), not for the whole minute it held."""
    async with session_factory(engine)() as session, session.begin():
        await session.execute(update(ApiKey).where(ApiKey.id == tenant.key_id).values(tokens_per_minute=200))
    f = await fleet({"node_a": echo_node("node_a")})
    client = sdk(api, tenant.secret)
    messages: Any = [{"role": "user", "content": "x"}]
    for attempt in range(2):
        answer = await client.chat.completions.create(model="fake-model", messages=messages)
        assert answer.choices[0].message.content == "w0 w1 w2 w3 w4 "
        job = f.jobs[-1]
        assert job.body["max_tokens"] == job.max_tokens == 200 - job.prompt_tokens
        if attempt == 0:
            with pytest.raises(openai.RateLimitError) as wait:  # the 12 tokens used take 3.6 s to drain
                await client.chat.completions.create(model="fake-model", messages=messages)
            retry_after = int(wait.value.response.headers["retry-after"])
            assert 1 <= retry_after <= 5  # not the minute the whole hold would take
            await asyncio.sleep(retry_after)
    with pytest.raises(openai.RateLimitError) as too_large:  # asked for, it is still too large
        await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=1500
        )
    assert too_large.value.code == "request_too_large"


async def test_models_list_only_what_the_tenant_may_use(api: RunningApi, engine: AsyncEngine) -> None:
    """An organisation limited to some models sees only those, and the others are 404 to it, as
    OpenAI answers for a model one has no access to; without a list it sees every active model."""
    limited = await make_tenant(engine, "limited", models=(("fake-model", 2048), ("other-model", 2048)))
    everyone = await make_tenant(engine, "everyone")
    async with session_factory(engine)() as session, session.begin():
        session.add(TenantModel(tenant_id=limited.tenant_id, model_name="other-model"))
    assert [m.id for m in (await sdk(api, limited.secret).models.list()).data] == ["other-model"]
    assert (await sdk(api, limited.secret).models.retrieve("other-model")).id == "other-model"
    with pytest.raises(openai.NotFoundError) as hidden:
        await sdk(api, limited.secret).models.retrieve("fake-model")
    assert hidden.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert sorted(m.id for m in (await sdk(api, everyone.secret).models.list()).data) == ["fake-model", "other-model"]


def logprob_node(node_id: str) -> NodeBehaviour:
    """Two pieces of two tokens each, with their log probabilities and one alternative each."""

    async def behave(job: wire.Job, reply: str, nc: Client) -> None:
        await nc.publish(reply, chunk(job, node_id, 0, "accepted"))
        for seq, (a, b) in enumerate((("He", "llo"), (" wor", "ld")), start=1):
            entries = [
                wire.TokenLogprob(t, -0.5 * seq, list(t.encode()), [wire.TopLogprob("x", -3.0, [120])]) for t in (a, b)
            ]
            finish = "length" if seq == 2 else None
            piece = wire.Piece(0, a + b, 2, finish, entries if job.body.get("logprobs") is not None else None)
            await nc.publish(reply, chunk(job, node_id, seq, "data", pieces=[piece]))
        await nc.publish(reply, chunk(job, node_id, 3, "end", usage=wire.Usage(3, 4)))

    return behave


async def test_log_probabilities_in_both_apis_streamed_or_not(api: RunningApi, tenant: TenantKey, fleet: Fleet) -> None:
    f = await fleet({"node_a": logprob_node("node_a")})
    client = sdk(api, tenant.secret)
    messages: Any = [{"role": "user", "content": "x"}]
    chat = await client.chat.completions.create(model="fake-model", messages=messages, logprobs=True, top_logprobs=1)
    assert (f.jobs[-1].body["logprobs"], f.jobs[-1].body["top_logprobs"]) == (True, 1)
    assert chat.choices[0].logprobs is not None
    content = chat.choices[0].logprobs.content or []
    assert [(e.token, e.logprob, e.bytes) for e in content] == [
        ("He", -0.5, [72, 101]),
        ("llo", -0.5, [108, 108, 111]),
        (" wor", -1.0, [32, 119, 111, 114]),
        ("ld", -1.0, [108, 100]),
    ]
    assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in content] == [[("x", -3.0)]] * 4

    stream = await client.chat.completions.create(model="fake-model", messages=messages, logprobs=True, stream=True)
    streamed = [e.token async for part in stream for c in part.choices for e in (c.logprobs.content or [])]
    assert streamed == ["He", "llo", " wor", "ld"]

    plain = await client.chat.completions.create(model="fake-model", messages=messages)
    assert plain.choices[0].logprobs is None  # not asked for: not sent, not answered
    assert "logprobs" not in f.jobs[-1].body

    completion = await client.completions.create(model="fake-model", prompt="x", logprobs=1)
    assert f.jobs[-1].body["logprobs"] == 1
    lp = completion.choices[0].logprobs
    assert lp is not None
    assert (lp.tokens, lp.text_offset) == (["He", "llo", " wor", "ld"], [0, 2, 5, 9])
    assert lp.token_logprobs == [-0.5, -0.5, -1.0, -1.0]
    assert lp.top_logprobs == [{"x": -3.0}] * 4
    parts = await client.completions.create(model="fake-model", prompt="x", logprobs=0, stream=True)
    offsets = [o async for part in parts for c in part.choices for o in (c.logprobs.text_offset or [])]
    assert offsets == [0, 2, 5, 9]  # counted across the stream's events

    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="fake-model", messages=messages, top_logprobs=2)
    assert refused.value.body["param"] == "top_logprobs"  # type: ignore[index]


def tool_node(node_id: str) -> NodeBehaviour:
    """Calls ``get_weather`` in three deltas, as vLLM streams a call."""

    async def behave(job: wire.Job, reply: str, nc: Client) -> None:
        await nc.publish(reply, chunk(job, node_id, 0, "accepted"))
        deltas = [
            wire.ToolCallDelta(0, "call_1", "get_weather", '{"city": '),
            wire.ToolCallDelta(0, None, None, '"Par'),
            wire.ToolCallDelta(0, None, None, 'is"}'),
        ]
        for seq, delta in enumerate(deltas, start=1):
            finish = "tool_calls" if seq == 3 else None
            piece = wire.Piece(0, "", 1, finish, None, [delta])
            await nc.publish(reply, chunk(job, node_id, seq, "data", pieces=[piece]))
        await nc.publish(reply, chunk(job, node_id, 4, "end", usage=wire.Usage(9, 3)))

    return behave


TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


async def test_tool_calls_streamed_or_whole_and_the_history_that_follows(
    api: RunningApi, tenant: TenantKey, fleet: Fleet
) -> None:
    f = await fleet({"node_a": tool_node("node_a")})
    client = sdk(api, tenant.secret)
    messages: Any = [{"role": "user", "content": "weather in Paris?"}]
    whole = await client.chat.completions.create(model="fake-model", messages=messages, tools=TOOLS)
    job = f.jobs[-1]
    assert job.tools  # placed only on a node that parses tool calls
    assert job.body["tools"] == TOOLS
    assert "tool_choice" not in job.body
    choice = whole.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", None)
    [call] = choice.message.tool_calls or []
    assert (call.id, call.function.name, call.function.arguments) == ("call_1", "get_weather", '{"city": "Paris"}')  # type: ignore[union-attr]

    stream = await client.chat.completions.create(
        model="fake-model", messages=messages, tools=TOOLS, tool_choice="required", stream=True
    )
    deltas = [d async for part in stream for c in part.choices for d in c.delta.tool_calls or []]
    assert f.jobs[-1].body["tool_choice"] == "required"
    assert [(d.index, d.id, d.function and d.function.name) for d in deltas] == [
        (0, "call_1", "get_weather"),
        (0, None, None),
        (0, None, None),
    ]
    assert "".join((d.function and d.function.arguments) or "" for d in deltas) == '{"city": "Paris"}'

    history: Any = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    await client.chat.completions.create(model="fake-model", messages=history, tools=TOOLS, tool_choice="none")
    job = f.jobs[-1]
    assert not job.tools  # "none": any node will do; the model still reads the tools, and calls none
    assert [t["function"]["name"] for t in job.body["tools"]] == ["get_weather"]
    assert job.body["tool_choice"] == "none"
    assert job.body["messages"][1]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert job.body["messages"][2] == {"role": "tool", "content": "21 C", "tool_call_id": "call_1"}

    f.without_tools = True  # as if no node of the model had a tool-call parser
    with pytest.raises(openai.BadRequestError) as unserved:
        await client.chat.completions.create(model="fake-model", messages=messages, tools=TOOLS)
    assert (unserved.value.code, unserved.value.param) == ("tools_not_supported", "tools")
    f.without_tools = False

    named: Any = {"type": "function", "function": {"name": "get_time"}}
    for bad, param in (
        ({"tools": TOOLS, "tool_choice": named}, "tool_choice"),  # not among the tools
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": [{"type": "function", "function": {"name": "has spaces"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="fake-model", messages=messages, **bad)
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]


async def test_several_choices_may_each_run_to_the_end_of_the_context(
    api: RunningApi, tenant: TenantKey, fleet: Fleet
) -> None:
    """``n`` choices hold n times max_tokens of quota, but the context bounds each choice alone."""
    await fleet({"node_a": echo_node("node_a", words=2)})
    client = sdk(api, tenant.secret)
    chat = await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}], n=2)
    assert chat.choices[0].message.content == "w0 w1 "
    completion = await client.completions.create(model="fake-model", prompt="x", n=3, max_tokens=2000)
    assert completion.choices[0].text == "w0 w1 "


async def test_the_bearer_scheme_is_case_insensitive(api: RunningApi, tenant: TenantKey) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        for scheme in ("bearer", "BEARER"):
            response = await client.get("/v1/models", headers={"Authorization": f"{scheme} {tenant.secret}"})
            assert response.status_code == 200, response.text


async def test_a_request_every_node_failed_still_has_its_usage_event(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client
) -> None:
    """Placed, and failed before any output on every node it tried: a 503 to the client and one
    usage event with nothing billed, naming the last node tried."""

    def failing(node_id: str) -> NodeBehaviour:
        async def behave(job: wire.Job, reply: str, nc: Client) -> None:
            await nc.publish(reply, chunk(job, node_id, 0, "error", error="boom", error_code="engine_error"))

        return behave

    f = await fleet({"node_a": failing("node_a"), "node_b": failing("node_b")})
    with pytest.raises(openai.InternalServerError) as err:
        await sdk(api, tenant.secret).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.status_code == 503
    request_id = f.placed[0][0]
    assert f.placed == [(request_id, "node_a"), (request_id, "node_b")]
    assert err.value.response.headers.get_list("x-request-id") == [request_id]  # the usage record's key
    event, _ = await usage_event(nc, tenant.tenant_id, request_id=request_id)
    assert (event.outcome, event.node_id, event.prompt_tokens, event.completion_tokens) == ("failed", "node_b", 0, 0)


async def test_body_too_large_is_413(api: RunningApi, tenant: TenantKey) -> None:
    huge = '{"model": "fake-model", "prompt": "' + "x" * 2_000_000 + '"}'
    response = await post_raw(api, tenant, "/v1/completions", huge)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_keys_bad_revoked_and_expired_are_401(api: RunningApi, tenant: TenantKey, engine: AsyncEngine) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    for key in ("", "sk-not-a-key"):
        with pytest.raises(openai.AuthenticationError):
            await sdk(api, key or "x").chat.completions.create(model="fake-model", messages=messages)
    async with httpx.AsyncClient(base_url=api.url) as client:
        missing = await client.get("/v1/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    models = await sdk(api, tenant.secret).models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    async with session_factory(engine)() as session, session.begin():
        await session.execute(update(ApiKey).where(ApiKey.id == tenant.key_id).values(expires_at=ApiKey.created_at))
    state = api.app.state.app_state
    state.services["auth"].forget(tenant.key_id)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        await sdk(api, tenant.secret).models.list()


def _streamed_seconds(metrics: str) -> float:
    """Total request time the api's Prometheus histogram holds for successful POST /v1/completions."""
    total = 0.0
    for line in metrics.splitlines():
        if (
            line.startswith("litestar_request_duration_seconds_sum{")
            and 'app_name="market_api"' in line
            and 'path="/v1/completions"' in line
            and 'status_code="200"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_streamed_response_is_timed_to_its_end_in_the_metrics(
    api: RunningApi, tenant: TenantKey, fleet: Fleet
) -> None:
    """Tokens skip the middleware on their way out; the request's duration still runs to the last one."""
    await fleet({"node_a": echo_node("node_a", words=4, delay=0.1)})
    async with httpx.AsyncClient(base_url=api.url) as client:
        before = _streamed_seconds((await client.get("/metrics")).text)
        stream = await sdk(api, tenant.secret).completions.create(
            model="fake-model", prompt="slow", max_tokens=4, stream=True
        )
        texts = [part.choices[0].text async for part in stream if part.choices]
        assert "".join(texts) == "w0 w1 w2 w3 "
        after = _streamed_seconds((await client.get("/metrics")).text)
    assert after - before >= 0.3


async def test_output_nobody_waits_for_is_cancelled_on_its_node_once(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client
) -> None:
    """A node still sending a job's output after the api let the attempt go (here: more output
    after the request ended; in production, a job a scheduler placed as the api withdrew it) is
    told to cancel it, once however many chunks come, and not for a late ``end``."""
    reasons: list[tuple[str, str]] = []

    async def on_cancel(msg: Any) -> None:
        cancel = wire.decoder(wire.Cancel).decode(msg.data)
        reasons.append((cancel.job_id, cancel.reason))

    sub = await nc.subscribe(subjects.node_cancel("stray"), cb=on_cancel)
    answered = echo_node("stray", words=2)
    strays: list[str] = []

    async def behave(job: wire.Job, reply: str, client: Client) -> None:
        await answered(job, reply, client)
        await asyncio.sleep(0.3)  # the request is over by now
        strays.append(job.id)
        assert job.relay_to
        for seq in range(3, 6):
            kind = "end" if seq == 5 else "data"
            stray = wire.Chunk(job_id=job.id, node_id="stray", seq=seq, kind=kind, pieces=[wire.Piece(0, "x")])
            batch = wire.ChunkBatch([wire.RelayedChunk(reply, stray)])
            await client.publish(subjects.node_relay("stray", job.relay_to), wire.encode(batch))

    await fleet({"stray": behave})
    result = await sdk(api, tenant.secret).completions.create(model="fake-model", prompt="x", max_tokens=2)
    assert result.choices[0].text == "w0 w1 "
    for _ in range(100):
        if reasons:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    await sub.unsubscribe()
    assert reasons == [(strays[0], "orphaned")]


async def test_a_batch_wakes_the_requests_it_starts_before_the_running_streams(nc: Client) -> None:
    """A node's batch carries a token for each of its running streams and, somewhere among them, a
    new request's first token: that request is woken first, so its first token does not wait
    for the api to relay every other stream's next one (the others keep their order, and each
    job its chunks' order)."""
    inboxes = Inboxes(nc)
    await inboxes.start()
    woke: list[tuple[str, int]] = []

    async def reader(name: str, queue: Any, wanted: int) -> None:
        for _ in range(wanted):
            woke.append((name, (await queue.get()).seq))

    def data(job: str, seq: int, ttft: float | None = None) -> wire.Chunk:
        return wire.Chunk(
            job_id=job, node_id="node_batch", seq=seq, kind="data", pieces=[wire.Piece(0, "x")], engine_ttft_ms=ttft
        )

    try:
        boxes = {job: inboxes.open(job, 1) for job in ("req_a", "req_b", "req_new", "req_c")}
        readers = [asyncio.create_task(reader(job, box[1], 2 if job == "req_new" else 1)) for job, box in boxes.items()]
        await asyncio.sleep(0.05)  # every reader waits on its mailbox
        items = [
            wire.RelayedChunk(boxes[job][0], chunk)
            for job, chunk in (
                ("req_a", data("req_a", 7)),
                ("req_b", data("req_b", 3)),
                ("req_new", data("req_new", 0, ttft=12.5)),
                ("req_c", data("req_c", 9)),
                ("req_new", data("req_new", 1)),
            )
        ]
        await nc.publish(subjects.node_relay("node_batch", inboxes.relay_id), wire.encode(wire.ChunkBatch(items)))
        await asyncio.wait_for(asyncio.gather(*readers), 5)
        assert woke == [("req_new", 0), ("req_new", 1), ("req_a", 7), ("req_b", 3), ("req_c", 9)]
    finally:
        await inboxes.stop()


async def _outbox_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(text("SELECT request_id FROM usage_outbox ORDER BY 1"))).scalars())


async def test_usage_events_wait_out_a_missing_stream_and_land_once(
    api: RunningApi, nc: Client, engine: AsyncEngine, settings: Settings
) -> None:
    """JetStream not storing (here: the usage stream gone) keeps the event, in the outbox too, and
    retries; a republish after a lost ack is dropped by the server (the request id is its Nats-Msg-Id)."""
    js = nc.jetstream()
    await js.delete_stream(subjects.USAGE_STREAM)
    inboxes = Inboxes(nc)
    await inboxes.start()
    publisher = UsagePublisher(inboxes, UsageOutbox(plain_url(settings.require_database_url())), concurrency=2)
    await publisher.start()
    event = make_usage_event("ten_outbox", request_id="req_missing_stream")
    try:
        await publisher.submit(event)
        await asyncio.sleep(0.5)
        assert publisher.published == 0
        assert await _outbox_ids(engine) == ["req_missing_stream"]
        await bus.ensure_usage_stream(js)
        await publisher.flush(timeout=10)
        assert publisher.published == 1
        await publisher.submit(event)  # as after an ack that never came back
        await publisher.flush(timeout=10)
        info = await js.stream_info(subjects.USAGE_STREAM)
        assert info.state.messages == 1
        await asyncio.sleep(0.2)  # the outbox's deletes are batched
        assert await _outbox_ids(engine) == []
    finally:
        await publisher.stop()
        await inboxes.stop()
        await bus.ensure_usage_stream(js)


async def test_a_store_arriving_as_the_last_statement_ends_is_not_left_waiting(settings: Settings) -> None:
    """Stores are group-committed by at most ``STATEMENTS`` writers. A store that comes just as
    the last writers finish (their loop done, not yet counted out) must start a writer of its own,
    not wait for the next store to come along: a request's last store would wait forever, its
    response never ending (seen in a benchmark: 3 of 1,048 streams hung after their last token).
    Sixteen callers storing with a random phase against the loop make that moment likely."""
    outbox = UsageOutbox(plain_url(settings.require_database_url()))
    rng = random.Random(7)

    async def caller(trial: int, c: int) -> None:
        for _ in range(rng.randint(0, 6)):
            await asyncio.sleep(0)
        await outbox.store(StoredEvent(f"req_phase_{trial}_{c}", "usage.ten_phase", b"{}"))

    try:
        for trial in range(400):  # each trial's last store has no later one to take it along
            calls = asyncio.gather(*(caller(trial, c) for c in range(rng.randint(2, 8))))
            await asyncio.wait_for(calls, 5)
    finally:
        await outbox.close()


async def test_usage_events_an_api_process_left_behind_are_published_by_another(
    api: RunningApi, nc: Client, engine: AsyncEngine
) -> None:
    """Rows in the outbox that no live process published for a while (it died between storing
    and the ack) are claimed and published by a running api, once; fresh ones are left alone."""
    left, fresh = (make_usage_event("ten_outbox", request_id=r) for r in ("req_left_behind", "req_just_stored"))
    async with engine.begin() as conn:
        for event, age in ((left, 120), (fresh, 0)):
            await conn.execute(
                text(
                    "INSERT INTO usage_outbox (request_id, subject, event, stored_at)"
                    " VALUES (:id, :subject, :event, now() - make_interval(secs => :age))"
                ),
                {
                    "id": event.request_id,
                    "subject": subjects.usage(event.tenant_id),
                    "event": wire.encode(event),
                    "age": age,
                },
            )
    usage = api.app.state.app_state.services["token"].usage
    assert await usage.sweep() == 1
    assert await usage.sweep() == 0  # claimed: not again until it is left behind once more
    await usage.flush(timeout=10)
    published, _ = await usage_event(nc, left.tenant_id, request_id=left.request_id)
    assert published == left
    await asyncio.sleep(0.2)
    assert await _outbox_ids(engine) == ["req_just_stored"]

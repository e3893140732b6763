"""The benchmark's load generator counts what the api streams: its figures are only as good as that."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from bench._client import StreamClient
from tests.conftest import RunningApi
from tests.token.conftest import FakeFleet, TenantKey, echo_node


async def test_the_lean_client_counts_a_stream_as_the_api_sent_it_on_one_connection(
    api: RunningApi, tenant: TenantKey, fleet: Callable[..., Awaitable[FakeFleet]]
) -> None:
    await fleet({"node_a": echo_node("node_a", words=5)})
    client = StreamClient(api.url + "/v1/completions", {"Authorization": f"Bearer {tenant.secret}"})
    body = {
        "model": "fake-model",
        "prompt": "once upon",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        answers = [await client.post(0, body, timeout=30)]
        connection = client.connections[0]
        answers.append(await client.post(0, body, timeout=30))
        assert client.connections[0] is connection  # kept alive between the two
        assert connection.transport is not None
        refused = await client.post(1, body | {"model": "no-such-model"}, timeout=30)
    finally:
        client.close()
    ids = set()
    for answer in answers:
        assert answer.status == 200
        assert answer.first is not None
        assert answer.tokens == 5  # the usage chunk's count
        assert answer.events == 5  # a chunk a word, as the echo node sent them
        assert answer.request_id is not None
        ids.add(answer.request_id)
    assert len(ids) == 2
    assert refused.status == 404
    assert b"model_not_found" in refused.error_body
    assert refused.first is None


async def test_a_slot_timed_out_mid_stream_gets_its_next_answer_whole(
    api: RunningApi, tenant: TenantKey, fleet: Callable[..., Awaitable[FakeFleet]]
) -> None:
    await fleet({"node_a": echo_node("node_a", words=4, delay=0.1)})
    client = StreamClient(api.url + "/v1/completions", {"Authorization": f"Bearer {tenant.secret}"})
    body = {"model": "fake-model", "prompt": "once upon", "max_tokens": 4, "stream": True}
    try:
        with pytest.raises(TimeoutError):
            await client.post(0, body, timeout=0.25)
        answer = await client.post(0, body, timeout=30)
    finally:
        client.close()
    assert answer.status == 200
    assert answer.tokens == 4
    assert answer.events == 4

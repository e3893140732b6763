"""Admission: hard quota under concurrency, shared rate limits across replicas, models, soft threshold."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from nats.aio.client import Client
from sqlalchemy import text

from api.admin.quota import quota_of
from api.auth import Principal
from api.errors import Forbidden, InvalidRequest, NotFound, QuotaExceeded, RateLimited, Unavailable
from api.limits import _CREDIT_SQL, SOFT_THRESHOLD_SUBJECT, Admission
from market.models import Reservation
from tests.conftest import RunningApi
from tests.tenancy.conftest import Replica, make_world, ok

Start = Callable[[], Awaitable[Replica]]


async def _quota(replica: Replica, tenant_id: str) -> tuple[int, int, int]:
    async with replica.state.sessions() as session:
        q = await quota_of(session, tenant_id)
    return q.granted, q.held, q.used


async def test_200_concurrent_admissions_never_exceed_a_hard_quota(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start
) -> None:
    world = await make_world(admin, grant=1000)
    a, b = await replicas(), await replicas()
    principals = [await a.principal(world.key), await b.principal(world.key)]

    async def one(i: int) -> Admission | None:
        replica = (a, b)[i % 2]
        try:
            return await replica.limiter.admit(principals[i % 2], world.model, 10, 40)
        except QuotaExceeded:
            return None

    admitted = [x for x in await asyncio.gather(*[one(i) for i in range(200)]) if x is not None]
    assert len(admitted) == 20  # 20 x 50 tokens = the whole grant, not one more
    assert await _quota(a, world.tenant_id) == (1000, 1000, 0)

    await asyncio.gather(*[(a, b)[i % 2].limiter.settle(adm, 30) for i, adm in enumerate(admitted)])
    assert await _quota(b, world.tenant_id) == (1000, 0, 600)  # every hold came back, use counted
    async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {world.key}"}) as tenant:
        quota = await ok(tenant.get("/api/tenant/quota"))
    assert (quota["granted"], quota["held"], quota["used"], quota["remaining"]) == (1000, 0, 600, 400)


async def test_interleaved_admit_and_settle_keep_use_within_the_grant(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start
) -> None:
    world = await make_world(admin, grant=2000)
    a, b = await replicas(), await replicas()
    principals = [await a.principal(world.key), await b.principal(world.key)]
    used_total = 0

    async def one(i: int) -> bool:
        nonlocal used_total
        replica = (a, b)[i % 2]
        try:
            admission = await replica.limiter.admit(principals[i % 2], world.model, 20, 80)
        except QuotaExceeded:
            return False
        await asyncio.sleep(random.random() / 50)
        used = random.randint(0, 100)
        used_total += used
        await replica.limiter.settle(admission, used)
        return True

    results = await asyncio.gather(*[one(i) for i in range(200)])
    granted, held, used = await _quota(a, world.tenant_id)
    assert held == 0
    assert used == used_total <= granted
    assert 20 <= sum(results) < 200


async def test_two_replicas_enforce_one_rate_limit(api: RunningApi, admin: httpx.AsyncClient, replicas: Start) -> None:
    world = await make_world(admin, key_limits={"requests_per_minute": 10})
    a, b = await replicas(), await replicas()
    pa, pb = await a.principal(world.key), await b.principal(world.key)
    outcomes: list[str] = []
    refusals: list[RateLimited] = []
    for i in range(16):
        replica, principal = (a, pa) if i % 2 else (b, pb)
        try:
            admission = await replica.limiter.admit(principal, world.model, 1, 1)
        except RateLimited as exc:
            outcomes.append("limited")
            refusals.append(exc)
        else:
            outcomes.append("ok")
            await replica.limiter.settle(admission, 1)
    assert outcomes == ["ok"] * 10 + ["limited"] * 6
    for refusal in refusals:
        assert refusal.status == 429
        assert int(refusal.headers["retry-after"]) >= 1
        assert "requests per minute for this API key" in refusal.message
        assert refusal.headers["x-ratelimit-remaining-requests"] == "0"


async def test_tenant_tokens_per_minute_and_headers(api: RunningApi, admin: httpx.AsyncClient, replicas: Start) -> None:
    world = await make_world(admin, tenant_limits={"tokens_per_minute": 1000, "requests_per_minute": 100})
    a = await replicas()
    p = await a.principal(world.key)
    first = await a.limiter.admit(p, world.model, 100, 300)
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert first.headers["x-ratelimit-remaining-tokens"] == "600"
    assert first.headers["x-ratelimit-limit-requests"] == "100"
    assert first.headers["x-ratelimit-remaining-requests"] == "99"
    assert first.headers["x-ratelimit-reset-tokens"].endswith("s")
    await a.limiter.admit(p, world.model, 100, 500)
    with pytest.raises(RateLimited) as limited:
        await a.limiter.admit(p, world.model, 100, 300)
    assert "tokens per minute for your organisation" in limited.value.message
    with pytest.raises(RateLimited) as too_large:
        await a.limiter.admit(p, world.model, 500, 600)
    assert too_large.value.code == "request_too_large"


@pytest.mark.parametrize("binding", ["key", "tenant"])
async def test_tokens_a_request_held_and_did_not_use_are_credited_back_to_the_limits(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start, binding: str
) -> None:
    """A request is charged its whole hold (prompt plus max_tokens) at admission; once it settles
    having used less, the limit counts what it used, and the next request gets in at once (on the
    key's limit and on the tenant's: each binds in turn, the other twice as large)."""
    key_tpm, tenant_tpm = (60, 120) if binding == "key" else (120, 60)
    world = await make_world(admin, tenant_limits={"tokens_per_minute": tenant_tpm, "requests_per_minute": 100})
    a = await replicas()
    async with a.state.sessions.begin() as session:
        await session.execute(
            text("UPDATE api_keys SET tokens_per_minute = :r WHERE id = :k"), {"r": key_tpm, "k": world.key_id}
        )
    p = await a.principal(world.key)
    first = await a.limiter.admit(p, world.model, 10, 50)  # a minute of the binding limit
    with pytest.raises(RateLimited):
        await a.limiter.admit(p, world.model, 10, 5)
    await a.limiter.settle(first, 15)  # it used 15 of the 60 it held
    second = await a.limiter.admit(p, world.model, 10, 30)  # 40 of the 45 credited
    # 60 - 15 - 40 = 5 left, and one more for each second the test took (60 a minute)
    assert 5 <= int(second.headers["x-ratelimit-remaining-tokens"]) < 10


async def test_a_credit_takes_back_only_what_is_left_of_its_own_charge(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start
) -> None:
    """A request that settles after its charge has drained (a long stream) has nothing left to
    credit: crediting its unused tokens then would take back the charges of requests admitted
    since, and let more than the limit through in a minute."""
    world = await make_world(admin, tenant_limits={"tokens_per_minute": 120, "requests_per_minute": 100})
    a = await replicas()
    p = await a.principal(world.key)
    long_ago = await a.limiter.admit(p, world.model, 0, 60)  # 30 s of the limit's clock
    # As if its 30 s had passed: its charge drained, and the limit is free again.
    async with a.state.sessions.begin() as session:
        await session.execute(
            text("UPDATE rate_limit_buckets SET tokens_tat = tokens_tat - 30 WHERE scope = :t"),
            {"t": world.tenant_id},
        )
    long_ago.admitted_at -= 30
    await a.limiter.admit(p, world.model, 0, 100)  # 100 of the 120
    await a.limiter.settle(long_ago, 0)  # it used nothing, but nothing of its charge is left
    with pytest.raises(RateLimited):
        await a.limiter.admit(p, world.model, 0, 50)  # 150 in this minute: over the limit


async def test_a_credit_lost_to_a_database_error_is_made_at_the_next_heartbeat(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops just as the credit is written (after the settle): the limit stays
    strict until the heartbeat credits it, not for the rest of the minute."""
    world = await make_world(admin, tenant_limits={"tokens_per_minute": 60, "requests_per_minute": 100})
    a = await replicas()
    p = await a.principal(world.key)
    first = await a.limiter.admit(p, world.model, 10, 50)  # the whole minute of the limit
    hot = a.limiter.hot
    fetch = hot.fetch
    dropped: list[str] = []

    async def drops_the_credit(query: str, *args: Any) -> Any:
        if query is _CREDIT_SQL and not dropped:
            dropped.append(query)
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        return await fetch(query, *args)

    monkeypatch.setattr(hot, "fetch", drops_the_credit)
    await a.limiter.settle(first, 15)  # it used 15 of the 60 it held
    assert dropped
    assert await _quota(a, world.tenant_id) == (100_000, 0, 15)  # the settle itself was written
    with pytest.raises(RateLimited):
        await a.limiter.admit(p, world.model, 10, 30)  # not credited yet
    await a.limiter.retry_credits()  # what the heartbeat does
    second = await a.limiter.admit(p, world.model, 10, 30)  # 40 of the 45 credited
    assert 5 <= int(second.headers["x-ratelimit-remaining-tokens"]) < 10


async def test_models_checked_at_admission(api: RunningApi, admin: httpx.AsyncClient, replicas: Start) -> None:
    world = await make_world(admin)
    await ok(admin.post("/api/admin/models", json={"name": "other", "context_length": 100}), 201)
    a = await replicas()
    p = await a.principal(world.key)
    with pytest.raises(NotFound) as missing:
        await a.limiter.admit(p, "no-such-model", 1, 1)
    assert missing.value.code == "model_not_found"
    with pytest.raises(InvalidRequest) as too_long:
        await a.limiter.admit(p, "other", 100, 1)  # the prompt alone fills the context
    assert too_long.value.code == "context_length_exceeded"
    # A hold past the context is several choices' (n) worth, each within it: the api checks each.
    await a.limiter.settle(await a.limiter.admit(p, "other", 60, 2 * 40), 0)
    await a.limiter.settle(await a.limiter.admit(p, "other", 10, 10), 0)
    await ok(admin.put(f"/api/admin/tenants/{world.tenant_id}/models", json={"models": [world.model]}))
    with pytest.raises(Forbidden) as refused:
        await a.limiter.admit(p, "other", 10, 10)
    assert refused.value.code == "model_not_allowed"
    await a.limiter.settle(await a.limiter.admit(p, world.model, 10, 10), 0)


async def test_only_tenant_keys_with_inference_scope_are_admitted(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start
) -> None:
    world = await make_world(admin)
    a = await replicas()
    manage_only = await ok(admin.post(f"/api/admin/tenants/{world.tenant_id}/keys", json={"scopes": ["manage"]}), 201)
    with pytest.raises(Forbidden):
        await a.limiter.admit(await a.principal(manage_only["key"]), world.model, 1, 1)
    with pytest.raises(Forbidden):
        await a.limiter.admit(Principal(key_id="key_x", role="platform_admin"), world.model, 1, 1)


async def test_settle_is_idempotent_and_soft_threshold_fires_once(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start, nc: Client
) -> None:
    world = await make_world(admin, grant=100)
    events: list[dict[str, object]] = []

    async def on_event(msg: object) -> None:
        events.append(msgspec.json.decode(msg.data))  # type: ignore[attr-defined]

    await nc.subscribe(SOFT_THRESHOLD_SUBJECT, cb=on_event)
    await nc.flush()
    a = await replicas()
    p = await a.principal(world.key)
    admission = await a.limiter.admit(p, world.model, 10, 80)
    await a.limiter.settle(admission, 85)
    await a.limiter.settle(admission, 85)
    assert await _quota(a, world.tenant_id) == (100, 0, 85)
    second = await a.limiter.admit(p, world.model, 1, 5)
    await a.limiter.settle(second, 5)
    await asyncio.sleep(0.3)
    assert len(events) == 1
    assert events[0]["tenant_id"] == world.tenant_id
    assert events[0]["used"] == 85
    with pytest.raises(QuotaExceeded) as exhausted:
        await a.limiter.admit(p, world.model, 10, 10)
    assert exhausted.value.code == "insufficient_quota"
    assert "10 of 100 remain" in exhausted.value.message


async def test_holds_of_a_dead_replica_are_released(api: RunningApi, admin: httpx.AsyncClient, replicas: Start) -> None:
    world = await make_world(admin, grant=100)
    crashed, survivor = await replicas(), await replicas()
    await crashed.limiter.admit(await crashed.principal(world.key), world.model, 50, 50)
    assert await _quota(survivor, world.tenant_id) == (100, 100, 0)
    # the crashed replica stops heartbeating: make its last heartbeat old
    await survivor.limiter.pool.execute(
        "UPDATE limiter_instances SET seen_at = now() - interval '10 minutes' WHERE id = $1", crashed.limiter.holder
    )
    released = await survivor.limiter.pool.fetchval("SELECT market_release_dead_holders(60)")
    assert released == 100
    assert await _quota(survivor, world.tenant_id) == (100, 0, 0)
    await survivor.limiter.admit(await survivor.principal(world.key), world.model, 50, 50)


async def test_a_request_cancelled_during_admission_strands_no_hold(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start
) -> None:
    """A client that disconnects while its admit runs: the hold it took goes back by itself."""
    world = await make_world(admin, grant=100)
    a = await replicas()
    principal = await a.principal(world.key)
    # keep the quota row locked so the admit is certainly mid-statement when it is cancelled
    async with a.limiter.pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM tenant_quotas WHERE tenant_id = $1 FOR UPDATE", world.tenant_id)
        admit = asyncio.create_task(a.limiter.admit(principal, world.model, 30, 30))
        await asyncio.sleep(0.2)
        admit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admit
    for _ in range(50):  # the admit now takes its hold, then gives it back
        if await _quota(a, world.tenant_id) == (100, 0, 0):
            break
        await asyncio.sleep(0.05)
    assert await _quota(a, world.tenant_id) == (100, 0, 0)
    await a.limiter.admit(principal, world.model, 50, 50)  # the whole grant is usable again


async def test_admission_recovers_when_the_database_drops_its_connections(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start
) -> None:
    """A PostgreSQL restart or failover closes the limiter's connections: it opens new ones."""
    world = await make_world(admin, grant=1000)
    a = await replicas()
    principal = await a.principal(world.key)
    await a.limiter.settle(await a.limiter.admit(principal, world.model, 10, 10), 5)
    pids = [conn.get_server_pid() for conn, _ in a.limiter.hot._idle]
    assert pids
    await a.limiter.pool.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)
    await asyncio.sleep(0.1)
    admitted = None
    for _ in range(len(pids) + 1):  # a statement on a connection that died: a 503, once per connection
        with contextlib.suppress(Unavailable):
            admitted = await a.limiter.admit(principal, world.model, 10, 10)
            break
    assert admitted is not None
    await a.limiter.settle(admitted, 5)
    assert await _quota(a, world.tenant_id) == (1000, 0, 10)


async def test_a_request_cancelled_while_waiting_for_a_connection_takes_nothing(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start
) -> None:
    """Every limiter connection busy, the client leaves: no hold and no rate-limit cost remain."""
    world = await make_world(admin, grant=100, key_limits={"requests_per_minute": 1})
    a = await replicas()
    principal = await a.principal(world.key)
    busy = [await a.limiter.hot.acquire() for _ in range(a.limiter.hot._size)]
    admit = asyncio.create_task(a.limiter.admit(principal, world.model, 10, 10))
    await asyncio.sleep(0.1)
    admit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admit
    for conn in busy:  # give them back the way a statement does
        await a.limiter.hot.run(conn, "SELECT 1")
    await asyncio.sleep(0.1)
    assert await _quota(a, world.tenant_id) == (100, 0, 0)
    # the one request a minute this key may make is still there
    await a.limiter.settle(await a.limiter.admit(principal, world.model, 10, 10), 5)
    with pytest.raises(RateLimited):
        await a.limiter.admit(principal, world.model, 10, 10)


async def test_a_burst_is_admitted_in_few_statements_each_request_judged_alone(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start
) -> None:
    """Admits that queue behind a statement go together in one; a refusal in a batch is its own.

    Two replicas, two tenants with different limits and an unknown model, all at once: the
    batches lock the same rows in opposite arrival orders and must neither deadlock nor mix up
    answers.
    """
    limited = await make_world(admin, key_limits={"requests_per_minute": 5})
    small = await make_world(admin, grant=300)  # three requests of 100 tokens
    a, b = await replicas(), await replicas()
    replicas_of = {id(a): a, id(b): b}
    principal = {(id(r), w.key): await r.principal(w.key) for r in (a, b) for w in (limited, small)}

    async def one(replica: Replica, world_key: str, model: str) -> str:
        try:
            admission = await replica.limiter.admit(principal[(id(replica), world_key)], model, 50, 50)
        except QuotaExceeded:  # a RateLimited too (429): the narrower first
            return "quota"
        except RateLimited:
            return "rate"
        except NotFound:
            return "model"
        return "ok" if admission.held_tokens == 100 else "wrong"

    calls = []
    for i in range(24):
        replica = list(replicas_of.values())[i % 2]
        world = (limited, small, limited)[i % 3]
        model = "org/no-such-model" if i % 8 == 7 else world.model
        calls.append((world.key, model, one(replica, world.key, model)))
    outcomes = await asyncio.gather(*(call for _, _, call in calls))
    by_world = {
        key: sorted(o for (k, m, _), o in zip(calls, outcomes, strict=True) if k == key and m != "org/no-such-model")
        for key in (limited.key, small.key)
    }
    assert by_world[limited.key] == ["ok"] * 5 + ["rate"] * (len(by_world[limited.key]) - 5)
    assert by_world[small.key] == ["ok"] * 3 + ["quota"] * (len(by_world[small.key]) - 3)
    assert [o for (_, m, _), o in zip(calls, outcomes, strict=True) if m == "org/no-such-model"] == ["model"] * 3
    assert a.limiter.admit_statements + b.limiter.admit_statements < len(calls)
    assert await _quota(a, small.tenant_id) == (300, 300, 0)


async def test_two_replicas_hold_one_reservation_to_its_slots_and_burst(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start
) -> None:
    world = await make_world(admin)
    a, b = await replicas(), await replicas()
    async with a.state.sessions.begin() as session:
        session.add(Reservation(id="res_shared", tenant_id=world.tenant_id, model=world.model, slots=3, burst_slots=2))
    principals = [await a.principal(world.key), await b.principal(world.key)]

    async def one(i: int) -> Admission | RateLimited:
        try:
            return await (a, b)[i % 2].limiter.admit(principals[i % 2], world.model, 10, 10)
        except RateLimited as exc:
            return exc

    answers = await asyncio.gather(*[one(i) for i in range(100)])
    refused = [x for x in answers if isinstance(x, RateLimited)]
    assert {(x.code, x.headers["retry-after"]) for x in refused} == {("reservation_full", "1")}
    admitted = [x for x in answers if isinstance(x, Admission)]
    assert sorted(x.admission_class for x in admitted) == ["burst", "burst", "reserved", "reserved", "reserved"]
    assert {x.reservation_id for x in admitted} == {"res_shared"}
    # a reserved slot freed while the burst ones still run goes to the next request, as reserved
    first_reserved = next(x for x in admitted if x.admission_class == "reserved")
    await a.limiter.settle(first_reserved, 20)
    again = await b.limiter.admit(principals[1], world.model, 10, 10)
    assert (again.admission_class, again.reservation_id) == ("reserved", "res_shared")
    with pytest.raises(RateLimited):
        await a.limiter.admit(principals[0], world.model, 10, 10)
    rest = [x for x in admitted if x is not first_reserved] + [again]
    await asyncio.gather(*[(a, b)[i % 2].limiter.settle(adm, 20) for i, adm in enumerate(rest)])
    async with a.state.sessions() as session:
        held = (await session.execute(text("SELECT sum(reserved), sum(burst) FROM reservation_holds"))).one()
    assert tuple(held) == (0, 0)  # every slot came back, whichever replica settled it


async def test_a_caller_cancelled_as_its_admission_is_answered_gives_back_the_hold_and_slot(
    api: RunningApi, admin: httpx.AsyncClient, replicas: Start
) -> None:
    """The admit's answer has arrived but its caller has not resumed when it is cancelled (a client
    gone at that instant): what the answer held, tokens and reserved slot, goes back."""
    world = await make_world(admin, grant=100)
    a = await replicas()
    async with a.state.sessions.begin() as session:
        session.add(Reservation(id="res_race", tenant_id=world.tenant_id, model=world.model, slots=1))
    principal = await a.principal(world.key)
    admit = asyncio.create_task(a.limiter.admit(principal, world.model, 30, 30))
    await asyncio.sleep(0)
    [pending] = a.limiter._admits
    # Checking every loop turn sees the answer before the caller's wake-up (queued by the answer) runs.
    while not pending.done.done():
        await asyncio.sleep(0)
    assert not admit.done()
    admit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admit
    assert pending.done.result()["status"] == "ok"  # it was admitted, and nobody will settle it
    for _ in range(50):
        if await _quota(a, world.tenant_id) == (100, 0, 0):
            break
        await asyncio.sleep(0.05)
    assert await _quota(a, world.tenant_id) == (100, 0, 0)
    again = await a.limiter.admit(principal, world.model, 50, 50)  # the whole grant, and the one slot
    assert (again.admission_class, again.reservation_id) == ("reserved", "res_race")

"""Elastic reservations as a tenant meets them: reserving against the live fleet, resizing, and the
classes its requests are admitted, placed and billed in (reserved, then burst, then a 429).

Placement and nodes are scripted (``FakeFleet``); one live node's heartbeats give the fleet its
capacity (8 sequences, of which reservations may hold half: ``reservable_share``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from nats.aio.client import Client
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from market import subjects, wire
from market.admin_keys import create_platform_admin_key
from market.db import plain_url, session_factory
from market.models import Model
from market.settings import Settings
from tests.billing.conftest import make_prices
from tests.conftest import RunningApi
from tests.token.conftest import FakeFleet, TenantKey, echo_node, make_tenant
from tests.token.test_token_api import usage_event

Fleet = Callable[..., Awaitable[FakeFleet]]
MODEL = "fake-model"


@pytest.fixture
async def live_node(nc: Client, settings: Settings) -> AsyncIterator[str]:
    """A healthy node serving ``fake-model`` with 8 sequence slots, heartbeating."""
    node_id = "node_reserve"
    beat = wire.Heartbeat(
        node_id=node_id,
        provider_id="prov_fake",
        status="healthy",
        models=[MODEL],
        profile=wire.ProfileInfo(max_num_seqs=8),
        slots=8,
    )

    async def beating() -> None:
        while True:
            await nc.publish(subjects.heartbeat(node_id), wire.encode(beat))
            await asyncio.sleep(settings.heartbeat_interval_s)

    task = asyncio.create_task(beating())
    await asyncio.sleep(0.3)
    yield node_id
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture
async def priced(engine: AsyncEngine) -> None:
    """Every class priced for ``fake-model``; a slot-hour costs 150 minor units."""
    await make_prices(session_factory(engine), model=MODEL, reservation_hour_minor=150)


def client(api: RunningApi, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


async def chat(api: RunningApi, key: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with client(api, key) as http:
        return await http.post("/v1/chat/completions", json=body)


async def usage_events(nc: Client, tenant_id: str, count: int) -> list[wire.UsageEvent]:
    """The first ``count`` usage events the api published for ``tenant_id``."""
    sub = await nc.jetstream().subscribe(subjects.usage(tenant_id), ordered_consumer=True)
    try:
        return [wire.decoder(wire.UsageEvent).decode((await sub.next_msg(5)).data) for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_requests_are_reserved_then_burst_then_refused_and_billed_in_their_class(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, nc: Client, live_node: str, priced: None
) -> None:
    f = await fleet({"node_slow": echo_node("node_slow", words=5, delay=0.3)})
    async with client(api, tenant.secret) as http:
        made = await http.post("/api/tenant/reservations", json={"model": MODEL, "slots": 2, "burst_slots": 1})
        assert made.status_code == 201, made.text
        reservation = made.json()
        assert (reservation["slots"], reservation["burst_slots"], reservation["status"]) == (2, 1, "active")
        assert (reservation["slot_hour_minor"], reservation["hour_minor"], reservation["currency"]) == (150, 300, "usd")

        running = []
        for expected in (1, 2, 3):  # one at a time, so each is admitted knowing the ones before
            running.append(asyncio.ensure_future(chat(api, tenant.secret)))
            await wait_for(lambda n=expected: len(f.jobs) == n)  # type: ignore[misc]
        assert [job.admission_class for job in f.jobs] == ["reserved", "reserved", "burst"]
        listed = (await http.get("/api/tenant/reservations")).json()
        assert [(r["id"], r["in_flight"]) for r in listed] == [(reservation["id"], 3)]

        refused = await chat(api, tenant.secret)  # two reserved and one burst are all in flight
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "reservation_full"
        assert refused.headers["retry-after"] == "1"
        assert len(f.jobs) == 3  # the refused request never reached a scheduler

        answers = await asyncio.gather(*running)
        assert [a.status_code for a in answers] == [200, 200, 200]
        events = await usage_events(nc, tenant.tenant_id, 3)
        assert {e.request_id: e.admission_class for e in events} == {j.id: j.admission_class for j in f.jobs}
        assert {e.reservation_id for e in events} == {reservation["id"]}

        # all three ended and gave their slots back: the next is reserved again
        again = await chat(api, tenant.secret)
        assert again.status_code == 200
        assert f.jobs[-1].admission_class == "reserved"
        assert (await http.get(f"/api/tenant/reservations/{reservation['id']}")).json()["in_flight"] == 0

        # ended: requests are on-demand, without a reservation
        ended = (await http.delete(f"/api/tenant/reservations/{reservation['id']}")).json()
        assert (ended["status"], ended["in_flight"], ended["hour_minor"]) == ("ended", 0, 0)
        after = await chat(api, tenant.secret)
        assert after.status_code == 200
        event, _ = await usage_event(nc, tenant.tenant_id, request_id=after.headers["x-request-id"])
        assert f.jobs[-1].admission_class == event.admission_class == "on_demand"
        assert event.reservation_id is None


async def test_reservations_fit_the_live_fleet_and_resize_within_it(
    api: RunningApi, tenant: TenantKey, engine: AsyncEngine, live_node: str, priced: None, settings: Settings
) -> None:
    other = await make_tenant(engine, name="globex")
    async with client(api, tenant.secret) as mine, client(api, other.secret) as theirs:

        async def refused(response: Awaitable[httpx.Response], status: int, code: str) -> dict[str, Any]:
            r = await response
            assert r.status_code == status, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            problem: dict[str, Any] = r.json()
            assert (problem["status"], problem["code"]) == (status, code)
            return problem

        # 8 live slots, half reservable: 4
        problem = await refused(
            mine.post("/api/tenant/reservations", json={"model": MODEL, "slots": 5}), 409, "insufficient_capacity"
        )
        assert "4 of 4 reservable" in problem["detail"]
        await refused(mine.post("/api/tenant/reservations", json={"model": "nope", "slots": 1}), 404, "model_not_found")
        created = await mine.post("/api/tenant/reservations", json={"model": MODEL, "slots": 3})
        assert created.status_code == 201
        rid = created.json()["id"]
        await refused(
            mine.post("/api/tenant/reservations", json={"model": MODEL, "slots": 1}), 409, "reservation_exists"
        )
        # another tenant sees none of it, and the fleet has one reservable slot left for it
        assert (await theirs.get("/api/tenant/reservations")).json() == []
        await refused(theirs.get(f"/api/tenant/reservations/{rid}"), 404, "reservation_not_found")
        await refused(theirs.patch(f"/api/tenant/reservations/{rid}", json={"slots": 1}), 404, "reservation_not_found")
        await refused(
            theirs.post("/api/tenant/reservations", json={"model": MODEL, "slots": 2}), 409, "insufficient_capacity"
        )
        # elastic: grow into the last slot, not past it; shrink any time
        grown = await mine.patch(f"/api/tenant/reservations/{rid}", json={"slots": 4, "burst_slots": 6})
        assert (grown.json()["slots"], grown.json()["burst_slots"], grown.json()["hour_minor"]) == (4, 6, 600)
        await refused(mine.patch(f"/api/tenant/reservations/{rid}", json={"slots": 5}), 409, "insufficient_capacity")
        shrunk = await mine.patch(f"/api/tenant/reservations/{rid}", json={"slots": 1})
        assert (shrunk.json()["slots"], shrunk.json()["burst_slots"]) == (1, 6)
        theirs_made = await theirs.post("/api/tenant/reservations", json={"model": MODEL, "slots": 3})
        assert theirs_made.status_code == 201, theirs_made.text
        # ended, a reservation frees its slots and cannot be resized
        await mine.delete(f"/api/tenant/reservations/{rid}")
        await refused(mine.patch(f"/api/tenant/reservations/{rid}", json={"slots": 1}), 409, "reservation_ended")
        again = await mine.post("/api/tenant/reservations", json={"model": MODEL, "slots": 1})
        assert again.status_code == 201

    conn = await asyncpg.connect(plain_url(settings.require_database_url()))
    try:
        sizes = await conn.fetch(
            "SELECT slots, burst_slots FROM reservation_changes WHERE reservation_id = $1 ORDER BY id", rid
        )
    finally:
        await conn.close()
    # the history the hourly charge reads: created, grown, shrunk, ended
    assert [tuple(s) for s in sizes] == [(3, 0), (4, 6), (1, 6), (0, 0)]


async def test_a_reservation_says_whether_the_live_fleet_backs_it(
    api: RunningApi, tenant: TenantKey, priced: None, nc: Client, settings: Settings
) -> None:
    """Capacity is checked when a reservation is made; a node that leaves later does not cancel it,
    but the tenant (and its admins) can see that it is no longer backed."""
    beat = wire.Heartbeat(
        node_id="node_backing",
        provider_id="prov_fake",
        status="healthy",
        models=[MODEL],
        profile=wire.ProfileInfo(max_num_seqs=8),
        slots=8,
    )
    await nc.publish(subjects.heartbeat(beat.node_id), wire.encode(beat))
    await nc.flush()
    async with client(api, tenant.secret) as http:
        for _ in range(50):  # the api's fleet view has the node
            made = await http.post("/api/tenant/reservations", json={"model": MODEL, "slots": 3})
            if made.status_code == 201:
                break
            await asyncio.sleep(0.05)
        assert made.status_code == 201, made.text
        rid = made.json()["id"]
        assert made.json()["backed"] is True  # 3 of 8 x 0.5 = 4 reservable slots
        draining = msgspec.structs.replace(beat, status="draining")
        await nc.publish(subjects.heartbeat(beat.node_id), wire.encode(draining))
        await nc.flush()
        for _ in range(50):
            shown = (await http.get(f"/api/tenant/reservations/{rid}")).json()
            if shown["backed"] is False:
                break
            await asyncio.sleep(0.05)
        assert (shown["status"], shown["backed"]) == ("active", False)  # still held, and charged
        ended = (await http.delete(f"/api/tenant/reservations/{rid}")).json()
        assert (ended["status"], ended["backed"]) == ("ended", None)


async def test_an_admin_reserves_on_a_tenants_behalf(
    api: RunningApi, tenant: TenantKey, live_node: str, priced: None, settings: Settings
) -> None:
    admin_key = await create_platform_admin_key(settings)
    base = f"/api/admin/tenants/{tenant.tenant_id}/reservations"
    async with client(api, admin_key) as admin, client(api, tenant.secret) as own:
        made = await admin.post(base, json={"model": MODEL, "slots": 2})
        assert made.status_code == 201, made.text
        rid = made.json()["id"]
        assert [r["id"] for r in (await own.get("/api/tenant/reservations")).json()] == [rid]
        grown = await admin.patch(f"{base}/{rid}", json={"burst_slots": 3})
        assert (grown.json()["slots"], grown.json()["burst_slots"]) == (2, 3)
        assert (await own.get(f"/api/tenant/reservations/{rid}")).json()["burst_slots"] == 3
        assert (await admin.delete(f"{base}/{rid}")).json()["status"] == "ended"
        assert [r["status"] for r in (await admin.get(base)).json()] == ["ended"]
        missing = await admin.get("/api/admin/tenants/ten_nobody/reservations")
        assert missing.status_code == 404


async def test_a_reservation_of_a_withdrawn_model_shrinks_and_ends_but_does_not_grow(
    api: RunningApi, tenant: TenantKey, engine: AsyncEngine, live_node: str, priced: None
) -> None:
    """Withdrawn behind the admin API's back (straight in the database): the reservation can only
    wind down."""
    async with client(api, tenant.secret) as http:
        rid = (await http.post("/api/tenant/reservations", json={"model": MODEL, "slots": 2})).json()["id"]
        async with session_factory(engine).begin() as session:
            await session.execute(update(Model).where(Model.name == MODEL).values(active=False))
        grow = await http.patch(f"/api/tenant/reservations/{rid}", json={"slots": 3})
        assert (grow.status_code, grow.json()["code"]) == (404, "model_not_found")
        shrink = await http.patch(f"/api/tenant/reservations/{rid}", json={"slots": 1})
        assert (shrink.status_code, shrink.json()["slots"]) == (200, 1)
        assert (await http.delete(f"/api/tenant/reservations/{rid}")).json()["status"] == "ended"


async def test_retiring_a_model_ends_its_reservations(
    api: RunningApi, tenant: TenantKey, engine: AsyncEngine, live_node: str, priced: None, settings: Settings
) -> None:
    other = await make_tenant(engine, name="other")
    admin_key = await create_platform_admin_key(settings)
    async with client(api, tenant.secret) as own, client(api, other.secret) as theirs, client(api, admin_key) as admin:
        mine = (await own.post("/api/tenant/reservations", json={"model": MODEL, "slots": 2})).json()["id"]
        yours = (await theirs.post("/api/tenant/reservations", json={"model": MODEL, "slots": 1})).json()["id"]
        retired = await admin.patch(f"/api/admin/models/{MODEL}", json={"active": False})
        assert retired.status_code == 200, retired.text
        for http, rid in ((own, mine), (theirs, yours)):
            ended = (await http.get(f"/api/tenant/reservations/{rid}")).json()
            assert (ended["status"], ended["ended_at"] is not None) == ("ended", True)
            grow = await http.patch(f"/api/tenant/reservations/{rid}", json={"slots": 3})
            assert (grow.status_code, grow.json()["code"]) == (409, "reservation_ended")
        again = await own.post("/api/tenant/reservations", json={"model": MODEL, "slots": 1})
        assert (again.status_code, again.json()["code"]) == (404, "model_not_found")
    assert await _last_change(settings, mine) == (0, "platform_admin")  # who ended it, in the history


async def test_suspending_a_tenant_ends_its_reservations_and_reinstating_does_not_restore_them(
    api: RunningApi, tenant: TenantKey, live_node: str, priced: None, settings: Settings
) -> None:
    admin_key = await create_platform_admin_key(settings)
    base = f"/api/admin/tenants/{tenant.tenant_id}"
    async with client(api, tenant.secret) as own, client(api, admin_key) as admin:
        rid = (await own.post("/api/tenant/reservations", json={"model": MODEL, "slots": 4})).json()["id"]
        assert (await admin.patch(base, json={"status": "suspended"})).status_code == 200
        [held] = (await admin.get(f"{base}/reservations")).json()
        assert (held["id"], held["status"]) == (rid, "ended")
        refused = await admin.post(f"{base}/reservations", json={"model": MODEL, "slots": 1})
        assert (refused.status_code, refused.json()["code"]) == (409, "tenant_suspended")
        assert refused.headers["content-type"].startswith("application/problem+json")

        assert (await admin.patch(base, json={"status": "active"})).status_code == 200
        assert [r["status"] for r in (await own.get("/api/tenant/reservations")).json()] == ["ended"]
        # the capacity it held went back to the fleet: the whole reservable share is there again
        made = await own.post("/api/tenant/reservations", json={"model": MODEL, "slots": 4})
        assert made.status_code == 201, made.text
    assert await _last_change(settings, rid) == (0, "platform_admin")


async def _last_change(settings: Settings, reservation_id: str) -> tuple[int, str | None]:
    """The reservation's last size, and the role of the key that set it."""
    conn = await asyncpg.connect(plain_url(settings.require_database_url()))
    try:
        row = await conn.fetchrow(
            """SELECT c.slots, k.role FROM reservation_changes c LEFT JOIN api_keys k ON k.id = c.actor_key_id
               WHERE c.reservation_id = $1 ORDER BY c.id DESC LIMIT 1""",
            reservation_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return row["slots"], row["role"]


async def test_a_model_without_a_reservation_price_cannot_be_reserved(
    api: RunningApi, tenant: TenantKey, live_node: str
) -> None:
    async with client(api, tenant.secret) as http:
        r = await http.post("/api/tenant/reservations", json={"model": MODEL, "slots": 1})
    assert r.status_code == 409
    assert r.json()["code"] == "not_reservable"


async def test_a_dead_api_process_gives_back_its_requests_in_flight(
    api: RunningApi, tenant: TenantKey, live_node: str, priced: None, settings: Settings
) -> None:
    async with client(api, tenant.secret) as http:
        rid = (await http.post("/api/tenant/reservations", json={"model": MODEL, "slots": 1})).json()["id"]
    conn = await asyncpg.connect(settings.require_database_url())
    try:
        # a process that admitted two requests under it and died (never heard from again)
        await conn.execute(
            "INSERT INTO quota_holds (holder, tenant_id, period, held)"
            " VALUES ('lim_dead', $1, market_current_period(), 0)",
            tenant.tenant_id,
        )
        await conn.execute("INSERT INTO reservation_holds VALUES ('lim_dead', $1, 1, 1)", rid)
        async with client(api, tenant.secret) as http:
            assert (await http.get(f"/api/tenant/reservations/{rid}")).json()["in_flight"] == 2
            assert (await chat(api, tenant.secret)).status_code == 429  # its slot looks taken
            await conn.fetchval("SELECT market_release_dead_holders(60)")
            assert (await http.get(f"/api/tenant/reservations/{rid}")).json()["in_flight"] == 0
        # an api process from before reservations settles as it did, while a rolling deploy replaces it
        await conn.fetch(
            "SELECT * FROM market_settle_one('lim_old', $1, market_current_period(), 0, 1, 0.8)", tenant.tenant_id
        )
        await conn.fetch(
            "SELECT * FROM market_settle("
            " ARRAY['lim_old'], ARRAY[$1], ARRAY[market_current_period()], '{0}', '{1}', 0.8)",
            tenant.tenant_id,
        )
        used = await conn.fetchval("SELECT used FROM tenant_quotas WHERE tenant_id = $1", tenant.tenant_id)
        assert used == 2
    finally:
        await conn.close()


async def test_sizing_suspending_retiring_and_requests_interleaved_keep_the_books_straight(
    api: RunningApi, tenant: TenantKey, fleet: Fleet, live_node: str, priced: None, settings: Settings
) -> None:
    """Everything that locks a reservation, at once and over and over: a tenant sizing its
    reservation and sending requests, an admin suspending and reinstating it and setting its allowed
    models, the platform retiring and restoring the model. No deadlock (a 500, or a 503 retry), and
    the invariants hold at the end."""
    await fleet({"node_echo": echo_node("node_echo", words=2, delay=0.01)})
    admin_key = await create_platform_admin_key(settings)
    statuses: list[tuple[str, int, str]] = []

    def saw(what: str, r: httpx.Response) -> None:
        code = r.json().get("code") or r.json().get("error", {}).get("code", "") if r.status_code >= 400 else ""
        statuses.append((what, r.status_code, code))

    async with client(api, tenant.secret) as own, client(api, admin_key) as admin:
        until = time.monotonic() + 4.0

        async def sizing() -> None:
            i = 0
            while time.monotonic() < until:
                i += 1
                listed = await own.get("/api/tenant/reservations")
                if listed.status_code != 200:
                    saw("list", listed)
                    continue
                active = [r["id"] for r in listed.json() if r["status"] == "active"]
                if not active:
                    saw("create", await own.post("/api/tenant/reservations", json={"model": MODEL, "slots": 1 + i % 3}))
                    continue
                for slots in (1 + i % 4, 1 + (i + 1) % 4, 1 + (i + 2) % 4):
                    saw("resize", await own.patch(f"/api/tenant/reservations/{active[0]}", json={"slots": slots}))
                if i % 7 == 0:
                    saw("end", await own.delete(f"/api/tenant/reservations/{active[0]}"))

        async def suspending() -> None:
            suspend = True
            while time.monotonic() < until:
                status = "suspended" if suspend else "active"
                saw("suspend", await admin.patch(f"/api/admin/tenants/{tenant.tenant_id}", json={"status": status}))
                await asyncio.sleep(0.15 if suspend else 0.3)  # active long enough to reserve again
                suspend = not suspend
            saw("suspend", await admin.patch(f"/api/admin/tenants/{tenant.tenant_id}", json={"status": "active"}))

        async def retiring() -> None:
            retire = True
            while time.monotonic() < until:
                saw("retire", await admin.patch(f"/api/admin/models/{MODEL}", json={"active": not retire}))
                await asyncio.sleep(0.1 if retire else 0.5)
                retire = not retire
            saw("retire", await admin.patch(f"/api/admin/models/{MODEL}", json={"active": True}))

        async def requests() -> None:
            while time.monotonic() < until:
                saw("chat", await chat(api, tenant.secret))

        async def allowing() -> None:  # the tenant's allowed models: tenant row, then the model's key
            models = f"/api/admin/tenants/{tenant.tenant_id}/models"
            while time.monotonic() < until:
                saw("allow", await admin.put(models, json={"models": [MODEL]}))
                saw("allow", await admin.put(models, json={"models": []}))

        await asyncio.gather(sizing(), suspending(), retiring(), requests(), requests(), allowing())

    assert not [s for s in statuses if s[1] >= 500], statuses  # a deadlock is a 503 conflict_retry
    suspended = {(403, "tenant_suspended")}  # the tenant's own key, while suspended
    sizing_refused = suspended | {(409, "tenant_suspended"), (404, "model_not_found")}
    expected = {
        "list": suspended,
        "create": {(201, ""), (409, "reservation_exists")} | sizing_refused,
        "resize": {(200, ""), (409, "reservation_ended")} | sizing_refused,
        "end": {(200, "")} | suspended,
        "suspend": {(200, "")},
        "retire": {(200, "")},
        "allow": {(200, "")},
        "chat": {(200, ""), (404, "model_not_found"), (429, "reservation_full")} | suspended,
    }
    assert {s for s in statuses if (s[1], s[2]) not in expected[s[0]]} == set()
    assert {(s[0], s[1]) for s in statuses} >= {("create", 201), ("chat", 200)}  # it did interleave work

    conn = await asyncpg.connect(plain_url(settings.require_database_url()))
    try:
        # the last word was a reinstatement and a restored model: state both, then check the books
        tenant_status = await conn.fetchval("SELECT status FROM tenants WHERE id = $1", tenant.tenant_id)
        model_active = await conn.fetchval("SELECT active FROM models WHERE name = $1", MODEL)
        active = await conn.fetch(
            "SELECT r.id, r.slots, (SELECT c.slots FROM reservation_changes c WHERE c.reservation_id = r.id"
            " ORDER BY c.id DESC LIMIT 1) AS last FROM reservations r WHERE r.status = 'active'"
        )
        ended_open = await conn.fetchval(
            "SELECT count(*) FROM reservations r WHERE r.status = 'ended' AND (SELECT c.slots FROM"
            " reservation_changes c WHERE c.reservation_id = r.id ORDER BY c.id DESC LIMIT 1) <> 0"
        )
        held = await conn.fetchval("SELECT coalesce(sum(reserved + burst), 0) FROM reservation_holds")
        quota_held = await conn.fetchval("SELECT held FROM tenant_quotas WHERE tenant_id = $1", tenant.tenant_id)
    finally:
        await conn.close()
    assert (tenant_status, model_active) == ("active", True)
    assert len(active) <= 1
    assert all(r["slots"] == r["last"] for r in active)  # the history's last size is the size in force
    assert ended_open == 0  # every ended reservation's history ends with its end
    assert (held, quota_held) == (0, 0)  # every request's slot and tokens came back

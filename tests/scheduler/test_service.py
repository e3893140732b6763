"""Scheduler replicas over real NATS and PostgreSQL, with fake nodes made of plain subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from market import subjects, wire
from market.models import Node, Provider
from market.settings import Settings
from scheduler.service import SchedulerService

_job_decoder = wire.decoder(wire.Job)
_placement_decoder = wire.decoder(wire.Placement)
_event_decoder = wire.decoder(wire.FleetEvent)


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Heartbeats every 0.1 s and a node lost after 1.2 s of silence: loss tests stay short, and a
    busy CI machine delaying a few heartbeats does not lose a healthy node."""
    return replace(settings, heartbeat_interval_s=0.1, heartbeat_timeout_s=1.2)


@dataclass
class FakeNode:
    """A node agent reduced to what the scheduler sees: heartbeats out, jobs in."""

    nc: Client
    settings: Settings
    node_id: str
    models: list[str]
    provider_id: str = "prov_test"
    status: wire.NodeStatus = "healthy"
    slots: int = 64
    running: int = 0
    profile: wire.ProfileInfo = field(default_factory=wire.ProfileInfo)
    jobs: list[tuple[wire.Job, str]] = field(default_factory=list)
    """Each job received with the reply subject it came with."""
    acknowledges: bool = False
    """Report ``placements`` as an agent does (else as agents before that field)."""
    placements: dict[str, int] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    async def start(self) -> FakeNode:
        async def on_job(msg: Msg) -> None:
            job = _job_decoder.decode(msg.data)
            self.jobs.append((job, msg.reply))
            replica, _, seq = (msg.headers or {}).get(wire.PLACEMENT_HEADER, "missing -1").rpartition(" ")
            self.placements[replica] = int(seq)  # a job sent without one shows as {"missing": -1}
            accepted = wire.Chunk(job_id=job.id, node_id=self.node_id, seq=0, kind="accepted")
            await self.nc.publish(msg.reply, wire.encode(accepted))

        await self.nc.subscribe(subjects.node_jobs(self.node_id), cb=on_job)
        await self.heartbeat()
        self._task = asyncio.create_task(self._beat())
        return self

    def heartbeat_message(self) -> wire.Heartbeat:
        return wire.Heartbeat(
            node_id=self.node_id,
            provider_id=self.provider_id,
            status=self.status,
            models=self.models,
            engine="sim",
            profile=self.profile,
            slots=self.slots,
            running=self.running,
            sent_at=time.time(),
            placements=dict(self.placements) if self.acknowledges else None,
        )

    async def heartbeat(self) -> None:
        await self.nc.publish(subjects.heartbeat(self.node_id), wire.encode(self.heartbeat_message()))
        await self.nc.flush()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self.heartbeat()

    async def go_silent(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def job_ids(self) -> list[str]:
        return [job.id for job, _reply in self.jobs]


@pytest.fixture
async def nodes(nc: Client) -> AsyncIterator[list[FakeNode]]:
    """Fake nodes started by a test; their heartbeats stop when it ends."""
    started: list[FakeNode] = []
    yield started
    for node in started:
        await node.go_silent()


@pytest.fixture
async def replicas() -> AsyncIterator[list[SchedulerService]]:
    started: list[SchedulerService] = []
    yield started
    for service in started:
        await service.stop()


async def start_node(nodes: list[FakeNode], nc: Client, settings: Settings, node_id: str, **kw: Any) -> FakeNode:
    node = await FakeNode(nc, settings, node_id, **kw).start()
    nodes.append(node)
    return node


async def start_replica(replicas: list[SchedulerService], settings: Settings, **kw: Any) -> SchedulerService:
    service = SchedulerService(settings, **kw)
    await service.start()
    replicas.append(service)
    return service


def make_job(job_id: str, model: str = "llama-8b", **kw: Any) -> wire.Job:
    fields: dict[str, Any] = {
        "id": job_id,
        "tenant_id": "ten_1",
        "key_id": "key_1",
        "model": model,
        "kind": "chat",
        "body": {"messages": [{"role": "user", "content": "hi"}]},
        "prompt_tokens": 10,
        "max_tokens": 20,
        "reply": f"_INBOX.api-test.{job_id}",
        "deadline": time.time() + 60,
    }
    fields.update(kw)
    return wire.Job(**fields)


async def submit(nc: Client, job: wire.Job) -> wire.Placement:
    # On a freshly started nats-server under load, a request right after the first replica
    # subscribed was seen (rarely) to get "no responders"; retry that once rather than flake.
    try:
        reply = await nc.request(subjects.JOBS_SUBMIT, wire.encode(job), timeout=3)
    except NoRespondersError:
        await asyncio.sleep(0.2)
        reply = await nc.request(subjects.JOBS_SUBMIT, wire.encode(job), timeout=3)
    return _placement_decoder.decode(reply.data)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_job_reaches_the_node_serving_its_model_and_answers_the_api_inbox(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    llama = await start_node(nodes, nc, settings, "node_llama", models=["llama-8b"])
    mistral = await start_node(nodes, nc, settings, "node_mistral", models=["mistral-7b"], provider_id="prov_m")
    await start_replica(replicas, settings)
    job = make_job("req_one", model="mistral-7b")
    inbox = await nc.subscribe(job.reply)

    placement = await submit(nc, job)

    assert placement == wire.Placement(job_id="req_one", node_id="node_mistral", provider_id="prov_m")
    await eventually(lambda: len(mistral.jobs) == 1)
    received, reply = mistral.jobs[0]
    assert reply == job.reply
    assert received == job
    assert llama.jobs == []
    # The node's answer goes straight to the api's inbox, not through the scheduler.
    chunk = wire.decoder(wire.Chunk).decode((await inbox.next_msg(timeout=2)).data)
    assert (chunk.kind, chunk.node_id, chunk.job_id) == ("accepted", "node_mistral", "req_one")


async def test_two_replicas_place_every_job_exactly_once(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    fleet = [await start_node(nodes, nc, settings, f"node_{i}", models=["llama-8b"], slots=500) for i in range(3)]
    first = await start_replica(replicas, settings, name="scheduler-1")
    second = await start_replica(replicas, settings, name="scheduler-2")

    placements = await asyncio.gather(*(submit(nc, make_job(f"req_{i:03d}")) for i in range(200)))

    assert all(p.error is None for p in placements)
    await eventually(lambda: sum(len(node.jobs) for node in fleet) == 200)
    await nc.flush()
    received = Counter(job_id for node in fleet for job_id in node.job_ids())
    assert received == Counter({f"req_{i:03d}": 1 for i in range(200)})
    by_node = {job_id: node.node_id for node in fleet for job_id in node.job_ids()}
    assert all(by_node[p.job_id] == p.node_id for p in placements)
    assert first.counters["placed"] > 0
    assert second.counters["placed"] > 0
    assert first.counters["placed"] + second.counters["placed"] == 200
    assert all(len(node.jobs) > 20 for node in fleet)  # the burst spread over the fleet


async def test_a_silent_node_is_announced_lost_once_and_gets_no_more_jobs(
    nc: Client, fast: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    events: list[wire.FleetEvent] = []

    async def on_event(msg: Msg) -> None:
        events.append(_event_decoder.decode(msg.data))

    await nc.subscribe(subjects.FLEET_EVENTS, cb=on_event)
    doomed = await start_node(nodes, nc, fast, "node_doomed", models=["llama-8b"])
    steady = await start_node(nodes, nc, fast, "node_steady", models=["llama-8b"])
    service = await start_replica(replicas, fast)
    first = await asyncio.gather(*(submit(nc, make_job(f"req_a{i}")) for i in range(10)))
    assert {p.node_id for p in first} == {"node_doomed", "node_steady"}

    await doomed.go_silent()
    await eventually(lambda: any(e.node_id == "node_doomed" for e in events), timeout=3)
    after = await asyncio.gather(*(submit(nc, make_job(f"req_b{i}")) for i in range(10)))

    assert {p.node_id for p in after} == {"node_steady"}
    await asyncio.sleep(fast.heartbeat_timeout_s)  # another timeout passes: still a single event
    assert [(e.kind, e.node_id) for e in events] == [("node_lost", "node_doomed")]
    assert service.stats()["healthy"] == 1
    assert steady.status == "healthy"


async def test_a_replica_that_was_frozen_does_not_call_live_nodes_lost(
    nc: Client, fast: Settings, replicas: list[SchedulerService]
) -> None:
    """The replica's own process stops for longer than the heartbeat timeout (a long GC, a virtual
    CPU the host did not run) while the node, elsewhere, goes on beating: no node_lost on waking."""
    events: list[wire.FleetEvent] = []

    async def on_event(msg: Msg) -> None:
        events.append(_event_decoder.decode(msg.data))

    await nc.subscribe(subjects.FLEET_EVENTS, cb=on_event)
    service = await start_replica(replicas, fast)
    stop = threading.Event()

    def elsewhere() -> None:
        """A node in another thread, with its own event loop and connection (another process)."""

        async def beat() -> None:
            other = await nats.connect(fast.require_nats_url(), user=fast.nats_user, password=fast.nats_password or "")
            node = FakeNode(other, fast, "node_alive", models=["llama-8b"])
            while not stop.is_set():
                await node.heartbeat()
                await asyncio.sleep(fast.heartbeat_interval_s)
            await other.close()

        asyncio.run(beat())

    thread = threading.Thread(target=elsewhere)
    thread.start()
    try:
        await eventually(lambda: service.stats()["healthy"] == 1)
        time.sleep(fast.heartbeat_timeout_s * 1.5)  # the freeze under test: the loop stops
        await asyncio.sleep(fast.heartbeat_timeout_s)
        assert [(e.kind, e.node_id) for e in events] == []
        assert service.stats()["healthy"] == 1
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)


async def test_a_draining_node_is_announced_once_and_gets_no_new_jobs(
    nc: Client, fast: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    events: list[wire.FleetEvent] = []

    async def on_event(msg: Msg) -> None:
        events.append(_event_decoder.decode(msg.data))

    await nc.subscribe(subjects.FLEET_EVENTS, cb=on_event)
    draining = await start_node(nodes, nc, fast, "node_draining", models=["llama-8b"], slots=200)
    await start_node(nodes, nc, fast, "node_other", models=["llama-8b"], running=50, slots=20)
    await start_replica(replicas, fast)
    draining.status = "draining"
    await draining.heartbeat()
    await eventually(lambda: bool(events))
    placements = await asyncio.gather(*(submit(nc, make_job(f"req_{i}")) for i in range(5)))

    assert {p.node_id for p in placements} == {"node_other"}
    await asyncio.sleep(3 * fast.heartbeat_interval_s)
    assert [(e.kind, e.node_id) for e in events] == [("node_draining", "node_draining")]


async def test_unknown_model_and_no_capacity_are_told_apart(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    await start_node(nodes, nc, settings, "node_full", models=["llama-8b"], running=8, slots=0)
    service = await start_replica(replicas, settings)

    unknown = await submit(nc, make_job("req_unknown", model="gpt-9"))
    full = await submit(nc, make_job("req_full"))

    assert unknown == wire.Placement(job_id="req_unknown", error="unknown_model")
    assert full.error == "no_capacity"
    assert full.node_id is None
    assert 0 < full.retry_after_s <= settings.heartbeat_timeout_s
    assert service.counters["unknown_model"] == service.counters["no_capacity"] == 1
    assert service.counters["placed"] == 0


async def test_tools_on_a_model_no_node_serves_with_them_are_refused_at_once(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    await start_node(nodes, nc, settings, "node_plain", models=["llama-8b"])
    service = await start_replica(replicas, settings)
    waiting = make_job("req_tools", tools=True)
    waiting.wait_s = 5.0  # even a job that may wait is answered at once: no node will ever fit
    assert await submit(nc, waiting) == wire.Placement(job_id="req_tools", error="tools_unsupported", retry_after_s=0.0)
    await start_node(nodes, nc, settings, "node_tools", models=["llama-8b"], profile=wire.ProfileInfo(tools=True))
    for _ in range(100):
        if service.fleet.get("node_tools") is not None:
            break
        await asyncio.sleep(0.02)
    placed = await submit(nc, make_job("req_tools_2", tools=True))
    assert placed.node_id == "node_tools"
    assert service.counters["tools_unsupported"] == 1


async def test_a_prompt_longer_than_every_nodes_context_is_refused_at_once(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    """Waiting for capacity would not help a prompt no node of its model has the context for,
    busy or not: it is answered ``context_too_long`` at once, however long it may wait."""
    for node_id, context in (("node_short", 2048), ("node_long", 8192)):
        profile = wire.ProfileInfo(max_model_len=context)
        await start_node(nodes, nc, settings, node_id, models=["llama-8b"], profile=profile, slots=0)
    service = await start_replica(replicas, settings)
    await eventually(lambda: service.fleet.longest_context("llama-8b") == 8192)
    refused = await request_placement(nc, make_job("req_long", prompt_tokens=9000, wait_s=30.0))
    assert refused.error == "context_too_long"
    waits = asyncio.create_task(request_placement(nc, make_job("req_fits", prompt_tokens=5000, wait_s=30.0)))
    await eventually(lambda: service.counters["queued"] == 1)  # the long node may free a slot
    assert not waits.done()
    waits.cancel()


async def test_node_rows_follow_heartbeats_and_loss(
    nc: Client,
    fast: Settings,
    engine: AsyncEngine,
    nodes: list[FakeNode],
    replicas: list[SchedulerService],
) -> None:
    async with engine.begin() as conn:
        await conn.execute(Provider.__table__.insert().values(id="prov_db", name="GPU Co"))
        await conn.execute(Node.__table__.insert().values(id="node_db", provider_id="prov_db", name="box 1"))
        await conn.execute(
            Node.__table__.insert().values(id="node_revoked", provider_id="prov_db", name="box 2", status="revoked")
        )
    profile = wire.ProfileInfo(mode="semi-pd", prefill_share=80, decode_share=100, max_num_seqs=64)
    node = await start_node(nodes, nc, fast, "node_db", provider_id="prov_db", models=["llama-8b", "qwen"])
    node.profile = profile
    await start_node(nodes, nc, fast, "node_revoked", provider_id="prov_db", models=["llama-8b"])
    await start_node(nodes, nc, fast, "node_unenrolled", models=["llama-8b"])
    await start_replica(replicas, fast, persist_interval_s=0.1)

    async def row(node_id: str) -> Node | None:
        async with engine.connect() as conn:
            found = (await conn.execute(select(Node.__table__).where(Node.id == node_id))).first()
        return None if found is None else Node(**found._asdict())

    async def wait_for_row(node_id: str, check: Callable[[Node], bool]) -> Node:
        deadline = time.monotonic() + 5
        while True:
            current = await row(node_id)
            if current is not None and check(current):
                return current
            assert time.monotonic() < deadline, f"{node_id} row never matched: {current and current.status}"
            await asyncio.sleep(0.05)

    healthy = await wait_for_row("node_db", lambda r: r.status == "healthy" and r.profile.get("mode") == "semi-pd")
    assert healthy.models == ["llama-8b", "qwen"]
    assert healthy.engine == "sim"
    assert healthy.profile["prefill_share"] == 80
    assert healthy.hardware["accelerator"] == "cpu"
    assert healthy.last_seen_at is not None
    assert abs(healthy.last_seen_at.timestamp() - time.time()) < 5

    await node.go_silent()
    await wait_for_row("node_db", lambda r: r.status == "unhealthy")
    revoked = await row("node_revoked")
    assert revoked is not None
    assert revoked.status == "revoked"  # a revoked node stays revoked whatever its agent says
    assert await row("node_unenrolled") is None  # enrolment creates rows, heartbeats do not


async def test_placement_goes_on_while_postgres_is_unreachable(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    unreachable = replace(settings, database_url="postgresql://market@127.0.0.1:9/market")
    await start_node(nodes, nc, settings, "node_a", models=["llama-8b"])
    service = await start_replica(replicas, unreachable, persist_interval_s=60)

    assert not await service.flush()
    placement = await submit(nc, make_job("req_db_down"))

    assert placement.node_id == "node_a"
    assert service.counters["db_errors"] == 1
    assert service.stats()["placed"] == 1


async def test_a_revoked_node_gets_no_more_jobs_even_if_it_says_it_is_healthy(
    nc: Client, fast: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    """Where NATS users are managed outside, a revoked node may stay connected: the provider's
    revocation (a fleet event from the api) must still stop placement on it for good."""
    rogue = await start_node(nodes, nc, fast, "node_rogue", models=["llama-8b"], slots=100)
    await start_node(nodes, nc, fast, "node_good", models=["llama-8b"], slots=100)
    await start_replica(replicas, fast)
    before = await asyncio.gather(*(submit(nc, make_job(f"req_r{i}")) for i in range(5)))
    assert "node_rogue" in {p.node_id for p in before}

    await nc.publish(
        subjects.FLEET_EVENTS, wire.encode(wire.FleetEvent(kind="node_revoked", node_id="node_rogue", at=time.time()))
    )
    await nc.flush()
    await asyncio.sleep(3 * fast.heartbeat_interval_s)  # it keeps heartbeating "healthy"
    assert rogue.status == "healthy"
    after = await asyncio.gather(*(submit(nc, make_job(f"req_s{i}")) for i in range(5)))
    assert {p.node_id for p in after} == {"node_good"}


async def request_placement(nc: Client, job: wire.Job, timeout: float = 10.0) -> wire.Placement:
    """``submit`` for jobs that may wait: a longer timeout, the same retry of a rare "no responders"."""
    try:
        reply = await nc.request(subjects.JOBS_SUBMIT, wire.encode(job), timeout=timeout)
    except NoRespondersError:
        await asyncio.sleep(0.2)
        reply = await nc.request(subjects.JOBS_SUBMIT, wire.encode(job), timeout=timeout)
    return _placement_decoder.decode(reply.data)


async def test_jobs_wait_for_a_free_slot_reserved_first_then_in_arrival_order(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    """Every node busy: jobs that may wait are answered when a heartbeat shows a slot, one per
    free slot, reserved before on_demand and first come first served within a class. (8 running
    and 1 free make a capacity of 9, too small for the reserved headroom to hold the slot back.)"""
    node = await start_node(nodes, nc, settings, "node_full", models=["llama-8b"], running=8, slots=0)
    service = await start_replica(replicas, settings)
    order = ["req_a", "req_b", "req_reserved"]
    waits = {}
    for job_id in order:
        cls = "reserved" if job_id == "req_reserved" else "on_demand"
        waits[job_id] = asyncio.create_task(request_placement(nc, make_job(job_id, wait_s=30.0, admission_class=cls)))
        await eventually(lambda: service.counters["queued"] == len(waits))
    await asyncio.sleep(0.2)
    assert not any(task.done() for task in waits.values())

    node.slots = 1  # from the next heartbeat on, each one shows one free slot
    await eventually(lambda: len(node.jobs) == len(order))
    assert node.job_ids() == ["req_reserved", "req_a", "req_b"]
    for job_id in order:
        placement = await waits[job_id]
        assert placement.node_id == "node_full"
        assert placement.error is None
    assert service.counters["placed"] == 3
    assert service.counters["no_capacity"] == 0


async def test_a_report_counted_before_a_job_arrived_does_not_free_the_jobs_slot(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    """A one-slot node's report, counted before the job placed on it arrived but reaching the
    replica after the placement, leaves the slot taken: the next job waits at the scheduler (in
    its order) rather than in the node's engine queue, until a report acknowledges the first job
    and shows the slot free."""
    node = await start_node(nodes, nc, settings, "node_one", models=["llama-8b"], slots=1, acknowledges=True)
    service = await start_replica(replicas, settings)
    await eventually(lambda: service.fleet.get("node_one") is not None)
    await node.go_silent()  # its reports are sent by hand from here on
    await node.heartbeat()
    first = await submit(nc, make_job("req_first"))
    assert first.node_id == "node_one"
    await eventually(lambda: len(node.jobs) == 1)
    assert node.placements == {service.replica: 1}
    beats = service.counters["heartbeats"]
    stale = msgspec.structs.replace(node.heartbeat_message(), placements={})
    await nc.publish(subjects.heartbeat("node_one"), wire.encode(stale))
    await eventually(lambda: service.counters["heartbeats"] == beats + 1)

    second = asyncio.create_task(request_placement(nc, make_job("req_second", wait_s=30.0)))
    await eventually(lambda: service.counters["queued"] == 1)
    node.slots = 0
    await node.heartbeat()  # acknowledges the first job, which holds the slot
    await asyncio.sleep(0.2)
    assert not second.done()
    node.slots = 1
    await node.heartbeat()  # the first job ended
    placement = await second
    assert placement.node_id == "node_one"
    assert node.job_ids() == ["req_first", "req_second"]
    assert node.placements == {service.replica: 2}


async def test_a_waiting_job_is_refused_when_its_wait_ends_or_its_replica_stops(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    await start_node(nodes, nc, settings, "node_full", models=["llama-8b"], running=8, slots=0)
    service = await start_replica(replicas, settings)
    started = time.monotonic()
    short = await request_placement(nc, make_job("req_short", wait_s=0.3))
    assert short.error == "no_capacity"
    assert time.monotonic() - started >= 0.3
    assert service.counters["queued"] == service.counters["no_capacity"] == 1

    patient = asyncio.create_task(request_placement(nc, make_job("req_patient", wait_s=30.0)))
    await eventually(lambda: service.counters["queued"] == 2)
    await service.stop()
    replicas.remove(service)
    answer = await patient
    assert answer.error == "no_capacity"
    assert answer.retry_after_s == 0.0  # ask again at once: another replica may take it


async def test_a_withdrawn_job_is_never_placed(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    node = await start_node(nodes, nc, settings, "node_full", models=["llama-8b"], running=8, slots=0)
    service = await start_replica(replicas, settings)
    gone = asyncio.create_task(request_placement(nc, make_job("req_gone", wait_s=30.0)))
    await eventually(lambda: service.counters["queued"] == 1)
    await nc.publish(subjects.JOBS_WITHDRAW, wire.encode(wire.Cancel(job_id="req_gone")))
    await eventually(lambda: service.counters["withdrawn"] == 1)
    gone.cancel()

    node.slots = 1
    stays = await request_placement(nc, make_job("req_next", wait_s=30.0))
    assert stays.node_id == "node_full"
    assert node.job_ids() == ["req_next"]


async def test_a_withdrawal_that_overtakes_its_job_still_keeps_it_off_the_nodes(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    """Withdrawals and submissions travel on different subscriptions: one can be handled first."""
    node = await start_node(nodes, nc, settings, "node_full", models=["llama-8b"], running=8, slots=0)
    service = await start_replica(replicas, settings)
    await nc.publish(subjects.JOBS_WITHDRAW, wire.encode(wire.Cancel(job_id="req_late")))
    await nc.flush()
    late = asyncio.create_task(request_placement(nc, make_job("req_late", wait_s=30.0)))
    await asyncio.sleep(0.3)
    node.slots = 1
    placed = await request_placement(nc, make_job("req_next", wait_s=30.0))
    assert placed.node_id == "node_full"
    assert node.job_ids() == ["req_next"]
    assert not late.done()  # nobody listens for its answer any more
    late.cancel()
    assert service.counters["queued"] <= 1


async def test_a_waiting_job_that_no_free_slot_suits_does_not_hold_up_those_behind_it(
    nc: Client, settings: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    """First come first served among the jobs that can use a slot: one that excludes the node
    with the free slot (it failed there before) stays waiting, the next one takes the slot."""
    node = await start_node(nodes, nc, settings, "node_full", models=["llama-8b"], running=8, slots=0)
    await start_node(nodes, nc, settings, "node_busy", models=["llama-8b"], running=8, slots=0)
    service = await start_replica(replicas, settings)
    picky = asyncio.create_task(request_placement(nc, make_job("req_picky", wait_s=30.0, exclude_nodes=["node_full"])))
    await eventually(lambda: service.counters["queued"] == 1)
    plain = asyncio.create_task(request_placement(nc, make_job("req_plain", wait_s=30.0)))
    await eventually(lambda: service.counters["queued"] == 2)
    node.slots = 1
    assert (await plain).node_id == "node_full"
    assert "req_picky" in service.waiting
    assert not picky.done()
    picky.cancel()


async def test_a_node_is_its_enrolling_providers_and_a_revocation_outlives_replicas(
    nc: Client, fast: Settings, engine: AsyncEngine, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    """What a heartbeat claims about its provider does not count against the enrolment (a
    tenant's allowed providers, offers and payouts go by it), and a node revoked before a replica
    started gets nothing from it."""
    async with engine.begin() as conn:
        await conn.execute(
            Provider.__table__.insert().values([{"id": "prov_a", "name": "A"}, {"id": "prov_b", "name": "B"}])
        )
        await conn.execute(
            Node.__table__.insert().values(
                [
                    {"id": "node_a", "provider_id": "prov_a", "name": "a", "status": "healthy"},
                    {"id": "node_gone", "provider_id": "prov_b", "name": "gone", "status": "revoked"},
                ]
            )
        )
    await start_node(nodes, nc, fast, "node_a", provider_id="prov_b", models=["llama-8b"])  # claims prov_b
    await start_node(nodes, nc, fast, "node_gone", provider_id="prov_b", models=["llama-8b"])
    await start_replica(replicas, fast)
    only_b = await submit(nc, make_job("req_b", allowed_providers=["prov_b"]))
    assert (only_b.node_id, only_b.error) == (None, "no_capacity")
    only_a = await submit(nc, make_job("req_a", allowed_providers=["prov_a"]))
    assert (only_a.node_id, only_a.provider_id) == ("node_a", "prov_a")


async def test_a_drain_the_node_did_not_hear_is_kept_and_ordered_again(
    nc: Client, fast: Settings, nodes: list[FakeNode], replicas: list[SchedulerService]
) -> None:
    """The api's drain order travels on core NATS and can be lost; the schedulers heard the event:
    the node gets no more jobs, and is told again with its next heartbeats until it says it drains."""
    node = await start_node(nodes, nc, fast, "node_d", models=["llama-8b"])
    other = await start_node(nodes, nc, fast, "node_e", models=["llama-8b"])
    orders: list[bytes] = []

    async def on_order(msg: Msg) -> None:
        orders.append(msg.data)

    await nc.subscribe(subjects.node_control("node_d"), cb=on_order)
    await start_replica(replicas, fast)
    event = wire.FleetEvent(kind="node_draining", node_id="node_d", at=time.time())
    await nc.publish(subjects.FLEET_EVENTS, wire.encode(event))
    await eventually(lambda: len(orders) >= 2)
    placements = [await submit(nc, make_job(f"req_{i}")) for i in range(6)]
    assert {p.node_id for p in placements} == {"node_e"}
    assert msgspec.json.decode(orders[0]) == {"action": "drain"}
    node.status = "draining"  # it heard the order at last
    await asyncio.sleep(0.3)
    heard = len(orders)
    await asyncio.sleep(0.3)
    assert len(orders) == heard
    assert other.job_ids() == [p.job_id for p in placements]

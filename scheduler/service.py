"""The scheduler replica: NATS plumbing around the pure policy, plus fleet state in PostgreSQL.

Every replica hears every heartbeat (plain subscription) and so holds the whole fleet; jobs come
through a queue group, so each job is placed by exactly one replica. A job that finds every node
busy may wait at the replica that took it (``scheduler.waiting``) and is placed, and only then
answered, as soon as a heartbeat shows a free slot. Placement never touches the database: the
``nodes`` rows are written behind, in one batched statement every couple of seconds, and a
database outage only delays those writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from sqlalchemy import text

from market import bus, db, subjects, wire
from market.ids import ulid
from scheduler.policy import DEFAULT_POLICY, FleetView, NodeState, Placed, PolicyConfig, place
from scheduler.waiting import Waiting, WaitQueue

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from sqlalchemy import TextClause
    from sqlalchemy.ext.asyncio import AsyncEngine

    from market.settings import Settings

log = logging.getLogger(__name__)

EventKind = Literal["node_lost", "node_draining", "node_revoked"]

MAX_MISSES = 64
"""Waiting jobs a dispatch may pass over because of their own limits (excluded nodes, providers,
price) while free slots remain, before it stops until the next heartbeat: bounds the work a
heartbeat does behind a long queue. A job passed over for want of any slot ends the scan at once."""
WITHDRAWN_KEPT = 4096
"""Withdrawn job ids remembered, for a withdrawal that overtakes its job (see ``_on_withdraw``)."""

# One statement for the whole batch: the rows travel as one JSON array (PostgreSQL turns JSON
# arrays into ``text[]`` columns itself). Unknown ids match nothing: enrolment creates rows, not us.
# A revoked node stays revoked whatever its agent still says.
_OFFERS = text("SELECT provider_id, model, output_minor_per_million FROM provider_offers")
_REGISTRY = text("SELECT id, provider_id, status FROM nodes")
_UPDATE_NODES = text(
    """
    UPDATE nodes AS n
    SET status = v.status, last_seen_at = v.last_seen_at, models = v.models, engine = v.engine,
        profile = v.profile, hardware = v.hardware, updated_at = now()
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(
        id text, status text, last_seen_at timestamptz, models text[], engine text,
        profile jsonb, hardware jsonb)
    WHERE n.id = v.id AND n.status <> 'revoked'
    """
)


class SchedulerService:
    """One scheduler replica. ``start()`` subscribes and starts the watcher; ``stop()`` undoes it.

    ``nc`` lets tests (or a process hosting several services) share a connection; without it the
    replica opens and later closes its own. ``warmup_s`` (default 1.5 heartbeat intervals) is how
    long it listens to heartbeats before taking jobs, so a fresh replica does not call a model
    unknown just because it has not heard from its nodes yet.
    """

    def __init__(
        self,
        settings: Settings,
        nc: Client | None = None,
        *,
        policy: PolicyConfig = DEFAULT_POLICY,
        warmup_s: float | None = None,
        persist_interval_s: float = 2.0,
        name: str = "scheduler",
        local: bool = False,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.name = name
        self.local = local
        """Hosted in a process that submits jobs through ``nc`` (an api replica): its submissions
        come in-process (``bus.serve_locally``), everyone else's through the queue group."""
        self.replica = f"{name}-{ulid()[-10:].lower()}"
        """This replica's id in its ``SchedulerAlive`` beats and its ``queued`` answers."""
        self.fleet = FleetView(settings.heartbeat_timeout_s, policy, replica=self.replica)
        self.warmup_s = settings.heartbeat_interval_s * 1.5 if warmup_s is None else warmup_s
        self.persist_interval_s = persist_interval_s
        self.placements: Counter[str] = Counter()
        """Jobs this replica placed, by node id."""
        self.counters: Counter[str] = Counter()
        """``placed``, ``unknown_model``, ``context_too_long``, ``tools_unsupported``, ``no_capacity``,
        ``expired``, ``invalid``, ``heartbeats``, ``queued`` (jobs that waited for a slot), ``withdrawn``
        (given up by the api while waiting), ``node_lost``/``node_draining``/``node_revoked`` (events
        sent), ``db_flushes``, ``db_errors``."""
        self.waiting = WaitQueue()
        """Jobs waiting here for a free slot."""
        self._withdrawn: dict[str, float] = {}
        """Job id -> monotonic time until which a submission of it is refused (withdrawn)."""
        self._answers: set[asyncio.Task[None]] = set()
        self._own_nc = nc is None
        self._subs: list[Subscription] = []
        self.revoked: set[str] = set()
        """Nodes revoked (heard while this replica ran, or in ``nodes``); their heartbeats are ignored."""
        self.providers: dict[str, str] = {}
        """Enrolled node -> its provider, from ``nodes``: a heartbeat's own claim does not count."""
        self.drain_ordered: set[str] = set()
        """Nodes the api told to drain that still say they are serving (the order may have been
        lost on its way): no jobs for them, and the order is sent again with their heartbeats."""
        self._event_decoder = wire.decoder(wire.FleetEvent)
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty: set[str] = set()
        self._engine: AsyncEngine | None = None
        self._job_decoder = wire.decoder(wire.Job)
        self._cancel_decoder = wire.decoder(wire.Cancel)
        self._heartbeat_decoder = wire.decoder(wire.Heartbeat)

    async def start(self) -> None:
        if self.nc is None:
            self.nc = await bus.connect(self.settings, name=self.name)
        nc = self.nc
        if self.settings.database_url:
            self._engine = db.create_engine(self.settings, pool_size=1, max_overflow=1)
            await self.load_registry()  # before the first heartbeat is taken in
        self._subs.append(await nc.subscribe(subjects.HEARTBEATS, cb=self._on_heartbeat))
        self._subs.append(await nc.subscribe(subjects.FLEET_EVENTS, cb=self._on_fleet_event))
        self._subs.append(await nc.subscribe(subjects.JOBS_WITHDRAW, cb=self._on_withdraw))
        await nc.flush()
        if self.warmup_s > 0:
            await asyncio.sleep(self.warmup_s)
        self._subs.append(await nc.subscribe(subjects.JOBS_SUBMIT, queue=subjects.SCHEDULERS_QUEUE, cb=self._on_job))
        await nc.flush()
        if self.local:
            bus.serve_locally(nc, subjects.JOBS_SUBMIT, self._on_job)
        self._tasks.append(asyncio.create_task(self._watch(), name=f"{self.name}-watch"))
        self._tasks.append(asyncio.create_task(self._beat(), name=f"{self.name}-beat"))
        if self._engine is not None:
            self._tasks.append(asyncio.create_task(self._persist_loop(), name=f"{self.name}-persist"))
        log.info("scheduler started", extra={"replica": self.name})

    async def stop(self) -> None:
        """Stop taking jobs (finishing the ones already delivered), send the jobs waiting here back
        (``no_capacity`` with no pause: the api submits them again, to another replica), then write
        the fleet one last time."""
        if self.local and self.nc is not None:
            bus.stop_serving_locally(self.nc, subjects.JOBS_SUBMIT, self._on_job)
        for sub in reversed(self._subs):
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
        self._subs.clear()
        for entry in self.waiting.drain():
            entry.timer.cancel()
            self._answer(entry, self._no_capacity(entry.job, retry_after_s=0.0))
        if self._answers:
            await asyncio.wait(list(self._answers), timeout=5)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._engine is not None:
            await self.flush()
            await self._engine.dispose()
            self._engine = None
        if self._own_nc and self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            self.nc = None
        log.info("scheduler stopped", extra={"replica": self.name})

    def stats(self) -> dict[str, Any]:
        return {
            "replica": self.name,
            "nodes": len(self.fleet),
            "healthy": self.fleet.healthy_count(time.monotonic()),
            **self.counters,
            "placements_by_node": dict(self.placements),
        }

    # --- jobs -------------------------------------------------------------------------------

    async def _on_job(self, msg: Msg | bus.LocalMsg) -> None:
        try:
            placement = await self._handle_job(msg)
        except Exception:
            log.exception("placing a job failed")
            placement = wire.Placement(job_id="", error="scheduler_error")
        if msg.reply and placement is not None:
            await msg.respond(wire.encode(placement))

    async def _handle_job(self, msg: Msg | bus.LocalMsg) -> wire.Placement | None:
        """The job's placement; when it waits here for a slot (answered later), ``queued`` if it
        asked for a notice, else None."""
        try:
            job = self._job_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            self.counters["invalid"] += 1
            log.warning("undecodable job: %s", exc)
            return wire.Placement(job_id="", error="invalid_job")
        if job.deadline < time.time():
            # Nobody waits for it any more: do not spend a node's capacity on it.
            self.counters["expired"] += 1
            return wire.Placement(job_id=job.id, error="expired")
        if self._withdrawn and self._withdrawn.get(job.id, 0.0) > time.monotonic():
            return None  # its api gave up on it before it got here: nobody listens for an answer
        now = time.monotonic()
        node = place(job, self.fleet, now)
        if node is None:
            if not self.fleet.serves(job.model):
                self.counters["unknown_model"] += 1
                return wire.Placement(job_id=job.id, error="unknown_model")
            if job.prompt_tokens >= self.fleet.longest_context(job.model):
                # No node of the model, busy or not, takes a prompt this long: waiting would not help.
                self.counters["context_too_long"] += 1
                return wire.Placement(job_id=job.id, error="context_too_long", retry_after_s=0.0)
            if job.tools and not self.fleet.serves_tools(job.model):
                # No node of the model parses tool calls, busy or not: waiting would not help.
                self.counters["tools_unsupported"] += 1
                return wire.Placement(job_id=job.id, error="tools_unsupported", retry_after_s=0.0)
            wait = min(job.wait_s, job.deadline - time.time())
            if wait > 0 and msg.reply:
                self._park(job, msg, wait)
                if job.hold_notice:
                    return wire.Placement(job_id=job.id, error="queued", scheduler=self.replica)
                return None
            self.counters["no_capacity"] += 1
            # Capacity news arrives with heartbeats: asking again before the next one is pointless.
            return self._no_capacity(job)
        placed = self.fleet.commit(node, now)
        return await self._forward(node, job, msg.data, placed)

    async def _forward(self, node: NodeState, job: wire.Job, data: bytes, placed: Placed) -> wire.Placement:
        """Send a placed job to its node: the bytes as they came, with the placement's sequence
        number (which the node's heartbeats acknowledge); the node answers straight to the api's
        inbox."""
        assert self.nc is not None
        # Numbered here, not when placed: nats-py buffers a message before it can yield, so the
        # numbers reach the node in order even when another placement's send waits meanwhile.
        seq = self.fleet.sent(placed)
        try:
            await self.nc.publish(
                subjects.node_jobs(node.node_id),
                data,
                reply=job.reply,
                headers={wire.PLACEMENT_HEADER: f"{self.replica} {seq}"},
            )
        except BaseException:  # also cancelled: a local submission runs in its asker's task
            self.fleet.release(node, placed)
            raise
        self.placements[node.node_id] += 1
        self.counters["placed"] += 1
        return wire.Placement(job_id=job.id, node_id=node.node_id, provider_id=node.provider_id)

    def _no_capacity(self, job: wire.Job, retry_after_s: float | None = None) -> wire.Placement:
        """By default, ask again after a heartbeat interval, when capacity news can have come."""
        retry = self.settings.heartbeat_interval_s if retry_after_s is None else retry_after_s
        return wire.Placement(job_id=job.id, error="no_capacity", retry_after_s=retry)

    # --- jobs waiting for a slot -----------------------------------------------------------------

    def _park(self, job: wire.Job, msg: Msg | bus.LocalMsg, wait: float) -> None:
        old = self.waiting.remove(job.id)
        if old is not None:
            old.timer.cancel()  # its requester sent it again, so nobody waits for the old answer
        entry = Waiting(job, msg.data, msg)
        entry.timer = asyncio.get_running_loop().call_later(wait, self._expire, job.id)
        self.waiting.add(entry)
        self.counters["queued"] += 1

    def _expire(self, job_id: str) -> None:
        entry = self.waiting.remove(job_id)
        if entry is not None:
            self.counters["no_capacity"] += 1
            self._answer(entry, self._no_capacity(entry.job))

    def _answer(self, entry: Waiting, placement: wire.Placement) -> None:
        task = asyncio.get_running_loop().create_task(entry.reply.respond(wire.encode(placement)))
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _on_withdraw(self, msg: Msg) -> None:
        """The api gave up on a job that waits for a slot (its client left): never place it.

        Withdrawals and submissions come through different subscriptions, so a withdrawal can be
        handled before the submission it withdraws: its id is kept for a while (the longest a job
        may wait), and a submission of it that arrives later is dropped unanswered."""
        try:
            cancel = self._cancel_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        entry = self.waiting.remove(cancel.job_id)
        if entry is not None:
            entry.timer.cancel()
            self.counters["withdrawn"] += 1
            return
        now = time.monotonic()
        if len(self._withdrawn) >= WITHDRAWN_KEPT:
            self._withdrawn = {job_id: until for job_id, until in self._withdrawn.items() if until > now}
            while len(self._withdrawn) >= WITHDRAWN_KEPT:
                del self._withdrawn[next(iter(self._withdrawn))]
        self._withdrawn[cancel.job_id] = now + self.settings.queue_timeout_s + self.settings.accept_timeout_s

    async def _dispatch(self, models: tuple[str, ...]) -> None:
        """Place waiting jobs of ``models`` on the free slots the fleet view now shows, in order.

        The choice is made without awaiting (so no job is added or placed twice meanwhile); the
        sends and answers follow."""
        now = time.monotonic()
        chosen: list[tuple[Waiting, NodeState, Placed]] = []
        for model in models:
            if not self.waiting.has(model):
                continue
            misses = 0
            for entry in self.waiting.ordered(model):
                node = place(entry.job, self.fleet, now)
                if node is not None:
                    chosen.append((entry, node, self.fleet.commit(node, now)))
                    continue
                if not self.fleet.has_free_slot(model, now, entry.job.admission_class == "reserved"):
                    break  # no slot for this class, nor for the classes after it
                misses += 1  # the job's own limits rule the free slots out: the next may fit
                if misses >= MAX_MISSES:
                    break
        for entry, _node, _placed in chosen:
            self.waiting.remove(entry.job.id)
            entry.timer.cancel()
        for entry, node, placed in chosen:
            try:
                placement = await self._forward(node, entry.job, entry.data, placed)
            except Exception:
                log.exception("sending a waiting job to its node failed", extra={"job": entry.job.id})
                placement = wire.Placement(job_id=entry.job.id, error="scheduler_error")
            with contextlib.suppress(Exception):
                await entry.reply.respond(wire.encode(placement))

    # --- fleet --------------------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = self._heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("undecodable heartbeat on %s: %s", msg.subject, exc)
            return
        if msg.subject != subjects.heartbeat(hb.node_id):
            # A node may only publish on its own subject; the body must agree with it.
            log.warning("heartbeat for %s arrived on %s; ignored", hb.node_id, msg.subject)
            return
        if hb.node_id in self.revoked:
            return  # a revoked node's word no longer counts, whatever status it claims
        enrolled_by = self.providers.get(hb.node_id)
        if enrolled_by is not None and enrolled_by != hb.provider_id:
            # Tenants' provider allow-lists, offers and payouts go by the enrolment, not the claim.
            log.warning("node %s claims provider %s, enrolled by %s", hb.node_id, hb.provider_id, enrolled_by)
            hb.provider_id = enrolled_by
        if hb.node_id in self.drain_ordered:
            if hb.status in ("draining", "revoked"):
                self.drain_ordered.discard(hb.node_id)  # it heard the order: its own word counts again
            else:
                hb.status = "draining"
                await self._order_drain(hb.node_id)
        self.counters["heartbeats"] += 1
        node = self.fleet.observe(hb, time.monotonic(), time.time())
        self._dirty.add(node.node_id)
        if self.waiting and node.free_slots > 0 and node.status == "healthy":
            await self._dispatch(node.models)
        if hb.status in ("draining", "revoked") and node.announced != hb.status:
            node.announced = hb.status
            await self._publish_event("node_draining" if hb.status == "draining" else "node_revoked", node)

    async def _on_fleet_event(self, msg: Msg) -> None:
        """A provider revoked a node through the api: never place on it again, even if it stays
        connected (where NATS users are managed outside) and keeps saying it is healthy."""
        try:
            event = self._event_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if event.kind == "node_revoked":
            self._revoke(event.node_id)
        elif event.kind == "node_draining" and event.node_id not in self.revoked:
            # From the api (a provider's drain) or from a replica that heard the node say so. Until
            # the node itself says it drains, it gets nothing (its order may have been lost).
            node = self.fleet.get(event.node_id)
            if node is None or node.status not in ("draining", "revoked"):
                self.drain_ordered.add(event.node_id)
                if node is not None:
                    node.status = "draining"

    def _revoke(self, node_id: str) -> None:
        if node_id not in self.revoked:
            self.revoked.add(node_id)
            self.drain_ordered.discard(node_id)
            self.fleet.forget(node_id)

    async def _order_drain(self, node_id: str) -> None:
        """Tell a node again to drain, as the api did (core NATS: an order can be lost)."""
        assert self.nc is not None
        with contextlib.suppress(Exception):
            await self.nc.publish(subjects.node_control(node_id), msgspec.json.encode({"action": "drain"}))

    async def _watch(self) -> None:
        """Declare nodes lost whose heartbeats stopped.

        A replica that was itself frozen (a long GC, a virtual CPU the host did not run) wakes to
        old heartbeat times while the heartbeats sent meanwhile are still unread in its socket: a
        round that woke that late is skipped once, so they are read before anyone is judged.
        """
        period = min(self.settings.heartbeat_interval_s, self.settings.heartbeat_timeout_s / 4)
        loop = asyncio.get_running_loop()
        skipped = False
        while True:
            slept_at = loop.time()
            await asyncio.sleep(period)
            if loop.time() - slept_at > 2 * period and not skipped:
                skipped = True
                continue
            skipped = False
            try:
                for node in self.fleet.expire(time.monotonic()):
                    self._dirty.add(node.node_id)
                    log.warning("node lost", extra={"node_id": node.node_id})
                    await self._publish_event("node_lost", node)
            except Exception:
                log.exception("fleet watch failed")

    async def _beat(self) -> None:
        """Say this replica is alive: the api submits again the jobs waiting at a replica whose
        beats stopped (their answers died with it), instead of waiting out their time."""
        assert self.nc is not None
        beat = wire.encode(wire.SchedulerAlive(replica=self.replica))
        while True:
            with contextlib.suppress(Exception):  # a connection being re-established
                await self.nc.publish(subjects.SCHEDULERS_ALIVE, beat)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _publish_event(self, kind: EventKind, node: NodeState) -> None:
        assert self.nc is not None
        event = wire.FleetEvent(kind=kind, node_id=node.node_id, at=time.time())
        await self.nc.publish(subjects.FLEET_EVENTS, wire.encode(event))
        self.counters[kind] += 1

    # --- persistence -------------------------------------------------------------------------

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(self.persist_interval_s)
            await self.flush()
            await self.load_offers()
            await self.load_registry()

    async def load_registry(self) -> bool:
        """Enrolled nodes' providers, and the revoked ones, from ``nodes``: what a node claims in
        its heartbeats does not decide whose it is, and a revocation holds for replicas started
        after it. A DB outage keeps what was last read."""
        rows = await self._read(_REGISTRY, "the node registry")
        if rows is None:
            return self._engine is None
        self.providers = {node_id: provider_id for node_id, provider_id, _ in rows}
        for node in self.fleet.nodes.values():
            enrolled_by = self.providers.get(node.node_id)
            if enrolled_by is not None:
                node.provider_id = enrolled_by
        for node_id, _, status in rows:
            if status == "revoked":
                self._revoke(node_id)
        return True

    async def _read(self, query: TextClause, what: str) -> Sequence[Any] | None:
        """``query``'s rows, or None without a database or when it cannot be read (logged: the
        caller keeps what it read last)."""
        if self._engine is None:
            return None
        try:
            async with asyncio.timeout(5.0), self._engine.connect() as conn:
                return (await conn.execute(query)).all()
        except Exception as exc:
            log.warning("could not read %s (keeping the last one): %s", what, exc)
            return None

    async def load_offers(self) -> bool:
        """Providers' asking prices (output price per 1M tokens) onto their nodes, for tenants'
        price ceilings and cheapest-wins ties. A DB outage keeps the last known offers."""
        rows = await self._read(_OFFERS, "provider offers")
        if rows is None:
            return self._engine is None
        by_provider: dict[str, dict[str, int]] = {}
        for provider_id, model, price in rows:
            by_provider.setdefault(provider_id, {})[model] = int(price)
        for node in list(self.fleet.nodes.values()):
            wanted = by_provider.get(node.provider_id, {})
            for model in [m for m in node.offers if m not in wanted]:
                self.fleet.set_offer(node.node_id, None, model)
            for model, price in wanted.items():
                self.fleet.set_offer(node.node_id, price, model)
        return True

    async def flush(self) -> bool:
        """Write what changed since the last flush to ``nodes``; on failure keep it for the next try."""
        if self._engine is None or not self._dirty:
            return True
        ids, self._dirty = self._dirty, set()
        rows = [self._row(node) for node_id in ids if (node := self.fleet.get(node_id)) is not None]
        try:
            async with asyncio.timeout(max(self.persist_interval_s * 5, 5.0)), self._engine.begin() as conn:
                await conn.execute(_UPDATE_NODES, {"rows": json.dumps(rows)})
        except Exception as exc:
            self._dirty |= ids
            self.counters["db_errors"] += 1
            log.warning("could not write fleet state to PostgreSQL (will retry): %s", exc)
            return False
        self.counters["db_flushes"] += 1
        return True

    @staticmethod
    def _row(node: NodeState) -> dict[str, Any]:
        return {
            "id": node.node_id,
            "status": "unhealthy" if node.lost else node.status,
            "last_seen_at": datetime.fromtimestamp(node.seen_at, UTC).isoformat() if node.seen_at else None,
            "models": list(node.models),
            "engine": node.engine[:16],
            "profile": msgspec.to_builtins(node.profile),
            "hardware": msgspec.to_builtins(node.hardware),
        }

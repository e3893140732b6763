"""The provider node agent: takes jobs from NATS, relays them through its engine, heartbeats.

Per job the agent publishes ``accepted`` (seq 0) if the engine's first output takes longer than
``ACCEPT_GRACE_S`` (any chunk tells the api the job was taken, so a fast job spares the message),
``data`` chunks as the engine streams (the first at once, later tokens coalesced when they come
faster than ``flush_interval_s``, which keeps NATS messages per second bounded at high token
rates), and ``end`` with usage (and the last pieces, when they came with the end of the stream: one
message fewer) or ``error``. It is the only place that knows a job's seq numbers, so every chunk of
a job is published from the job's own task, in order. Chunks go to the job's reply subject or, when
the job names its api replica (``relay_to``), into an outbox that sends the chunks of all jobs for
that replica ready in the same moment as one ``wire.ChunkBatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors

from market import aio, bus, subjects, wire
from market.wire import Chunk, Hardware, Heartbeat, Job, Piece, ProfileInfo, ToolCallDelta, Usage
from nodes.engines.base import Emission, Engine, EngineError, EngineLoad

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

    from market.settings import Settings

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
QUICK_REPORT_S = 0.05
"""Least time between the extra load reports sent when jobs end."""
QUICK_REPORT_FULL_S = 0.005
"""The same while the schedulers take this node for (nearly) full: a freed slot is then capacity
that jobs waiting at a scheduler cannot use until it is reported (with 100 ms jobs, 50 ms of such
lag cost a quarter of the fleet's capacity in ``bench/capacity_queue.py``). A few ms still gather
the ends of one engine step into one report."""
NEAR_FULL_SHARE = 0.1
"""Of the slots a report offered, the share below which the node counts as full: schedulers keep
that much of a node (their default ``reserved_headroom_share``) for reserved traffic, so burst and
on-demand jobs wait before the last slot is taken."""
ACCEPT_GRACE_S = 0.05
"""Say ``accepted`` only when no output came this soon; far below the api's accept timeout."""
FOREIGN_SCRAPES = 3
"""Scrapes in a row an engine must show requests beyond this agent's jobs before they count as
other clients' load (a single scrape's excess is usually a wave that just ended)."""
MAX_BATCH = 256
"""Chunks per ChunkBatch message at most (well under NATS's 1 MB payload even for long pieces)."""
MAX_REPLICAS_ACKNOWLEDGED = 32
"""Scheduler replicas a heartbeat acknowledges placements of (those heard from last): far more
than run at once; one restarted long ago has nothing left to be told."""


@dataclass(slots=True)
class AgentConfig:
    """Who the node is and how it behaves on the wire."""

    node_id: str
    provider_id: str
    settings: Settings
    models: list[str]
    """Marketplace model names this node serves (jobs name these; the engine has its own name)."""
    profile: ProfileInfo = field(default_factory=ProfileInfo)
    hardware: Hardware = field(default_factory=Hardware)
    heartbeat_interval_s: float | None = None
    """Default: ``settings.heartbeat_interval_s``."""
    flush_interval_s: float = 0.002
    batch_chunks: bool = True
    """Send chunks for one api replica together (``wire.ChunkBatch``) when its jobs allow it."""
    relay_window_s: float = 0.002
    """How long a batch waits for more jobs' tokens before it goes (never a job's first or last
    chunk). vLLM's server writes one engine step's tokens for its streams over a few
    milliseconds; at 50 streams this window took a batch from 3 to 18 chunks."""
    queue_share: float = 1.0
    """Jobs the node accepts beyond ``max_num_seqs``, as a share of it (they wait in the engine)."""
    drain_timeout_s: float = 300.0
    nats_user: str | None = None
    nats_password: str | None = None
    nats_creds: str | None = None
    nats_nkey_seed: str | None = None
    """An enrolled node's own nkey seed (``SU...``): its NATS identity, allowed only its subjects."""


@dataclass(eq=False, slots=True)
class _Running:
    job: Job
    reply: str
    task: asyncio.Task[None] | None = None
    pump: asyncio.Task[None] | None = None
    stop_reason: str | None = None
    """Why the engine stream was aborted early: ``cancelled`` (by the api), ``deadline``,
    ``api_lost`` (its api stopped sending keepalives), or the node's own doing: ``node_stopping``
    (revoked, or a drain that ran out of time) or ``engine_unhealthy`` (before any output)."""
    engine_sent_at: float = 0.0
    engine_first_at: float | None = None
    """Monotonic times of the request to the engine and of its first output (the engine's TTFT)."""
    wanted_at: float = 0.0
    """Monotonic time the api last said it wants the job (its arrival, then each keepalive)."""


_NODE_GAVE_UP = {
    "node_stopping": "the node left",
    "engine_unhealthy": "the node's engine stopped answering",
    "api_lost": "the api stopped asking for the job",
}
"""The node's own reasons to abort a job, each ended with a retryable error rather than ``end``."""


class _Done:
    """Queue sentinel: the engine stream ended normally."""


class _Stopped:
    """Queue sentinel: the engine stream was aborted (cancel, deadline, kill)."""


_DONE, _STOPPED = _Done(), _Stopped()
_QueueItem = Emission | EngineError | _Done | _Stopped


def _join_calls(calls: list[ToolCallDelta] | None, more: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Tool-call deltas in order, a delta that only continues the previous one's arguments joined
    onto it (one delta per call per message, rather than one per token)."""
    out = list(calls or ())
    for delta in more:
        last = out[-1] if out else None
        if last is not None and last.index == delta.index and delta.id is None and delta.name is None:
            out[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + delta.arguments)
        else:
            out.append(delta)
    return out


def _merge(pending: list[Piece], new: list[Piece]) -> None:
    """Append ``new`` pieces, joining a piece onto the last one of the same choice."""
    for piece in new:
        last = pending[-1] if pending else None
        if last is not None and last.index == piece.index and last.finish_reason is None:
            logprobs = last.logprobs
            if piece.logprobs is not None:
                logprobs = piece.logprobs if logprobs is None else logprobs + piece.logprobs
            calls = last.tool_calls
            if piece.tool_calls is not None:
                calls = _join_calls(calls, piece.tool_calls)
            pending[-1] = Piece(
                last.index, last.text + piece.text, last.tokens + piece.tokens, piece.finish_reason, logprobs, calls
            )
        else:
            pending.append(piece)


class NodeAgent:
    """One provider node: ``await start()``, then ``await stop(drain=True)`` (or ``kill()`` in tests).

    ``nc``: share one NATS connection between many agents in one process (fleet simulations); the
    agent then leaves by unsubscribing and never closes it. By default each agent connects itself.
    """

    def __init__(self, config: AgentConfig, engine: Engine, *, nc: Client | None = None) -> None:
        self.config = config
        self.engine = engine
        self.node_id = config.node_id
        self.nc: Client | None = nc
        self._own_connection = nc is None
        self.draining = False
        self.stopped = asyncio.Event()
        """Set when the agent has left (after stop, kill or a revoke order)."""
        self._jobs: dict[str, _Running] = {}
        self._last_load: EngineLoad | None = None
        self._scrape: asyncio.Task[tuple[EngineLoad, int]] | None = None
        self._foreign = 0
        """Requests in the engine that are not this agent's jobs (other clients of a shared engine):
        the least excess of its gauges over our job count in the last ``FOREIGN_SCRAPES`` scrapes."""
        self._excess: deque[int] = deque(maxlen=FOREIGN_SCRAPES)
        self._last_beat_at = 0.0
        self._reported_slots = 0
        self._jobs_since_beat = 0
        """Jobs received since the last report: once they take all but ``NEAR_FULL_SHARE`` of the
        slots it offered, schedulers see no room for burst and on-demand jobs."""
        self._quick_at: float | None = None
        """When the pending extra report is due (monotonic), if one is."""
        self._quick_timer: asyncio.TimerHandle | None = None
        self._quick_task: asyncio.Task[None] | None = None
        self._subs: list[Any] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._hb_seq = 0
        self._placements: dict[str, int] = {}
        """Per scheduler replica, the sequence number of the last job received from it
        (``wire.PLACEMENT_HEADER``), the replica heard from last at the end; echoed in heartbeats."""
        self._killed = False
        self._outbox: dict[str, list[wire.RelayedChunk]] = {}
        """Chunks waiting for the outbox task, by api relay id."""
        self._outbox_task: asyncio.Task[None] | None = None
        self._outbox_urgent = False
        self._outbox_sleep: asyncio.Future[None] | None = None
        self._job_decoder = wire.decoder(Job)
        self._cancel_decoder = wire.decoder(wire.Cancel)
        self._keepalive_decoder = wire.decoder(wire.Keepalive)
        self._interval = config.heartbeat_interval_s or config.settings.heartbeat_interval_s

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, start the engine (readiness comes later for vLLM), subscribe, heartbeat."""
        cfg = self.config
        if self._own_connection:
            self.nc = await bus.connect(
                cfg.settings,
                name=f"node {cfg.node_id}",
                user=cfg.nats_user,
                password=cfg.nats_password,
                creds=cfg.nats_creds,
                nkey_seed=cfg.nats_nkey_seed,
                pending_size=8 * 1024 * 1024,
            )
        assert self.nc is not None
        await self.engine.start()
        # Jobs and cancels are handled as they are read, never queued (a busy node cannot become a
        # slow consumer), and a job's task starts a loop turn sooner than through nats-py's own.
        self._subs = [
            await bus.subscribe_inline(self.nc, subjects.node_jobs(cfg.node_id), self._on_job),
            await bus.subscribe_inline(self.nc, subjects.node_cancel(cfg.node_id), self._on_cancel),
            await self.nc.subscribe(subjects.node_control(cfg.node_id), cb=self._on_control),
            await self.nc.subscribe(subjects.node_keepalive(cfg.node_id), cb=self._on_keepalive),
        ]
        await self.nc.flush()  # the server knows our subscriptions before anyone sees us healthy
        await self._publish_heartbeat()
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name=f"heartbeat {cfg.node_id}")
        log.info("node %s serving %s with %s engine", cfg.node_id, cfg.models, self.engine.kind)

    async def drain(self) -> None:
        """Take no new jobs (they get ``draining`` errors); say so in heartbeats at once."""
        if self.draining:
            return
        self.draining = True
        with contextlib.suppress(Exception):
            await self._publish_heartbeat()

    async def stop(self, drain: bool = True) -> None:
        """Leave the marketplace. With ``drain``, finish in-flight jobs first (up to drain_timeout_s)
        and send a final ``draining`` heartbeat; without (revoked), abort them: each ends with a
        retryable error, which the api fails over before a job's first token."""
        if self.stopped.is_set() or self._killed:
            return
        await self.drain()
        tasks = [r.task for r in self._jobs.values() if r.task is not None]
        if drain and tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.config.drain_timeout_s)
            if pending:
                log.warning("drain timed out with %d jobs in flight; cancelling them", len(pending))
        for running in list(self._jobs.values()):
            self._abort(running, "node_stopping")
        tasks = [r.task for r in self._jobs.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        if self._quick_timer is not None:
            self._quick_timer.cancel()
        with contextlib.suppress(Exception):
            await self._outbox_sent()
        with contextlib.suppress(Exception):
            await self._publish_heartbeat()  # the last word: draining, so nobody places here
        if self._scrape is not None:
            self._scrape.cancel()
        await self._leave_nats(gently=True)
        await self.engine.stop()
        self.stopped.set()

    async def kill(self) -> None:
        """Tests: die like a crashed process. Heartbeats stop, NATS closes, nothing more is sent."""
        self._killed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self._quick_timer is not None:
            self._quick_timer.cancel()
        if self._scrape is not None:
            self._scrape.cancel()
        for running in list(self._jobs.values()):
            self._abort(running, "killed")
            if running.task is not None:
                running.task.cancel()
        await self._leave_nats(gently=False)
        await self.engine.stop()
        self.stopped.set()

    async def _leave_nats(self, *, gently: bool) -> None:
        if self.nc is None:
            return
        with contextlib.suppress(Exception):
            if not self._own_connection:
                for sub in self._subs:
                    await sub.unsubscribe()
            elif gently:
                await self.nc.drain()
            else:
                await self.nc.close()

    # --- heartbeats ----------------------------------------------------------------------------

    async def heartbeat(self, *, quick: bool = False) -> Heartbeat:
        """The node's current report (also what ``_heartbeats`` publishes).

        ``quick`` reuses the engine load from the last full report (no scrape) with this agent's
        own job count, for the extra reports sent when a job ends.
        """
        cfg = self.config
        engine_status = self.engine.status
        if engine_status != "healthy":
            self._fail_waiting_jobs()
        status: wire.NodeStatus = "draining" if self.draining else engine_status
        if quick and self._last_load is not None:
            load = EngineLoad(running=len(self._jobs), waiting=0, kv_cache_usage=self._last_load.kv_cache_usage)
        else:
            load, excess = await self._engine_load()
            if excess is not None:
                self._excess.append(excess)
                self._foreign = min(self._excess)
            self._last_load = load
        running = max(load.running, 0)
        slots = 0
        if status == "healthy":
            # The engine batches max_num_seqs and queues the rest itself; letting a short queue
            # form there (queue_share of max_num_seqs) keeps it saturated between our reports,
            # while the schedulers' load score still prefers idle nodes first.
            # Our own jobs count as they are now; the engine's gauges only add what is not ours.
            # Gauges lag: counting jobs that had ended as busy slots left schedulers refusing work
            # for a whole heartbeat interval after a wave of requests ended and the next came in.
            limit = self.engine.max_num_seqs + int(self.engine.max_num_seqs * cfg.queue_share)
            slots = max(0, limit - len(self._jobs) - self._foreign)
        self._hb_seq += 1
        return Heartbeat(
            node_id=cfg.node_id,
            provider_id=cfg.provider_id,
            status=status,
            models=list(cfg.models),
            engine=self.engine.kind,
            profile=cfg.profile,
            hardware=cfg.hardware,
            slots=slots,
            running=running,
            waiting=load.waiting,
            kv_cache_usage=load.kv_cache_usage,
            agent_version=AGENT_VERSION,
            sent_at=time.time(),
            seq=self._hb_seq,
            placements=dict(self._placements),  # taken with ``slots``: the jobs that count in it
        )

    async def _engine_load(self) -> tuple[EngineLoad, int | None]:
        """The engine's load, waiting at most one heartbeat interval for it.

        A busy engine can be slow to answer its metrics scrape (vLLM's allows 2 s); a heartbeat
        held back that long makes a healthy node look lost to the schedulers, which then fail its
        jobs over. A scrape still running is left to finish, and the last known load stands in.
        """
        task = self._scrape
        if task is None or task.done():
            task = self._scrape = asyncio.create_task(self._scrape_load())
        done, _ = await asyncio.wait({task}, timeout=self._interval)
        if task in done and not task.cancelled() and task.exception() is None:
            return task.result()
        return self._last_load or EngineLoad(), None

    async def _scrape_load(self) -> tuple[EngineLoad, int]:
        """The engine's load, and how many more requests it counts than this agent has jobs (the
        most it had while the scrape ran). Gauges lag: a wave of jobs that just ended can still be
        counted, so one scrape's excess is not taken for other clients' load (see ``_foreign``)."""
        before = len(self._jobs)
        load = await self.engine.load()
        return load, max(0, load.running + load.waiting - max(before, len(self._jobs)))

    async def _publish_heartbeat(self, *, quick: bool = False) -> None:
        if self._killed or self.nc is None:
            return
        beat = await self.heartbeat(quick=quick)
        if not self._killed:
            self._last_beat_at = time.monotonic()
            self._reported_slots, self._jobs_since_beat = beat.slots, 0
            await self.nc.publish(subjects.heartbeat(self.node_id), wire.encode(beat))

    def _load_changed(self) -> None:
        """A job ended (or came while a report is pending): tell the schedulers soon, at most every
        ``QUICK_REPORT_S``, or ``QUICK_REPORT_FULL_S`` while they take the node for full (the jobs
        placed since the last report took all but ``NEAR_FULL_SHARE`` of the slots it offered), so
        their view of free slots does not lag a whole heartbeat interval behind under load."""
        if self._killed or self.nc is None:
            return
        full = self._reported_slots - self._jobs_since_beat <= self._reported_slots * NEAR_FULL_SHARE
        due = max(time.monotonic(), self._last_beat_at + (QUICK_REPORT_FULL_S if full else QUICK_REPORT_S))
        if self._quick_at is not None and self._quick_at <= due:
            return  # a report is already due no later
        if self._quick_timer is not None:
            self._quick_timer.cancel()
        self._quick_at = due
        self._quick_timer = asyncio.get_running_loop().call_later(due - time.monotonic(), self._quick_report)

    def _quick_report(self) -> None:
        self._quick_at = self._quick_timer = None

        async def report() -> None:
            with contextlib.suppress(Exception):
                await self._publish_heartbeat(quick=True)

        self._quick_task = asyncio.create_task(report())

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self._abort_unwanted()
            try:
                await self._publish_heartbeat()
            except Exception:
                log.exception("heartbeat failed")

    async def _on_keepalive(self, msg: Msg) -> None:
        try:
            keepalive = self._keepalive_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("undecodable keepalive on %s", msg.subject)
            return
        now = time.monotonic()
        for job_id in keepalive.job_ids:
            running = self._jobs.get(job_id)
            if running is not None:
                running.wanted_at = now

    def _abort_unwanted(self) -> None:
        """Abort the jobs whose api stopped saying it wants them (``Job.keepalive_s``): its process
        died, nobody reads their output, and they hold slots (and the engine) for nothing."""
        now = time.monotonic()
        for running in list(self._jobs.values()):
            every = running.job.keepalive_s
            if every > 0 and now - running.wanted_at > wire.KEEPALIVE_MISSES * every and running.stop_reason is None:
                log.warning("job %s: its api stopped asking for it; aborting", running.job.id)
                self._abort(running, "api_lost")

    # --- control and cancel ----------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        """``drain`` or ``revoke``, as msgpack/JSON ``{"action": ...}`` or a bare word."""
        action = _control_action(msg.data)
        if action == "drain":
            # The provider drained it: finish in-flight work, take none, then leave.
            log.info("node %s: drain ordered", self.node_id)
            await self.drain()
            self._stop_task = asyncio.create_task(self.stop(drain=True))
        elif action == "revoke":
            log.warning("node %s: revoked; leaving now", self.node_id)
            # Not awaited here: stopping drains this very subscription.
            self._stop_task = asyncio.create_task(self.stop(drain=False))
        else:
            log.warning("node %s: unknown control message %r", self.node_id, msg.data[:100])

    def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = self._cancel_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("undecodable cancel on %s", msg.subject)
            return
        running = self._jobs.get(cancel.job_id)
        if running is not None:
            self._abort(running, "cancelled")

    def _fail_waiting_jobs(self) -> None:
        """The engine stopped answering its health checks: jobs still waiting for their first
        output end now with a retryable error, and the api places them elsewhere, instead of
        waiting out its first-token timeout on an engine that may be hung."""
        for running in list(self._jobs.values()):
            if running.engine_first_at is None and running.pump is not None:
                self._abort(running, "engine_unhealthy")

    def _abort(self, running: _Running, reason: str) -> None:
        if running.stop_reason is None:
            running.stop_reason = reason
        if running.pump is not None:
            running.pump.cancel()

    # --- jobs ----------------------------------------------------------------------------------

    def _on_job(self, msg: Msg) -> None:
        if msg.headers:
            self._acknowledge(msg.headers.get(wire.PLACEMENT_HEADER))
        try:
            job = self._job_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("undecodable job on %s", msg.subject)
            return
        reply = msg.reply or job.reply
        if not reply or self._killed:
            return
        if job.id in self._jobs:  # a redelivery: the running task answers
            return
        running = _Running(job, reply, wanted_at=time.monotonic())
        self._jobs[job.id] = running
        self._jobs_since_beat += 1
        if self._quick_at is not None:
            self._load_changed()  # a report due later may have to come sooner now
        running.task = asyncio.create_task(self._run(running), name=f"job {job.id}")

    def _acknowledge(self, placement: str | None) -> None:
        """Note a placement's ``"<replica> <sequence number>"`` for the next heartbeat; a bounded
        number of replicas is kept (each restart of a scheduler is a new one)."""
        if not placement:
            return
        replica, _, number = placement.rpartition(" ")
        try:
            seq = int(number)
        except ValueError:
            return
        if not replica:
            return
        placements = self._placements
        last = placements.pop(replica, None)
        if last is None and len(placements) >= MAX_REPLICAS_ACKNOWLEDGED:
            del placements[next(iter(placements))]
        placements[replica] = seq if last is None else max(last, seq)

    async def _publish(self, running: _Running, chunk: Chunk) -> None:
        if self._killed or self.nc is None:
            return
        relay_to = running.job.relay_to
        if relay_to and self.config.batch_chunks:
            self._outbox.setdefault(relay_to, []).append(wire.RelayedChunk(running.reply, chunk))
            if chunk.kind != "data" or chunk.engine_ttft_ms is not None:
                # A first word (accepted, the first token) or a last (end, error) goes now.
                self._outbox_urgent = True
                if self._outbox_sleep is not None:
                    aio.wake(self._outbox_sleep)
            if self._outbox_task is None:
                self._outbox_task = asyncio.create_task(self._send_outbox())
            return
        try:
            await self.nc.publish(running.reply, wire.encode(chunk))
        except Exception as exc:  # a closed connection must not kill the job's bookkeeping
            log.warning("cannot publish chunk %d of %s: %s", chunk.seq, chunk.job_id, exc)

    async def _run(self, running: _Running) -> None:
        try:
            await self._relay(running)
        except asyncio.CancelledError:
            if not self._killed:
                raise
        except Exception:
            log.exception("job %s failed in the agent", running.job.id)
        finally:
            self._jobs.pop(running.job.id, None)
            self._load_changed()

    async def _relay(self, running: _Running) -> None:
        job, node = running.job, self.node_id
        seq = 0

        def chunk(kind: wire.ChunkKind, **fields: Any) -> Chunk:
            nonlocal seq
            out = Chunk(job_id=job.id, node_id=node, seq=seq, kind=kind, **fields)
            seq += 1
            return out

        if time.time() >= job.deadline:
            await self._publish(
                running, chunk("error", error="deadline passed before the job started", error_code="deadline_exceeded")
            )
            return
        if self.draining:
            await self._publish(running, chunk("error", error="node is draining", error_code="draining"))
            return
        if self.engine.status != "healthy":
            await self._publish(
                running, chunk("error", error=f"engine is {self.engine.status}", error_code="engine_unavailable")
            )
            return
        if job.model not in self.config.models:
            await self._publish(
                running,
                chunk(
                    "error", error=f"model {job.model!r} is not served here", error_code="invalid_request", status=404
                ),
            )
            return
        box = aio.Mailbox()
        running.engine_sent_at = time.monotonic()
        running.pump = asyncio.create_task(self._pump(self.engine.generate(job), box, running), name=f"pump {job.id}")
        loop = asyncio.get_running_loop()
        deadline_timer = loop.call_at(
            loop.time() + max(0.0, job.deadline - time.time()), self._abort, running, "deadline"
        )
        pending: list[Piece] = []
        said_anything = False
        """Anything published yet (``accepted`` or data); the api waits for a first word."""
        accept_at = loop.time() + ACCEPT_GRACE_S
        sent_data = False
        last_sent = 0.0
        usage: Usage | None = None
        relayed = 0
        outcome: _QueueItem | None = None
        interval = self.config.flush_interval_s
        try:
            while outcome is None:
                if not said_anything:
                    remaining = accept_at - loop.time()
                    if remaining <= 0:
                        await self._publish(running, chunk("accepted"))
                        said_anything = True
                        continue
                    items = await box.take_within(remaining)
                elif not pending:
                    items = await box.take()  # the common case: nothing held back, no timer
                else:
                    items = await box.take_within(last_sent + interval - time.monotonic())
                for item in items:
                    if isinstance(item, Emission):
                        _merge(pending, item.pieces)
                        relayed += sum(p.tokens for p in item.pieces)
                        if item.usage is not None:
                            usage = item.usage
                    else:
                        outcome = item
                now = time.monotonic()
                ends = isinstance(outcome, (_Done, _Stopped))  # the last pieces then ride in ``end``
                if pending and not ends and (not sent_data or now - last_sent >= interval or outcome is not None):
                    await self._publish(
                        running, chunk("data", pieces=pending, engine_ttft_ms=None if sent_data else _ttft(running))
                    )
                    pending = []
                    sent_data = said_anything = True
                    last_sent = now
        finally:
            deadline_timer.cancel()

        if isinstance(outcome, _Done):
            final = usage or Usage(job.prompt_tokens, relayed)
            await self._publish(
                running, chunk("end", pieces=pending, usage=final, engine_ttft_ms=None if sent_data else _ttft(running))
            )
        elif isinstance(outcome, _Stopped) and running.stop_reason in _NODE_GAVE_UP:
            # The node gave up on the job, not the api: an error it can act on (before the first
            # token it places the job elsewhere; after, it ends the stream and bills what was sent),
            # never an ``end`` that would pass for a finished completion. (``api_lost``: should the
            # api be alive after all, only stalled, its client sees the stream fail, not end early.)
            if pending:
                await self._publish(running, chunk("data", pieces=pending))
            why = _NODE_GAVE_UP[running.stop_reason]
            await self._publish(
                running, chunk("error", error=f"{why} before the job finished", error_code="engine_unavailable")
            )
        elif isinstance(outcome, _Stopped):
            # Cancelled or past its deadline: bill what was produced. The agent counted the
            # completion tokens it relayed; prompt tokens are the engine's if it said, else the api's.
            prompt = usage.prompt_tokens if usage is not None else job.prompt_tokens
            await self._publish(running, chunk("end", pieces=pending, usage=Usage(prompt, relayed)))
        elif isinstance(outcome, EngineError):
            await self._publish(
                running, chunk("error", error=outcome.message, error_code=outcome.code, status=outcome.status)
            )

    async def _send_outbox(self) -> None:
        """Publish what the jobs put in the outbox, a message per api replica.

        vLLM steps all its sequences at once, so the tokens of one step reach the agent's jobs
        together or within a few milliseconds: after ``relay_window_s`` (at once for a job's first
        or last chunk) one message carries what they put here. One task at a time keeps each
        job's chunks in order.
        """
        try:
            window = self.config.relay_window_s
            if window > 0 and not self._outbox_urgent:
                loop = asyncio.get_running_loop()
                sleep = self._outbox_sleep = loop.create_future()
                timer = loop.call_later(window, aio.wake, sleep)
                try:
                    await sleep
                finally:
                    timer.cancel()
                    self._outbox_sleep = None
            self._outbox_urgent = False
            while self._outbox and not self._killed and self.nc is not None:
                outbox, self._outbox = self._outbox, {}
                for relay_to, items in outbox.items():
                    subject = subjects.node_relay(self.node_id, relay_to)
                    for start in range(0, len(items), MAX_BATCH):
                        batch = wire.ChunkBatch(items[start : start + MAX_BATCH])
                        try:
                            try:
                                await self.nc.publish(subject, wire.encode(batch))
                            except nats.errors.MaxPayloadError:  # long pieces: each to its own inbox
                                for item in batch.items:
                                    await self.nc.publish(item.reply, wire.encode(item.chunk))
                        except Exception as exc:  # a closed connection must not stop the others
                            log.warning("cannot publish %d chunks to %s: %s", len(batch.items), relay_to, exc)
        finally:
            self._outbox_task = None
            if self._outbox and not self._killed:  # put while the last publish was under way
                self._outbox_task = asyncio.create_task(self._send_outbox())

    async def _outbox_sent(self) -> None:
        """Wait until the outbox is empty (before leaving: the last chunks must go out)."""
        while self._outbox_task is not None:
            await asyncio.shield(self._outbox_task)

    async def _pump(self, stream: AsyncIterator[Emission], box: aio.Mailbox, running: _Running) -> None:
        """Read the engine stream into the job's mailbox; cancelling this aborts the engine request."""
        try:
            async for emission in stream:
                if running.engine_first_at is None:
                    running.engine_first_at = time.monotonic()
                box.put_nowait(emission)
            box.put_nowait(_DONE)
        except asyncio.CancelledError:
            box.put_nowait(_STOPPED)
        except EngineError as exc:
            box.put_nowait(exc)
        except Exception as exc:
            log.exception("engine stream failed")
            box.put_nowait(EngineError("engine_error", f"engine failed: {exc}"))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await aclose()


def _ttft(running: _Running) -> float | None:
    first = running.engine_first_at
    return None if first is None else round((first - running.engine_sent_at) * 1000, 3)


def _control_action(data: bytes) -> str | None:
    for decode in (msgspec.msgpack.decode, msgspec.json.decode):
        try:
            value = decode(data)
        except msgspec.DecodeError:
            continue
        if isinstance(value, dict):
            action = value.get("action") or value.get("kind")
            return str(action) if action else None
        if isinstance(value, str):
            return value
    text = data.decode(errors="replace").strip()
    return text or None

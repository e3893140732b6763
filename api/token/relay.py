"""NATS plumbing of one api replica for the token path.

* ``Inboxes``: one wildcard subscription for every job's chunks, dispatched to per-attempt
  ``Mailbox``es (a subscription per request would cost a server round trip each), and for the
  schedulers' answers to submissions (``Inboxes.request``). Output for an attempt nobody waits
  for (a job placed just as its client left) is cancelled on its node.
* ``FleetWatch``: turns the schedulers' ``node_lost`` events into a "lost" signal on the queues of
  jobs that were on that node, so they fail over (before the first token) or end (after it).
* ``UsagePublisher``: stores each usage event in the outbox, then publishes it to JetStream off
  the request path, with the request id as ``Nats-Msg-Id`` so a retried publish is dropped by
  the server, retrying until acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from api.limits import STALE_HOLDER_S
from api.token.outbox import StoredEvent, UsageOutbox
from market import bus, subjects, wire
from market.aio import TIMED_OUT, Mailbox
from market.ids import ulid

log = logging.getLogger(__name__)

LOST = object()
"""Put on a job's queue when the node it runs on was declared lost."""

_chunk_decoder = wire.decoder(wire.Chunk)
_batch_decoder = wire.decoder(wire.ChunkBatch)
_fleet_decoder = wire.decoder(wire.FleetEvent)
ORPHANS_KEPT = 1024
"""Orphaned jobs remembered, so each is cancelled once rather than once per chunk."""


class Inboxes:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.relay_id = "api" + ulid()[-10:].lower()
        """This replica's name for nodes' chunk batches (``Job.relay_to``)."""
        self.prefix = subjects.inbox_prefix(self.relay_id)
        self.queues: dict[str, Mailbox] = {}
        self._sub: Subscription | None = None
        self._batch_sub: Subscription | None = None
        self._orphans: dict[tuple[str, str], None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._answers: dict[str, Mailbox] = {}
        self._numbers = itertools.count()

    async def request(self, subject: str, payload: bytes, timeout: float, headers: dict[str, str] | None = None) -> Msg:
        """``nc.request`` answered on this replica's wildcard inbox: nats-py's own request makes a
        random token, an inbox string and a response-map entry per call and dispatches the answer
        through a callback of its own, a few percent of the api's CPU at two requests per job (its
        placement, its usage event's JetStream publish). Raises ``nats.errors.NoRespondersError``
        and ``nats.errors.TimeoutError`` as it does."""
        question = await self.ask(subject, payload, headers)
        try:
            return await question.answer(timeout)
        finally:
            question.close()

    async def ask(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> Question:
        """Publish a request whose answers (one or more) come to this replica's inbox."""
        reply = f"{self.prefix}.a.{next(self._numbers)}"
        question = Question(self, reply)
        self._answers[reply] = question.answers
        try:
            local = bus.local_handler(self.nc, subject)
            if local is not None:  # a replica hosted here: its answers come straight to the question
                await local(bus.LocalMsg(subject, payload, reply, headers, question.answers.put_nowait))
                return question
            await self.nc.publish(subject, payload, reply=reply, headers=headers)
        except BaseException:
            question.close()
            raise
        return question

    def orphan(self, node_id: str, chunk: wire.Chunk) -> None:
        """A node sends output for a job attempt that has no mailbox here (finished, failed over,
        or placed by a scheduler just as the api withdrew it), or that runs elsewhere (placed
        twice: by a scheduler replica taken for dead, which woke): cancel it there, once."""
        key = (node_id, chunk.job_id)
        if chunk.kind in ("end", "error") or key in self._orphans:
            return  # an ending job needs no cancel; late chunks after a cancel are normal
        self._orphans[key] = None
        if len(self._orphans) > ORPHANS_KEPT:
            del self._orphans[next(iter(self._orphans))]
        cancel = wire.encode(wire.Cancel(job_id=chunk.job_id, reason="orphaned"))
        task = asyncio.get_running_loop().create_task(self.nc.publish(subjects.node_cancel(node_id), cancel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        def on_chunk(msg: Any) -> None:
            queue = self.queues.get(msg.subject)
            if queue is None:
                answers = self._answers.get(msg.subject)
                if answers is not None:
                    answers.put_nowait(msg)
                    return
                # A late chunk for a finished attempt. Orphaned output is cancelled only from
                # batches, whose sender NATS vouches for; here the node id is the body's word.
                return
            if not msg.data and (msg.headers or {}).get("Status") == "503":
                queue.put_nowait(LOST)  # "no responders": the node is not subscribed any more
                return
            try:
                queue.put_nowait(_chunk_decoder.decode(msg.data))
            except msgspec.DecodeError:
                log.warning("undecodable chunk on %s", msg.subject)

        def on_batch(msg: Any) -> None:
            node_id = msg.subject.split(".")[2]  # the node NATS let publish here
            try:
                batch = _batch_decoder.decode(msg.data)
            except msgspec.DecodeError:
                log.warning("undecodable chunk batch from node %s", node_id)
                return
            items = batch.items
            # A batch carries a step's tokens for every stream on the node; the jobs whose first
            # output is in it are woken first, so a new request's first token leaves before the
            # running streams' next ones rather than behind them (each job's chunks keep their order).
            starting = {i.chunk.job_id for i in items if i.chunk.engine_ttft_ms is not None}
            if starting and len(starting) < len(items):
                items = sorted(items, key=lambda i: i.chunk.job_id not in starting)  # stable
            for item in items:
                chunk = item.chunk
                if chunk.node_id != node_id:
                    log.warning("node %s sent a chunk in another node's name (%s)", node_id, chunk.node_id)
                    continue
                queue = self.queues.get(item.reply)
                if queue is None:
                    self.orphan(node_id, chunk)
                else:
                    queue.put_nowait(chunk)

        self._sub = await bus.subscribe_inline(self.nc, self.prefix + ".>", on_chunk)
        self._batch_sub = await bus.subscribe_inline(self.nc, subjects.relay_inbox(self.relay_id), on_batch)

    def open(self, job_id: str, attempt: int) -> tuple[str, Mailbox]:
        subject = f"{self.prefix}.{job_id}.{attempt}"
        queue = Mailbox()
        self.queues[subject] = queue
        return subject, queue

    def close(self, subject: str) -> None:
        self.queues.pop(subject, None)

    def reopen(self, subject: str, queue: Mailbox) -> None:
        """Take an attempt's chunks again after ``close`` (what came between is orphaned)."""
        self.queues[subject] = queue

    async def stop(self) -> None:
        for sub in (self._sub, self._batch_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


_WITHDRAWN = object()


class Withdrawn(Exception):
    """Its asker stopped waiting for the answer (``Question.withdraw``)."""


class Question:
    """A request's answers on an api replica's inbox (``Inboxes.ask``); ``close`` when done."""

    __slots__ = ("answers", "inboxes", "reply")

    def __init__(self, inboxes: Inboxes, reply: str) -> None:
        self.inboxes = inboxes
        self.reply = reply
        self.answers = Mailbox()

    async def answer(self, timeout: float) -> Msg:
        """The next answer; ``nats.errors.TimeoutError`` after ``timeout`` seconds without one,
        ``nats.errors.NoRespondersError`` when nobody received the request, ``Withdrawn`` once
        ``withdraw`` was called."""
        msg = await self.answers.get_within(timeout)
        if msg is TIMED_OUT:
            raise nats.errors.TimeoutError
        if msg is _WITHDRAWN:
            raise Withdrawn
        if not msg.data and (msg.headers or {}).get("Status") == "503":
            raise nats.errors.NoRespondersError
        return msg  # type: ignore[no-any-return]

    def withdraw(self) -> None:
        """End the wait for an answer now: ``answer`` raises ``Withdrawn``."""
        self.answers.put_nowait(_WITHDRAWN)

    def close(self) -> None:
        self.inboxes._answers.pop(self.reply, None)


class SchedulerWatch:
    """When each scheduler replica was last heard from (``SchedulerAlive`` beats).

    A replica counts as gone only while this api hears the others: an api whose own connection
    or loop stalled (and so heard no one) must not take every replica for dead at once and
    submit every waiting job twice.
    """

    KEPT = 256
    """Replicas remembered; the oldest are forgotten beyond this (replicas come and go)."""

    def __init__(self, nc: Client, timeout_s: float) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        self.seen: dict[str, float] = {}
        self.last_any = float("-inf")
        self.hearing_since = float("inf")
        """Since when beats have come without a gap of half the timeout (any replica's)."""
        self._sub: Subscription | None = None

    async def start(self) -> None:
        decode = wire.decoder(wire.SchedulerAlive).decode
        loop = asyncio.get_running_loop()

        def on_beat(msg: Any) -> None:
            try:
                self.heard(decode(msg.data).replica, loop.time())
            except msgspec.DecodeError:
                log.warning("undecodable scheduler beat")

        self._sub = await bus.subscribe_inline(self.nc, subjects.SCHEDULERS_ALIVE, on_beat)

    def heard(self, replica: str, now: float) -> None:
        if now - self.last_any > self.timeout_s / 2:
            self.hearing_since = now
        self.last_any = now
        self.seen.pop(replica, None)
        self.seen[replica] = now  # newest last
        if len(self.seen) > self.KEPT:
            del self.seen[next(iter(self.seen))]

    def gone(self, replica: str, since: float, now: float | None = None) -> bool:
        """No beat from ``replica`` for ``timeout_s``, counting from ``since`` (loop time) at the
        latest (a replica this api has not heard yet has that long), while other replicas' beats
        have kept coming for as long."""
        if now is None:
            now = asyncio.get_running_loop().time()
        last = max(self.seen.get(replica, since), since)
        hearing = now - self.last_any <= self.timeout_s / 2 and now - self.hearing_since > self.timeout_s
        return hearing and now - last > self.timeout_s

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


class FleetWatch:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.on_node: dict[str, dict[str, Mailbox]] = {}

    async def start(self) -> None:
        async def on_event(msg: Any) -> None:
            try:
                event = _fleet_decoder.decode(msg.data)
            except msgspec.DecodeError:
                return
            if event.kind in ("node_lost", "node_revoked"):
                for queue in list(self.on_node.get(event.node_id, {}).values()):
                    queue.put_nowait(LOST)

        await self.nc.subscribe(subjects.FLEET_EVENTS, cb=on_event)

    def watch(self, node_id: str, subject: str, queue: Mailbox) -> None:
        self.on_node.setdefault(node_id, {})[subject] = queue

    def unwatch(self, node_id: str, subject: str) -> None:
        jobs = self.on_node.get(node_id)
        if jobs is not None:
            jobs.pop(subject, None)
            if not jobs:
                self.on_node.pop(node_id, None)


class _PubAckError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: the stream and sequence it stored, or why not."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _PubAckError | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


class UsagePublisher:
    """At-least-once publishing to JetStream; JetStream's dedup window and the ledger's unique
    request id turn that into exactly-once. Each event is first stored in the usage outbox
    (``api.token.outbox``), so an api process that dies before the ack delays it rather than
    losing it; the outbox's rows left behind by any process are published again from here.
    Publishes are requests answered on the replica's wildcard inbox (``Inboxes.request``), as a
    JetStream publish is a request for its ack."""

    SWEEP_S = 10.0
    """How often the outbox is checked for events left behind."""

    def __init__(self, inboxes: Inboxes, outbox: UsageOutbox | None, concurrency: int = 64) -> None:
        self.inboxes = inboxes
        self.outbox = outbox
        self.queue: asyncio.Queue[StoredEvent] = asyncio.Queue()
        self.concurrency = concurrency
        self._tasks: list[asyncio.Task[None]] = []
        self.published = 0

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        if self.outbox is not None:
            self._tasks.append(asyncio.create_task(self._sweep(), name="usage-outbox-sweep"))

    async def submit(self, event: wire.UsageEvent, *, checkpointed: bool = False) -> None:
        """Keep ``event`` (stored before this returns, unless the database is away) and publish it.

        ``checkpointed``: the request's stream was checkpointed (``api.token.outbox``); its
        checkpoint becomes a tombstone in the same statement."""
        stored: StoredEvent | None
        stored = StoredEvent(event.request_id, subjects.usage(event.tenant_id), wire.encode(event), checkpointed)
        if self.outbox is not None:
            try:
                stored = await self.outbox.store(stored)  # the rest of it, if its checkpoint was billed
            except Exception as exc:  # still published from memory; lost only if this process dies first
                log.error("usage event not stored in the outbox", extra={"request": event.request_id, "err": str(exc)})
        if stored is not None:
            self.queue.put_nowait(stored)

    async def sweep(self) -> int:
        """Queue the outbox's events left behind (by a process that died, or while JetStream was
        away), and the last checkpoints of streams whose api process died mid-way."""
        if self.outbox is None:
            return 0
        orphaned = await self.outbox.claim_orphaned(STALE_HOLDER_S)
        found = orphaned + await self.outbox.claim_left_behind()
        for event in found:
            self.queue.put_nowait(event)
        if orphaned:
            log.warning("billing %d streams whose api process died mid-way, as of their last checkpoint", len(orphaned))
        if len(found) > len(orphaned):
            log.warning("publishing %d usage events left behind in the outbox", len(found) - len(orphaned))
        return len(found)

    async def _sweep(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("usage outbox sweep failed: %s", exc)
            await asyncio.sleep(self.SWEEP_S)

    async def _publish(self, event: StoredEvent) -> None:
        delay = 0.05
        while True:
            try:
                answer = await self.inboxes.request(
                    event.subject, event.payload, 5.0, headers={"Nats-Msg-Id": event.request_id}
                )
                ack = _ack_decoder.decode(answer.data)
                if ack.error is not None or not ack.stream:
                    raise RuntimeError(f"JetStream did not store the event: {ack.error or answer.data!r}")
                self.published += 1
                if self.outbox is not None:
                    self.outbox.forget(event.request_id)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down or slow, no stream yet: keep the event and retry
                log.warning("usage publish failed, retrying", extra={"request": event.request_id, "err": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _worker(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                await self._publish(event)
            finally:
                self.queue.task_done()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every submitted event is acked (shutdown, tests)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)

    async def stop(self) -> None:
        """Publish what is queued, for a while; what is left stays in the outbox for the next process."""
        await self.flush()
        if not self.queue.empty():
            left = self.queue.qsize()
            log.error("usage events not published at shutdown, left in the outbox", extra={"pending": left})
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.outbox is not None:
            await self.outbox.close()

"""NATS plumbing of one api replica for the token path.

* ``Inboxes``: one wildcard subscription for every job's chunks, dispatched to per-attempt queues
  (a subscription per request would cost a server round trip each).
* ``FleetWatch``: turns the schedulers' ``node_lost`` events into a "lost" signal on the queues of
  jobs that were on that node, so they fail over (before the first token) or end (after it).
* ``UsagePublisher``: publishes usage events to JetStream off the request path, with the request
  id as ``Nats-Msg-Id`` so a retried publish is dropped by the server, retrying until acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from market import subjects, wire
from market.ids import ulid

log = logging.getLogger(__name__)

LOST = object()
"""Put on a job's queue when the node it runs on was declared lost."""

_chunk_decoder = wire.decoder(wire.Chunk)
_fleet_decoder = wire.decoder(wire.FleetEvent)


class Inboxes:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = subjects.inbox_prefix("api" + ulid()[-10:].lower())
        self.queues: dict[str, asyncio.Queue[Any]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        async def on_chunk(msg: Any) -> None:
            queue = self.queues.get(msg.subject)
            if queue is None:
                return  # a late chunk for a finished attempt
            if not msg.data and (msg.headers or {}).get("Status") == "503":
                queue.put_nowait(LOST)  # "no responders": the node is not subscribed any more
                return
            try:
                queue.put_nowait(_chunk_decoder.decode(msg.data))
            except msgspec.DecodeError:
                log.warning("undecodable chunk on %s", msg.subject)

        self._sub = await self.nc.subscribe(self.prefix + ".>", cb=on_chunk, pending_msgs_limit=1_000_000)

    def open(self, job_id: str, attempt: int) -> tuple[str, asyncio.Queue[Any]]:
        subject = f"{self.prefix}.{job_id}.{attempt}"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.queues[subject] = queue
        return subject, queue

    def close(self, subject: str) -> None:
        self.queues.pop(subject, None)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


class FleetWatch:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.on_node: dict[str, dict[str, asyncio.Queue[Any]]] = {}

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

    def watch(self, node_id: str, subject: str, queue: asyncio.Queue[Any]) -> None:
        self.on_node.setdefault(node_id, {})[subject] = queue

    def unwatch(self, node_id: str, subject: str) -> None:
        jobs = self.on_node.get(node_id)
        if jobs is not None:
            jobs.pop(subject, None)
            if not jobs:
                self.on_node.pop(node_id, None)


class UsagePublisher:
    """At-least-once publishing to JetStream; JetStream's dedup window and the ledger's unique
    request id turn that into exactly-once."""

    def __init__(self, js: JetStreamContext, concurrency: int = 64) -> None:
        self.js = js
        self.queue: asyncio.Queue[wire.UsageEvent] = asyncio.Queue()
        self.concurrency = concurrency
        self._tasks: list[asyncio.Task[None]] = []
        self.published = 0

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]

    def submit(self, event: wire.UsageEvent) -> None:
        self.queue.put_nowait(event)

    async def _publish(self, event: wire.UsageEvent) -> None:
        delay = 0.05
        while True:
            try:
                await self.js.publish(
                    subjects.usage(event.tenant_id),
                    wire.encode(event),
                    timeout=5.0,
                    headers={"Nats-Msg-Id": event.request_id},
                )
                self.published += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down or slow: keep the event and retry
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
        await self.flush()
        if not self.queue.empty():
            log.error("usage events not yet published at shutdown", extra={"pending": self.queue.qsize()})
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

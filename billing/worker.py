"""The billing worker: a durable JetStream pull consumer that writes usage into the ledger.

Exactly once, by construction rather than by luck:
- a batch is committed in one PostgreSQL transaction keyed by request id (``billing.ingest``), and
  only then acknowledged, message by message (explicit acks; never ack-all, which would also ack
  messages another worker holds uncommitted);
- a crash between commit and ack makes JetStream redeliver after ``ack_wait``, and the redelivered
  events insert nothing (``ON CONFLICT DO NOTHING``), so they are simply acknowledged;
- several workers share the durable consumer (``billing``): JetStream hands each message to one of
  them, and if two ever race on a redelivery the unique request id still admits one.

The next batch is fetched while the current one is being written, so NATS parsing in this process
overlaps with PostgreSQL's work in its own. After a NATS restart the client reconnects by itself;
if the stream or the consumer is gone (a server that lost its store) the worker re-creates and
re-binds them. A PostgreSQL outage makes the worker ``nak`` the batch and reconnect with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import String

from billing import ingest
from billing.ledger import hour_start, post_reservation_hours
from market import bus, subjects
from market.db import plain_url
from market.models import UsageRecord
from market.wire import UsageEvent, decoder

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

    from market.settings import Settings

log = logging.getLogger(__name__)

DURABLE = "billing"
RATE_PENDING_EVERY_S = 30.0
RESERVATION_GRACE = timedelta(minutes=2)
"""How long after an hour ends it is charged: a resize stamped by its transaction's start within
the hour may commit a little after it, and must still count in that hour."""
RESERVATION_LOOKBACK = timedelta(days=7)
"""How far back each pass looks for reservation-hours not yet charged (an invoice run looks at its
whole month)."""
_RETRYABLE_SQL = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_REFUSED_SQL = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
"""What PostgreSQL refuses because of a row's values: that event, not the database, is at fault."""

_MAX_TOKENS = 2**31 - 1
_TIMES = (946_684_800.0, 253_402_300_799.0)
"""Unix times from 2000 to the end of year 9999: what a usage record's timestamps can hold."""
_WIDTHS: dict[str, int] = {
    name: cast(String, UsageRecord.__table__.c[name].type).length or 0
    for name in ("request_id", "tenant_id", "key_id", "model", "node_id", "provider_id")
}
"""The usage record's column widths, read from its table."""


def invalid(event: UsageEvent) -> str | None:
    """Why ``event`` cannot be billed as it stands, or None. The api never sends such an event;
    one that arrives anyway (a bug, a foreign publisher) must not stop billing for everyone else."""
    for name, width in _WIDTHS.items():
        value = getattr(event, name)
        if value is not None and not 0 < len(value) <= width:
            return f"{name} is empty or longer than {width} characters"
    for name in ("prompt_tokens", "completion_tokens", "relayed_completion_tokens"):
        if not 0 <= getattr(event, name) <= _MAX_TOKENS:
            return f"{name} is negative or too large"
    for name in ("started_at", "ended_at"):
        if not _TIMES[0] <= getattr(event, name) <= _TIMES[1]:  # NaN fails both comparisons
            return f"{name} is not a time between 2000 and 9999"
    for name in ("ttft_ms", "engine_ttft_ms", "duration_ms"):
        value = getattr(event, name)
        if value is not None and not 0 <= value < 1e12:
            return f"{name} is negative, infinite or not a number"
    return None


def charge_hours_until(db_now: datetime) -> datetime:
    """The end of the last reservation-hour that may be charged at ``db_now``."""
    return hour_start(db_now - RESERVATION_GRACE)


@dataclass
class WorkerStats:
    received: int = 0
    recorded: int = 0
    duplicates: int = 0
    unrated: int = 0
    rejected: int = 0
    batches: int = 0
    rebinds: int = 0


class ConsumerGone(Exception):
    """The durable consumer (or its stream) no longer exists on the server."""


class Puller:
    """JetStream pull requests over one plain subscription.

    nats-py's ``PullSubscription.fetch`` awaits every message with its own timeout, which costs
    more CPU than decoding, rating and writing the message together; here messages are appended
    by the subscription callback and a fetch only waits once. Each request has its own reply
    subject, so a status (404 no messages, 408 expired) ends only the request it belongs to.
    Messages from a request answered after its fetch returned stay in the buffer for the next one.
    """

    def __init__(self, nc: Client, stream: str, durable: str) -> None:
        self.nc = nc
        self.api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = nc.new_inbox()
        self.buffer: list[Msg] = []
        self.finished: set[str] = set()
        self.gone: str | None = None
        self._wanted = 0
        self._changed = asyncio.Event()
        self._sequence = 0
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = await self.nc.subscribe(self.inbox + ".*", cb=self._on_msg, pending_msgs_limit=-1)

    async def stop(self) -> None:
        """Unsubscribe and hand buffered, unprocessed messages back for prompt redelivery."""
        for msg in self._take(len(self.buffer)):
            with contextlib.suppress(Exception):
                await msg.nak()
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        self._subscription = None

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self.buffer.append(msg)
            if len(self.buffer) >= self._wanted:
                self._changed.set()
            return
        if status == "503" or (status == "409" and "deleted" in (msg.headers or {}).get("Description", "").lower()):
            self.gone = f"{status} {(msg.headers or {}).get('Description', '')}".strip()
        if status != "100":  # 100 is an idle heartbeat; anything else ends its request
            self.finished.add(msg.subject)
        self._changed.set()

    async def _request(self, body: dict[str, Any]) -> str:
        self._sequence += 1
        reply = f"{self.inbox}.{self._sequence}"
        await self.nc.publish(self.api_subject, json.dumps(body).encode(), reply=reply)
        return reply

    async def _wait(self, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and self.gone is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _take(self, batch: int) -> list[Msg]:
        taken, self.buffer = self.buffer[:batch], self.buffer[batch:]
        return taken

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages: what is available now, else the first to arrive within ``timeout``."""
        self.finished.clear()  # statuses of earlier requests: each request has its own reply subject
        if len(self.buffer) < batch:
            self._wanted = batch
            reply = await self._request({"batch": batch - len(self.buffer), "no_wait": True})
            await self._wait(lambda: len(self.buffer) >= batch or reply in self.finished, timeout)
            self.finished.discard(reply)
        if not self.buffer and self.gone is None:
            self._wanted = 1
            expires = int(timeout * 1_000_000_000)
            reply = await self._request({"batch": batch, "expires": expires})
            await self._wait(lambda: bool(self.buffer) or reply in self.finished, timeout + 0.5)
        if self.gone is not None:
            raise ConsumerGone(self.gone)
        return self._take(batch)


class UsageWorker:
    """One billing worker. ``run`` until ``stop`` is set; it owns its NATS and PostgreSQL connections."""

    def __init__(
        self,
        settings: Settings,
        *,
        durable: str = DURABLE,
        filter_subject: str = subjects.USAGE_SUBJECTS,
        batch_size: int = 5000,
        ack_wait_s: float = 30.0,
        fetch_timeout_s: float = 1.0,
        name: str = "billing",
        housekeeping_every_s: float = RATE_PENDING_EVERY_S,
    ) -> None:
        self.settings = settings
        self.durable = durable
        self.filter_subject = filter_subject
        self.batch_size = batch_size
        self.ack_wait_s = ack_wait_s
        self.fetch_timeout_s = fetch_timeout_s
        self.name = name
        self.housekeeping_every_s = housekeeping_every_s
        self.stats = WorkerStats()
        self.ready = asyncio.Event()
        self._decode = decoder(UsageEvent)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub: Puller | None = None
        self._db: asyncpg.Connection | None = None
        self._last_rating = 0.0
        self._last_hours = 0.0

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        self._nc = await bus.connect(self.settings, name=self.name)
        self._js = self._nc.jetstream()
        pending: asyncio.Task[list[Msg]] | None = None
        try:
            await self._bind()
            self.ready.set()
            while not stop.is_set():
                msgs = await (pending if pending is not None else self._fetch())
                pending = None
                if not msgs:
                    await self._idle()
                    continue
                pending = asyncio.create_task(self._fetch())
                await self.process(msgs)
                if time.monotonic() - self._last_hours >= self.housekeeping_every_s:  # busy all along
                    await self._charge_reservation_hours()
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            await self._close()

    async def process(self, msgs: list[Msg]) -> None:
        """Decode, commit, then acknowledge one batch.

        An event that cannot be billed (undecodable, out of range, or refused by PostgreSQL for
        its values) is rejected alone: logged with its bytes and terminated, so JetStream stops
        redelivering it (it stays in the stream, which keeps 30 days, for inspection); the rest of
        its batch is recorded. Anything else PostgreSQL raises returns the batch for redelivery.
        """
        events: list[UsageEvent] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                event = self._decode.decode(msg.data)
            except msgspec.DecodeError as exc:
                await self._reject(msg, f"undecodable: {exc}")
                continue
            if reason := invalid(event):
                await self._reject(msg, reason)
                continue
            events.append(event)
            good.append(msg)
        if events:
            try:
                result = await self._store(events, good)
            except _REFUSED_SQL as exc:
                if len(events) == 1:
                    await self._reject(good[0], f"refused by the database: {exc}")
                    self.stats.received += len(msgs)
                    return
                self.stats.received += len(msgs) - len(good)
                for msg in good:  # one at a time, to find the one at fault
                    await self.process([msg])
                return
            if result is None:
                return
            self.stats.recorded += result.recorded
            self.stats.duplicates += result.received - result.recorded
            self.stats.unrated += result.unrated
            if result.unrated:
                log.warning("usage without a price in force recorded unrated", extra={"count": result.unrated})
        self.stats.received += len(msgs)
        self.stats.batches += 1
        await self.ack(good)

    async def _reject(self, msg: Msg, reason: str) -> None:
        self.stats.rejected += 1
        log.error(
            "usage event rejected",
            extra={"reason": reason, "subject": msg.subject, "data": msg.data[:2000].hex()},
        )
        with contextlib.suppress(Exception):
            await msg.term()

    async def ack(self, msgs: list[Msg]) -> None:
        """Acknowledge committed messages (fire-and-forget: a lost ack only means a harmless redelivery)."""
        for msg in msgs:
            await msg.ack()

    async def _store(self, events: list[UsageEvent], msgs: list[Msg]) -> ingest.BatchResult | None:
        for attempt in range(5):
            try:
                db = await self._connection()
                return await ingest.store_batch(db, events, self.settings.currency)
            except _RETRYABLE_SQL:
                log.warning("batch conflicted with another worker; retrying", extra={"attempt": attempt})
            except _REFUSED_SQL:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Away, restarting, out of connections or disk: nothing to do with the events.
                log.warning("postgres unavailable; batch returned for redelivery", extra={"error": str(exc)})
                await self._drop_connection()
                break
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)
        await asyncio.sleep(1.0)
        return None

    async def _connection(self) -> asyncpg.Connection:
        if self._db is None or self._db.is_closed():
            self._db = await asyncpg.connect(plain_url(self.settings.require_database_url()), timeout=5)
        return self._db

    async def _drop_connection(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close(timeout=2)
        self._db = None

    async def _bind(self) -> None:
        """Create the stream and the durable consumer if missing, and bind a pull subscription."""
        assert self._js is not None
        await bus.ensure_usage_stream(self._js)
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=max(20_000, self.batch_size * 8),
            max_waiting=64,
            filter_subject=self.filter_subject,
        )
        try:
            await self._js.consumer_info(subjects.USAGE_STREAM, self.durable)
        except nats.js.errors.NotFoundError:
            await self._js.add_consumer(subjects.USAGE_STREAM, config)
        assert self._nc is not None
        self._sub = Puller(self._nc, subjects.USAGE_STREAM, self.durable)
        await self._sub.start()

    async def _rebind(self, reason: str) -> None:
        self.stats.rebinds += 1
        log.warning("re-binding the usage consumer", extra={"reason": reason})
        if self._sub is not None:
            await self._sub.stop()
        self._sub = None
        for delay in (0.2, 0.5, 1, 2, 5):
            try:
                await self._bind()
                return
            except (nats.errors.Error, OSError) as exc:
                log.warning("re-bind failed", extra={"error": repr(exc)})
                await asyncio.sleep(delay)

    async def _fetch(self) -> list[Msg]:
        if self._sub is None:
            await self._rebind("not bound")
            if self._sub is None:
                return []
        try:
            msgs: list[Msg] = await self._sub.fetch(self.batch_size, timeout=self.fetch_timeout_s)
        except ConsumerGone as exc:
            await self._rebind(f"consumer or stream not found ({exc})")
            return []
        except (nats.errors.Error, OSError) as exc:
            await asyncio.sleep(0.5)
            await self._rebind(repr(exc))
            return []
        return msgs

    async def _idle(self) -> None:
        """Between batches with nothing to do: check the consumer still exists; rate late-priced usage;
        charge the reservation-hours that ended."""
        now = time.monotonic()
        if now - self._last_rating < self.housekeeping_every_s:
            return
        self._last_rating = now
        if self._js is not None:
            try:
                await self._js.consumer_info(subjects.USAGE_STREAM, self.durable)
            except nats.js.errors.NotFoundError:
                await self._rebind("consumer disappeared")
            except (TimeoutError, nats.errors.Error, OSError):
                pass  # disconnected: the client reconnects by itself
        try:
            posted = await ingest.rate_pending(await self._connection(), self.settings.currency)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("rating pending usage failed", extra={"error": str(exc)})
            await self._drop_connection()
            return
        if posted:
            log.info("rated usage that was waiting for a price", extra={"count": posted})
        await self._charge_reservation_hours()

    async def _charge_reservation_hours(self) -> None:
        """Charge the reservation-hours that ended, by the database's clock (which stamps the
        reservations' changes) and ``RESERVATION_GRACE`` late."""
        self._last_hours = time.monotonic()
        try:
            conn = await self._connection()
            async with conn.transaction():
                until = charge_hours_until(await conn.fetchval("SELECT now()"))
                hours = await post_reservation_hours(conn, self.settings.currency, until - RESERVATION_LOOKBACK, until)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("charging reservation-hours failed", extra={"error": str(exc)})
            await self._drop_connection()
            return
        if hours:
            log.info("charged reservation-hours", extra={"count": hours})

    async def _close(self) -> None:
        if self._sub is not None:
            await self._sub.stop()
        await self._drop_connection()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = None


async def run_workers(settings: Settings, count: int, stop: asyncio.Event, **options: Any) -> list[WorkerStats]:
    """Run ``count`` workers in this process (they share the durable consumer) until ``stop``."""
    workers = [UsageWorker(settings, name=f"billing-{i}", **options) for i in range(count)]
    await asyncio.gather(*(w.run(stop) for w in workers))
    return [w.stats for w in workers]

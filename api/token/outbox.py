"""Usage events kept in PostgreSQL from a request's end until JetStream acknowledges them.

A request's usage event is stored here before its client sees the response end, and deleted once
JetStream has it. An api process that dies, or one that stops while NATS is out of reach, leaves
its unacknowledged events here instead of losing them; every replica (a restarted one included)
claims rows left behind for longer than ``LEFT_BEHIND_S`` and publishes them. Publishing an event
twice is harmless: JetStream drops a repeated ``Nats-Msg-Id`` within its window and the ledger a
repeated request id after it.

Stores and deletes are group-committed like admissions (what arrives while a statement is in
flight goes in the next one), on connections that wait for the WAL flush: these rows are what
gets billed.

Streams in flight are checkpointed too (``usage_in_flight``): every few seconds each api process
writes the event each of its streams would end with if it ended now, under its limiter's id. The
statement that stores a checkpointed request's final event turns its row into a tombstone
(``final``) that no checkpoint overwrites, even one whose statement was already running: the
primary key orders the two in the database, so nothing in the process waits for anything.
``claim_orphaned`` copies the non-final rows of processes that stopped heartbeating, and that
nobody rewrote for as long, into the outbox (unless a final event is there already), so a stream
whose api died mid-way is billed for what it had relayed by its last checkpoint. The row stays,
``claimed`` (a tombstone that keeps its event): a process only cut off from PostgreSQL for that
long, which stores the final event later, then bills only what it adds (``rest_of``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import msgspec

from api.limits import HotConnections
from market import wire
from market.aio import Drainers

log = logging.getLogger(__name__)

_STORE_SQL = """
WITH ended AS (
    INSERT INTO usage_in_flight (request_id, holder, subject, event, final)
    SELECT i, '', '', ''::bytea, true FROM unnest($1::text[], $4::boolean[]) AS u(i, checkpointed)
     WHERE checkpointed ORDER BY i  -- rows locked in one order by every statement: no deadlocks
    ON CONFLICT (request_id) DO UPDATE
       SET final = true, updated_at = now(),
           event = CASE WHEN usage_in_flight.claimed THEN usage_in_flight.event ELSE ''::bytea END
    RETURNING request_id, claimed, event),
stored AS (
    INSERT INTO usage_outbox (request_id, subject, event)
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(i, s, e)
     WHERE i NOT IN (SELECT request_id FROM ended WHERE claimed)
    ON CONFLICT (request_id) DO NOTHING)
SELECT request_id, event FROM ended WHERE claimed
"""
_STORE_REST_SQL = """
INSERT INTO usage_outbox (request_id, subject, event)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) ON CONFLICT (request_id) DO NOTHING
"""
_CHECKPOINT_SQL = """
INSERT INTO usage_in_flight (request_id, holder, subject, event)
SELECT i, $1, s, e FROM unnest($2::text[], $3::text[], $4::bytea[]) AS u(i, s, e) ORDER BY i
ON CONFLICT (request_id) DO UPDATE SET event = excluded.event, updated_at = now() WHERE NOT usage_in_flight.final
"""
_CLAIM_ORPHANED_SQL = """
WITH picked AS (
    SELECT request_id FROM usage_in_flight f
     WHERE NOT f.final
       AND f.updated_at < now() - make_interval(secs => $1)
       AND NOT EXISTS (SELECT 1 FROM limiter_instances i
                        WHERE i.id = f.holder AND i.seen_at >= now() - make_interval(secs => $1))
     ORDER BY request_id
       FOR UPDATE),
orphaned AS (
    UPDATE usage_in_flight f SET final = true, claimed = true, updated_at = now()
      FROM picked p WHERE f.request_id = p.request_id AND NOT f.final
    RETURNING f.request_id, f.subject, f.event),
tombstones AS (
    DELETE FROM usage_in_flight
     WHERE final AND updated_at < now() - make_interval(secs => CASE WHEN claimed THEN $3::float8 ELSE $2::float8 END))
INSERT INTO usage_outbox (request_id, subject, event)
SELECT request_id, subject, event FROM orphaned
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id, subject, event
"""
_FORGET_SQL = "DELETE FROM usage_outbox WHERE request_id = ANY($1::text[])"
_CLAIM_SQL = """
UPDATE usage_outbox SET stored_at = now()
 WHERE request_id IN (
       SELECT request_id FROM usage_outbox
        WHERE stored_at < now() - make_interval(secs => $1)
        ORDER BY stored_at LIMIT $2
          FOR UPDATE SKIP LOCKED)
RETURNING request_id, subject, event
"""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    request_id: str
    subject: str
    payload: bytes
    checkpointed: bool = False
    """A checkpoint of the request may exist (or be being written): storing this final event
    turns it into a tombstone."""


@dataclass(slots=True)
class _PendingStore:
    event: StoredEvent
    done: asyncio.Future[StoredEvent | None]


REST_SUFFIX = ".rest"
"""Appended to a request id for the part of its usage billed after its checkpoint was."""
_event_decoder = wire.decoder(wire.UsageEvent)


def _billed(event: wire.UsageEvent) -> int:
    """The completion tokens billing charges for ``event`` (``billing.ingest``: the relayed count
    when the engine gave none, else the smaller of the two)."""
    if event.completion_tokens == 0:
        return event.relayed_completion_tokens
    return min(event.completion_tokens, event.relayed_completion_tokens)


def rest_of(final: StoredEvent, claimed: bytes) -> StoredEvent | None:
    """What ``final`` adds to the checkpoint another replica billed (``claimed``), as an event of
    its own (``<request id>.rest``), or None when it adds nothing: the billed completion tokens
    and the prompt tokens beyond the checkpoint's, never fewer than none (what was billed stands).
    Engine and relayed counts are both that difference, so billing and its reconciliation see
    an exact event; timings are left out, so latency figures count the request once."""
    try:
        whole, billed = _event_decoder.decode(final.payload), _event_decoder.decode(claimed)
    except msgspec.DecodeError:
        log.error("cannot compare a final usage event with its billed checkpoint", extra={"request": final.request_id})
        return None
    completion = max(0, _billed(whole) - _billed(billed))
    rest = msgspec.structs.replace(
        whole,
        request_id=whole.request_id + REST_SUFFIX,
        prompt_tokens=max(0, whole.prompt_tokens - billed.prompt_tokens),
        completion_tokens=completion,
        relayed_completion_tokens=completion,
        ttft_ms=None,
        engine_ttft_ms=None,
    )
    if not (rest.prompt_tokens or completion):
        return None
    return StoredEvent(rest.request_id, final.subject, wire.encode(rest))


class UsageOutbox:
    LEFT_BEHIND_S = 30.0
    """A row this old was left behind: its process died, or it cannot reach JetStream."""
    TOMBSTONE_S = 600.0
    """How long a final event's tombstone outlives it in ``usage_in_flight``: far longer than any
    checkpoint statement still running can take."""
    CLAIMED_KEPT_S = 2 * 86400.0
    """How long a checkpoint billed for a process taken for dead is kept: the time that process,
    if alive after all, has to reach PostgreSQL again and have the rest of its stream billed."""
    STATEMENTS = 2
    """Store statements in flight at once."""

    def __init__(self, url: str) -> None:
        self.conns = HotConnections(url, self.STATEMENTS + 1, synchronous_commit=True)
        self._stores: list[_PendingStore] = []
        self._writers = Drainers(self.STATEMENTS, self._write, "usage-outbox-store")
        self._forgets: list[str] = []
        self._forgetters = Drainers(1, self._delete, "usage-outbox-forget")

    async def store(self, event: StoredEvent) -> StoredEvent | None:
        """Return once ``event`` is committed, with what to publish: ``event``; or, when its
        checkpoint was billed already (this process was taken for dead), the rest of it
        (``rest_of``), or None if there is none. Raise if the database refused or is away."""
        pending = _PendingStore(event, asyncio.get_running_loop().create_future())
        self._stores.append(pending)
        self._writers.kick()
        return await asyncio.shield(pending.done)  # a caller that leaves does not take its row back

    async def _write(self) -> None:
        while self._stores:
            batch, self._stores = self._stores, []
            events = [item.event for item in batch]
            publish: dict[str, StoredEvent | None] = {}
            try:
                claimed = await self.conns.fetch(
                    _STORE_SQL,
                    [e.request_id for e in events],
                    [e.subject for e in events],
                    [e.payload for e in events],
                    [e.checkpointed for e in events],
                )
                if claimed:  # rare: this process was taken for dead while it relayed these
                    finals = {e.request_id: e for e in events}
                    publish = {r["request_id"]: rest_of(finals[r["request_id"]], bytes(r["event"])) for r in claimed}
                    await self._store_rests([e for e in publish.values() if e is not None])
            except Exception as exc:
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(exc)
                continue
            for item in batch:
                if not item.done.done():
                    item.done.set_result(publish.get(item.event.request_id, item.event))

    async def _store_rests(self, rests: list[StoredEvent]) -> None:
        """Keep the ``.rest`` events of final events whose checkpoints were billed already. The
        final events are committed as such (their own ids are not published), so a failure
        here leaves the rests published from memory, like any event whose store failed."""
        log.warning(
            "usage of streams billed as of a checkpoint (this process was taken for dead): billing the rest",
            extra={"rests": [e.request_id for e in rests]},
        )
        if not rests:
            return
        try:
            await self.conns.fetch(
                _STORE_REST_SQL, [e.request_id for e in rests], [e.subject for e in rests], [e.payload for e in rests]
            )
        except Exception as exc:
            log.error("the rest of checkpointed streams not stored in the outbox", extra={"err": str(exc)})

    def forget(self, request_id: str) -> None:
        """JetStream has the event: delete its row (in the next batch; a row left is published again, harmlessly)."""
        self._forgets.append(request_id)
        self._forgetters.kick()

    async def _delete(self) -> None:
        while self._forgets:
            batch, self._forgets = self._forgets, []
            try:
                await self.conns.fetch(_FORGET_SQL, batch)
            except Exception as exc:  # left in place: published again later, dropped as a duplicate
                log.warning("could not delete %d published usage events from the outbox: %s", len(batch), exc)

    async def checkpoint(self, holder: str, events: list[StoredEvent]) -> None:
        """Write (or overwrite) the events streams in flight would end with now, as ``holder``'s."""
        if events:
            await self.conns.fetch(
                _CHECKPOINT_SQL,
                holder,
                [e.request_id for e in events],
                [e.subject for e in events],
                [e.payload for e in events],
            )

    async def claim_orphaned(self, stale_s: float) -> list[StoredEvent]:
        """Move the checkpoints of api processes silent for ``stale_s``, and not rewritten for as
        long, into the outbox (a final event stored there stands) and return them, claimed for
        ``LEFT_BEHIND_S`` like any row; drop tombstones older than ``TOMBSTONE_S``."""
        rows = await self.conns.fetch(_CLAIM_ORPHANED_SQL, stale_s, self.TOMBSTONE_S, self.CLAIMED_KEPT_S)
        return [StoredEvent(r["request_id"], r["subject"], bytes(r["event"])) for r in rows]

    async def claim_left_behind(self, limit: int = 500) -> list[StoredEvent]:
        """Rows stored (or last claimed) over ``LEFT_BEHIND_S`` ago, claimed for this process for as long again."""
        rows = await self.conns.fetch(_CLAIM_SQL, self.LEFT_BEHIND_S, limit)
        return [StoredEvent(r["request_id"], r["subject"], bytes(r["event"])) for r in rows]

    async def close(self) -> None:
        await self._writers.wait()
        await self._forgetters.wait()
        await self.conns.close()

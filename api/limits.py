"""Admission limits: allowed models, requests and tokens per minute, and the period quota.

The token API calls ``Limiter.admit`` before any output reaches the client (for a key with room
left, while its job is being placed: see ``api.token.service``) and ``Limiter.settle`` exactly once
when the request ends (completed, failed or cancelled). All state lives in PostgreSQL and is
changed only by the ``market_admit``/``market_settle`` functions (migration 0003): one round trip
per admission, serialised on the tenant's quota row, so any number of api replicas enforce one
limit and concurrent requests can never overrun a hard quota.

The hot path uses its own connections (prepared statements, no ORM, and not asyncpg's pool, whose
acquire/release cost more than the statement) because admission is on every token request. Both
statements run to completion even when the request is cancelled: an admit whose caller left is
settled with nothing used, so a hold is never stranded. Both are group-committed: while a
statement is in flight the next admits (or settles) queue and go together in one statement
(``market_admit_many``, migration 0005), so a burst of a tenant's requests, which serialise on
its quota row anyway, costs two round trips rather than one each. Batching changes no rule: each
admit in a batch is ``market_admit`` under the same locks, and a delayed settle only keeps a hold a
little longer (more conservative).

Admission also decides the request's class (migration 0012): under the tenant's reservation for
the model, ``reserved`` within its slots, ``burst`` above them up to its burst ceiling, and a 429
``reservation_full`` beyond; ``on_demand`` without one. The settle gives the in-flight count back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import asyncpg
import msgspec

from api.auth import Principal
from api.errors import (
    DATABASE_AWAY,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RateLimited,
    Unavailable,
)
from api.state import AppState
from market.aio import Drainers
from market.db import plain_url
from market.ids import new_id

log = logging.getLogger(__name__)

SOFT_THRESHOLD_SUBJECT = "events.quota.soft_threshold"
"""Published once per tenant and period when usage first reaches the soft threshold."""
SOFT_THRESHOLD = 0.8
HEARTBEAT_S = 5.0
CREDITS_KEPT = 10_000
"""Failed credits kept for a retry (the newest): a minute on they would credit nothing anyway."""
STALE_HOLDER_S = 60.0
"""A limiter silent this long is presumed dead; its holds go back to the tenants' quotas."""
INFERENCE_SCOPE = "inference"

_ADMIT_SQL = "SELECT * FROM market_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, true)"
_ADMIT_MANY_SQL = (
    "SELECT * FROM market_admit_many($1, $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],"
    " $7::integer[], $8::integer[], $9::integer[], $10::integer[], true)"
)
ADMIT_STATEMENTS = 2
"""Admit statements in flight at once per process; what arrives meanwhile waits for the next batch.
Two, so one tenant's lock wait (another replica's transaction) does not hold every admit back."""
_SETTLE_ONE_SQL = "SELECT * FROM market_settle_one($1, $2, $3, $4, $5, $6, $7, $8)"
_SETTLE_SQL = (
    "SELECT * FROM market_settle($1::text[], $2::text[], $3::date[], $4::bigint[], $5::bigint[], $6, $7::text[],"
    " $8::text[])"
)

_LIMIT_NAMES = {
    "key_requests": "requests per minute for this API key",
    "key_tokens": "tokens per minute for this API key",
    "tenant_requests": "requests per minute for your organisation",
    "tenant_tokens": "tokens per minute for your organisation",
}


TokenRates = tuple[tuple[int, str, int], ...]
"""Rate-limit buckets a request's tokens were charged to: (0 for a key's, 1 for a tenant's, the
order admission locks them in; scope; tokens a minute)."""


@dataclass(slots=True)
class Admission:
    """An admitted request: what it holds against the quota, and the rate-limit headers to return."""

    tenant_id: str
    key_id: str
    model: str
    period: date
    held_tokens: int
    holder: str
    """The limiter (api process) that holds the tokens; any limiter may settle."""
    admission_class: str = "on_demand"
    """``reserved`` or ``burst`` under the tenant's reservation for the model, else ``on_demand``."""
    reservation_id: str | None = None
    """The reservation whose in-flight count this request takes (given back at settle)."""
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    token_rates: TokenRates = ()
    """The tokens-per-minute limits the hold was charged to: at settle, what the request did not
    use is credited back to them."""
    admitted_at: float = field(default_factory=time.monotonic)
    """When the hold was charged to them: a charge drains with time, and only what is left of it
    may be credited."""
    room: tuple[int | None, int | None, int] = (None, None, 0)
    """What was left when this was admitted: requests and tokens before a rate limit (None: no
    limit), and quota tokens. The token path reads it to judge whether the next admission of
    the same key can run beside placement (``api.token.service``)."""


class SoftThresholdReached(msgspec.Struct):
    """Event body on ``events.quota.soft_threshold``."""

    tenant_id: str
    period: str
    granted: int
    used: int
    threshold: float


@dataclass(slots=True)
class _PendingAdmit:
    args: tuple[str, str, str, int, int, int | None, int | None, int | None, int | None]
    """tenant, key, model, prompt, max, key rpm/tpm, tenant rpm/tpm: ``market_admit``'s after the holder."""
    done: asyncio.Future[asyncpg.Record]
    """The request's row; cancelled by a caller that left (see ``Limiter._admit_batches``)."""


@dataclass(slots=True)
class _PendingSettle:
    holder: str
    tenant_id: str
    period: date
    hold: int
    used: int
    reservation_id: str | None
    admission_class: str | None
    """The class whose count under ``reservation_id`` the settle gives back."""
    done: asyncio.Future[None] | None
    """Resolved when written; None when nobody waits (an orphaned admit's release)."""
    token_rates: TokenRates = ()
    """``Admission.token_rates``: credited ``hold - used`` once the settle is written."""
    admitted_at: float = 0.0
    """``Admission.admitted_at``."""


async def _keep_session(_: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release (a round trip): our statements leave no session state."""


class HotConnections:
    """A lean connection pool for the hot statements (admit, settle, the usage outbox).

    asyncpg's ``Pool`` spends about 90 us per acquire/release (a shielded release task, timeout
    scopes, a proxy object): more than a ``SELECT 1`` round trip. Here acquire and release are a
    list pop and push. Acquiring may be cancelled; a statement, once sent, is never cancelled by
    its caller (the limiter runs statements in shielded tasks), so a returned connection is idle.
    A connection that failed is closed and replaced on demand; one idle for ``MAX_IDLE_S`` is
    closed by ``prune`` (a middlebox may have dropped it silently); PostgreSQL ends a statement
    stuck longer than ``STATEMENT_TIMEOUT_S``. Not covered: a network that vanishes mid-statement
    (TCP gives up after its own retransmission timeout), as with asyncpg's pool without a
    ``command_timeout``.
    """

    MAX_IDLE_S = 120.0
    CONNECT_TIMEOUT_S = 5.0
    STATEMENT_TIMEOUT_S = 10.0

    def __init__(self, url: str, size: int, *, synchronous_commit: bool = False) -> None:
        self._url = url
        self._size = size
        self._synchronous_commit = synchronous_commit
        self._idle: list[tuple[asyncpg.Connection, float]] = []
        """Idle connections and when each was last used; the most recent last."""
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._open = 0
        """Connections open or being opened."""
        self._closed = False

    async def acquire(self) -> asyncpg.Connection:
        """A connection for one statement (give it back with ``run``); cancelling here is safe."""
        while True:
            while self._idle:
                conn, _ = self._idle.pop()
                if not conn.is_closed():
                    return conn
                self._open -= 1
            if self._open < self._size:
                self._open += 1
                try:
                    # admit and settle need not wait for the WAL flush: holds are transient and
                    # billing counts from the ledger; a database crash forgets at most the last
                    # moment's holds and use (the quota is then briefly lenient, never strict).
                    # The usage outbox does wait: its rows are what gets billed.
                    conn = await asyncpg.connect(
                        self._url,
                        timeout=self.CONNECT_TIMEOUT_S,
                        server_settings={
                            "synchronous_commit": "on" if self._synchronous_commit else "off",
                            # server-side: a client-side command_timeout costs ~35 us a statement
                            "statement_timeout": f"{int(self.STATEMENT_TIMEOUT_S * 1000)}",
                        },
                    )
                except BaseException:
                    self._open -= 1
                    self._wake(None)
                    raise
                return conn
            waiter: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed over as we were cancelled
                    passed = waiter.result()
                    if passed is not None:
                        self._release(passed, broken=False)
                    else:
                        self._wake(None)
                raise
            if handed is not None:
                return handed

    def _wake(self, conn: asyncpg.Connection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _release(self, conn: asyncpg.Connection, *, broken: bool) -> None:
        if broken or self._closed or conn.is_closed():
            self._open -= 1
            conn.terminate()
            self._wake(None)  # a waiter may open the replacement
        elif not self._wake(conn):
            self._idle.append((conn, time.monotonic()))

    def give_back(self, conn: asyncpg.Connection) -> None:
        """Return an acquired connection that ran nothing."""
        self._release(conn, broken=False)

    async def run(self, conn: asyncpg.Connection, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run one statement on an acquired connection, then give the connection back."""
        try:
            rows = await conn.fetch(query, *args)
        except BaseException as exc:
            self._release(conn, broken=not isinstance(exc, asyncpg.PostgresError))
            raise
        self._release(conn, broken=False)
        return rows

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self.run(await self.acquire(), query, *args)

    def prune(self) -> None:
        """Close the connections idle for longer than ``MAX_IDLE_S`` (the oldest are first)."""
        cutoff = time.monotonic() - self.MAX_IDLE_S
        while self._idle and self._idle[0][1] < cutoff:
            conn, _ = self._idle.pop(0)
            self._open -= 1
            conn.terminate()

    async def close(self) -> None:
        """Close the idle connections; one still in use is closed when its statement returns."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        for conn, _ in idle:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)


def _unavailable(exc: BaseException) -> Unavailable:
    log.warning("admission failed, the database is unreachable: %r", exc)
    return Unavailable(
        "admission is unavailable for a moment (quota store unreachable); retry shortly",
        code="service_unavailable",
        headers={"Retry-After": "1"},
    )


def format_reset(seconds: float) -> str:
    """OpenAI's duration style for ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest):d}s"


def _headers(row: asyncpg.Record) -> dict[str, str]:
    headers: dict[str, str] = {}
    if row["limit_requests"] is not None:
        headers["x-ratelimit-limit-requests"] = str(row["limit_requests"])
        headers["x-ratelimit-remaining-requests"] = str(row["remaining_requests"])
        headers["x-ratelimit-reset-requests"] = format_reset(row["reset_requests"])
    if row["limit_tokens"] is not None:
        headers["x-ratelimit-limit-tokens"] = str(row["limit_tokens"])
        headers["x-ratelimit-remaining-tokens"] = str(row["remaining_tokens"])
        headers["x-ratelimit-reset-tokens"] = format_reset(row["reset_tokens"])
    return headers


class Limiter:
    """One per api process; registered as ``state.services["limiter"]``."""

    def __init__(self, state: AppState, *, soft_threshold: float = SOFT_THRESHOLD) -> None:
        self.state = state
        self.soft_threshold = soft_threshold
        self.holder = new_id("key").replace("key_", "lim_", 1)
        self._pool: asyncpg.Pool | None = None
        self._hot: HotConnections | None = None
        self._pending: list[_PendingSettle] = []
        self._admits: list[_PendingAdmit] = []
        self._admitters = Drainers(ADMIT_STATEMENTS, self._admit_batches, "limiter-admit")
        self.admit_statements = 0
        """Admit statements sent (a batch counts once)."""
        self._retry: list[_PendingSettle] = []
        self._credit_retry: list[_PendingSettle] = []
        """Settled requests whose tokens-per-minute credit failed: credited at the next heartbeat."""
        self._settlers = Drainers(1, self._flush_loop, "limiter-settle")
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        url = plain_url(self.state.settings.require_database_url())
        self._hot = HotConnections(url, max(2, self.state.settings.db_pool_size))
        self._pool = await asyncpg.create_pool(url, min_size=1, max_size=2, reset=_keep_session)
        await self._pool.execute("INSERT INTO limiter_instances (id) VALUES ($1)", self.holder)
        self._heartbeat = asyncio.create_task(self._beat(), name="limiter-heartbeat")

    async def close(self) -> None:
        """Finish every queued settle, then leave: what this process still holds is released now."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self._admitters.wait()  # their releases of orphaned holds join the settles below
        await self._settlers.wait()
        self._pending.extend(self._retry)
        self._retry.clear()
        if self._pending:
            await self._flush()
        await self.retry_credits()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.execute("DELETE FROM limiter_instances WHERE id = $1", self.holder)
                await self._pool.fetchval("SELECT market_release_dead_holders($1)", STALE_HOLDER_S)
            await self._pool.close()
            self._pool = None
        if self._hot is not None:
            await self._hot.close()
            self._hot = None

    @property
    def pool(self) -> asyncpg.Pool:
        """For the cold statements (heartbeat, sweep)."""
        if self._pool is None:
            raise RuntimeError("Limiter.start() has not run")
        return self._pool

    @property
    def hot(self) -> HotConnections:
        """For admit and settle."""
        if self._hot is None:
            raise RuntimeError("Limiter.start() has not run")
        return self._hot

    async def admit(self, principal: Principal, model: str, prompt_tokens: int, max_tokens: int) -> Admission:
        """Hold ``prompt_tokens + max_tokens`` for this request, or raise the error the client should see."""
        if principal.role != "tenant" or principal.tenant_id is None:
            raise Forbidden("the token API needs a tenant key (sk-...)", code="wrong_key_role")
        if principal.scopes and INFERENCE_SCOPE not in principal.scopes:
            raise Forbidden("this API key may not call the token API (no 'inference' scope)", code="missing_scope")
        if prompt_tokens < 0 or max_tokens < 0:
            raise InvalidRequest("prompt and max_tokens must not be negative", param="max_tokens")
        tenant_id = principal.tenant_id
        args = (
            tenant_id,
            principal.key_id,
            model,
            prompt_tokens,
            max_tokens,
            principal.key_rpm,
            principal.key_tpm,
            principal.tenant_rpm,
            principal.tenant_tpm,
        )
        pending = _PendingAdmit(args, asyncio.get_running_loop().create_future())
        self._admits.append(pending)
        self._admitters.kick()
        try:
            # A caller that leaves cancels ``done``: before its batch is sent it takes nothing,
            # after, the batch gives back what it held.
            row = await pending.done
        except DATABASE_AWAY as exc:
            raise _unavailable(exc) from exc
        except asyncio.CancelledError:
            # Left just as the answer came (the batch saw ``done`` uncancelled): give it back here.
            if pending.done.done() and not pending.done.cancelled() and pending.done.exception() is None:
                answered = pending.done.result()
                if answered["status"] == "ok":
                    rates = _token_rates(principal.key_id, principal.key_tpm, tenant_id, principal.tenant_tpm)
                    self._release_orphan(tenant_id, prompt_tokens + max_tokens, answered, rates)
            raise
        status: str = row["status"]
        if status == "ok":
            return Admission(
                tenant_id=tenant_id,
                key_id=principal.key_id,
                model=model,
                period=row["period"],
                held_tokens=prompt_tokens + max_tokens,
                holder=self.holder,
                admission_class=row["admission_class"] or "on_demand",
                reservation_id=row["reservation"],
                headers=_headers(row),
                token_rates=_token_rates(principal.key_id, principal.key_tpm, tenant_id, principal.tenant_tpm),
                room=(row["remaining_requests"], row["remaining_tokens"], row["granted"] - row["held"] - row["used"]),
            )
        raise self._refusal(status, row, model, prompt_tokens + max_tokens)

    async def _admit_batches(self) -> None:
        """Send the queued admits, all in one statement, until none are left.

        The connection comes first and the batch after, so admits whose callers left while every
        connection was busy are dropped before anything is sent. Once sent, a statement runs to its
        end: a caller that left by then gets its hold released here (and its tokens credited back to
        tokens-per-minute limits; it still counts as a request, having reached the limiter).
        """
        while self._admits:
            try:
                conn = await self.hot.acquire()
            except DATABASE_AWAY as exc:
                batch, self._admits = self._admits, []
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(exc)
                continue
            batch = [item for item in self._admits if not item.done.done()]
            self._admits = []
            if not batch:
                self.hot.give_back(conn)
                continue
            self.admit_statements += 1
            try:
                if len(batch) == 1:
                    rows = await self.hot.run(conn, _ADMIT_SQL, self.holder, *batch[0].args)
                else:
                    columns = list(zip(*(item.args for item in batch), strict=True))
                    rows = sorted(await self.hot.run(conn, _ADMIT_MANY_SQL, self.holder, *columns), key=_ord)
                if len(rows) != len(batch):
                    raise RuntimeError(f"admission answered {len(rows)} rows for {len(batch)} requests")
            except Exception as exc:
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(exc)
                continue
            for item, row in zip(batch, rows, strict=True):
                if not item.done.cancelled():
                    item.done.set_result(row)
                elif row["status"] == "ok":
                    tenant_id, key_id, hold = item.args[0], item.args[1], item.args[3] + item.args[4]
                    rates = _token_rates(key_id, item.args[6], tenant_id, item.args[8])
                    self._release_orphan(tenant_id, hold, row, rates)

    def _release_orphan(self, tenant_id: str, hold: int, row: asyncpg.Record, token_rates: TokenRates) -> None:
        """Give back what an admission whose caller left holds (quota, its reservation slot, and
        what it took of tokens-per-minute limits)."""
        reservation, klass = row["reservation"], row["admission_class"]
        self._queue(
            _PendingSettle(
                self.holder, tenant_id, row["period"], hold, 0, reservation, klass, None, token_rates, time.monotonic()
            )
        )

    def _refusal(self, status: str, row: asyncpg.Record, model: str, wanted: int) -> Exception:
        headers = _headers(row)
        if status == "model_not_found":
            return NotFound(f"the model '{model}' does not exist", code="model_not_found", param="model")
        if status == "model_not_allowed":
            return Forbidden(f"your organisation may not use the model '{model}'", code="model_not_allowed")
        if status == "context_length_exceeded":  # the prompt alone, by the api's estimate (migration 0007)
            return InvalidRequest(
                f"this model's maximum context length is {row['detail']} tokens; the prompt alone is about as long",
                code="context_length_exceeded",
                param="messages",
            )
        if status == "reservation_full":
            reserved, _, burst = str(row["detail"]).partition("/")
            headers["retry-after"] = "1"
            return RateLimited(
                f"your reservation for '{model}' is full: {reserved} reserved and {burst} burst requests are"
                " in flight; retry in 1s, or raise the reservation's slots or burst_slots",
                code="reservation_full",
                headers=headers,
            )
        if status == "insufficient_quota":
            remaining = max(0, row["granted"] - row["held"] - row["used"])
            return QuotaExceeded(
                f"you exceeded your quota for this period: the request needs {wanted} tokens"
                f" (prompt plus max_tokens) and {remaining} of {row['granted']} remain",
                headers=headers,
            )
        kind, _, limit_name = status.partition(":")
        what = _LIMIT_NAMES.get(limit_name, limit_name)
        if kind == "too_large":
            return RateLimited(
                f"request too large: it needs {wanted} tokens (prompt plus max_tokens), more than the limit of"
                f" {row['detail']} {what}",
                code="request_too_large",
                headers=headers,
            )
        retry_after = max(1, math.ceil(row["retry_after"] or 0))
        headers["retry-after"] = str(retry_after)
        return RateLimited(f"rate limit reached: {row['detail']} {what}; retry in {retry_after}s", headers=headers)

    async def settle(self, admission: Admission, used_tokens: int) -> None:
        """Release the hold and count ``used_tokens``. Idempotent; never raises; survives cancellation."""
        if admission.settled:
            return
        admission.settled = True
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(
            _PendingSettle(
                admission.holder,
                admission.tenant_id,
                admission.period,
                admission.held_tokens,
                max(0, used_tokens),
                admission.reservation_id,
                admission.admission_class,
                done,
                admission.token_rates,
                admission.admitted_at,
            )
        )
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(done)

    def _queue(self, item: _PendingSettle) -> None:
        self._pending.append(item)
        self._settlers.kick()

    async def _flush_loop(self) -> None:
        while self._pending:
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        crossed: list[tuple[str, date, int, int]] = []
        try:
            if len(batch) == 1:
                one = batch[0]
                row = (
                    await self.hot.fetch(
                        _SETTLE_ONE_SQL,
                        one.holder,
                        one.tenant_id,
                        one.period,
                        one.hold,
                        one.used,
                        self.soft_threshold,
                        one.reservation_id,
                        one.admission_class,
                    )
                )[0]
                if row["crossed"]:
                    crossed.append((one.tenant_id, one.period, row["granted"], row["used"]))
            else:
                rows = await self.hot.fetch(
                    _SETTLE_SQL,
                    [item.holder for item in batch],
                    [item.tenant_id for item in batch],
                    [item.period for item in batch],
                    [item.hold for item in batch],
                    [item.used for item in batch],
                    self.soft_threshold,
                    [item.reservation_id for item in batch],
                    [item.admission_class for item in batch],
                )
                crossed += [
                    (r["crossed_tenant_id"], r["crossed_period"], r["crossed_granted"], r["crossed_used"]) for r in rows
                ]
        except Exception:  # the database is away: keep the settles, retry from the heartbeat
            log.exception("settling %d admissions failed; will retry", len(batch))
            self._retry.extend(batch)
        else:
            await self._credit(batch)
        for item in batch:
            if item.done is not None and not item.done.done():
                item.done.set_result(None)
        for tenant_id, period, granted, used in crossed:
            await self._soft_threshold_reached(tenant_id, period, granted, used)

    async def _credit(self, batch: list[_PendingSettle]) -> None:
        """Credit tokens-per-minute limits with what settled requests held and did not use.

        Admission charges a request's whole hold (prompt plus max_tokens) to the limits, as it may
        use that much; charged alone, a limit would count what requests could have used, not what
        they did. A charge drains as time passes (GCRA: n tokens of a limit of r a minute are
        n*60/r seconds of its clock), so only the part not yet drained is credited: crediting more
        would take back other requests' charges made since. One statement for the batch, locking
        the buckets in the order admission takes them (the keys', then the tenants', each by
        scope), so it cannot deadlock with it. Written after the settle; one that fails is made
        again at the next heartbeat (``retry_credits``), worked out anew then: what drained
        meanwhile is no longer credited."""
        now = time.monotonic()
        seconds: dict[tuple[int, str], float] = {}
        for item in batch:
            for kind, scope, rate in item.token_rates:
                per_token = 60.0 / rate
                unused = (item.hold - item.used) * per_token  # negative: it used more than it held
                left = max(0.0, item.hold * per_token - (now - item.admitted_at))
                seconds[kind, scope] = seconds.get((kind, scope), 0.0) + min(unused, left)
        credits = [(kind, scope, secs) for (kind, scope), secs in seconds.items() if secs]
        if not credits:
            return
        try:
            await self.hot.fetch(_CREDIT_SQL, [c[0] for c in credits], [c[1] for c in credits], [c[2] for c in credits])
        except Exception as exc:
            log.warning("crediting tokens-per-minute limits failed (will retry): %r", exc)
            self._credit_retry += [item for item in batch if item.token_rates]
            del self._credit_retry[:-CREDITS_KEPT]

    async def retry_credits(self) -> None:
        """Make the credits that failed (the heartbeat calls this)."""
        if self._credit_retry:
            batch, self._credit_retry = self._credit_retry, []
            await self._credit(batch)

    async def _soft_threshold_reached(self, tenant_id: str, period: date, granted: int, used: int) -> None:
        event = SoftThresholdReached(
            tenant_id=tenant_id,
            period=period.strftime("%Y-%m"),
            granted=granted,
            used=used,
            threshold=self.soft_threshold,
        )
        log.warning(
            "tenant reached the soft quota threshold",
            extra={"tenant_id": event.tenant_id, "period": event.period, "granted": event.granted, "used": event.used},
        )
        try:
            await self.state.nc.publish(SOFT_THRESHOLD_SUBJECT, msgspec.json.encode(event))
        except Exception:
            log.exception("could not publish the soft-threshold event")

    async def _beat(self) -> None:
        """Say we are alive, retry failed settles, and release the holds of limiters that died."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                self.hot.prune()
                await self.pool.execute(
                    "INSERT INTO limiter_instances (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET seen_at = now()",
                    self.holder,
                )
                if self._retry:
                    self._pending.extend(self._retry)
                    self._retry.clear()
                    self._settlers.kick()
                await self.retry_credits()
                released = await self.pool.fetchval("SELECT market_release_dead_holders($1)", STALE_HOLDER_S)
                if released:
                    log.warning("released %d tokens held by api processes that stopped", released)
            except Exception:
                log.exception("limiter heartbeat failed")


def _token_rates(key_id: str, key_tpm: int | None, tenant_id: str, tenant_tpm: int | None) -> TokenRates:
    charged = ((0, key_id, key_tpm), (1, tenant_id, tenant_tpm))
    return tuple((kind, scope, rate) for kind, scope, rate in charged if rate)


_CREDIT_SQL = """
WITH c AS MATERIALIZED (
    SELECT b.scope, x.secs
      FROM rate_limit_buckets b JOIN unnest($1::int[], $2::text[], $3::float8[]) AS x(kind, scope, secs)
           ON x.scope = b.scope
     ORDER BY x.kind, b.scope
       FOR UPDATE OF b)
UPDATE rate_limit_buckets b SET tokens_tat = b.tokens_tat - c.secs FROM c WHERE b.scope = c.scope
"""
"""Move the buckets' token clocks back by each scope's credit (GCRA: a cost of n tokens moved a
limit of r a minute forward by n*60/r seconds; migration 0003)."""


def _ord(row: asyncpg.Record) -> int:
    position: int = row["ord"]
    return position


def limiter_of(state: AppState) -> Limiter:
    limiter: Limiter = state.services["limiter"]
    return limiter


async def start_limiter(state: AppState) -> None:
    """Start-up hook: ``state.services["limiter"]``."""
    limiter = Limiter(state)
    await limiter.start()
    state.services["limiter"] = limiter
    state.closers.append(limiter.close)


def quota_remaining(granted: int, held: int, used: int) -> int:
    return max(0, granted - held - used)

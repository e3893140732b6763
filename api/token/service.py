"""The token path: admission, placement through a scheduler, relay of a node's chunks, usage.

One ``Run`` is one tenant request. ``begin()`` places the job and waits for its first token (or
its end); failures up to then are invisible to the client: the job is placed again on another
node (up to ``MAX_ATTEMPTS``). After the first token the client has seen output, so a failure
ends the response with an error event and only what was delivered is billed. ``finish()`` runs
exactly once whatever happens (completion, error, client disconnect): it settles the quota hold
and stores one UsageEvent in the usage outbox (before the client sees the response end), from
which it is published.

Admission (a PostgreSQL round trip) usually runs beside placement rather than before it: for a
key whose last admission here for the model was recent and left room (``SPECULATE_WINDOW_S``;
each such request takes its share of that room), the job is submitted at once and the admission's
answer is awaited before the client sees anything. A refusal withdraws the job wherever it is (a
scheduler's queue, its node) as soon as it comes, and is the client's error, as if it had come
first: nothing is held, and the tenant is charged nothing. Its price is the node's work on a
refused request until the cancel arrives (usually less than the prefill), which the room rule
keeps to the rare request that runs into a limit another replica or key reached meanwhile; the
marketplace pays the provider for it (a usage event with outcome ``refused``, ``_pay_refused``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import msgspec
import nats.errors
from sqlalchemy import select

from api.auth import Principal
from api.errors import AppError, Forbidden, InvalidRequest, NotFound, Unavailable, UpstreamError
from api.state import AppState
from api.token.outbox import StoredEvent, UsageOutbox
from api.token.relay import (
    LOST,
    FleetWatch,
    Inboxes,
    Question,
    SchedulerWatch,
    UsagePublisher,
    Withdrawn,
)
from api.token.schemas import ChatCompletionRequest, CompletionRequest, estimate_tokens
from market import subjects, wire
from market.aio import TIMED_OUT, Mailbox
from market.db import plain_url
from market.ids import new_id
from market.models import Model, TenantModel

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_ATTEMPTS = 3
RETRYABLE = {"engine_unavailable", "draining", "engine_error", "node_lost", "accept_timeout"}
KEEPALIVE_S = 3.0
"""How often the api tells each node which of its jobs it still relays (``wire.Keepalive``): a node
aborts a job its api stopped asking for (the process died) after ``wire.KEEPALIVE_MISSES`` of these."""
SPECULATE_WINDOW_S = 10.0
"""A key admitted this recently, with room left for another request like the one at hand, has its
next job placed while its admission runs (see the module docstring)."""
CATALOG_TTL_S = 5.0
CATALOG_REFRESH_AHEAD_S = 1.0
"""Within this long of the catalog's expiry, a request reloads it in the background and goes on."""
INTER_CHUNK_TIMEOUT_S = 60.0
LOST_GRACE_S = 2.0
"""How long a node reported lost mid-stream may stay silent before its stream is given up on."""
REFUSED_COUNT_WAIT_S = 2.0
"""How long a refused job's node has, after its cancel, to send its count of the work done."""
_STALLED = object()
"""Queued by a run's watchdog when its node sent nothing for ``INTER_CHUNK_TIMEOUT_S``."""
_CLIENT_GONE = object()
"""Queued by ``Run.client_gone``: the client of a streamed response disconnected."""
_REFUSED = object()
"""Queued when an admission running beside placement refuses: the job is not waited for further."""


class ClientGone(Exception):
    """Raised by ``Run.batches`` once the client of a streamed response has disconnected."""


class _NotAdmitted(Exception):
    """The admission running beside placement refused while the job was being placed or started."""


_placement_decoder = wire.decoder(wire.Placement)


class Limiter(Protocol):
    """What the token path needs from the quota and rate-limit service (``api.limits``)."""

    holder: str
    """This process's id among the limiters (its liveness is their heartbeat)."""

    async def admit(self, principal: Principal, model: str, prompt_tokens: int, max_tokens: int) -> Any: ...

    async def settle(self, admission: Any, used_tokens: int) -> None: ...


class Catalog:
    """Active models from the database, cached for a few seconds per replica.

    While requests keep coming the catalog is reloaded in the background before it expires
    (``CATALOG_REFRESH_AHEAD_S``): otherwise every request in flight when it expired waited for
    the query, once every ``CATALOG_TTL_S``, however long the database took. Only a catalog that
    has expired (an idle replica, a failing database) is reloaded in line.
    """

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._models: dict[str, Model] = {}
        self._loaded_at = -CATALOG_TTL_S
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Task[None] | None = None

    async def all(self) -> dict[str, Model]:
        age = time.monotonic() - self._loaded_at
        if age > CATALOG_TTL_S:
            async with self._lock:
                if time.monotonic() - self._loaded_at > CATALOG_TTL_S:
                    await self._load()
        elif age > CATALOG_TTL_S - CATALOG_REFRESH_AHEAD_S and self._refresh is None:
            self._refresh = asyncio.create_task(self._reload_ahead(), name="catalog-refresh")
        return self._models

    async def _load(self) -> None:
        started = time.monotonic()
        async with self.state.sessions() as session:
            rows = (await session.scalars(select(Model).where(Model.active))).all()
        self._models = {m.name: m for m in rows}
        self._loaded_at = started

    async def _reload_ahead(self) -> None:
        try:
            async with self._lock:
                await self._load()
        except Exception as exc:  # the entry stands until it expires; then a request reloads in line
            log.warning("reloading the model catalog failed: %r", exc)
        finally:
            self._refresh = None

    async def close(self) -> None:
        """Stop a background reload (the database pool is closed after the token service)."""
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh

    async def usable(self, tenant_id: str | None) -> dict[str, Model]:
        """The active models a tenant may use (all of them without an allow-list); what
        ``/v1/models`` lists. Read at each call: listing models is not the hot path."""
        models = await self.all()
        if tenant_id is None:
            return models
        async with self.state.sessions() as session:
            allowed = set(
                (await session.scalars(select(TenantModel.model_name).where(TenantModel.tenant_id == tenant_id))).all()
            )
        return {name: m for name, m in models.items() if name in allowed} if allowed else models

    async def get(self, name: str, tenant_id: str | None = None) -> Model:
        """An active model; with ``tenant_id``, only one the tenant may use (the same 404 else)."""
        model = (await self.all() if tenant_id is None else await self.usable(tenant_id)).get(name)
        if model is None:
            raise NotFound(
                f"The model '{name}' does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
        return model


@dataclass(eq=False)  # identity: runs are kept in a set while placed
class Run:
    """One request's journey; see the module docstring."""

    service: TokenService
    principal: Principal
    kind: Literal["chat", "completion"]
    model: str
    job: wire.Job
    admission: Any
    started_at: float = field(default_factory=time.time)
    node_id: str | None = None
    provider_id: str | None = None
    subject: str | None = None
    queue: Mailbox | None = None
    first: wire.Chunk | None = None
    first_token_at: float | None = None
    engine_ttft_ms: float | None = None
    relayed_tokens: int = 0
    engine_usage: wire.Usage | None = None
    outcome: wire.Outcome | None = None
    finished: bool = False
    """Set by ``finish``: the quota is settled and the usage event submitted."""
    tried: tuple[str | None, str | None] | None = None
    """The node (and its provider) of the last attempt that failed before its first token: a
    request that ends without output anywhere still gets its (zero-token) usage event."""
    placing: bool = False
    """The job was sent to the schedulers and no answer came back (one may hold it, waiting for a
    slot, or its answer was lost): a cancel then withdraws it there."""
    streamed: bool = False
    """The client gets the output as it comes (SSE): a stream is checkpointed while it runs, as
    its client has what was relayed even if this process dies; a whole response is not."""
    checkpointed: bool = False
    """A checkpoint of this stream was (or is being) written: its final event tombstones it."""
    admitting: asyncio.Task[Any] | None = None
    """The admission, while it runs beside placement; ``admission`` or ``refusal`` once it ends."""
    question: Question | None = None
    """The submission waiting for a scheduler's answer: a refusal meanwhile withdraws it."""
    refusal: BaseException | None = None
    """Why the admission that ran beside placement refused the request (what the client gets)."""

    # ---- placement -------------------------------------------------------------------------
    async def begin(self, client_left: Callable[[], Awaitable[object]] | None = None) -> None:
        """Place the job and wait for its first output; raise an AppError if that never comes.

        ``client_left`` returns when the client disconnects: it is watched while the job waits
        for a free slot (and only then, as it costs a task), and ends the wait with ClientGone.

        An admission running beside placement is awaited before this returns: its refusal (and
        not, say, a 503 for want of capacity meanwhile) is what the client gets.
        """
        if self.admitting is not None:
            self.admitting.add_done_callback(self._admission_done)
        try:
            await self._place_and_start(client_left)
        except (AppError, _NotAdmitted):
            refusal = await self.admitted()
            if refusal is None:
                raise
        else:
            refusal = await self.admitted()
            if refusal is None:
                return
        # Withdrawn where it is (waiting at a scheduler, or on its node) and given up on at once.
        if self._reached_node() and not self.finished:
            # It reached a node, which works on it until the cancel: the node's count is awaited
            # in the background, and the provider paid for that work (the tenant is not charged).
            # Taken over before any await, so nothing (a cancelled request) can come between,
            # and its chunks kept from now on (the attempt was closed as the refusal came).
            assert self.subject is not None
            assert self.queue is not None
            self.service.inboxes.reopen(self.subject, self.queue)
            self.finished = True
            self.service.spawn(self._pay_refused())
        else:
            await self._cancel("not_admitted")
            await self.finish("failed")
        raise refusal from None

    def _reached_node(self) -> bool:
        return self.node_id is not None and self.subject is not None and self.queue is not None

    async def _pay_refused(self) -> None:
        """Record the work a node did on a job refused after it was placed there (admission beside
        placement is the marketplace's choice, so its cost is too): a usage event with outcome
        ``refused``, which billing pays the provider for and charges the tenant nothing. The
        node's count comes with its ``end`` after the cancel; the completion tokens the api
        received from it are the cross-check, as for any stream."""
        assert self.queue is not None
        assert self.subject is not None
        self.service.inboxes.reopen(self.subject, self.queue)  # the attempt may have been closed
        try:
            await self._cancel("not_admitted")
        except BaseException:
            self._release_attempt()
            raise
        received = sum(p.tokens for p in self.first.pieces) if self.first is not None else 0
        if self.first is not None and self.first.kind == "end":
            self.engine_usage = self.first.usage  # a short job's whole output came at once
        deadline = time.monotonic() + REFUSED_COUNT_WAIT_S
        try:
            while self.engine_usage is None:
                item = await self.queue.get_within(deadline - time.monotonic())
                if item is TIMED_OUT or item is LOST:
                    break
                if not isinstance(item, wire.Chunk) or item.node_id != self.node_id:
                    continue
                received += sum(p.tokens for p in item.pieces)
                if item.kind == "end":
                    self.engine_usage = item.usage
                elif item.kind == "error":
                    break
        finally:
            self._release_attempt()
            self.service.placed.discard(self)
        self.outcome = "refused"
        self.relayed_tokens = received
        event = self.usage_event("refused", time.time())
        if event.prompt_tokens or event.completion_tokens or event.relayed_completion_tokens:
            await self.service.usage.submit(event)

    def _admission_done(self, task: asyncio.Task[Any]) -> None:
        """A refusal stops the wait for a scheduler's answer, for a slot or for the first token
        (placing a refused job on and on, or waiting out its prefill, only takes capacity from
        admitted work; and a scheduler that does not answer would hold the refusal back)."""
        if _refused(task):
            if self.queue is not None:
                self.queue.put_nowait(_REFUSED)
            if self.question is not None:
                self.question.withdraw()

    def _refused(self) -> bool:
        return self.refusal is not None or (self.admitting is not None and _refused(self.admitting))

    async def admitted(self) -> BaseException | None:
        """Wait for an admission running beside placement: None once admitted (or when none ran),
        else its refusal. Waiting does not cancel the admission (a hold it took is never lost)."""
        task = self.admitting
        if task is not None:
            if not task.done():
                await asyncio.wait((task,))
            self.admitting = None
            if task.cancelled():
                self.refusal = Unavailable("admission was interrupted; retry shortly", headers={"Retry-After": "1"})
            elif task.exception() is not None:
                self.refusal = task.exception()
            else:
                self.admission = task.result()
        return self.refusal

    async def _place_and_start(self, client_left: Callable[[], Awaitable[object]] | None) -> None:
        last_error = "no node could serve the request"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            self.job.attempt = attempt
            self.subject, self.queue = self.service.inboxes.open(self.job.id, attempt)
            self.job.reply = self.subject
            self.job.relay_to = self.service.inboxes.relay_id
            try:
                placement = await self._place(client_left)
                if placement.error == "context_too_long":
                    self._release_attempt()
                    raise InvalidRequest(
                        f"the prompt (about {self.job.prompt_tokens} tokens) is longer than the context any node"
                        f" serves the model '{self.model}' with",
                        code="context_length_exceeded",
                        param="messages" if self.kind == "chat" else "prompt",
                    )
                if placement.error == "tools_unsupported":
                    self._release_attempt()
                    raise InvalidRequest(
                        f"the model '{self.model}' is not served with tool calling here; send it without tools",
                        code="tools_not_supported",
                        param="tools",
                    )
                if placement.error:
                    self._release_attempt()
                    raise Unavailable(
                        f"no capacity for model '{self.model}' right now; retry shortly",
                        code="no_capacity",
                        headers={"Retry-After": str(max(1, round(placement.retry_after_s)))},
                    )
                self.node_id, self.provider_id = placement.node_id, placement.provider_id
                assert self.node_id is not None
                self.service.placed.add(self)
                self.service.fleet.watch(self.node_id, self.subject, self.queue)
                failure = await self._await_first()
            except BaseException:
                self._release_attempt()
                raise
            if failure is None:
                return
            last_error = failure
            await self._cancel("failover")  # a slow node must not run the job for nobody
            log.info(
                "job failed over before its first token",
                extra={"job": self.job.id, "node": self.node_id, "reason": failure, "attempt": attempt},
            )
            if self.node_id and self.node_id not in self.job.exclude_nodes:
                self.job.exclude_nodes.append(self.node_id)
            self._release_attempt()
            self.tried = (self.node_id, self.provider_id)
            self.node_id = self.provider_id = None
        await self.finish("failed")
        raise Unavailable(f"{last_error}; retry shortly", code="no_capacity", headers={"Retry-After": "1"})

    async def _place(self, client_left: Callable[[], Awaitable[object]] | None) -> wire.Placement:
        """Submit, and while every node that serves the model is busy, wait for a free slot.

        A short wait (``queue_timeout_s``) beats a 503 for a burst that lasts milliseconds. The
        first submission asks for an answer at once (the usual case: a slot is free). If none is,
        the job goes again with ``Job.wait_s``: the scheduler keeps it, in order, and answers when
        it places it, while the api watches for the client leaving (then the job is withdrawn).
        Asking again after a growing pause is only for a scheduler that answered ``no_capacity``
        before the time was up (a replica stopping, or one that does not keep jobs). A model that
        no node serves at all is answered at once.
        """
        deadline = time.monotonic() + self.service.settings.queue_timeout_s
        self.job.wait_s = 0.0
        placement = await self._submit()
        if placement.error != "no_capacity":
            return placement
        watcher = asyncio.ensure_future(client_left()) if client_left is not None else None
        pause = 0.01
        try:
            while placement.error == "no_capacity":
                self.job.wait_s = deadline - time.monotonic()
                if self.job.wait_s <= 0 or self._refused():
                    break
                placement = await _unless(self._submit(), watcher, self.admitting)
                if placement.error == "no_capacity" and placement.retry_after_s > 0:
                    # Answered before the time was up by a scheduler that does not keep jobs.
                    pause_s = min(pause, max(0.0, deadline - time.monotonic()))
                    await _unless(asyncio.sleep(pause_s), watcher, self.admitting)
                    pause = min(pause * 2, 0.2)
        finally:
            if watcher is not None:
                watcher.cancel()
        return placement

    async def _submit(self) -> wire.Placement:
        """Ask a scheduler; a replica restarting (no responders for a moment) is retried briefly.

        Every replica answers at once: with a placement, ``no_capacity``, or (a job that may wait,
        ``hold_notice``) ``queued``, after which the wait for its final answer ends early should
        that replica's beats stop: it died, and the answer with it. The job is then handed back as
        ``no_capacity`` with no pause, which submits it again (to a live replica) for the time
        left. A submission nobody answers in twice the accept timeout (a replica that died or
        stalled with it unread, or an answer lost) is sent once more, to whichever replica takes
        it: should the first have placed it after all, only the node the answer names speaks for
        the job, and the other's output is cancelled there.
        """
        first_timeout = self.service.settings.accept_timeout_s * 2
        self.job.hold_notice = self.job.wait_s > 0
        resent = False
        for pause in (0.1, 0.3, None):
            self.placing = True
            try:
                question = await self.service.inboxes.ask(subjects.JOBS_SUBMIT, wire.encode(self.job))
                self.question = question
                if self._refused():  # refused before there was a question to withdraw
                    question.withdraw()
                handed_on = False
                try:
                    try:
                        answer = await question.answer(first_timeout)
                    except nats.errors.TimeoutError:
                        if resent:
                            raise
                        resent = True
                        log.warning("no scheduler answered a submission; sending it again", extra={"job": self.job.id})
                        continue
                    placement = _placement_decoder.decode(answer.data)
                    if placement.error == "queued" and placement.scheduler:
                        placement = await self._held(question, placement.scheduler, first_timeout + self.job.wait_s)
                except (Withdrawn, asyncio.CancelledError):
                    # Refused, or the client left: a scheduler may be placing the job this instant,
                    # and its answer names the node to stop.
                    handed_on = True
                    self.service.spawn(self.service.cancel_late_placement(question, self.job.id))
                    raise
                finally:
                    self.question = None
                    if not handed_on:
                        question.close()
                self.placing = False
                return placement
            except Withdrawn:
                raise _NotAdmitted from None  # still ``placing``: the cancel withdraws it at the schedulers
            except nats.errors.NoRespondersError:
                # Nobody received it, so sending it again cannot place it twice.
                self.placing = False
                if pause is None:
                    break
                await asyncio.sleep(pause)
            except (nats.errors.Error, msgspec.DecodeError):
                break  # unanswered twice, or an answer that makes no sense
        await self.finish("failed")
        raise Unavailable(
            "no scheduler is answering; retry shortly", code="no_capacity", headers={"Retry-After": "1"}
        ) from None

    async def _held(self, question: Question, replica: str, timeout: float) -> wire.Placement:
        """The answer of the replica that keeps the job waiting, or ``no_capacity`` to submit it
        again at once if that replica's beats stop first (nats TimeoutError after ``timeout``)."""
        loop = asyncio.get_running_loop()
        since = loop.time()
        deadline = since + timeout
        watch = self.service.schedulers
        check = self.service.settings.heartbeat_interval_s
        while True:
            try:
                return _placement_decoder.decode((await question.answer(min(check, deadline - loop.time()))).data)
            except nats.errors.TimeoutError:
                if loop.time() >= deadline:
                    raise
                if watch.gone(replica, since):
                    log.warning(
                        "scheduler replica went silent with a job waiting there; submitting it again",
                        extra={"job": self.job.id, "replica": replica},
                    )
                    return wire.Placement(job_id=self.job.id, error="no_capacity", retry_after_s=0.0)

    async def _await_first(self) -> str | None:
        """None when the first output arrived (kept in ``self.first``), else why this attempt failed."""
        assert self.queue is not None
        settings = self.service.settings
        accept_deadline = time.monotonic() + settings.accept_timeout_s
        token_deadline = time.monotonic() + settings.first_token_timeout_s
        accepted = False
        while True:
            if self._refused():
                raise _NotAdmitted
            deadline = token_deadline if accepted else accept_deadline
            item = await self.queue.get_within(deadline - time.monotonic())
            if item is _REFUSED:
                continue  # seen at the top
            if item is TIMED_OUT:
                if not accepted:
                    return "accept_timeout"
                await self._cancel("first_token_timeout")
                await self.finish("failed")
                raise UpstreamError("the engine produced no output in time", code="timeout", status=504)
            if item is LOST:
                return "node_lost"
            chunk: wire.Chunk = item
            if chunk.node_id != self.node_id:
                # Only the node the job was placed on speaks for it (see Inboxes); another one
                # runs it for nobody (placed twice, by a scheduler replica taken for dead). Only
                # this job is cancelled there, whatever the chunk claims.
                if chunk.job_id == self.job.id:
                    self.service.inboxes.orphan(chunk.node_id, chunk)
                continue
            if chunk.kind == "accepted":
                accepted = True
                continue
            if chunk.kind == "error":
                code = chunk.error_code or "engine_error"
                if code == "invalid_request":
                    await self.finish("failed")
                    message = chunk.error or "the engine refused the request"
                    # vLLM says a request does not fit its max_model_len in words only; OpenAI's
                    # code for it is what frameworks check before trimming a conversation.
                    too_long = "maximum context length" in message
                    prompt_param = "messages" if self.kind == "chat" else "prompt"
                    param = None
                    if too_long:
                        param = "max_tokens" if "max_tokens" in message else prompt_param
                    elif "out of vocabulary" in message:  # a token id past the model's (vLLM's words)
                        param = prompt_param
                    raise InvalidRequest(
                        message,
                        code="context_length_exceeded" if too_long else "invalid_request",
                        param=param,
                        status=chunk.status if chunk.status and 400 <= chunk.status < 500 else 400,
                    )
                if code in RETRYABLE:
                    return code
                return "engine_error"
            self.first = chunk
            self.first_token_at = time.time()
            self.engine_ttft_ms = chunk.engine_ttft_ms
            return None

    def _release_attempt(self) -> None:
        if self.subject is not None:
            self.service.inboxes.close(self.subject)
            if self.node_id is not None:
                self.service.fleet.unwatch(self.node_id, self.subject)

    # ---- relay -----------------------------------------------------------------------------
    async def batches(self) -> AsyncIterator[list[wire.Chunk]]:
        """The job's output from the first token on, as the chunks that are ready together.

        Everything already queued is taken at once so the client gets one write for it (a write
        per chunk is the relay's main cost). Ends after ``end``; raises UpstreamError on a node's
        error or loss, after yielding what arrived before it, and ClientGone after ``client_gone``.
        A node silent for ``INTER_CHUNK_TIMEOUT_S`` while we wait for it is given up on: one timer
        per run checks (re-armed as needed), not a timeout scope around every wait.

        A scheduler's word that the node was lost is a judgement from missed heartbeats, which a
        loaded machine can also miss; the stream itself is better evidence. So the node is given
        up on only once it has also sent nothing for ``LOST_GRACE_S`` (a dead node has, as its
        heartbeats stopped well before); output after the report clears it.
        """
        queue = self.queue
        assert queue is not None
        assert self.first is not None
        loop = asyncio.get_running_loop()
        waiting_since: float | None = None
        last_output = loop.time()
        lost = False

        def watch() -> None:
            since, now = waiting_since, loop.time()
            if since is not None and (
                now - since >= INTER_CHUNK_TIMEOUT_S or (lost and now - last_output >= LOST_GRACE_S)
            ):
                queue.put_nowait(_STALLED)
            else:
                at = (since or now) + INTER_CHUNK_TIMEOUT_S
                if lost and since is not None:
                    at = min(at, last_output + LOST_GRACE_S)
                timer[0] = loop.call_at(at, watch)

        timer = [loop.call_later(INTER_CHUNK_TIMEOUT_S, watch)]
        pending: list[Any] = [self.first]
        node_id = self.node_id
        try:
            while True:
                batch: list[wire.Chunk] = []
                for item in pending:
                    if item is _CLIENT_GONE:
                        raise ClientGone
                    if item is _STALLED:
                        if len(pending) > 1:
                            continue  # output came in the same moment: the node is not silent
                        if lost:
                            raise await self._node_lost()
                        await self._cancel("timeout")
                        raise UpstreamError("the engine stopped sending output", code="timeout")
                    if item is LOST:
                        lost = True
                        continue
                    chunk: wire.Chunk = item
                    if chunk.node_id != node_id:
                        if chunk.job_id == self.job.id:  # as in _await_first
                            self.service.inboxes.orphan(chunk.node_id, chunk)
                        continue
                    if chunk.kind == "data" or chunk.kind == "end":
                        lost, last_output = False, loop.time()
                        for piece in chunk.pieces:
                            self.relayed_tokens += piece.tokens
                        batch.append(chunk)
                        if chunk.kind == "end":
                            self.engine_usage = chunk.usage
                            yield batch
                            return
                    elif chunk.kind == "error":
                        if batch:
                            yield batch
                        raise UpstreamError(
                            chunk.error or "the engine failed mid-stream", code=chunk.error_code or "engine_error"
                        )
                if batch:
                    yield batch
                if lost:  # the watchdog looks again when the grace ends (at once if it has)
                    timer[0].cancel()
                    timer[0] = loop.call_at(last_output + LOST_GRACE_S, watch)
                waiting_since = loop.time()
                pending = await queue.take()
                waiting_since = None
        finally:
            timer[0].cancel()

    async def _node_lost(self) -> UpstreamError:
        """Give up on a node reported lost and silent since (cancelled there, should it be alive)."""
        await self._cancel("node_lost")
        return UpstreamError("the provider node serving this request was lost", code="node_lost")

    def client_gone(self) -> None:
        """The client disconnected: ``batches`` raises ClientGone at its next item (no cancellation
        of the streaming task needed, so no cancel scope around every write)."""
        if self.queue is not None:
            self.queue.put_nowait(_CLIENT_GONE)

    async def _cancel(self, reason: str) -> None:
        """Tell the node to abort the job; if a scheduler still holds it waiting for a slot, tell
        the schedulers to drop it (should it have been placed meanwhile, its node's first chunk
        finds no inbox and the api cancels it there: see ``Inboxes``)."""
        subject = subjects.node_cancel(self.node_id) if self.node_id is not None else None
        if subject is None and self.placing:
            subject = subjects.JOBS_WITHDRAW
        if subject is not None:
            with contextlib.suppress(Exception):
                await self.service.state.nc.publish(
                    subject, wire.encode(wire.Cancel(job_id=self.job.id, reason=reason))
                )

    async def cancel_and_finish(self) -> None:
        """The client went away: abort on the node, wait briefly for its final count, then bill."""
        await self._cancel("client_disconnected")
        if self.node_id is not None and self.queue is not None and self.engine_usage is None:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                item = await self.queue.get_within(deadline - time.monotonic())
                if item is TIMED_OUT or item is LOST:
                    break
                if not isinstance(item, wire.Chunk) or item.node_id != self.node_id:
                    continue  # the stall watchdog's marker, or another node's word (see Inboxes)
                if item.kind == "end":
                    self.engine_usage = item.usage
                    break
                if item.kind == "error":
                    break
        await self.finish("cancelled")

    # ---- end -------------------------------------------------------------------------------
    async def finish(self, outcome: wire.Outcome, *, delivered: bool = True) -> None:
        """Settle the quota and publish the usage event: exactly once per request.

        ``delivered=False``: the client received none of the output (a whole response that
        failed after the engine started), so nothing counts against the tenant.
        """
        if self.finished:
            return
        self.finished = True
        if not delivered:
            self.engine_usage, self.first, self.relayed_tokens = None, None, 0
        self.outcome = outcome
        self._release_attempt()
        self.service.placed.discard(self)
        if await self.admitted() is not None:
            # Refused: nothing was held, and the tenant is charged nothing; a node that began on
            # the job is paid for its work (the client left while the admission was awaited).
            if self._reached_node():
                await self._pay_refused()
            return
        if self.node_id is None and self.tried is not None:
            self.node_id, self.provider_id = self.tried
        event = self.usage_event(outcome, time.time())
        if self.service.limiter is not None and self.admission is not None:
            completion = event.completion_tokens if self.engine_usage else self.relayed_tokens
            try:
                await self.service.limiter.settle(self.admission, event.prompt_tokens + completion)
            except Exception:
                log.exception("quota settle failed", extra={"job": self.job.id})
        if self.node_id is None and self.engine_usage is None and self.relayed_tokens == 0:
            return  # never reached a node: nothing was consumed, nothing to record
        await self.service.usage.submit(event, checkpointed=self.checkpointed)

    def usage_event(self, outcome: wire.Outcome, ended: float) -> wire.UsageEvent:
        """The request's usage event, were it to end now with ``outcome``."""
        usage = self.engine_usage
        # Without the engine's report (lost mid-stream), a prompt that produced output was
        # processed: count the api's estimate of it, as the agent does for a cancelled job.
        prompt = usage.prompt_tokens if usage else (self.job.prompt_tokens if self.first is not None else 0)
        # The admission's class bills, also for a job placed while its admission ran (as on_demand).
        admission_class = getattr(self.admission, "admission_class", None) or self.job.admission_class
        return wire.UsageEvent(
            request_id=self.job.id,
            tenant_id=self.job.tenant_id,
            key_id=self.job.key_id,
            model=self.model,
            admission_class=admission_class,
            reservation_id=getattr(self.admission, "reservation_id", None),
            node_id=self.node_id,
            provider_id=self.provider_id,
            prompt_tokens=prompt,
            completion_tokens=usage.completion_tokens if usage else 0,
            relayed_completion_tokens=self.relayed_tokens,
            outcome=outcome,
            started_at=self.started_at,
            ended_at=ended,
            ttft_ms=round((self.first_token_at - self.started_at) * 1000, 3) if self.first_token_at else None,
            engine_ttft_ms=self.engine_ttft_ms,
            duration_ms=round((ended - self.started_at) * 1000, 3),
        )


class TokenService:
    """Everything the token routes need, built once per api replica."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.settings = state.settings
        self.catalog = Catalog(state)
        self.inboxes = Inboxes(state.nc)
        self.fleet = FleetWatch(state.nc)
        self.schedulers = SchedulerWatch(state.nc, state.settings.heartbeat_timeout_s)
        self.usage = UsagePublisher(self.inboxes, UsageOutbox(plain_url(state.settings.require_database_url())))
        self.background: set[asyncio.Task[None]] = set()
        self.placed: set[Run] = set()
        """Runs placed on a node and not finished: what the keepalives name, and (the streams
        past their first token) what ``checkpoint`` writes."""
        self.room: dict[tuple[str, str], tuple[float, tuple[int | None, int | None, int]]] = {}
        """Per key and model: when it was last admitted here, and the room its admission left
        (``Admission.room``) less what admissions running beside placement since may take; what
        decides whether its next admission runs beside placement."""
        self._keepalives: asyncio.Task[None] | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._checkpoint: asyncio.Task[int] | None = None
        """The checkpoint statement under way, if one is: stopping waits for it rather than
        cancelling it (a cancelled statement may still commit, later than anyone expects)."""

    @property
    def limiter(self) -> Limiter | None:
        limiter: Limiter | None = self.state.services.get("limiter")
        return limiter

    async def start(self) -> None:
        await self.inboxes.start()
        await self.fleet.start()
        await self.schedulers.start()
        await self.usage.start()
        self._checkpoints = asyncio.create_task(self._checkpoint_loop(), name="usage-checkpoints")
        self._keepalives = asyncio.create_task(self._keepalive_loop(), name="job-keepalives")

    async def stop(self) -> None:
        """Let requests that are finishing (cancel, settle, usage) end, then flush usage events."""
        if self._keepalives is not None:
            self._keepalives.cancel()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
        if self._checkpoint is not None:
            with contextlib.suppress(Exception):
                await self._checkpoint
        if self.background:
            await asyncio.wait(list(self.background), timeout=5)
        await self.catalog.close()
        await self.usage.stop()
        await self.schedulers.stop()
        await self.inboxes.stop()

    async def checkpoint(self) -> int:
        """Write the usage event each stream in flight would end with now (as a failure: its
        client has a cut stream if this process dies), under this process's limiter id; see
        ``api.token.outbox``. Returns how many were written."""
        holder = self.limiter.holder if self.limiter is not None else None
        runs = [
            run
            for run in self.placed
            if run.streamed
            and run.first is not None
            and not run.finished
            and run.admitting is None
            and run.refusal is None
        ]
        if holder is None or self.usage.outbox is None or not runs:
            return 0
        now = time.time()
        events = [
            StoredEvent(run.job.id, subjects.usage(run.job.tenant_id), wire.encode(run.usage_event("failed", now)))
            for run in runs
        ]
        for run in runs:
            run.checkpointed = True  # before the statement: a final stored meanwhile must tombstone it
        await self.usage.outbox.checkpoint(holder, events)
        return len(events)

    async def keepalive(self) -> int:
        """Tell each node the jobs this process still relays there; returns how many nodes were told."""
        by_node: dict[str, list[str]] = {}
        for run in list(self.placed):
            if run.node_id is not None and not run.finished:
                by_node.setdefault(run.node_id, []).append(run.job.id)
        for node_id, job_ids in by_node.items():
            await self.state.nc.publish(subjects.node_keepalive(node_id), wire.encode(wire.Keepalive(job_ids=job_ids)))
        return len(by_node)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            try:
                await self.keepalive()
            except Exception as exc:  # NATS away: the nodes wait KEEPALIVE_MISSES intervals
                log.warning("sending job keepalives failed: %r", exc)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.usage_checkpoint_s)
            self._checkpoint = asyncio.ensure_future(self.checkpoint())
            try:
                await asyncio.shield(self._checkpoint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next one may succeed; the final events do not depend on it
                log.warning("checkpointing streams in flight failed: %r", exc)

    async def cancel_late_placement(self, question: Question, job_id: str) -> None:
        """A job given up while its submission waited for an answer (refused, or its client left): if
        the answer still comes within twice the accept timeout and places it, the job is cancelled on
        that node. The withdrawal stops a scheduler that still holds it; this one a scheduler that
        placed it just before (a node whose output comes in batches would be told by ``orphan``
        too; one that answers an inbox directly only by this)."""
        deadline = time.monotonic() + self.settings.accept_timeout_s * 2  # as long as a submission waits
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    placement = _placement_decoder.decode((await question.answer(left)).data)
                except Withdrawn:
                    continue  # the marker of a second withdrawal
                if placement.node_id is not None:
                    cancel = wire.Cancel(job_id=job_id, reason="refused")
                    await self.state.nc.publish(subjects.node_cancel(placement.node_id), wire.encode(cancel))
                if placement.error != "queued":
                    return
        except (nats.errors.Error, msgspec.DecodeError):
            return  # no answer in time, or none that places it
        finally:
            question.close()

    def spawn(self, coro: Any) -> None:
        """Run cleanup that must outlive a cancelled request (anyio re-cancels awaits in its scope)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def prepare(
        self,
        principal: Principal,
        kind: Literal["chat", "completion"],
        request: ChatCompletionRequest | CompletionRequest,
        arrived: float | None = None,
    ) -> Run:
        """Validate against the catalog, admit, and build the Job (not yet placed).

        ``arrived`` (unix time) starts the request's clock for its TTFT and duration, so both
        include authentication and admission; by default, now."""
        if principal.tenant_id is None:
            raise Forbidden("the token API needs a tenant key (sk-...)", code="invalid_api_key")
        model = await self.catalog.get(request.model)
        token_ids = request.token_ids() if isinstance(request, CompletionRequest) else None
        if token_ids is not None:
            prompt_tokens = lower_bound = len(token_ids)  # counted, not estimated
        else:
            prompt_text = request.prompt_text()
            prompt_tokens = estimate_tokens(prompt_text)
            lower_bound = max(1, len(prompt_text.encode()) // 8)
        requested = request.requested_max_tokens()
        if requested is not None and lower_bound + requested > model.context_length:
            raise InvalidRequest(
                f"This model's maximum context length is {model.context_length} tokens. However, you requested "
                f"at least {lower_bound + requested} tokens ({lower_bound} in the prompt, {requested} for the "
                "completion). Please reduce the length of the prompt or the completion.",
                code="context_length_exceeded",
                param="max_tokens"
                if isinstance(request, CompletionRequest) or request.max_tokens
                else "max_completion_tokens",
            )
        if lower_bound >= model.context_length:
            raise InvalidRequest(
                f"This model's maximum context length is {model.context_length} tokens; the prompt alone is longer.",
                code="context_length_exceeded",
                param="messages" if kind == "chat" else "prompt",
            )
        max_tokens = requested if requested is not None else max(1, model.context_length - prompt_tokens)
        max_tokens = min(max_tokens, model.context_length)
        capped = False
        if requested is None:
            # Without max_tokens a request may generate what one minute of its tokens-per-minute
            # limit allows (what it leaves unused is credited back when it ends), rather than be
            # refused for good as larger than the limit when the context is.
            rates = [rate for rate in (principal.key_tpm, principal.tenant_tpm) if rate]
            fit = (min(rates) - prompt_tokens) // request.choices if rates else 0
            if 1 <= fit < max_tokens:
                max_tokens, capped = fit, True
        admission, admitting = None, None
        hold = prompt_tokens + max_tokens * request.choices
        if self.limiter is not None:
            admit = self._admit(self.limiter, principal, model.name, prompt_tokens, max_tokens * request.choices)
            if self._take_room((principal.key_id, model.name), hold):
                admitting = asyncio.ensure_future(admit)
            else:
                admission = await admit
        body: dict[str, Any] = {"model": model.name, **request.sampling()}
        if isinstance(request, ChatCompletionRequest):
            body["messages"] = [_message(m) for m in request.messages]
            if request.requested_max_tokens() is not None or capped:
                body["max_tokens"] = max_tokens
        else:
            body["prompt"] = token_ids if token_ids is not None else request.prompt_text()
            body["max_tokens"] = max_tokens
        job = wire.Job(
            id=new_id("request"),
            tenant_id=principal.tenant_id,
            key_id=principal.key_id,
            model=model.name,
            kind=kind,
            body=body,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            reply="",
            deadline=time.time() + self.settings.first_token_timeout_s + 600,
            allowed_providers=list(principal.allowed_providers) if principal.allowed_providers else None,
            max_price_minor_per_million=principal.max_price_minor_per_million,
            keepalive_s=KEEPALIVE_S,
            admission_class=getattr(admission, "admission_class", None) or "on_demand",
            tools=isinstance(request, ChatCompletionRequest) and request.calls_tools,
        )
        return Run(
            service=self,
            principal=principal,
            kind=kind,
            model=model.name,
            job=job,
            admission=admission,
            started_at=arrived if arrived is not None else time.time(),
            streamed=bool(request.stream),
            admitting=admitting,
        )

    async def _admit(
        self, limiter: Limiter, principal: Principal, model: str, prompt_tokens: int, max_tokens: int
    ) -> Any:
        """``limiter.admit``, remembering the room it left for the key (or, refused, that it has none)."""
        key = (principal.key_id, model)
        try:
            admission = await limiter.admit(principal, model, prompt_tokens, max_tokens)
        except AppError:
            self.room.pop(key, None)
            raise
        room = getattr(admission, "room", None)
        if getattr(admission, "reservation_id", None) is not None:
            # Under a reservation the admission decides the class the scheduler serves the job
            # in (reserved first): the next job waits for its admission rather than go unclassed.
            self.room.pop(key, None)
        elif room is not None:
            if len(self.room) >= 100_000:  # keys seen once long ago: forget them all at once
                self.room.clear()
            self.room[key] = (time.monotonic(), room)
        return admission

    def _take_room(self, key: tuple[str, str], hold: int) -> bool:
        """Whether the key's last admission here for this model was recent and left room for one
        more request of ``hold`` tokens; if so the request takes that room, so that a burst runs
        beside placement only as far as the last admission's room goes."""
        seen = self.room.get(key)
        if seen is None or time.monotonic() - seen[0] > SPECULATE_WINDOW_S:
            return False
        requests, tokens, quota = seen[1]
        if (requests is not None and requests < 1) or (tokens is not None and tokens < hold) or quota < hold:
            return False
        left = (
            None if requests is None else requests - 1,
            None if tokens is None else tokens - hold,
            quota - hold,
        )
        self.room[key] = (seen[0], left)
        return True


async def _unless(
    work: Awaitable[T], watcher: asyncio.Future[object] | None, admitting: asyncio.Task[Any] | None = None
) -> T:
    """``work``'s result, unless ``watcher`` (the client leaving) finishes first: then ClientGone;
    or ``admitting`` (an admission running beside placement) refuses first: then _NotAdmitted."""
    if watcher is None and admitting is None:
        return await work
    task = asyncio.ensure_future(work)
    while True:
        others = [w for w in (watcher, admitting) if w is not None and not w.done()]
        try:
            await asyncio.wait((task, *others), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # our caller was cancelled: so is the work
            task.cancel()
            raise
        if task.done():
            return task.result()
        refused = admitting is not None and _refused(admitting)
        if refused or (watcher is not None and watcher.done()):
            break
        # the admission ended and admitted: go on waiting for the work (and the client)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if refused:
        raise _NotAdmitted
    raise ClientGone


def _refused(admitting: asyncio.Task[Any]) -> bool:
    """Whether an admission running beside placement has ended without admitting (refused, or
    interrupted: ``Run.admitted`` turns either into the client's error)."""
    return admitting.done() and (admitting.cancelled() or admitting.exception() is not None)


def _message(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = msgspec.to_builtins(message.tool_calls)
    return out

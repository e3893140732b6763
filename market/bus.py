"""One NATS connection per process, reconnecting forever, the JetStream usage stream, inline
subscriptions, and requests to a subject served in the same process delivered without the server."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import nats
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from market import subjects

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

    from market.settings import Settings

log = logging.getLogger(__name__)


async def connect(
    settings: Settings,
    *,
    name: str,
    url: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    nkey_seed: str | None = None,
    **options: Any,
) -> Client:
    """Connect to NATS with the process's identity; retries forever after the first success.

    Identity, first match wins: a node's own nkey seed, a creds file, a user and password (the
    services'), else the settings' user and password.
    """

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    auth: dict[str, Any] = {}
    if not nkey_seed:
        user = user or settings.nats_user
        password = password or settings.nats_password
        creds = creds or settings.nats_creds
    if nkey_seed:
        auth["nkeys_seed_str"] = nkey_seed
    elif creds:
        auth["user_credentials"] = creds
    elif user:
        auth["user"] = user
        auth["password"] = password or ""
    return await nats.connect(
        servers=[url or settings.require_nats_url()],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **auth,
        **options,
    )


async def ensure_usage_stream(js: JetStreamContext) -> None:
    """Create or update the durable usage stream (file storage, dedup window, never drops new)."""
    config = StreamConfig(
        name=subjects.USAGE_STREAM,
        subjects=[subjects.USAGE_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=30 * 24 * 3600.0,
        duplicate_window=subjects.USAGE_DEDUP_WINDOW_S,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)


class _Inline(asyncio.Queue[Any]):
    """A subscription's pending queue that hands each message to its handler as it is put.

    nats-py parks every message of a callback subscription in an ``asyncio.Queue`` and wakes a task
    per subscription to take it out and await the callback: two queue operations, a task switch
    and a coroutine per message. For the api's chunk inbox (one message per relayed chunk, tens
    of thousands a second) that was a tenth of the process's CPU; a handler that only files the
    message where its reader waits needs none of it. Nothing is ever stored, so ``qsize`` is 0
    and ``join`` (drain) returns at once.
    """

    def __init__(self, sub: Subscription, handler: Callable[[Msg], None]) -> None:
        super().__init__()
        self._sub = sub
        self._handler = handler

    def put_nowait(self, item: Any) -> None:
        self._sub._pending_size -= len(item.data)  # the client counted it as pending; it is not
        try:
            self._handler(item)
        except Exception:  # the client's read loop must never see a handler's failure
            log.exception("inline handler failed on %s", item.subject)


async def subscribe_inline(nc: Client, subject: str, handler: Callable[[Msg], None]) -> Subscription:
    """Subscribe with a plain function called from the client's read loop, in arrival order.

    ``handler`` must not block or await: it runs inside the connection's reader. Uses nats-py's
    subscription internals (``_pending_queue``, ``_pending_size``, checked by the tests that stream
    through it); a client without them gets the documented callback path instead.
    """
    sub = await nc.subscribe(subject)  # no callback: no per-subscription task is started
    if isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue) and hasattr(sub, "_pending_size"):
        sub._pending_queue = _Inline(sub, handler)
        return sub
    await sub.unsubscribe()

    async def callback(msg: Msg) -> None:
        handler(msg)

    return await nc.subscribe(subject, cb=callback)


class LocalMsg:
    """A request to a subject served in this process (``serve_locally``), or its answer.

    It has what a queue-group handler reads of nats-py's ``Msg`` (``subject``, ``data``, ``reply``,
    ``headers``, ``respond``), so the same handler serves both paths; ``respond`` hands the answer
    straight to the asker's ``deliver``.
    """

    __slots__ = ("_deliver", "data", "headers", "reply", "subject")

    def __init__(
        self,
        subject: str,
        data: bytes,
        reply: str = "",
        headers: dict[str, str] | None = None,
        deliver: Callable[[LocalMsg], None] | None = None,
    ) -> None:
        self.subject = subject
        self.data = data
        self.reply = reply
        self.headers = headers
        self._deliver = deliver

    async def respond(self, data: bytes) -> None:
        if self._deliver is not None:
            self._deliver(LocalMsg(self.reply, data))


LocalHandler = Callable[[LocalMsg], Awaitable[None]]
_local: weakref.WeakKeyDictionary[Client, dict[str, LocalHandler]] = weakref.WeakKeyDictionary()


def serve_locally(nc: Client, subject: str, handler: LocalHandler) -> None:
    """Have requests on ``subject`` that go through ``nc`` from this process handed to ``handler``
    in-process, past the NATS server: the submissions of an api replica that hosts a scheduler
    replica (``MARKET_API_SCHEDULER``) skip two process wake-ups on their way to a node. The
    handler stays a member of the subject's queue group on the server for everyone else."""
    _local.setdefault(nc, {})[subject] = handler


def stop_serving_locally(nc: Client, subject: str, handler: LocalHandler) -> None:
    routes = _local.get(nc)
    if routes is not None and routes.get(subject) == handler:  # bound methods: equal, not identical
        del routes[subject]


def local_handler(nc: Client, subject: str) -> LocalHandler | None:
    """The in-process handler of ``subject`` on ``nc``, if one serves it."""
    routes = _local.get(nc)
    return None if routes is None else routes.get(subject)

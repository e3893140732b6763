"""One NATS connection per process, reconnecting forever, and the JetStream usage stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
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

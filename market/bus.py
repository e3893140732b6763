"""One NATS connection per process, reconnecting forever, and the JetStream usage stream."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import nats
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from market import subjects

if TYPE_CHECKING:
    from nats.aio.client import Client
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

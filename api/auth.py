"""Bearer-key authentication and role guards.

A key is looked up by the sha256 of the presented secret (one indexed query), then cached for a
few seconds so the token API's hot path rarely touches the database. A key in use is looked up
again in the background during the last ``REFRESH_AHEAD_S`` of its entry, so its requests never
wait for that query (once every TTL, each of them did, for as long as the database took).
Revocation is broadcast on ``control.keys.revoked`` so every api replica drops the cached key at
once; the short TTL bounds staleness if a broadcast is missed. Expired, revoked and unknown keys
all get a 401; the code says which (``expired_api_key``, ``revoked_api_key``, ``invalid_api_key``)
since the caller holds the key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from sqlalchemy import select

from api.errors import Forbidden, Unauthorized
from api.state import AppState
from market import keys, subjects
from market.models import ApiKey, Tenant

log = logging.getLogger(__name__)

CACHE_TTL_S = 5.0
REFRESH_AHEAD_S = 1.0
"""A cached key used within this long of its entry's expiry is looked up again in the background."""
CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key and what it belongs to."""

    key_id: str
    role: str
    tenant_id: str | None = None
    incubator_id: str | None = None
    provider_id: str | None = None
    scopes: tuple[str, ...] = ()
    expires_at: float | None = None
    key_rpm: int | None = None
    key_tpm: int | None = None
    tenant_rpm: int | None = None
    tenant_tpm: int | None = None
    allowed_providers: tuple[str, ...] | None = None
    max_price_minor_per_million: int | None = None


class KeyRevoked(msgspec.Struct):
    key_id: str
    secret_hash: str | None = None


class Authenticator:
    """Resolves bearer secrets to principals with a small TTL cache shared by the process."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._by_key_id: dict[str, str] = {}
        self._loading: dict[str, asyncio.Future[Principal]] = {}
        """Lookups in flight: a burst on an expired key waits for one query, not one each."""
        self._revocations = 0
        """Bumped by every revocation; a lookup that a revocation overtook is done again."""

    async def start(self) -> None:
        async def on_revoked(msg: Any) -> None:
            self.forget(msgspec.json.decode(msg.data, type=KeyRevoked).key_id)

        await self.state.nc.subscribe(subjects.KEYS_REVOKED, cb=on_revoked)

    def forget(self, key_id: str) -> None:
        self._revocations += 1
        digest = self._by_key_id.pop(key_id, None)
        if digest is not None:
            self._cache.pop(digest, None)

    async def announce_revoked(self, key_id: str) -> None:
        """Tell every replica (including this one) to drop the key now."""
        self.forget(key_id)
        await self.state.nc.publish(subjects.KEYS_REVOKED, msgspec.json.encode(KeyRevoked(key_id=key_id)))

    async def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, secret = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":  # schemes are case-insensitive (RFC 9110, section 11.1)
            raise Unauthorized("missing API key: send 'Authorization: Bearer sk-...'")
        secret = secret.strip()
        if not secret or len(secret) > 200:
            raise Unauthorized("invalid API key")
        digest = keys.digest(secret)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
            if cached[0] - now < REFRESH_AHEAD_S and digest not in self._loading:
                self._lookup(digest)  # in the background: this request goes on with the entry
        else:
            principal = await asyncio.shield(self._loading.get(digest) or self._lookup(digest))
        if principal.expires_at is not None and principal.expires_at <= time.time():
            raise Unauthorized("API key has expired", code="expired_api_key")
        return principal

    async def close(self) -> None:
        """Let lookups under way (background refreshes among them) end before the pool closes."""
        if self._loading:
            await asyncio.wait(list(self._loading.values()), timeout=5)

    def _lookup(self, digest: str) -> asyncio.Future[Principal]:
        """Start the one lookup of ``digest`` that concurrent callers share."""
        loading = self._loading[digest] = asyncio.ensure_future(self._load_and_cache(digest))
        loading.add_done_callback(functools.partial(self._loaded, digest))
        return loading

    def _loaded(self, digest: str, loading: asyncio.Future[Principal]) -> None:
        if self._loading.get(digest) is loading:
            del self._loading[digest]
        if loading.cancelled():
            return
        exc = loading.exception()  # retrieved: its callers may all have gone
        if isinstance(exc, (Unauthorized, Forbidden)):
            # A refresh found the key revoked or its tenant suspended: the entry must not outlive that.
            entry = self._cache.pop(digest, None)
            if entry is not None:
                self._by_key_id.pop(entry[1].key_id, None)
        elif exc is not None and digest in self._cache:
            log.warning("refreshing a cached API key failed; its entry is kept until it expires: %r", exc)

    async def _load_and_cache(self, digest: str) -> Principal:
        for _ in range(3):  # a key revoked during the lookup (maybe this one): look again
            revocations = self._revocations
            principal = await self._load(digest)
            if self._revocations == revocations:
                break
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
            self._by_key_id.clear()
        self._cache[digest] = (time.monotonic() + CACHE_TTL_S, principal)
        self._by_key_id[principal.key_id] = digest
        return principal

    async def _load(self, digest: str) -> Principal:
        async with self.state.sessions() as session:
            row = (
                await session.execute(
                    select(ApiKey, Tenant)
                    .outerjoin(Tenant, Tenant.id == ApiKey.tenant_id)
                    .where(ApiKey.secret_hash == digest)
                )
            ).first()
        if row is None:
            raise Unauthorized("invalid API key")
        key, tenant = row
        if key.revoked_at is not None:
            raise Unauthorized("API key has been revoked", code="revoked_api_key")
        if tenant is not None and tenant.status != "active":
            raise Forbidden("tenant is suspended", code="tenant_suspended")
        return Principal(
            key_id=key.id,
            role=key.role,
            tenant_id=key.tenant_id,
            incubator_id=key.incubator_id,
            provider_id=key.provider_id,
            scopes=tuple(key.scopes or ()),
            expires_at=key.expires_at.timestamp() if key.expires_at else None,
            key_rpm=key.requests_per_minute,
            key_tpm=key.tokens_per_minute,
            tenant_rpm=tenant.requests_per_minute if tenant else None,
            tenant_tpm=tenant.tokens_per_minute if tenant else None,
            allowed_providers=tuple(tenant.allowed_providers) if tenant and tenant.allowed_providers else None,
            max_price_minor_per_million=tenant.max_price_minor_per_million if tenant else None,
        )


def authenticator(state: AppState) -> Authenticator:
    auth: Authenticator = state.services["auth"]
    return auth


async def principal_of(request: Request[Any, Any, Any]) -> Principal:
    """Authenticate once per request; guards and handlers share the result."""
    cached = request.scope.get("state", {}).get("principal")
    if isinstance(cached, Principal):
        return cached
    state: AppState = request.app.state.app_state
    # The raw header, not ``request.headers``: that decodes every header into a new mapping.
    raw = next((v for k, v in request.scope["headers"] if k == b"authorization"), None)
    principal = await authenticator(state).authenticate(raw.decode("latin-1") if raw is not None else None)
    request.scope.setdefault("state", {})["principal"] = principal
    return principal


def _role_guard(*roles: str) -> Any:
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        principal = await principal_of(connection)  # type: ignore[arg-type]
        if principal.role not in roles:
            raise Forbidden(f"this route needs a {' or '.join(roles)} key")

    return guard


require_platform_admin = _role_guard("platform_admin")
require_admin = _role_guard("platform_admin", "incubator_admin")
require_tenant = _role_guard("tenant")
require_provider = _role_guard("provider")


def utcnow() -> datetime:
    return datetime.now(UTC)

"""The Litestar application factory. Importing this module is cheap; ``create_app`` builds the app."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Router, get
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath
from litestar.plugins.prometheus import PrometheusController
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from api.bodies import check_body
from api.errors import EXCEPTION_HANDLERS, NotFound
from api.health import HealthController
from api.state import AppState
from market import __version__, bus, db
from market.ids import ulid
from market.logs import request_id_var
from market.settings import Settings

log = logging.getLogger("api")

Startup = Callable[[AppState], Any]
"""Extra start-up hooks (domain areas register their services on the state)."""


class _Metrics:
    """The request counters and timings Litestar's ``PrometheusMiddleware`` keeps, under its
    names and labels (``litestar_requests_total``, ``litestar_request_duration_seconds``, ...,
    ``app_name="market_api"``), with each label set's children looked up once: that middleware
    builds a ``Request``, a label dict and four ``labels()`` calls per request, which cost 5-8% of
    the api's CPU on the token path (py-spy, one-token requests)."""

    PREFIX = "litestar"
    APP_NAME = "market_api"
    EXCLUDE = frozenset({"/metrics", "/healthz", "/readyz"})

    def __init__(self) -> None:
        labels = ["method", "path", "status_code", "app_name"]
        self.count = _metric(Counter, f"{self.PREFIX}_requests_total", "Total requests", labels)
        self.errors = _metric(Counter, f"{self.PREFIX}_requests_error_total", "Total errors in requests", labels)
        self.time = _metric(
            Histogram, f"{self.PREFIX}_request_duration_seconds", "Request duration, in seconds", labels
        )
        self.running = _metric(
            Gauge, f"{self.PREFIX}_requests_in_progress", "Total requests currently in progress", labels
        )
        self._ended: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._running: dict[tuple[str, str], Any] = {}

    def started(self, method: str, path: str) -> Any:
        gauge = self._running.get((method, path))
        if gauge is None:
            gauge = self._running[(method, path)] = self.running.labels(method, path, 200, self.APP_NAME)
        gauge.inc()
        return gauge

    def ended(self, method: str, path: str, status: int, seconds: float) -> None:
        children = self._ended.get((method, path, status))
        if children is None:
            values = (method, path, status, self.APP_NAME)
            children = self._ended[(method, path, status)] = (
                self.count.labels(*values),
                self.time.labels(*values),
                self.errors.labels(*values) if status >= 500 else None,
            )
        count, timing, errors = children
        count.inc()
        timing.observe(seconds)
        if errors is not None:
            errors.inc()


def _metric(kind: type[Any], name: str, documentation: str, labels: list[str]) -> Any:
    """The process's collector called ``name``: one per process however many apps are built (tests)."""
    existing = REGISTRY._names_to_collectors.get(name)  # no public look-up
    return existing if existing is not None else kind(name, documentation, labels)


def observe_middleware(app: ASGIApp) -> ASGIApp:
    """Give every request an id (or keep the caller's ``X-Request-Id``), echo it, log with it, and
    count and time it for ``/metrics``: one wrapper around ``send`` for both."""
    metrics = _Metrics()

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = incoming.decode("latin-1")[:64] if incoming else "req_" + ulid().lower()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        path: str = scope.get("path_template", "<unmatched>")  # bounded: never the raw path
        timed = path not in metrics.EXCLUDE
        method: str = scope["method"]
        started = time.perf_counter()
        status, seconds = 200, 0.0  # seconds: to the last body message

        async def send_with_id(message: Message) -> None:
            nonlocal status, seconds
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                headers = message["headers"]
                # A token request's id becomes its job's once it has one (the usage event's key).
                if isinstance(headers, list) and not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", state.get("request_id", request_id).encode("latin-1")))
            elif message["type"] == "http.response.body":
                seconds = time.perf_counter() - started
            await send(message)

        gauge = metrics.started(method, path) if timed else None
        try:
            await app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            if gauge is not None:
                gauge.dec()
                metrics.ended(method, path, status, seconds)

    return middleware


SERVER_SEND = "market.server_send"
"""Scope state key of the ASGI server's own ``send``."""


class MarketApp(Litestar):
    """The api's Litestar app; keeps the server's own ``send`` in the scope for the token relay,
    whose body writes skip the middleware (see ``api.token.sse``)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    route_handlers: Sequence[Any] = (),
    on_startup: Sequence[Startup] = (),
) -> Litestar:
    """Build the api. The token, admin, tenant and provider routes come in ``route_handlers``."""

    @get("/{path:str}", include_in_schema=False, sync_to_thread=False)
    def no_such_schema_page(path: FromPath[str]) -> None:
        """Litestar answers an unknown page under ``/schema`` with an HTML page; this one, put on the
        schema's router before Litestar adds its own, takes its place (a test holds Litestar to it)
        with a problem+json 404, as every other route."""
        raise NotFound(f"no schema page {path!r}: the schema is at /schema/openapi.json, its pages at /schema")

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine = db.create_engine(settings)
        nc = await bus.connect(settings, name=f"api-{ulid()[-8:].lower()}")
        js = nc.jetstream()
        await bus.ensure_usage_stream(js)
        state = AppState(settings=settings, engine=engine, sessions=db.session_factory(engine), nc=nc, js=js)
        app.state.app_state = state
        for hook in on_startup:
            result = hook(state)
            if hasattr(result, "__await__"):
                await result
        started = time.monotonic()
        log.info("api ready", extra={"startup_ms": round((time.monotonic() - started) * 1000, 1)})
        try:
            yield
        finally:
            for closer in reversed(state.closers):
                await closer()
            await nc.drain()
            await engine.dispose()

    def provide_state(request: Request[Any, Any, Any]) -> AppState:
        state: AppState = request.app.state.app_state
        return state

    config = AppConfig(
        route_handlers=[HealthController, PrometheusController, *route_handlers],
        dependencies={"app_state": Provide(provide_state, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[observe_middleware],
        before_request=check_body,
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(
            title="Compute Market",
            version=__version__,
            description="Token API (OpenAI-compatible), admin, tenant and provider APIs.",
            path="/schema",
            openapi_router=Router("/schema", route_handlers=[no_such_schema_page], include_in_schema=False),
        ),
        request_max_body_size=settings.max_body_bytes,
        debug=False,
    )
    return MarketApp.from_config(config)

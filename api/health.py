"""Liveness and readiness: ``/healthz`` says the process runs, ``/readyz`` that it can serve."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from sqlalchemy import text

from api.state import AppState


class HealthController(Controller):
    include_in_schema = True
    tags = ["health"]

    @get("/healthz", sync_to_thread=False)
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz")
    async def readyz(self, app_state: NamedDependency[AppState]) -> Response[dict[str, Any]]:
        checks = {"postgres": await _check_postgres(app_state), "nats": _check_nats(app_state)}
        ready = all(value == "ok" for value in checks.values())
        return Response(
            {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
        )


async def _check_postgres(state: AppState) -> str:
    try:
        async with asyncio.timeout(2), state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # readiness reports any failure rather than raising
        return f"unreachable: {type(exc).__name__}"
    return "ok"


def _check_nats(state: AppState) -> str:
    return "ok" if state.nc.is_connected else "disconnected"

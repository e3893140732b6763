"""OpenAI-compatible token routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Bodies are read raw and decoded with msgspec (see ``schemas``) so every validation error carries
OpenAI's error shape. Errors before the first token are HTTP errors with the right status;
after it, a streamed response ends with an error event (the status line is already sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Literal

from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath

from api.auth import principal_of
from api.errors import AppError
from api.state import AppState
from api.token.format import StreamFormatter, ToolCalls, whole_response
from api.token.schemas import decode_chat, decode_completion
from api.token.service import ClientGone, Run, TokenService
from api.token.sse import RelayStream
from market.logs import request_id_var
from market.wire import TokenLogprob, Usage

log = logging.getLogger(__name__)


def token_service(request: Request[Any, Any, Any]) -> TokenService:
    state: AppState = request.app.state.app_state
    service: TokenService = state.services["token"]
    return service


class TokenController(Controller):
    path = "/v1"
    tags = ["token API"]

    @get("/models")
    async def list_models(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The models this marketplace sells that the caller's organisation may use."""
        principal = await principal_of(request)
        models = await token_service(request).catalog.usable(principal.tenant_id)
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name,
                    "object": "model",
                    "created": int(m.created_at.timestamp()),
                    "owned_by": m.owned_by,
                    "context_length": m.context_length,
                }
                for m in models.values()
            ],
        }

    @get("/models/{model_id:path}")
    async def get_model(self, request: Request[Any, Any, Any], model_id: FromPath[str]) -> dict[str, Any]:
        principal = await principal_of(request)
        m = await token_service(request).catalog.get(model_id.lstrip("/"), principal.tenant_id)
        return {
            "id": m.name,
            "object": "model",
            "created": int(m.created_at.timestamp()),
            "owned_by": m.owned_by,
            "context_length": m.context_length,
        }

    @post("/chat/completions", status_code=200)
    async def chat_completions(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Create a chat completion (OpenAI's request and response format; ``stream`` supported)."""
        return await _complete(request, "chat")

    @post("/completions", status_code=200)
    async def completions(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Create a text completion (OpenAI's legacy completions format; ``stream`` supported)."""
        return await _complete(request, "completion")


async def _complete(request: Request[Any, Any, Any], kind: Literal["chat", "completion"]) -> Response[Any]:
    arrived = time.time()
    principal = await principal_of(request)
    body = await request.body()
    parsed = decode_chat(body) if kind == "chat" else decode_completion(body)
    service = token_service(request)
    run = await service.prepare(principal, kind, parsed, arrived)
    # From here on the request is its job: responses (errors too) and logs carry the usage event's id.
    request.scope["state"]["request_id"] = run.job.id
    request_id_var.set(run.job.id)
    try:
        await run.begin(lambda: _wait_disconnect(request))
    except ClientGone:
        # The client left while its request waited for a slot: it was withdrawn, nothing ran.
        run.service.spawn(run.cancel_and_finish())
        return Response(b"", status_code=499)
    except asyncio.CancelledError:
        run.service.spawn(run.cancel_and_finish())
        raise
    except BaseException:
        run.service.spawn(run.finish("failed"))
        raise
    # The admission may have run beside placement: its headers are known only now.
    headers = dict(getattr(run.admission, "headers", None) or {})
    headers["x-request-id"] = run.job.id
    created = int(run.started_at)
    if parsed.stream:
        return RelayStream(
            run,
            StreamFormatter(kind, run.job.id, run.model, created),
            parsed.include_usage,
            {**headers, "cache-control": "no-cache"},
        )
    return await _whole(request, run, kind, created, headers)


async def _whole(
    request: Request[Any, Any, Any], run: Run, kind: str, created: int, headers: dict[str, str]
) -> Response[Any]:
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    logprobs: dict[int, list[TokenLogprob]] | None = {} if run.job.body.get("logprobs") is not None else None
    tool_calls: dict[int, ToolCalls] = {}

    async def collect() -> None:
        async for batch in run.batches():
            for chunk in batch:
                for piece in chunk.pieces:
                    texts.setdefault(piece.index, []).append(piece.text)
                    if piece.finish_reason:
                        finish[piece.index] = piece.finish_reason
                    if logprobs is not None and piece.logprobs:
                        logprobs.setdefault(piece.index, []).extend(piece.logprobs)
                    if piece.tool_calls:
                        tool_calls.setdefault(piece.index, ToolCalls()).add(piece.tool_calls)

    disconnect = asyncio.create_task(_wait_disconnect(request))
    work = asyncio.create_task(collect())
    try:
        await asyncio.wait({work, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            run.service.spawn(run.cancel_and_finish())
            with contextlib.suppress(BaseException):
                await work
            return Response(b"", status_code=499)
        try:
            work.result()
        except AppError:
            # A whole response failed: the client got nothing, so nothing is billed.
            run.service.spawn(run.finish("failed", delivered=False))
            raise
    except asyncio.CancelledError:
        work.cancel()
        run.service.spawn(run.cancel_and_finish())
        raise
    finally:
        disconnect.cancel()
    usage = run.engine_usage or Usage(0, run.relayed_tokens)
    await run.finish("completed")
    return Response(
        whole_response(kind, run.job.id, run.model, created, texts, finish, usage, logprobs, tool_calls),
        media_type="application/json",
        headers=headers,
    )


async def _wait_disconnect(request: Request[Any, Any, Any]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def start_token_service(state: AppState) -> None:
    service = TokenService(state)
    await service.start()
    state.services["token"] = service
    state.closers.append(service.stop)


__all__ = ["TokenController", "start_token_service"]

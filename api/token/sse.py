"""The streamed (SSE) response of the token routes.

Litestar's ``Stream`` runs every response in an anyio task group (a cancel scope and a disconnect
listener) and passes each write through the app's middleware, which only looks at the response
start and the end (status, request id, metrics: the request's duration ends with its last body
message). At a write per token that overhead was a sizeable part of the api's CPU. Here the start
and the last message go through the middleware as usual, the tokens between them are written
straight to the server's ``send`` (kept in the scope by ``api.app.MarketApp``), and a disconnect
is noticed by one plain task that tells the run, which then ends the relay loop at its next item.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from litestar import Request
from litestar.background_tasks import BackgroundTask, BackgroundTasks
from litestar.datastructures import Cookie
from litestar.response import Stream
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Scope, Send, TypeEncodersMap

from api.app import SERVER_SEND
from api.errors import AppError
from api.token.format import DONE, StreamFormatter
from api.token.service import ClientGone, Run
from market.wire import Usage


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover - makes this an async generator


class RelayStream(Stream):
    """Streams one run's output as OpenAI's server-sent events."""

    def __init__(self, run: Run, fmt: StreamFormatter, include_usage: bool, headers: dict[str, str]) -> None:
        super().__init__(_nothing(), media_type="text/event-stream", headers=headers)
        self.run = run
        self.fmt = fmt
        self.include_usage = include_usage

    def to_asgi_response(
        self,
        app: Any,
        request: Request[Any, Any, Any],
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Any = None,
        encoded_headers: Any = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: Any = None,
        status_code: int | None = None,
        type_encoders: TypeEncodersMap | None = None,
    ) -> ASGIStreamingResponse:
        cookie_list: list[Cookie] = list(itertools.chain(self.cookies, cookies or ()))
        return _RelayResponse(
            self,
            background=self.background or background,
            content_length=0,
            cookies=cookie_list,
            encoded_headers=encoded_headers,
            headers={**headers, **self.headers} if headers is not None else self.headers,
            is_head_response=is_head_response,
            iterator=self.iterator,
            media_type="text/event-stream",
            status_code=self.status_code or status_code,
        )


class _RelayResponse(ASGIStreamingResponse):
    def __init__(self, stream: RelayStream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        write: Send = scope["state"].get(SERVER_SEND) or send
        cork = _corker(write)
        if cork is not None:
            cork(True)  # the headers wait for the first token: one segment, one wake-up of the client
        run = self.stream.run
        watcher: asyncio.Task[None] | None = None
        try:
            await self.start_response(send=send)
            watcher = asyncio.create_task(_watch_disconnect(receive, run))
            try:
                await _relay(run, self.stream.fmt, self.stream.include_usage, write, send, cork)
            except ClientGone:
                # Nothing reaches the client any more; this ends the request for the middleware (metrics).
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if cork is not None:
                cork(False)
            if watcher is not None:
                watcher.cancel()
            if not run.finished:
                # The client went away, or the server cancelled the response.
                run.service.spawn(run.cancel_and_finish())
        await self.after_response()


async def _relay(
    run: Run,
    fmt: StreamFormatter,
    include_usage: bool,
    write: Send,
    send: Send,
    cork: Callable[[bool], None] | None = None,
) -> None:
    """Tokens through ``write`` (the server's own send), the end through ``send`` (the middleware's);
    the socket, corked while the headers wait, is uncorked with the first token."""
    first = True
    try:
        async for batch in run.batches():
            out = b"".join(fmt.pieces(chunk.pieces) for chunk in batch if chunk.pieces)
            if out:
                if first:  # the stream's TTFT ends when its first token leaves for the client
                    run.first_token_at = time.time()
                    first = False
                await write({"type": "http.response.body", "body": out, "more_body": True})
            if cork is not None:
                cork(False)  # after the first batch (a no-op after that): the headers never wait longer
        usage = run.engine_usage or Usage(0, run.relayed_tokens)
        await run.finish("completed")
        end = fmt.usage(usage) + DONE if include_usage else DONE
    except AppError as exc:
        await run.finish("failed")
        end = fmt.error(exc.message, exc.code) + DONE
    await send({"type": "http.response.body", "body": end, "more_body": False})


def _corker(send: Send) -> Callable[[bool], None] | None:
    """Sets TCP_CORK on the response's socket, where the server is uvicorn on Linux; else None.

    uvicorn writes the headers the moment the response starts and the first token in a second
    system call: two segments, and on a busy core the client woke for the headers and ran before
    the api got back to write the token. Corked in between, the kernel sends both as one. Any
    other server (or platform) just sends them as before."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    cork_option = getattr(socket, "TCP_CORK", None)
    if transport is None or cork_option is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None

    corked = False

    def cork(on: bool) -> None:
        nonlocal corked
        if on != corked:
            corked = on
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, cork_option, 1 if on else 0)

    return cork


async def _watch_disconnect(receive: Receive, run: Run) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while (await receive())["type"] != "http.disconnect":
            pass
        run.client_gone()

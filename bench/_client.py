"""A lean HTTP/1.1 client for the load generator: streamed completions on keep-alive connections.

The load generator shares a core with the services it measures (and, in the control-plane run,
with the simulated nodes), so every CPU-second it spends is one the api waits for. aiohttp's
streaming reader costs a few Python calls per line; here ``httptools`` (llhttp, in C, installed
with uvicorn) parses the response and removes the chunked framing, and each server-sent event
is one ``msgspec`` decode of the two fields that are counted. A stream's first token is timed
when its bytes arrive, not when a task resumes to read them.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools
import msgspec


class _Choice(msgspec.Struct):
    text: str | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Event(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None


_decode_event = msgspec.json.Decoder(_Event).decode
_encode = msgspec.json.encode


@dataclass
class Answer:
    """One streamed response, as the load generator counts it."""

    status: int = 0
    first: float | None = None
    """``time.perf_counter()`` when the first event with text arrived."""
    tokens: int = 0
    """Completion tokens: the usage chunk's count, else one per event with text."""
    events: int = 0
    """Events with text: the chunks the server wrote (several tokens may share one)."""
    request_id: str | None = None
    error_body: bytearray = field(default_factory=bytearray)


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer = Answer()
        self.done: asyncio.Future[None] | None = None
        self.buffer = b""
        self.keep_alive = True
        self.framed = False
        """The response says where its body ends (a length or chunks), not the connection's end."""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:  # a callback's own failure is the context
            self._fail(ConnectionError(f"unparsable response: {exc} ({exc.__context__!r})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if exc is None and self.answer.status and not self.framed:
            # A body that ends with the connection (neither a length nor chunks): llhttp without
            # ``feed_eof`` cannot see its end, but the closed connection is it.
            self.on_message_complete()
            return
        self._fail(ConnectionError(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        self.keep_alive = False
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"x-request-id":
            self.answer.request_id = value.decode()
        elif name in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.answer.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        answer = self.answer
        if answer.status != 200:
            answer.error_body += body[: max(0, 200 - len(answer.error_body))]
            return
        *events, self.buffer = (self.buffer + body).split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            decoded = _decode_event(event[6:])
            for choice in decoded.choices:
                if choice.text:
                    if answer.first is None:
                        answer.first = time.perf_counter()
                    answer.tokens += 1
                    answer.events += 1
            if decoded.usage is not None:
                answer.tokens = decoded.usage.completion_tokens

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


class StreamClient:
    """POSTs to one URL, each caller on a connection of its own (``slot``), reopened when the
    server closed it."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\n{extra}Content-Length: "
        ).encode()
        self.connections: dict[int, _Connection] = {}

    async def post(self, slot: int, body: object, timeout: float = 600) -> Answer:
        """Send ``body`` as JSON and read the whole response; raises ``ConnectionError`` or
        ``TimeoutError`` when the exchange fails."""
        conn = self.connections.get(slot)
        if conn is None or conn.transport is None or not conn.keep_alive:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
            self.connections[slot] = conn
        payload = _encode(body)
        conn.answer = Answer()
        conn.buffer = b""
        conn.framed = False
        conn.done = asyncio.get_running_loop().create_future()
        assert conn.transport is not None
        conn.transport.write(self.head + b"%d\r\n\r\n" % len(payload) + payload)
        try:
            async with asyncio.timeout(timeout):
                await conn.done
        except BaseException:
            # Timed out or cancelled mid-response: the rest of it would arrive as the next
            # request's answer, so the connection is dropped rather than used again.
            conn.keep_alive = False
            if conn.transport is not None:
                conn.transport.close()
            self.connections.pop(slot, None)
            raise
        return conn.answer

    def close(self) -> None:
        for conn in self.connections.values():
            if conn.transport is not None:
                conn.transport.close()
        self.connections.clear()

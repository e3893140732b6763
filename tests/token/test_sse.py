"""The streamed response's socket handling (Linux, as the api's servers), on real TCP sockets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from api.token.sse import _corker


class _Cycle:
    """What ``_corker`` reads of uvicorn's request cycle: its bound ``send`` and ``transport``."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport

    async def send(self, message: dict[str, Any]) -> None:
        self.transport.write(message["body"])


def _received(peer: socket.socket) -> bytes:
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


async def test_the_headers_leave_with_the_first_token_in_one_segment() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    client.setblocking(False)
    server_sock, _ = await asyncio.get_running_loop().sock_accept(listener)
    _, writer = await asyncio.open_connection(sock=server_sock)
    try:
        cork = _corker(_Cycle(writer.transport).send)
        assert cork is not None
        cork(True)
        writer.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        await asyncio.sleep(0.05)
        assert _received(client) == b"", "the headers wait while the socket is corked"
        writer.transport.write(b"data: first\n\n")
        cork(False)
        await asyncio.sleep(0.05)
        assert _received(client) == b"HTTP/1.1 200 OK\r\n\r\ndata: first\n\n"
        writer.transport.write(b"data: next\n\n")  # uncorked: each write leaves at once
        await asyncio.sleep(0.05)
        assert _received(client) == b"data: next\n\n"
    finally:
        writer.close()
        client.close()
        listener.close()


def test_no_cork_without_a_server_transport() -> None:
    async def plain_send(message: dict[str, Any]) -> None:
        pass

    assert _corker(plain_send) is None

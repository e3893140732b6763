"""The HTTP server's own answers, in the api's error formats.

uvicorn refuses a request it cannot parse (its framing: a negative, doubled or non-numeric
Content-Length, one beside chunked Transfer-Encoding, a bad chunk size, an unknown method)
before the app sees it, with a plain-text 400. Clients of the token API parse OpenAI's error
body, and every other client RFC 9457's; they get those here too.
"""

from __future__ import annotations

from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.errors import error_media_type, error_payload

UNPARSABLE = "the HTTP request could not be parsed: check its request line, Content-Length and Transfer-Encoding"


class MarketHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering an unparsable request in the format of the API its
    path names, as far as the path was read (the connection then closes, as uvicorn's does)."""

    def send_400_response(self, msg: str) -> None:
        url: bytes = getattr(self, "url", b"") or b""
        path = url.split(b"?", 1)[0].decode("latin-1") or "/"
        body = msgspec.json.encode(
            error_payload(
                path, 400, UNPARSABLE, code="invalid_request", openai_type="invalid_request_error", title="Bad Request"
            )
        )
        media_type = error_media_type(path).encode("ascii")
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: " + media_type + b"\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()


def server_options() -> dict[str, Any]:
    """What ``uvicorn.Config`` takes for the api, wherever it is served (``market api``, tests)."""
    return {"http": MarketHttpProtocol, "log_config": None, "access_log": False, "lifespan": "on"}

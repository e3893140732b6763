"""Request bodies decoded with msgspec, every failure a 400 that names the field.

The token routes and the fleet routes read raw bodies (the token path for speed, both to keep
the error in their own format); the other routes' ``JSONBody`` is checked by ``strict_json_body``
first (in ``check_body``, every request's hook). All share this one decoder so the messages match.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.enums import RequestEncodingType
from litestar.params import BodyKwarg

from api.errors import InvalidRequest, UnsupportedMediaType

T = TypeVar("T")


_LONE_SURROGATE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")
"""A high surrogate escape (after an even run of backslashes: not itself escaped) with no low one after it."""
_PATH = re.compile(r"`\$\.([^`]+)`")
"""The field msgspec names in its message (``at `$.a.b``` or ``at `key` in `$.a```): the error's ``param``."""


def decode_body(body: bytes, decoder: msgspec.json.Decoder[T], *, empty: bytes | None = None) -> T:
    """Decode ``body``; an empty one is refused, or read as ``empty`` where every field has a default."""
    if not body:
        if empty is None:
            raise InvalidRequest("request body is empty; send a JSON object")
        body = empty
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        path = _PATH.search(message)
        param = path.group(1).replace("[...]", "") if path else None
        raise InvalidRequest(f"invalid request: {message}", param=param) from None
    except msgspec.DecodeError as exc:
        if "truncated" in str(exc) and _LONE_SURROGATE.search(body):
            # msgspec calls an unpaired high surrogate escape the end of its input
            raise InvalidRequest(
                "request body is not valid JSON: an escaped high surrogate (\\uD800-\\uDBFF) must be "
                "followed by an escaped low surrogate (\\uDC00-\\uDFFF)"
            ) from None
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # msgspec's own depth limit is far above what any of our bodies nests
        raise InvalidRequest("request body is nested too deeply") from None


_STRICT: dict[Any, msgspec.json.Decoder[Any] | None] = {}
_IDENTITY = (b"", b"identity")


async def check_body(request: Request[Any, Any, Any]) -> None:
    """Every route's body, before its handler: encoded plainly, and strictly typed where JSON.

    No body is decompressed here, and a compressed one read as JSON would fail in words about
    JSON that hide the cause: a body sent with a ``Content-Encoding`` other than identity is a
    415 saying so (a request without a body is not judged by the header)."""
    encoding, has_body = None, False
    for name, value in request.scope["headers"]:
        if name == b"content-encoding":
            encoding = value
        elif name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            has_body = True
    if has_body and encoding is not None and encoding.strip().lower() not in _IDENTITY:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding.decode('latin-1')!r} is not supported: send the body uncompressed"
        )
    await strict_json_body(request)


async def strict_json_body(request: Request[Any, Any, Any]) -> None:
    """Decode a route's JSON body (``data: JSONBody[T]``) strictly before Litestar does.

    Litestar converts the whole signature with ``msgspec.convert(strict=False)``, as query strings
    need, which also takes ``"5"``, ``"1e3"`` or ``1.0`` for an integer field of a body (a money
    amount among them) and ``"0"`` for a boolean. The body is read once (Litestar keeps it), so
    the handler still gets its typed ``data``; what the strict decoder refuses is a 400 naming
    the field, in the same words as the routes that decode their bodies themselves.
    """
    handler = request.route_handler
    if handler not in _STRICT:
        field = handler.parsed_data_field
        _STRICT[handler] = (
            msgspec.json.Decoder(field.annotation)
            if field is not None
            and isinstance(field.kwarg_definition, BodyKwarg)
            and field.kwarg_definition.media_type == RequestEncodingType.JSON
            else None
        )
    decoder = _STRICT[handler]
    if decoder is not None:
        body = await request.body()
        if body:  # an empty body is Litestar's to refuse (or to read as None where that is allowed)
            decode_body(body, decoder)

"""Request bodies decoded with msgspec, every failure a 400 that names the field.

The token routes and the fleet routes read raw bodies (the token path for speed, both to keep
the error in their own format); they share this one decoder so the messages match.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from api.errors import InvalidRequest

T = TypeVar("T")


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
        param = message.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in message else None
        raise InvalidRequest(f"invalid request: {message}", param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None

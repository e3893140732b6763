"""OpenAI response shapes: whole responses and server-sent-event chunks, as bytes.

Built by hand with msgspec rather than through a framework serializer: this is the hot path of
every streamed token.
"""

from __future__ import annotations

from typing import Any

import msgspec

from market.wire import Piece, Usage

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def response_id(kind: str, request_id: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id.removeprefix("req_")


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class StreamFormatter:
    """Turns wire Pieces into OpenAI streaming chunks for one response."""

    def __init__(self, kind: str, request_id: str, model: str, created: int) -> None:
        self.kind = kind
        self.id = response_id(kind, request_id)
        self.model = model
        self.created = created
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._started: set[int] = set()
        # What every chunk of this response repeats, encoded once: a token's event only encodes
        # its choices (the same bytes as encoding the whole dict, in the same key order).
        self._head = (
            b'data: {"id":'
            + _json.encode(self.id)
            + b',"object":'
            + _json.encode(self.object)
            + b',"created":'
            + _json.encode(created)
            + b',"model":'
            + _json.encode(model)
            + b',"choices":'
        )

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return b"data: " + _json.encode(body) + b"\n\n"

    def pieces(self, pieces: list[Piece]) -> bytes:
        choices: list[dict[str, Any]] = []
        for piece in pieces:
            if self.kind == "chat":
                delta: dict[str, Any] = {"content": piece.text} if piece.text else {}
                if piece.index not in self._started:
                    self._started.add(piece.index)
                    delta = {"role": "assistant", "content": piece.text}
                choices.append(
                    {"index": piece.index, "delta": delta, "logprobs": None, "finish_reason": piece.finish_reason}
                )
            else:
                choices.append(
                    {"index": piece.index, "text": piece.text, "logprobs": None, "finish_reason": piece.finish_reason}
                )
        return self._head + _json.encode(choices) + b"}\n\n"

    def usage(self, usage: Usage) -> bytes:
        return self._event([], usage_body(usage))

    @staticmethod
    def error(message: str, code: str, kind: str = "server_error") -> bytes:
        return (
            b"data: "
            + _json.encode({"error": {"message": message, "type": kind, "param": None, "code": code}})
            + b"\n\n"
        )


def whole_response(
    kind: str,
    request_id: str,
    model: str,
    created: int,
    texts: dict[int, list[str]],
    finish: dict[int, str | None],
    usage: Usage,
) -> bytes:
    """A non-streamed response from the pieces collected for each choice."""
    choices: list[dict[str, Any]] = []
    for index in sorted(texts) or [0]:
        text = "".join(texts.get(index, []))
        if kind == "chat":
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish.get(index) or "stop",
                }
            )
        else:
            choices.append(
                {"index": index, "text": text, "logprobs": None, "finish_reason": finish.get(index) or "stop"}
            )
    return _json.encode(
        {
            "id": response_id(kind, request_id),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage_body(usage),
            "system_fingerprint": None,
        }
    )

"""OpenAI response shapes: whole responses and server-sent-event chunks, as bytes.

Built by hand with msgspec rather than through a framework serializer: this is the hot path of
every streamed token.
"""

from __future__ import annotations

from typing import Any

import msgspec

from market.wire import Piece, TokenLogprob, ToolCallDelta, Usage

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


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's ``choice.logprobs``."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The completions API's ``choice.logprobs``: parallel lists, ``text_offset`` counted from
    ``offset`` characters into the choice's text."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def tool_call_deltas(calls: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """``delta.tool_calls``: a call's id, type and name in its first delta only, as OpenAI's."""
    out = []
    for call in calls:
        function: dict[str, Any] = {"arguments": call.arguments}
        item: dict[str, Any] = {"index": call.index}
        if call.id is not None:
            item["id"] = call.id
            item["type"] = "function"
        if call.name is not None:
            function["name"] = call.name
        item["function"] = function
        out.append(item)
    return out


class ToolCalls:
    """One choice's tool calls put together from their deltas, for a whole response."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, deltas: list[ToolCallDelta]) -> None:
        for delta in deltas:
            call = self.calls.setdefault(
                delta.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if delta.id is not None:
                call["id"] = delta.id
            if delta.name is not None:
                call["function"]["name"] = delta.name
            call["function"]["arguments"] += delta.arguments

    def message(self) -> list[dict[str, Any]]:
        return [self.calls[i] for i in sorted(self.calls)]


class StreamFormatter:
    """Turns wire Pieces into OpenAI streaming chunks for one response."""

    def __init__(self, kind: str, request_id: str, model: str, created: int) -> None:
        self.kind = kind
        self.id = response_id(kind, request_id)
        self.model = model
        self.created = created
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._started: set[int] = set()
        self._offsets: dict[int, int] = {}
        """Characters of each choice's logprob tokens sent so far (the completions API's ``text_offset``)."""
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
                    delta = {"role": "assistant", "content": piece.text or (None if piece.tool_calls else "")}
                if piece.tool_calls:
                    delta["tool_calls"] = tool_call_deltas(piece.tool_calls)
                logprobs = chat_logprobs(piece.logprobs) if piece.logprobs is not None else None
                choices.append(
                    {"index": piece.index, "delta": delta, "logprobs": logprobs, "finish_reason": piece.finish_reason}
                )
            else:
                logprobs = None
                if piece.logprobs is not None:
                    offset = self._offsets.get(piece.index, 0)
                    logprobs = completion_logprobs(piece.logprobs, offset)
                    self._offsets[piece.index] = offset + sum(len(e.token) for e in piece.logprobs)
                choices.append(
                    {
                        "index": piece.index,
                        "text": piece.text,
                        "logprobs": logprobs,
                        "finish_reason": piece.finish_reason,
                    }
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
    logprobs: dict[int, list[TokenLogprob]] | None = None,
    tool_calls: dict[int, ToolCalls] | None = None,
) -> bytes:
    """A non-streamed response from the pieces collected for each choice (and their logprobs, if
    the request asked for them)."""
    choices: list[dict[str, Any]] = []
    for index in sorted(texts) or [0]:
        text = "".join(texts.get(index, []))
        entries = logprobs.get(index, []) if logprobs is not None else None
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = tool_calls.get(index) if tool_calls else None
            if calls is not None:
                message["content"] = text or None
                message["tool_calls"] = calls.message()
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": chat_logprobs(entries) if entries is not None else None,
                    "finish_reason": finish.get(index) or "stop",
                }
            )
        else:
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "logprobs": completion_logprobs(entries, 0) if entries is not None else None,
                    "finish_reason": finish.get(index) or "stop",
                }
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

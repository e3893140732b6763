"""OpenAI request bodies, validated with msgspec (fast, and precise error messages).

Unknown fields are ignored rather than refused, as the OpenAI SDK grows fields faster than any
server; every known field is checked for type and range, so a wrong value gets a 400 that names it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from api.bodies import decode_body
from api.errors import InvalidRequest

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
ChoiceCount = Annotated[int, msgspec.Meta(ge=1, le=8)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""OpenAI's seed is a 64-bit signed integer."""
Stop = str | Annotated[list[str], msgspec.Meta(max_length=4)] | None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Sampling(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    max_tokens: PositiveInt | None = None
    stream: bool | None = False
    """``null`` (which the SDK sends for ``stream=None``) means the default, as for ``n``."""
    stream_options: StreamOptions | None = None
    stop: Stop = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    n: ChoiceCount | None = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None

    def sampling(self) -> dict[str, Any]:
        """The sampling fields the engine gets, without Nones."""
        out: dict[str, Any] = {}
        for name in ("stop", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "user"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.choices != 1:
            out["n"] = self.choices
        return out

    def __post_init__(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true - at `$.stream_options`")

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=4096)]
    max_completion_tokens: PositiveInt | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_text(self) -> str:
        return "\n".join(f"{m.role}: {m.text()}" for m in self.messages)


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    echo: bool | None = False

    def requested_max_tokens(self) -> int | None:
        # The completions API defaults to 16 tokens when max_tokens is absent.
        return self.max_tokens or 16

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


_CHAT = msgspec.json.Decoder(ChatCompletionRequest)
_COMPLETION = msgspec.json.Decoder(CompletionRequest)


def decode_chat(body: bytes) -> ChatCompletionRequest:
    return decode_body(body, _CHAT)


def decode_completion(body: bytes) -> CompletionRequest:
    request = decode_body(body, _COMPLETION)
    if request.echo:
        raise InvalidRequest("echo is not supported", param="echo")
    return request


def estimate_tokens(text: str) -> int:
    """A cheap upper-leaning estimate (about 4 bytes a token for English, 1 for other scripts).

    Used for the context check, the quota hold and placement; the engine's count is what bills.
    """
    raw = len(text.encode())
    return max(1, raw // 3 + 4)

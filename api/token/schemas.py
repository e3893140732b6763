"""OpenAI request bodies, validated with msgspec (fast, and precise error messages).

Unknown fields are ignored rather than refused, as the OpenAI SDK grows fields faster than any
server; every known field is checked for type and range, so a wrong value gets a 400 that names it.
The exceptions are the fields that would change what comes back and that the relay cannot carry
(the legacy function calling, a completion's suffix, audio, images, vLLM's own guided decoding and
chat template arguments, a reasoning effort): ignoring them would answer something other than what
was asked, so they are a 400 ``unsupported_parameter`` naming the field. vLLM's sampling extensions
that tenants coming from vLLM send (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
``stop_token_ids``) are validated and passed on.
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
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
"""Alternatives per token: OpenAI allows 20 for chat (5 for completions); vLLM's default cap is 20."""
Stop = str | Annotated[list[str], msgspec.Meta(max_length=4)] | None
INT32_MAX = 2**31 - 1
"""vLLM keeps token ids and counts as 32-bit integers; anything larger is refused here, by name,
rather than failing where the job is encoded for the scheduler (msgpack stops at 64 bits)."""
TopK = Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)]
"""vLLM's: sample from the k likeliest tokens; -1 or 0 means all."""
MinP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0.0, le=2.0)]
TokenIdInt = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
StopTokenIds = Annotated[list[TokenIdInt], msgspec.Meta(max_length=64)]
_TokenIds = Annotated[list[TokenIdInt], msgspec.Meta(min_length=1)]


TokenBias = Annotated[int, msgspec.Meta(ge=-100, le=100)]
TokenId = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,9}$")]
LogitBias = Annotated[dict[TokenId, TokenBias], msgspec.Meta(max_length=1024)]
"""Token id (as a string, as OpenAI's) to a bias added to its logit; the engine refuses ids
outside its vocabulary."""


class JsonSchema(msgspec.Struct, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextFormat(msgspec.Struct, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(msgspec.Struct, tag_field="type", tag="json_object"):
    pass


class JsonSchemaFormat(msgspec.Struct, tag_field="type", tag="json_schema"):
    json_schema: JsonSchema


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat
"""Structured output: the engine constrains its sampling to the format (vLLM's guided decoding),
so the answer parses, whatever the model."""

FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDef(msgspec.Struct, omit_defaults=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, tag_field="type", tag="function"):
    function: FunctionDef


class NamedFunction(msgspec.Struct):
    name: FunctionName


class NamedToolChoice(msgspec.Struct, tag_field="type", tag="function"):
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct, tag_field="type", tag="function"):
    """A call the assistant made, sent back in a later request's history."""

    id: Annotated[str, msgspec.Meta(max_length=256)]
    function: CalledFunction


_GUIDED = "vLLM's own guided decoding is not offered; use response_format (json_schema or json_object)"
_UNSUPPORTED: dict[str, str] = {
    "functions": "the legacy function calling is not supported; use tools",
    "function_call": "the legacy function calling is not supported; use tool_choice",
    "suffix": "a completion's suffix is not supported",
    "audio": "audio output is not supported",
    "guided_json": _GUIDED,
    "guided_regex": _GUIDED,
    "guided_choice": _GUIDED,
    "guided_grammar": _GUIDED,
    "structured_outputs": _GUIDED,
    "chat_template_kwargs": "chat template arguments are not supported",
    "reasoning_effort": "the models served here take no reasoning effort",
}


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: Any = None


class AudioPart(msgspec.Struct, tag_field="type", tag="input_audio"):
    input_audio: Any = None


class FilePart(msgspec.Struct, tag_field="type", tag="file"):
    file: Any = None


class VideoPart(msgspec.Struct, tag_field="type", tag="video_url"):
    video_url: Any = None


ContentPart = TextPart | ImagePart | AudioPart | FilePart | VideoPart
"""Parts other than text are decoded only to be refused by name (``ChatCompletionRequest``):
the models served here read text."""


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: Any = None
    """The legacy function calling's, in an assistant's history: refused by name, as at the top."""

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        # as vLLM joins a message's text parts
        return "\n".join(part.text for part in self.content if isinstance(part, TextPart))


def _check_message(i: int, message: ChatMessage) -> None:
    """What OpenAI requires of each role: content (an assistant's may be its tool calls instead),
    and for a tool's answer the call it answers."""
    at = f"$.messages[{i}]"
    if message.role == "assistant":
        if message.content is None and not message.tool_calls and message.function_call is None:
            raise ValueError(f"an assistant message needs content or tool_calls - at `{at}.content`")
    elif message.content is None:
        raise ValueError(f"a {message.role} message needs content - at `{at}.content`")
    if message.role == "tool" and not message.tool_call_id:
        raise ValueError(f"a tool message needs the tool_call_id it answers - at `{at}.tool_call_id`")


_PASSED_ON = (
    "stop",
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
)
"""The sampling fields the engine gets as they came (when set)."""


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
    logit_bias: LogitBias | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    min_tokens: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)] | None = None
    stop_token_ids: StopTokenIds | None = None
    # Fields we refuse when they ask for something (see the module's docstring); null, false, an
    # empty list or string, or ``"none"`` ask for nothing, as the SDKs and frameworks often send.
    functions: list[Any] | None = None
    function_call: Any = None
    suffix: str | None = None
    audio: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    chat_template_kwargs: Any = None
    reasoning_effort: Any = None

    def sampling(self) -> dict[str, Any]:
        """The sampling fields the engine gets, without Nones."""
        out: dict[str, Any] = {}
        for name in _PASSED_ON:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.logit_bias:
            out["logit_bias"] = self.logit_bias
        if self.stop_token_ids:
            out["stop_token_ids"] = self.stop_token_ids
        if self.choices != 1:
            out["n"] = self.choices
        return out

    def __post_init__(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true - at `$.stream_options`")
        wanted = self.requested_max_tokens()
        if self.min_tokens and wanted is not None and self.min_tokens > wanted:
            raise ValueError(f"min_tokens must not exceed the maximum of {wanted} tokens - at `$.min_tokens`")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def refuse_unsupported(self) -> None:
        for name, why in _UNSUPPORTED.items():
            value = getattr(self, name)
            if value is None or value is False or value in ([], "", "none"):
                continue
            raise InvalidRequest(f"Unsupported parameter '{name}': {why}.", code="unsupported_parameter", param=name)

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _check_free_json(value: object, where: str) -> None:
    """Free-form JSON (a tool's parameters, a response schema) travels to the node in msgpack,
    which carries integers of 64 bits at most: a larger one is refused here by name, not where
    the job is encoded. The encode runs in C; the schemas are small."""
    try:
        msgspec.msgpack.encode(value)
    except OverflowError:
        raise ValueError(f"an integer in it does not fit in 64 bits - at `$.{where}`") from None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=4096)]
    max_completion_tokens: PositiveInt | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, message in enumerate(self.messages):
            _check_message(i, message)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true - at `$.top_logprobs`")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools - at `$.tool_choice`")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            wanted = self.tool_choice.function.name
            if wanted not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names '{wanted}', which is not among the tools - at `$.tool_choice`")
        for i, tool in enumerate(self.tools or ()):
            _check_free_json(tool.function.parameters, f"tools[{i}].function.parameters")
        if isinstance(self.response_format, JsonSchemaFormat):
            _check_free_json(self.response_format.json_schema.schema, "response_format.json_schema.schema")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for i, message in enumerate(self.messages):
            if message.function_call is not None:
                raise InvalidRequest(
                    f"Unsupported parameter 'messages[{i}].function_call': the legacy function calling is not"
                    " supported; use tool_calls.",
                    code="unsupported_parameter",
                    param=f"messages[{i}].function_call",
                )
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if not isinstance(part, TextPart):
                        raise InvalidRequest(
                            f"Unsupported content part '{part.__struct_config__.tag}': the models served"
                            " here read text parts only.",
                            code="unsupported_parameter",
                            param=f"messages[{i}].content[{j}]",
                        )

    @property
    def calls_tools(self) -> bool:
        """The model is offered tools (it may, or must, call one): a node that parses calls is needed."""
        return bool(self.tools) and self.tool_choice != "none"

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.response_format is not None and not isinstance(self.response_format, TextFormat):
            out["response_format"] = msgspec.to_builtins(self.response_format)
        if self.logprobs:
            out["logprobs"] = True
            if self.top_logprobs:
                out["top_logprobs"] = self.top_logprobs
        if self.calls_tools:
            out["tools"] = msgspec.to_builtins(self.tools)
            if self.tool_choice is not None:
                out["tool_choice"] = msgspec.to_builtins(self.tool_choice)
            if self.parallel_tool_calls is not None:
                out["parallel_tool_calls"] = self.parallel_tool_calls
        elif self.tools:
            # "none", as OpenAI means it: the model still reads the tools (its chat template writes
            # them into the prompt; vLLM needs no tool-call parser for that) but answers in text.
            out["tools"] = msgspec.to_builtins(self.tools)
            out["tool_choice"] = "none"
        return out

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_text(self) -> str:
        """What the prompt holds, for the token estimate: the messages, calls made, and the tools
        offered (a chat template writes their definitions into the prompt)."""
        parts = [f"{m.role}: {m.text()}" for m in self.messages]
        parts += [c.function.name + c.function.arguments for m in self.messages for c in m.tool_calls or ()]
        if self.tools:
            parts.append(msgspec.json.encode(self.tools).decode())
        return "\n".join(parts)


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | Annotated[list[Any], msgspec.Meta(min_length=1)]
    """A string, or as OpenAI's and vLLM's: a list of one string, token ids (a list of integers), or
    a list of one list of token ids. Several prompts in one request are refused (one completion a
    request, ``n`` of them at most)."""
    echo: bool | None = False
    logprobs: TopLogprobs | None = None
    """The completions API's: log probabilities of each token and of this many alternatives."""
    response_format: Any = None
    best_of: Annotated[int, msgspec.Meta(ge=1, le=20)] | None = None
    """OpenAI's legacy server-side choice among several completions; only 1 (or ``n``) is taken."""

    def __post_init__(self) -> None:
        super().__post_init__()
        prompt = self.prompt
        if isinstance(prompt, list):
            # One form from here on: the text, or the token ids (checked in C: a long prompt of
            # ids costs a few milliseconds of the event loop, not tens).
            if len(prompt) == 1 and isinstance(prompt[0], str):
                self.prompt = prompt[0]
            else:
                if len(prompt) == 1 and isinstance(prompt[0], list):
                    prompt = prompt[0]
                try:
                    self.prompt = msgspec.convert(prompt, _TokenIds)
                except msgspec.ValidationError as exc:
                    why = str(exc).split(" - at ")[0]
                    raise ValueError(
                        f"prompt must be a string, token ids (integers from 0 to {INT32_MAX}), or a list of one "
                        f"of these; several prompts in one request are not supported ({why}) - at `$.prompt`"
                    ) from None
        if self.best_of is not None and self.best_of != self.choices:
            raise ValueError("best_of other than n is not supported (each choice is streamed as made) - at `$.best_of`")

    def token_ids(self) -> list[int] | None:
        """The prompt as token ids, if it came so; None for text."""
        return self.prompt if isinstance(self.prompt, list) else None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.response_format not in (None, {}, {"type": "text"}):
            raise InvalidRequest(
                "Unsupported parameter 'response_format': structured output is offered on /v1/chat/completions.",
                code="unsupported_parameter",
                param="response_format",
            )

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out

    def requested_max_tokens(self) -> int | None:
        # The completions API defaults to 16 tokens when max_tokens is absent.
        return self.max_tokens or 16

    def prompt_text(self) -> str:
        """The prompt as text; empty for token ids (``token_ids``)."""
        return self.prompt if isinstance(self.prompt, str) else ""


_CHAT = msgspec.json.Decoder(ChatCompletionRequest)
_COMPLETION = msgspec.json.Decoder(CompletionRequest)


def decode_chat(body: bytes) -> ChatCompletionRequest:
    request = decode_body(body, _CHAT)
    request.refuse_unsupported()
    return request


def decode_completion(body: bytes) -> CompletionRequest:
    request = decode_body(body, _COMPLETION)
    request.refuse_unsupported()
    if request.echo:
        raise InvalidRequest("echo is not supported", param="echo")
    return request


def estimate_tokens(text: str) -> int:
    """A cheap upper-leaning estimate (about 4 bytes a token for English, 1 for other scripts).

    Used for the context check, the quota hold and placement; the engine's count is what bills.
    """
    raw = len(text.encode())
    return max(1, raw // 3 + 4)

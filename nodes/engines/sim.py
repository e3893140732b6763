"""A SIMULATED engine: no model, an asyncio latency model of vLLM serving an 8B model.

For fleet-scale tests and benchmarks: hundreds of ``SimEngine`` nodes run in one process. Each
engine has one scheduler loop (two in semi-PD mode: a prefill and a decode worker, as in the
paper) that wakes once per simulated step, never per token, and emits deterministic pseudo-text.
Its output is meaningless and is never billed as real capacity (heartbeats say ``engine="sim"``).

Calibration, all from /work/shared/SIMULATOR.md:

- Step time, chunked-prefill-aware, 8B on one H100 (BF16, TP1)::

      step_ms = 6.0 + 0.027 * prefill_tokens_in_step + 0.88e-6 * sum_chunks c * (o + c / 2)
                + 0.0485 * decode_context_tokens / 1000 + 0.01 * decoding_sequences

  (TTFT of an idle 1k prompt ~25-35 ms; ITL ~6-7 ms at batch 1, rising with batch and context;
  an 8k chunk costs ~227 ms, the ITL spike chunked prefill and semi-PD aim at.)
- Other accelerators: decode and the fixed cost scale by memory bandwidth, prefill by dense FLOP/s.
- semi-PD with a share s% of SMs, r = 100 / s: prefill time x (0.7324 r + 0.3185), decode time per
  token x (0.6099 r + 0.4153). Prefill and decode then run as separate workers at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from market.wire import Job, Piece, ServingMode, TokenLogprob, ToolCallDelta, TopLogprob, Usage
from nodes.engines.base import Emission, EngineError, EngineLoad, EngineStatus, busy_streams

SIM_MODEL_NAME = "sim-llama-3-8b"
Phase = Literal["both", "prefill", "decode"]


@dataclass(frozen=True, slots=True)
class Accelerator:
    """Memory bandwidth (TB/s) and dense BF16 FLOP/s (TFLOP/s), SIMULATOR.md."""

    name: str
    bandwidth_tbs: float
    tflops: float
    memory_gib: float


ACCELERATORS = {
    "H100": Accelerator("H100", 3.35, 989.0, 80.0),
    "A100": Accelerator("A100", 2.0, 312.0, 80.0),
    "H200": Accelerator("H200", 4.8, 989.0, 141.0),
    "RTX4090": Accelerator("RTX4090", 1.0, 165.0, 24.0),
}
_REFERENCE = ACCELERATORS["H100"]

# Llama 3 8B: 32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes = 128 KiB of KV per token;
# 16 GB of weights.
_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2
_WEIGHTS_GIB = 16.0

_WORDS = (  # noqa: SIM905 - prose reads better than a list
    "the market serves tokens from a node while the scheduler watches heartbeats and prefill "
    "meets decode in a shared cache so every tenant gets a fair share of the fleet today"
).split()


def prefill_slowdown(share: int) -> float:
    """semi-PD prefill time factor with ``share``% of SMs (arXiv 2504.19867 fit, SIMULATOR.md)."""
    r = 100.0 / share
    return 0.7324 * r + 0.3185


def decode_slowdown(share: int) -> float:
    """semi-PD decode time-per-token factor with ``share``% of SMs (SIMULATOR.md)."""
    r = 100.0 / share
    return 0.6099 * r + 0.4153


def prefill_ms(chunks: list[tuple[int, int]]) -> float:
    """Prefill part of a step on the H100 reference; ``chunks`` are (offset, length)."""
    tokens = sum(c for _, c in chunks)
    attention = sum(c * (o + c / 2) for o, c in chunks)
    return 0.027 * tokens + 0.88e-6 * attention


def decode_ms(context_tokens: int, sequences: int) -> float:
    """Decode part of a step on the H100 reference."""
    return 0.0485 * context_tokens / 1000 + 0.01 * sequences


STEP_BASE_MS = 6.0
"""Fixed cost of one engine step (scheduling, weights read once) on the H100 reference."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How the simulated node is built."""

    served_model_name: str = SIM_MODEL_NAME
    accelerator: str = "H100"
    mode: ServingMode = "unified"
    prefill_share: int = 100
    decode_share: int = 100
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.9
    speedup: float = 1.0
    """Simulated seconds per wall second: tests run 10-1000x faster than real time."""
    start_delay_s: float = 0.0
    """Simulated start-up time before the engine reports healthy (wall time / speedup)."""
    stream_interval: int = 1
    """Tokens gathered before they are streamed (vLLM's ``--stream-interval``); the first and the
    last of a request go at once."""
    busy_stream_interval: int = 4
    """The interval for a request that starts while the node is busy (a quarter of
    ``max_num_seqs`` streaming, at least 8), as the vLLM engine asks vLLM for it per request
    (``nodes.engines.vllm``): the simulator streams as a real node does under the same load."""


@dataclass(eq=False, slots=True)
class _Seq:
    job_id: str
    prompt_tokens: int
    max_tokens: int
    seed: int
    out: asyncio.Queue[Emission | EngineError | None] = field(default_factory=asyncio.Queue)
    prefilled: int = 0
    generated: int = 0
    aborted: bool = False
    alternatives: int | None = None
    """Log probabilities asked for, with this many alternatives per token; None: not asked for."""
    tool: tuple[str, str] | None = None
    """(finish reason, function name) when the request makes the model call a tool."""
    interval: int = 1
    """Tokens a streamed emission gathers (the first and the last go at once)."""
    held: list[Piece] = field(default_factory=list)

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.generated


def _forced_tool(body: dict[str, Any]) -> tuple[str, str] | None:
    """A tool the request makes the model call: a named ``tool_choice`` (which ends as ``stop``, as
    OpenAI's) or ``required`` (``tool_calls``); ``auto`` gets text from the simulator."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return "stop", str((choice.get("function") or {}).get("name") or "")
    if choice == "required" and tools:
        return "tool_calls", str((tools[0].get("function") or {}).get("name") or "")
    return None


def estimate_prompt_tokens(job: Job) -> int:
    """About 4 characters per token plus a few per chat message for the template."""
    body = job.body
    if job.kind == "chat":
        chars, overhead = 0, 0
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # content parts
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            chars += len(str(content or ""))
            overhead += 4
        return max(1, (chars + 3) // 4 + overhead)
    prompt: Any = body.get("prompt", "")
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        prompt = " ".join(str(p) for p in prompt)
    return max(1, (len(str(prompt)) + 3) // 4)


class SimEngine:
    """A simulated vLLM: continuous batching with ``max_num_seqs`` and a token budget per step."""

    kind = "sim"

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        if self.config.accelerator not in ACCELERATORS:
            raise ValueError(f"unknown accelerator {self.config.accelerator!r}: one of {', '.join(ACCELERATORS)}")
        self.served_model_name = self.config.served_model_name
        self.max_num_seqs = self.config.max_num_seqs
        self.busy_streams = busy_streams(self.config.max_num_seqs)
        """Requests in the engine from which a new one counts the node as busy, as for vLLM."""
        acc = ACCELERATORS[self.config.accelerator]
        self._decode_scale = _REFERENCE.bandwidth_tbs / acc.bandwidth_tbs
        self._prefill_scale = _REFERENCE.tflops / acc.tflops
        kv_bytes = max(0.0, acc.memory_gib * self.config.gpu_memory_utilization - _WEIGHTS_GIB) * 2**30
        self.kv_capacity_tokens = int(kv_bytes // _KV_BYTES_PER_TOKEN)
        self._waiting: deque[_Seq] = deque()
        self._prefilling: list[_Seq] = []
        self._decoding: list[_Seq] = []
        self._wakes: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._status: EngineStatus = "starting"
        self._forced_down = False

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        if self.config.mode == "semi-pd":
            self._tasks = [
                asyncio.create_task(self._loop(prefill=True, decode=False), name="sim-prefill"),
                asyncio.create_task(self._loop(prefill=False, decode=True), name="sim-decode"),
            ]
        else:
            self._tasks = [asyncio.create_task(self._loop(prefill=True, decode=True), name="sim-step")]
        if self.config.start_delay_s > 0:
            await asyncio.sleep(self.config.start_delay_s / self.config.speedup)
        self._status = "unhealthy" if self._forced_down else "healthy"

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._wakes = []
        for seq in [*self._waiting, *self._prefilling, *self._decoding]:
            seq.out.put_nowait(EngineError("engine_unavailable", "engine stopped"))
        self._waiting.clear()
        self._prefilling.clear()
        self._decoding.clear()
        self._status = "unhealthy"

    def set_down(self, down: bool) -> None:
        """Tests: make the engine unhealthy (new jobs fail with engine_unavailable) or well again."""
        self._forced_down = down
        if self._tasks:
            self._status = "unhealthy" if down else "healthy"

    @property
    def status(self) -> EngineStatus:
        return self._status

    async def load(self) -> EngineLoad:
        running = len(self._prefilling) + len(self._decoding)
        used = sum(s.context for s in self._prefilling) + sum(s.context for s in self._decoding)
        return EngineLoad(
            running=running,
            waiting=len(self._waiting),
            kv_cache_usage=min(1.0, used / self.kv_capacity_tokens) if self.kv_capacity_tokens else 0.0,
        )

    # --- requests ------------------------------------------------------------------------------

    async def generate(self, job: Job) -> AsyncIterator[Emission]:
        if self._status != "healthy":
            raise EngineError("engine_unavailable", f"simulated engine is {self._status}")
        body = job.body
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or job.max_tokens or 16)
        prompt = estimate_prompt_tokens(job)
        if max_tokens < 1:
            raise EngineError("invalid_request", "max_tokens must be at least 1", status=400)
        if prompt + max_tokens > self.config.max_model_len:
            raise EngineError(
                "invalid_request",
                f"prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds max_model_len "
                f"{self.config.max_model_len}",
                status=400,
            )
        if self.kv_capacity_tokens and prompt + max_tokens > self.kv_capacity_tokens:
            # It could never be admitted, and would hold back everything queued behind it.
            raise EngineError(
                "invalid_request",
                f"prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the KV cache of "
                f"{self.kv_capacity_tokens} tokens",
                status=400,
            )
        seed = int.from_bytes(hashlib.blake2b(job.id.encode(), digest_size=4).digest(), "big")
        seq = _Seq(job.id, prompt, max_tokens, seed)
        seq.interval = self.config.stream_interval
        if self.config.busy_stream_interval > 1 and self._open() >= self.busy_streams:
            seq.interval = max(seq.interval, self.config.busy_stream_interval)  # as vLLM takes the larger
        seq.tool = _forced_tool(body) if job.kind == "chat" else None
        if job.kind == "chat" and body.get("logprobs"):
            seq.alternatives = int(body.get("top_logprobs") or 0)
        elif job.kind != "chat" and body.get("logprobs") is not None:
            seq.alternatives = int(body["logprobs"])
        self._waiting.append(seq)
        self._wake_all()
        try:
            while True:
                item = await seq.out.get()
                if item is None:
                    return
                if isinstance(item, EngineError):
                    raise item
                yield item
        finally:
            seq.aborted = True  # the loop drops it at its next step: the engine's abort

    def _open(self) -> int:
        """Requests in the engine (waiting or running), as the vLLM engine counts its open streams."""
        return len(self._waiting) + len(self._prefilling) + len(self._decoding)

    def _wake_all(self) -> None:
        for wake in self._wakes:
            wake.set()

    def _text(self, seq: _Seq, position: int) -> str:
        return " " + _WORDS[(seq.seed + position * 7) % len(_WORDS)]

    def _tool_piece(self, seq: _Seq, text: str, done: bool) -> Piece:
        """The forced tool call, one token at a time: ``{"input": "<words>"}``, closed at the last
        token (made-up arguments, but always JSON)."""
        assert seq.tool is not None
        finish, name = seq.tool
        word = json.dumps(text)[1:-1]
        if seq.generated == 1:
            call = ToolCallDelta(0, f"call_{seq.job_id[-12:]}", name, '{"input": "' + word)
        else:
            call = ToolCallDelta(0, None, None, word)
        if done:
            call = ToolCallDelta(call.index, call.id, call.name, call.arguments + '"}')
        return Piece(0, "", 1, finish if done else None, None, [call])

    def _logprobs(self, seq: _Seq, text: str) -> list[TokenLogprob] | None:
        """Made-up but well-formed log probabilities: the chosen token the likeliest."""
        if seq.alternatives is None:
            return None
        chosen = -0.1 * (1 + (seq.seed + seq.generated) % 5)
        others = [
            TopLogprob(" " + _WORDS[(seq.seed + seq.generated + k) % len(_WORDS)], chosen - k)
            for k in range(1, seq.alternatives)
        ]
        top = [TopLogprob(text, chosen), *others] if seq.alternatives else []
        return [TokenLogprob(text, chosen, list(text.encode()), top)]

    def step_ms(self, chunks: list[tuple[int, int]], decode_context: int, decode_seqs: int, phase: Phase) -> float:
        """Simulated duration of one step on this node's accelerator and split.

        ``phase`` is ``both`` for a unified (chunked-prefill) step, or ``prefill`` / ``decode`` for
        one semi-PD worker's step, slowed by its share of SMs.
        """
        semi = self.config.mode == "semi-pd"
        p_factor = prefill_slowdown(self.config.prefill_share) if semi else 1.0
        d_factor = decode_slowdown(self.config.decode_share) if semi else 1.0
        p_ms = prefill_ms(chunks) * self._prefill_scale * p_factor
        d_ms = decode_ms(decode_context, decode_seqs) * self._decode_scale * d_factor
        base = STEP_BASE_MS * self._decode_scale * (p_factor if phase == "prefill" else d_factor)
        return base + p_ms + d_ms

    # --- the scheduler loop --------------------------------------------------------------------

    def _admit(self) -> None:
        """Move waiting sequences in while there are seats and KV room (vLLM admits FCFS)."""
        running = len(self._prefilling) + len(self._decoding)
        used = sum(s.context for s in self._prefilling) + sum(s.context for s in self._decoding)
        while self._waiting and running < self.config.max_num_seqs:
            seq = self._waiting[0]
            if seq.aborted:
                self._waiting.popleft()
                continue
            if self.kv_capacity_tokens and used + seq.prompt_tokens > self.kv_capacity_tokens:
                break
            self._waiting.popleft()
            self._prefilling.append(seq)
            running += 1
            used += seq.prompt_tokens

    def _drop_aborted(self) -> None:
        self._prefilling = [s for s in self._prefilling if not s.aborted]
        self._decoding = [s for s in self._decoding if not s.aborted]

    def _plan_prefill(self, budget: int) -> list[tuple[_Seq, int, int]]:
        """Chunks (seq, offset, length) for this step within the token budget, FCFS."""
        chunks = []
        for seq in self._prefilling:
            if budget <= 0:
                break
            length = min(budget, seq.prompt_tokens - seq.prefilled)
            chunks.append((seq, seq.prefilled, length))
            budget -= length
        return chunks

    async def _loop(self, *, prefill: bool, decode: bool) -> None:
        """One engine step per iteration; sleeps the simulated step time, then emits its tokens."""
        speedup = self.config.speedup
        wake = asyncio.Event()
        self._wakes.append(wake)
        target = time.monotonic()
        while True:
            self._drop_aborted()
            if prefill:
                self._admit()
            decoding = list(self._decoding) if decode else []
            # In unified mode decode sequences spend one token each of the step's budget.
            budget = self.config.max_num_batched_tokens - len(decoding)
            chunks = self._plan_prefill(budget) if prefill else []
            if not chunks and not decoding:
                wake.clear()
                await wake.wait()
                target = time.monotonic()
                continue
            context = sum(s.context for s in decoding)
            phase: Phase = "both" if prefill and decode else ("prefill" if prefill else "decode")
            step_s = self.step_ms([(o, c) for _, o, c in chunks], context, len(decoding), phase) / 1000.0
            target = max(target + step_s / speedup, time.monotonic() - 0.05)  # no catch-up bursts
            await asyncio.sleep(max(0.0, target - time.monotonic()))
            for seq in decoding:
                if not seq.aborted:
                    self._emit(seq)
            for seq, _offset, length in chunks:
                seq.prefilled += length
                if seq.prefilled >= seq.prompt_tokens and not seq.aborted:
                    self._prefilling.remove(seq)
                    self._emit(seq)  # the step that completes a prompt samples its first token
                    if seq.generated < seq.max_tokens:
                        self._decoding.append(seq)
                        self._wake_all()  # semi-PD: the decode worker may be idle
            self._decoding = [s for s in self._decoding if s.generated < s.max_tokens and not s.aborted]

    def _emit(self, seq: _Seq) -> None:
        seq.generated += 1
        done = seq.generated >= seq.max_tokens
        text = self._text(seq, seq.generated)
        if seq.tool is not None:
            piece = self._tool_piece(seq, text, done)
        else:
            piece = Piece(0, text, 1, "length" if done else None, self._logprobs(seq, text))
        if seq.interval > 1 and not done and (seq.generated - 1) % seq.interval:
            seq.held.append(piece)  # vLLM's stream interval: the first token at once, then every n-th
            return
        pieces, seq.held = [*seq.held, piece], []
        seq.out.put_nowait(Emission(pieces, Usage(seq.prompt_tokens, seq.generated)))
        if done:
            seq.out.put_nowait(None)

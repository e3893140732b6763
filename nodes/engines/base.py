"""The engine contract the node agent relays jobs through.

An engine is whatever turns a wire ``Job`` into generated text: a real vLLM server (launched by the
agent or attached to) or the simulator. The agent only needs readiness, load, and a stream of
pieces it can abandon at any time (closing the iterator aborts the request in the engine).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from market.wire import Job, Piece, Usage

EngineStatus = Literal["starting", "healthy", "unhealthy"]
ErrorCode = Literal["engine_unavailable", "invalid_request", "engine_error"]


class EngineError(Exception):
    """A job failed in the engine; ``code`` is the wire ``Chunk.error_code`` to report."""

    def __init__(self, code: ErrorCode, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What placement needs to know about the engine right now."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


@dataclass(frozen=True, slots=True)
class Emission:
    """One step of a generation as the engine streams it.

    ``usage`` is the engine's running count when it reports one (prompt tokens are then known
    before the end, which makes a cancelled job's usage exact); the last one seen is final.
    """

    pieces: list[Piece]
    usage: Usage | None = None


def busy_streams(max_num_seqs: int) -> int:
    """Streams open on an engine from which its node counts as busy (a quarter of its batch, at
    least 8): a job that starts then streams a few tokens a chunk (``busy_stream_interval``)."""
    return max(8, max_num_seqs // 4)


@runtime_checkable
class Engine(Protocol):
    """An inference engine the agent relays jobs to."""

    kind: str
    """``vllm`` or ``sim``; reported in heartbeats."""
    served_model_name: str
    max_num_seqs: int

    async def start(self) -> None:
        """Begin serving (may return before ready; readiness is ``status``)."""

    async def stop(self) -> None:
        """Stop serving and release processes; abort what is still running."""

    @property
    def status(self) -> EngineStatus:
        """``healthy`` only when a real request has succeeded since the engine last (re)started."""

    async def load(self) -> EngineLoad:
        """Running and waiting sequences and KV-cache use (0..1)."""

    def generate(self, job: Job) -> AsyncIterator[Emission]:
        """Stream the job's output. Raises ``EngineError``; closing the iterator aborts the job."""

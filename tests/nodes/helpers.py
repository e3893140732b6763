"""What the api and scheduler look like to a node: jobs in, chunks and heartbeats out, over NATS."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.aio.client import Client

from market import subjects, wire
from market.ids import new_id
from market.wire import Chunk, Heartbeat, Job

CHUNKS = wire.decoder(Chunk)
HEARTBEATS = wire.decoder(Heartbeat)


def make_job(
    model: str,
    *,
    kind: str = "completion",
    prompt: str = "hello world",
    max_tokens: int = 8,
    deadline_s: float = 60.0,
    **body: Any,
) -> Job:
    payload: dict[str, Any] = {"max_tokens": max_tokens, **body}
    if kind == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    job_id = new_id("request")
    return Job(
        id=job_id,
        tenant_id="ten_test",
        key_id="key_test",
        model=model,
        kind=kind,  # type: ignore[arg-type]
        body=payload,
        prompt_tokens=max(1, len(prompt) // 4),
        max_tokens=max_tokens,
        reply=f"_INBOX.test.{job_id}",
        deadline=time.time() + deadline_s,
    )


class JobWatch:
    """The api's side of one job: its inbox and the chunks that arrived."""

    def __init__(self, nc: Client, job: Job) -> None:
        self.nc = nc
        self.job = job
        self.chunks: list[Chunk] = []
        self.first_data = asyncio.Event()
        self.finished = asyncio.Event()
        self._sub: Any = None

    async def submit(self, node_id: str, headers: dict[str, str] | None = None) -> JobWatch:
        async def on_chunk(msg: Any) -> None:
            if not msg.data and (msg.headers or {}).get("Status") == "503":
                # "No responders": the server had not yet seen the agent's subscription (rarely,
                # right after start). The api fails over on this; here we simply send it again.
                await asyncio.sleep(0.05)
                await self.nc.publish(
                    subjects.node_jobs(node_id), wire.encode(self.job), reply=self.job.reply, headers=headers
                )
                return
            chunk = CHUNKS.decode(msg.data)
            self.chunks.append(chunk)
            if chunk.kind == "data" or chunk.pieces:
                self.first_data.set()
            if chunk.kind in ("end", "error"):
                self.finished.set()

        self._sub = await self.nc.subscribe(self.job.reply, cb=on_chunk)
        # As the scheduler forwards it: the job message's reply is the api's inbox.
        await self.nc.publish(subjects.node_jobs(node_id), wire.encode(self.job), reply=self.job.reply, headers=headers)
        await self.nc.flush()
        return self

    async def done(self, timeout: float = 30.0) -> Chunk:
        await asyncio.wait_for(self.finished.wait(), timeout)
        await self._sub.unsubscribe()
        return self.chunks[-1]

    async def cancel(self, node_id: str) -> None:
        await self.nc.publish(subjects.node_cancel(node_id), wire.encode(wire.Cancel(job_id=self.job.id)))

    @property
    def data(self) -> list[Chunk]:
        """The chunks that carry output: ``data``, and ``end`` when the last pieces came with it."""
        return [c for c in self.chunks if c.kind == "data" or (c.kind == "end" and c.pieces)]

    @property
    def text(self) -> str:
        return "".join(p.text for c in self.data for p in c.pieces)

    @property
    def relayed_tokens(self) -> int:
        return sum(p.tokens for c in self.data for p in c.pieces)


class HeartbeatWatch:
    """Heartbeats of one node, as schedulers see them."""

    def __init__(self, nc: Client, node_id: str) -> None:
        self.nc = nc
        self.node_id = node_id
        self.beats: list[Heartbeat] = []
        self._changed = asyncio.Event()
        self._sub: Any = None

    async def start(self) -> HeartbeatWatch:
        async def on_beat(msg: Any) -> None:
            self.beats.append(HEARTBEATS.decode(msg.data))
            self._changed.set()

        self._sub = await self.nc.subscribe(subjects.heartbeat(self.node_id), cb=on_beat)
        await self.nc.flush()
        return self

    async def wait_for(self, status: str, timeout: float = 10.0, since: int = 0) -> Heartbeat:
        """The latest heartbeat with ``status`` among those from index ``since`` on."""
        deadline = time.monotonic() + timeout
        while True:
            for beat in reversed(self.beats[since:]):
                if beat.status == status:
                    return beat
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [b.status for b in self.beats[-5:]]
                raise TimeoutError(f"no {status} heartbeat from {self.node_id} within {timeout}s (last: {seen})")
            self._changed.clear()
            await asyncio.wait([asyncio.ensure_future(self._changed.wait())], timeout=remaining)

    async def stop(self) -> None:
        await self._sub.unsubscribe()

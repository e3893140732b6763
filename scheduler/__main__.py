"""``market scheduler`` / ``python -m scheduler``: run one scheduler replica until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal

from market import aio, logs
from market.settings import Settings
from scheduler.service import SchedulerService


async def run(settings: Settings) -> None:
    service = SchedulerService(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await service.start()
    try:
        await stopping.wait()
    finally:
        await service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="market scheduler",
        description="Run a scheduler replica (configured by MARKET_* environment variables; add replicas to scale).",
    )
    parser.parse_args()
    settings = Settings.from_env()
    logs.setup("scheduler", settings.log_level)
    aio.run(run(settings))


if __name__ == "__main__":
    main()

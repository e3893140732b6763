"""``market api``: serve the api with uvicorn (uvloop + httptools, its errors in the api's formats)."""

from __future__ import annotations

import argparse

import uvicorn

from api.main import build_app
from api.server import server_options
from market import logs
from market.aio import settle_heap
from market.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="market api", description="Serve the marketplace api.")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    settings = Settings.from_env()
    logs.setup("api", settings.log_level)
    app = build_app(settings)
    settle_heap()
    uvicorn.run(
        app,
        host=args.host or settings.http_host,
        port=args.port or settings.http_port,
        loop="uvloop",
        timeout_graceful_shutdown=10,
        **server_options(),
    )


if __name__ == "__main__":
    main()

"""The ``market`` command: composes the processes of the marketplace.

Domain packages are started by module name (``python -m api`` and so on), never imported here, so
the kernel stays at the bottom of the dependency graph and the node agent can be installed alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import runpy
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from market.settings import Settings, SettingsError

SERVICES = ("api", "scheduler", "billing")


class CliError(RuntimeError):
    """Printed as one line, exit code 1."""


def _run_module(module: str, argv: Sequence[str]) -> None:
    sys.argv = [f"market {module}", *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["MARKET_DATA_DIR"] = str(settings.data_dir)
    env["MARKET_HTTP_PORT"] = str(settings.http_port)
    env["MARKET_HTTP_HOST"] = settings.http_host
    if settings.database_url:
        env["MARKET_DATABASE_URL"] = settings.database_url
    if settings.nats_url:
        env["MARKET_NATS_URL"] = settings.nats_url
    env["MARKET_API_URL"] = f"http://{settings.http_host}:{settings.http_port}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Supervisor:
    """Runs child processes, restarts ones that die, and stops them all in reverse order."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.children: dict[str, tuple[list[str], subprocess.Popen[bytes]]] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.stopping = False

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        from market.embedded import _pdeathsig

        self.envs[name] = env or {}
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen(
            argv,
            env={**self.env, **self.envs[name]},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_pdeathsig(signal.SIGTERM),
        )
        self.children[name] = (argv, proc)

    async def watch(self) -> None:
        backoff: dict[str, float] = {}
        while not self.stopping:
            await asyncio.sleep(0.5)
            for name, (argv, proc) in list(self.children.items()):
                if proc.poll() is not None and not self.stopping:
                    delay = min(backoff.get(name, 0.5) * 2, 30.0)
                    backoff[name] = delay
                    print(
                        f"market: {name} exited with {proc.returncode}; restarting in {delay:.0f}s "
                        f"(log: {self.log_dir / (name + '.log')})",
                        file=sys.stderr,
                    )
                    await asyncio.sleep(delay)
                    if not self.stopping:
                        self.spawn(name, argv, self.envs.get(name))

    def stop(self) -> None:
        self.stopping = True
        for _argv, proc in reversed(list(self.children.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _argv, proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _wait_http(url: str, timeout: float, sup: Supervisor) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _argv, api = sup.children["api"]
        if api.poll() is not None:
            raise CliError(f"the api exited with code {api.returncode} (log: {sup.log_dir / 'api.log'})")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our own loopback URL
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise CliError(f"the api did not answer {url} within {timeout:.0f}s (log: {sup.log_dir / 'api.log'})")


def cmd_up(args: argparse.Namespace) -> int:
    from market import migrate, natsauth
    from market.admin_keys import bootstrap_admin_key
    from market.embedded import EmbeddedNats, EmbeddedPostgres, check_port, ensure_writable_dir

    settings = Settings.from_env()
    data_dir = Path(args.data_dir).expanduser().resolve() if args.data_dir else settings.data_dir
    settings = replace(settings, data_dir=data_dir, http_port=args.port or settings.http_port)
    ensure_writable_dir(data_dir)
    check_port(settings.http_port, "the api", "--port or MARKET_HTTP_PORT", settings.http_host)
    log_dir = ensure_writable_dir(data_dir / "logs")

    pg = nats = None
    sup: Supervisor | None = None
    stop_signal = {"received": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop_signal["received"] = True
        raise KeyboardInterrupt

    # SIGINT too, explicitly: started in the background by a script (``market up &`` without job
    # control), a process inherits SIGINT ignored and Ctrl-C's signal would otherwise do nothing.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if not settings.database_url:
            pg = EmbeddedPostgres(data_dir / "postgres" / "data", port=int(os.environ.get("MARKET_PG_PORT", "0")))
            settings = settings.with_servers(database_url=pg.start())
        passwords: dict[str, str] = {}
        if not settings.nats_url:
            passwords = natsauth.load_or_create_service_passwords(data_dir / "nats" / "services.json")
            nats = EmbeddedNats(
                data_dir / "nats", port=int(os.environ.get("MARKET_NATS_PORT", "0")), service_passwords=passwords
            )
            settings = settings.with_servers(nats_url=nats.start())
        migrate.upgrade(settings.require_database_url())
        new_key = asyncio.run(bootstrap_admin_key(settings, data_dir / "admin-key"))

        sup = Supervisor(_settings_env(settings), log_dir)
        # On one machine the api hosts the scheduler replica (a process and a NATS hop fewer on the
        # way to a first token) unless MARKET_API_SCHEDULER=0 asks for a scheduler process of its own.
        hosted = settings.api_scheduler is not False
        for service in SERVICES:
            if service == "scheduler" and hosted:
                continue
            env: dict[str, str] = {"MARKET_API_SCHEDULER": "1"} if service == "api" and hosted else {}
            if passwords:  # embedded NATS: each service logs in as itself
                env |= {"MARKET_NATS_USER": service, "MARKET_NATS_PASSWORD": passwords[service]}
                if service == "api":
                    env["MARKET_NATS_AUTH_DIR"] = str(data_dir / "nats")
            sup.spawn(service, [sys.executable, "-m", service], env)
        base = f"http://{settings.http_host}:{settings.http_port}"
        _wait_http(base + "/healthz", 60, sup)
        if args.node:
            from market import local_node

            model_dir = Path(args.model).expanduser().resolve() if args.model else None
            token = asyncio.run(local_node.prepare(settings, args.node, model_dir))
            node_args = [
                sys.executable,
                "-m",
                "nodes",
                "join",
                "--api",
                base,
                "--token",
                token,
                "--engine",
                args.node,
                "--name",
                "local",
                "--data-dir",
                str(data_dir / "node"),
            ]
            if model_dir is not None:
                node_args += ["--model", str(model_dir)]
            sup.spawn("node", node_args)
        print(f"market: api at {base}  (OpenAPI: {base}/schema, logs: {log_dir})")
        if new_key:
            print(f"market: platform-admin key (shown once, also in {data_dir / 'admin-key'}): {new_key}")
        else:
            print(f"market: platform-admin key in {data_dir / 'admin-key'}")
        if args.node:
            print(f"market: local {args.node} node starting (log: {log_dir / 'node.log'})")
        print("market: Ctrl-C stops everything")
        sys.stdout.flush()
        asyncio.run(sup.watch())
    except KeyboardInterrupt:
        print("\nmarket: stopping", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if sup is not None:
            sup.stop()
        if nats is not None:
            nats.stop()
        if pg is not None:
            pg.stop()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from market import migrate

    settings = Settings.from_env()
    if args.downgrade:
        migrate.downgrade(settings.require_database_url(), args.downgrade)
    else:
        migrate.upgrade(settings.require_database_url(), args.target)
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    from market.admin_keys import create_platform_admin_key

    settings = Settings.from_env()
    if args.admin_command == "create-key":
        print(asyncio.run(create_platform_admin_key(settings, name=args.name)))
        return 0
    raise CliError("usage: market admin create-key [--name NAME]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="market", description="A compute marketplace for LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole marketplace on this machine (embedded servers)")
    up.add_argument("--data-dir", help="where data, logs and the admin key live (default: ./.data)")
    up.add_argument("--port", type=int, default=None, help="api port (default 8080)")
    up.add_argument("--node", choices=("sim", "vllm"), help="also run one local provider node")
    up.add_argument("--model", help="with --node vllm: a local model directory to serve")
    up.set_defaults(func=cmd_up)

    mig = sub.add_parser("migrate", help="apply the database migrations")
    mig.add_argument("--target", default="heads")
    mig.add_argument("--downgrade", metavar="REVISION", help="downgrade to REVISION instead")
    mig.set_defaults(func=cmd_migrate)

    admin = sub.add_parser("admin", help="platform administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    create_key = admin_sub.add_parser("create-key", help="print a new platform-admin key")
    create_key.add_argument("--name", default="platform admin")
    admin.set_defaults(func=cmd_admin)

    for service in ("api", "scheduler", "billing", "node"):
        sub.add_parser(service, help=f"run the {service} (see `market {service} --help`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("api", "scheduler", "billing", "node"):
        module = "nodes" if argv[0] == "node" else argv[0]
        _run_module(module, argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    from market.embedded import EmbeddedError

    try:
        result: int = args.func(args)
    except (CliError, EmbeddedError, SettingsError) as exc:
        print(f"market: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

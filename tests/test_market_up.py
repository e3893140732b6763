"""``market up`` as a user runs it: one command, real embedded servers, clean Ctrl-C, data kept."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from market.embedded import free_port

_OUTPUT: dict[int, list[str]] = {}
_READERS: dict[int, threading.Thread] = {}


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    """``market up`` as a user starts it; its output is collected line by line as it comes.

    Started with SIGINT ignored, as a script's background job (``market up &`` without job
    control) is: the SIGINT that ``_stop`` sends must stop it all the same."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "market.cli", "up", "--data-dir", str(data_dir), "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=_ignore_sigint,
    )
    lines = _OUTPUT[proc.pid] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    _READERS[proc.pid] = threading.Thread(target=read, daemon=True)
    _READERS[proc.pid].start()
    return proc


def _output(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """Everything the process printed, once it has exited."""
    proc.wait(timeout)
    _READERS[proc.pid].join(10)
    return "".join(_OUTPUT[proc.pid])


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> float:
    """Until /readyz answers 200 and the command has printed its banner."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        assert proc.poll() is None, "".join(_OUTPUT[proc.pid])
        try:
            ready = httpx.get(url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready and any("Ctrl-C stops everything" in line for line in _OUTPUT[proc.pid]):
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError("market up did not become ready")


def _wait_unbilled(url: str, secret: str, expected: int, timeout: float = 30) -> None:
    """Until the tenant's unbilled usage is ``expected`` micros: its usage events went through
    JetStream into the ledger and were rated."""
    deadline = time.monotonic() + timeout
    while True:
        balance = httpx.get(url + "/api/tenant/balance", headers={"Authorization": f"Bearer {secret}"}).json()
        if balance["unbilled_usage_micros"] == expected:
            return
        assert time.monotonic() < deadline, balance
        time.sleep(0.3)


def _descendants(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop(proc: subprocess.Popen[str], children: list[psutil.Process]) -> str:
    proc.send_signal(signal.SIGINT)
    out = _output(proc)
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left behind: {[p.info for p in alive]}"
    return out


def test_market_up_serves_restarts_with_its_data_and_leaves_nothing(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "market", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(data_dir, port)
    try:
        took = _wait_ready(url, proc)
        assert took < 30
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}
        key_file = data_dir / "admin-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert key.startswith("sk-admin-")
        children = _descendants(proc)
        names = {p.name() for p in children}
        assert "postgres" in names
        assert "nats-server" in names
    finally:
        if proc.poll() is None:
            first_out = _stop(proc, _descendants(proc))
    assert proc.returncode == 0
    assert f"api at {url}" in first_out
    assert key in first_out

    second = _start(data_dir, port)
    try:
        _wait_ready(url, second)
        assert key_file.read_text().strip() == key
    finally:
        second_out = _stop(second, _descendants(second))
    assert key not in second_out, "the admin key is shown only on the first start"
    assert "platform-admin key in" in second_out


def test_market_up_with_the_port_taken_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = _start(tmp_path / "market", port)
        out = _output(proc)
    assert proc.returncode == 1
    assert (
        out.strip()
        == f"market: port {port} for the api is already in use: stop what holds it or set --port or MARKET_HTTP_PORT"
    )


def test_market_up_with_an_unwritable_data_dir_says_so() -> None:
    bad = "/proc/market-data"
    proc = _start(Path(bad), free_port())
    out = _output(proc)
    assert proc.returncode == 1
    assert out.strip().startswith(f"market: data directory {bad} is not writable")
    assert out.strip().count("\n") == 0


def test_market_up_with_a_sim_node_serves_a_tenant_through_the_admin_api(tmp_path: Path) -> None:
    """The README's path: start with a local node, make a tenant with the admin key, call the SDK."""
    import openai

    data_dir, port = tmp_path / "market", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(data_dir, port, "--node", "sim")
    try:
        _wait_ready(url, proc)
        admin = {"Authorization": "Bearer " + (data_dir / "admin-key").read_text().strip()}
        with httpx.Client(base_url=url, timeout=30) as client:
            tenant = client.post("/api/admin/tenants", json={"name": "startup"}, headers=admin).json()
            grant = client.post(f"/api/admin/tenants/{tenant['id']}/grants", json={"tokens": 100_000}, headers=admin)
            assert grant.status_code == 201, grant.text
            key = client.post(f"/api/admin/tenants/{tenant['id']}/keys", json={"name": "prod"}, headers=admin)
            secret = key.json()["key"]
        sdk = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
        deadline = time.monotonic() + 60
        while True:  # the node enrols and warms up
            try:
                answer = sdk.chat.completions.create(
                    model="sim-llama-3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                break
            except openai.APIStatusError:
                assert time.monotonic() < deadline, "the local sim node never served"
                time.sleep(0.5)
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 4
        assert [m.id for m in sdk.models.list().data] == ["sim-llama-3-8b"]
        # Placed by the scheduler replica the api hosts: no scheduler process of its own.
        assert not (data_dir / "logs" / "scheduler.log").exists()
        # The billing worker rates it at the demo prices: (prompt * 15 + 4 * 60) micros.
        expected = answer.usage.prompt_tokens * 15 + 4 * 60
        _wait_unbilled(url, secret, expected)
        # The walkthrough's tool call: the local sim node says it parses calls, and makes one up.
        weather: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        call = sdk.chat.completions.create(
            model="sim-llama-3-8b",
            messages=[{"role": "user", "content": "the weather in Paris?"}],
            tools=[weather],
            tool_choice="required",
            max_tokens=4,
        )
        [made_up] = call.choices[0].message.tool_calls or []
        assert made_up.function.name == "get_weather"  # type: ignore[union-attr]
        assert json.loads(made_up.function.arguments)  # type: ignore[union-attr]
        # The walkthrough's reservation: made, doubled, listed with its price, ended.
        with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {secret}"}) as own:
            made = own.post("/api/tenant/reservations", json={"model": "sim-llama-3-8b", "slots": 2, "burst_slots": 4})
            assert made.status_code == 201, made.text
            rid = made.json()["id"]
            assert own.patch(f"/api/tenant/reservations/{rid}", json={"slots": 4}).json()["slots"] == 4
            [listed] = own.get("/api/tenant/reservations").json()
            assert (listed["slot_hour_minor"], listed["hour_minor"]) == (5, 20)  # the demo price book's
            reserved = sdk.chat.completions.create(
                model="sim-llama-3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert reserved.usage is not None
            assert reserved.usage.completion_tokens == 4
            assert own.delete(f"/api/tenant/reservations/{rid}").json()["status"] == "ended"
            deadline = time.monotonic() + 30
            while True:  # billed in the reserved class, at the demo book's price for it
                by_class = {row["admission_class"] for row in own.get("/api/tenant/usage").json()["rows"]}
                if "reserved" in by_class:
                    break
                assert time.monotonic() < deadline, by_class
                time.sleep(0.3)
    finally:
        if proc.poll() is None:
            _stop(proc, _descendants(proc))


@pytest.mark.vllm
def test_market_up_with_a_vllm_node_answers_the_sdk_with_usage_that_reaches_the_ledger(tmp_path: Path) -> None:
    """The issue's own check: ``market up --node vllm`` (the tiny random Llama built into the data
    directory, served by a real vLLM), then only the ``openai`` SDK: streamed and whole answers
    with usage, and the usage events billed from the stream."""
    import openai

    data_dir, port = tmp_path / "market", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(data_dir, port, "--node", "vllm")
    try:
        _wait_ready(url, proc, timeout=120)
        admin = {"Authorization": "Bearer " + (data_dir / "admin-key").read_text().strip()}
        with httpx.Client(base_url=url, timeout=30) as client:
            tenant = client.post("/api/admin/tenants", json={"name": "startup"}, headers=admin).json()
            grant = client.post(f"/api/admin/tenants/{tenant['id']}/grants", json={"tokens": 100_000}, headers=admin)
            assert grant.status_code == 201, grant.text
            secret = client.post(f"/api/admin/tenants/{tenant['id']}/keys", json={}, headers=admin).json()["key"]
        sdk = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0, timeout=60)
        deadline = time.monotonic() + 300
        while True:  # vLLM starts (about 40 s here) and the node enrols
            try:
                whole = sdk.chat.completions.create(
                    model="tiny-random-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=6
                )
                break
            except openai.APIStatusError:
                assert time.monotonic() < deadline, "".join(_OUTPUT[proc.pid])
                time.sleep(1)
        assert whole.usage is not None
        assert whole.usage.completion_tokens == 6
        assert whole.choices[0].finish_reason == "length"
        parts = list(
            sdk.completions.create(
                model="tiny-random-llama",
                prompt="once upon a time",
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        streamed = parts[-1].usage
        assert streamed is not None
        assert streamed.completion_tokens == 5
        assert sum(1 for p in parts if p.choices and p.choices[0].text) >= 1
        # Both usage events went through JetStream into the ledger, rated at the demo prices.
        expected = (whole.usage.prompt_tokens + streamed.prompt_tokens) * 15 + (6 + 5) * 60
        _wait_unbilled(url, secret, expected)
    finally:
        if proc.poll() is None:
            _stop(proc, _descendants(proc))

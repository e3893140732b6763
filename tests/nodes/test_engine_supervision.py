"""The vLLM engine's supervision and load parsing, against a stand-in HTTP server (the real vLLM
is tested in test_vllm.py): what a long-running engine's odd moments must not do."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import psutil

from market.embedded import free_port
from nodes.engines.vllm import VllmEngine, parse_metrics
from nodes.profiles import LaunchPlan, ProcessSpec
from tests.nodes.helpers import make_job

SERVER = Path(__file__).with_name("fake_openai_server.py")


def test_broken_gauges_do_not_become_load() -> None:
    """NaN, infinite, negative or absurd gauges (a broken exporter) are skipped or bounded: an
    unbounded count once made every heartbeat fail to encode, and the node was called lost."""
    load = parse_metrics(
        "vllm:num_requests_running NaN\n"
        "vllm:num_requests_waiting +Inf\n"
        'vllm:kv_cache_usage_perc{engine="0"} +Inf\n'
        'vllm:num_requests_running{engine="1"} 3\n'
    )
    assert (load.running, load.waiting, load.kv_cache_usage) == (3, 0, 0.0)
    huge = parse_metrics("vllm:num_requests_running 1e20\nvllm:num_requests_waiting -3\nvllm:kv_cache_usage_perc 7\n")
    assert (huge.running, huge.waiting, huge.kv_cache_usage) == (1_000_000, 0, 1.0)


async def test_one_slow_health_check_does_not_restart_an_engine_up_for_long(tmp_path: Path) -> None:
    """The start-up timeout counts from the start, or from the check that first failed after the
    engine was ready; an engine up for longer than it must survive one slow ``/health``."""
    port = free_port()
    spec = ProcessSpec(
        name="vllm", role="engine", argv=[sys.executable, str(SERVER), str(port), str(tmp_path)], port=port
    )
    engine = VllmEngine(
        LaunchPlan("unified", "fake", [spec]),
        check_interval_s=0.2,
        startup_timeout_s=3.0,
        restart_backoff_s=(0.1, 0.1),
        log_dir=tmp_path,
    )
    await engine.start()
    try:
        await engine.wait_ready(30)
        await asyncio.sleep(3.5)  # up for longer than the start-up timeout
        (tmp_path / "slow_health").touch()
        await asyncio.sleep(5.6)  # one check times out
        (tmp_path / "slow_health").unlink(missing_ok=True)  # taken by the slow check
        await engine.wait_ready(10)
        await asyncio.sleep(1.0)  # a restart would have been counted by now
        assert engine.restarts == 0
    finally:
        await engine.stop()


async def test_jobs_reuse_the_connections_to_the_engine(tmp_path: Path) -> None:
    """A stream read to its ``[DONE]`` ends at once, and its connection goes back for the next
    job when the body's end comes (as vLLM's may under load, a moment later): aiohttp closes a
    connection released with its body unread, and a connection per job would cost the agent and
    the engine a connect each on the way to the first token."""
    port = free_port()
    spec = ProcessSpec(
        name="vllm", role="engine", argv=[sys.executable, str(SERVER), str(port), str(tmp_path)], port=port
    )
    engine = VllmEngine(LaunchPlan("unified", "fake", [spec]), served_model_name="fake", log_dir=tmp_path)
    ended = tmp_path / "ended"
    await engine.start()
    try:
        await engine.wait_ready(30)
        await asyncio.sleep(0.4)  # the readiness probe's completion has ended
        local_ports: set[int] = set()
        for _ in range(4):
            before = ended.read_text() if ended.exists() else ""
            async for _emission in engine.generate(make_job("fake", max_tokens=2)):
                local_ports |= {
                    c.laddr.port
                    for c in psutil.Process().net_connections(kind="tcp")
                    if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
                }
            # The job ended with its [DONE], before its body did (0.2 s later) ...
            assert (ended.read_text() if ended.exists() else "") == before
            await asyncio.sleep(0.4)
            assert ended.read_text() == before + "1"  # ... which was then read to its end
        assert 1 <= len(local_ports) <= 2  # a health check may hold one while a job starts
    finally:
        await engine.stop()

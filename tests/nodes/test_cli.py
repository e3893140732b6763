"""``python -m nodes``, as ``market up --node sim`` runs it: serves, and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from nats.aio.client import Client

from market.ids import new_id
from market.settings import Settings
from nodes.__main__ import main
from tests.nodes.helpers import HeartbeatWatch, JobWatch, make_job


async def test_local_sim_node_serves_and_drains_on_sigterm(nc: Client, settings: Settings, tmp_path: Path) -> None:
    node_id = new_id("node")
    beats = await HeartbeatWatch(nc, node_id).start()
    env = {
        **os.environ,
        "MARKET_NATS_URL": settings.require_nats_url(),
        "MARKET_NATS_USER": settings.nats_user or "",
        "MARKET_NATS_PASSWORD": settings.nats_password or "",
        "MARKET_DATA_DIR": str(tmp_path),
        "MARKET_HEARTBEAT_INTERVAL": "0.2",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nodes", "local", "--engine", "sim", "--node-id", node_id, "--provider-id", "prov_cli",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=open(tmp_path / "node.log", "wb"),  # noqa: SIM115 - the child owns it
    )  # fmt: skip
    try:
        try:
            beat = await beats.wait_for("healthy", timeout=30)
        except TimeoutError:
            raise AssertionError((tmp_path / "node.log").read_text()) from None
        assert (beat.models, beat.engine, beat.provider_id) == (["sim-llama-3-8b"], "sim", "prov_cli")

        watch = await JobWatch(nc, make_job("sim-llama-3-8b", max_tokens=150)).submit(node_id)
        await asyncio.wait_for(watch.first_data.wait(), 10)
        proc.send_signal(signal.SIGTERM)
        end = await watch.done(10)
        assert end.kind == "end"  # the in-flight job finished
        assert end.usage is not None
        assert end.usage.completion_tokens == 150
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert beats.beats[-1].status == "draining"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_bad_profile_is_refused_with_one_line(tmp_path: Path, capsys: object) -> None:
    profile = tmp_path / "node.yaml"
    profile.write_text(f"model: {tmp_path}\nserved_model_name: m\nmode: semi-pd\nprefill_share: 150\n")
    assert main(["run", "--profile", str(profile)]) == 1
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.count("\n") == 1
    assert "prefill_share must be between 1 and 100" in err

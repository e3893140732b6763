"""A new provider's path: key, enrolment token, `market node join` in another process, the node
turns healthy, tenant traffic lands on it, drain, and it leaves without dropping a request."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from market.admin_keys import create_platform_admin_key
from market.settings import Settings
from scheduler.service import SchedulerService
from tests.conftest import RunningApi
from tests.token.conftest import make_tenant

SIM_MODEL = "sim-llama-3-8b"


def _join(api: RunningApi, token: str, data_dir: Path, speedup: float = 20.0) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}
    env["MARKET_DATA_DIR"] = str(data_dir)
    env["MARKET_HEARTBEAT_INTERVAL"] = "0.2"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "market.cli",
            "node",
            "join",
            "--api",
            api.url,
            "--token",
            token,
            "--engine",
            "sim",
            "--speedup",
            str(speedup),
            "--name",
            "rig-1",
            "--data-dir",
            str(data_dir / "node"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


async def _status(client: httpx.AsyncClient, headers: dict[str, str], want: str, timeout: float = 30) -> list[dict]:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = (await client.get("/api/provider/nodes", headers=headers)).json()
        if nodes and all(n["status"] == want for n in nodes):
            return list(nodes)
        await asyncio.sleep(0.1)
    raise AssertionError(f"nodes never became {want}: {nodes}")


async def test_provider_joins_serves_drains_and_leaves(
    api: RunningApi, scheduler: SchedulerService, settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    admin = await create_platform_admin_key(settings)
    tenant = await make_tenant(engine, "startup", models=((SIM_MODEL, 8192),))
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        created = (
            await client.post(
                "/api/admin/providers", json={"name": "rigs inc"}, headers={"Authorization": f"Bearer {admin}"}
            )
        ).json()
        provider = {"Authorization": f"Bearer {created['key']}"}
        token = (await client.post("/api/provider/enrolment-tokens", json={}, headers=provider)).json()["token"]

        node = _join(api, token, tmp_path)
        try:
            nodes = await _status(client, provider, "healthy")
            assert nodes[0]["models"] == [SIM_MODEL]
            assert nodes[0]["name"] == "rig-1"
            node_id = nodes[0]["id"]

            sdk = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key=tenant.secret, max_retries=0)
            answer = await sdk.completions.create(model=SIM_MODEL, prompt="hello", max_tokens=8)
            assert answer.usage is not None
            assert answer.usage.completion_tokens == 8
            assert scheduler.placements[node_id] == 1

            # Long requests in flight, then the provider drains: they all finish.
            in_flight = [
                asyncio.create_task(sdk.completions.create(model=SIM_MODEL, prompt="tell me", max_tokens=300))
                for _ in range(4)
            ]
            await asyncio.sleep(0.3)
            drained = await client.post(f"/api/provider/nodes/{node_id}/drain", headers=provider)
            assert drained.status_code == 202
            results = await asyncio.gather(*in_flight)
            assert [r.usage.completion_tokens for r in results if r.usage] == [300] * 4
            out, _ = await asyncio.to_thread(node.communicate, timeout=30)
            assert node.returncode == 0, out
            assert f"joined the marketplace as {node_id}" in out

            # With the only node gone, a tenant gets a clear 503, not a hang.
            with pytest.raises(openai.InternalServerError):
                await sdk.completions.create(model=SIM_MODEL, prompt="anyone?", max_tokens=2)
        finally:
            if node.poll() is None:
                node.kill()
                node.wait()

        # The same token cannot enrol another machine.
        again = _join(api, token, tmp_path / "other")
        out, _ = await asyncio.to_thread(again.communicate, timeout=30)
        assert again.returncode == 1
        assert "enrolment refused (401): this enrolment token was already used; mint a new one" in out

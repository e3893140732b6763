"""Providers and their nodes: enrolment, what a node may do on NATS, revocation, drain, listing."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from market import natsauth, subjects, wire
from market.admin_keys import create_platform_admin_key
from market.db import session_factory
from market.models import EnrolmentToken
from market.settings import Settings
from tests.conftest import RunningApi
from tests.fleet.helpers import create_provider


async def _enrol(client: httpx.AsyncClient, provider: dict[str, str], name: str = "gpu-1") -> tuple[str, str]:
    token = (await client.post("/api/provider/enrolment-tokens", json={}, headers=provider)).json()["token"]
    seed = natsauth.new_node_seed()
    enrolled = await client.post(
        "/api/nodes/enrol", json={"token": token, "public_key": natsauth.public_key(seed), "name": name}
    )
    assert enrolled.status_code == 201, enrolled.text
    return enrolled.json()["node_id"], seed


@pytest.fixture
async def admin(settings: Settings) -> str:
    return await create_platform_admin_key(settings)


async def _node_connection(settings: Settings, seed: str, errors: list[str], closed: asyncio.Event) -> Client:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    async def on_closed() -> None:
        closed.set()

    return await nats.connect(
        settings.require_nats_url(),
        nkeys_seed_str=seed,
        error_cb=on_error,
        closed_cb=on_closed,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
    )


async def test_enrolment_token_is_one_time_and_expires(api: RunningApi, admin: str, engine: AsyncEngine) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        _, provider = await create_provider(client, admin, "acme gpus")
        minted = await client.post("/api/provider/enrolment-tokens", json={"ttl_seconds": 600}, headers=provider)
        assert minted.status_code == 201
        token = minted.json()["token"]
        key = natsauth.public_key(natsauth.new_node_seed())
        first = await client.post("/api/nodes/enrol", json={"token": token, "public_key": key})
        assert first.status_code == 201
        assert first.json()["node_id"].startswith("node_")
        again = await client.post(
            "/api/nodes/enrol", json={"token": token, "public_key": natsauth.public_key(natsauth.new_node_seed())}
        )
        assert again.status_code == 401
        assert again.json()["code"] == "enrolment_token_used"
        assert "already used" in again.json()["detail"]

        stale = (await client.post("/api/provider/enrolment-tokens", json={}, headers=provider)).json()
        async with session_factory(engine)() as session, session.begin():
            await session.execute(
                update(EnrolmentToken)
                .where(EnrolmentToken.id == stale["id"])
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        expired = await client.post(
            "/api/nodes/enrol",
            json={"token": stale["token"], "public_key": natsauth.public_key(natsauth.new_node_seed())},
        )
        assert expired.status_code == 401
        assert expired.json()["code"] == "enrolment_token_expired"

        bad = await client.post("/api/nodes/enrol", json={"token": "enr-x", "public_key": "U" * 56})
        assert bad.status_code == 400
        assert bad.headers["content-type"].startswith("application/problem+json")
        unknown_field = await client.post("/api/provider/enrolment-tokens", json={"ttl": 5}, headers=provider)
        assert unknown_field.status_code == 400
        tenant_key_cannot = await client.post(
            "/api/provider/enrolment-tokens", json={}, headers={"Authorization": f"Bearer {admin}"}
        )
        assert tenant_key_cannot.status_code == 403


async def test_a_node_can_use_only_its_own_subjects_and_revocation_cuts_it_off(
    api: RunningApi, admin: str, settings: Settings, nc: Client
) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        _, provider = await create_provider(client, admin, "acme gpus")
        node_a, seed_a = await _enrol(client, provider, "a")
        node_b, _ = await _enrol(client, provider, "b")
        await asyncio.sleep(0.3)  # the server reloads its authorization

        errors: list[str] = []
        closed = asyncio.Event()
        node = await _node_connection(settings, seed_a, errors, closed)
        jobs: list[bytes] = []

        async def on_job(msg: Any) -> None:
            jobs.append(msg.data)
            await node.publish(msg.reply, b"chunk")

        await node.subscribe(subjects.node_jobs(node_a), cb=on_job)
        await node.subscribe(subjects.node_jobs(node_b))  # another node's jobs
        await node.subscribe(subjects.USAGE_SUBJECTS)  # the usage stream
        relayed: list[str] = []

        async def on_relay(msg: Any) -> None:
            relayed.append(msg.subject)

        await nc.subscribe("fleet.relay.>", cb=on_relay)
        await nc.flush()
        await node.publish(subjects.heartbeat(node_b), b"forged")
        await node.publish(subjects.JOBS_SUBMIT, b"forged")
        await node.publish(subjects.node_relay(node_b, "api1"), b"forged")  # in another node's name
        for _ in range(25):  # its own chunk batches (again while the server may still be reloading)
            await node.publish(subjects.node_relay(node_a, "api1"), b"batch")
            await node.flush()
            await asyncio.sleep(0.2)
            if relayed:
                break
        assert set(relayed) == {subjects.node_relay(node_a, "api1")}, errors
        assert any(f'publish to "{subjects.node_relay(node_b, "api1")}"' in e for e in errors)
        assert any(f'subscription to "{subjects.node_jobs(node_b)}"' in e for e in errors)
        assert any('subscription to "usage.>"' in e for e in errors)
        assert any(f'publish to "{subjects.heartbeat(node_b)}"' in e for e in errors)
        assert any('publish to "jobs.submit"' in e for e in errors)

        replies = await nc.request(subjects.node_jobs(node_a), b"job", timeout=2)
        assert replies.data == b"chunk"
        assert jobs == [b"job"]

        revoked = await client.post(f"/api/provider/nodes/{node_a}/revoke", headers=provider)
        assert revoked.status_code == 200
        assert revoked.json()["status"] == "revoked"
        await asyncio.wait_for(closed.wait(), 10)
        assert any("Authorization Violation" in e for e in errors)
        listed = {n["id"]: n["status"] for n in (await client.get("/api/provider/nodes", headers=provider)).json()}
        assert listed[node_a] == "revoked"


async def test_provider_sees_its_nodes_live_and_only_its_own(
    api: RunningApi, admin: str, settings: Settings, nc: Client
) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        provider_a, headers_a = await create_provider(client, admin, "a")
        _, headers_b = await create_provider(client, admin, "b")
        node_id, seed = await _enrol(client, headers_a)
        await asyncio.sleep(0.3)
        node = await _node_connection(settings, seed, [], asyncio.Event())
        controls: list[bytes] = []

        async def on_control(msg: Any) -> None:
            controls.append(msg.data)

        await node.subscribe(subjects.node_control(node_id), cb=on_control)
        beat = wire.Heartbeat(
            node_id=node_id,
            provider_id=provider_a,
            status="healthy",
            models=["m"],
            running=3,
            waiting=1,
            kv_cache_usage=0.25,
            slots=12,
            sent_at=time.time(),
        )
        await node.publish(subjects.heartbeat(node_id), wire.encode(beat))
        # Speaking for another node on its own subject is ignored.
        forged = wire.Heartbeat(node_id="node_someone_else", provider_id=provider_a, status="healthy", models=["x"])
        await node.publish(subjects.heartbeat(node_id), wire.encode(forged))
        await node.flush()
        await asyncio.sleep(0.2)
        assert "node_someone_else" not in api.app.state.app_state.services["fleet"].live
        listed = (await client.get("/api/provider/nodes", headers=headers_a)).json()
        assert [(n["id"], n["status"], n["running"], n["models"]) for n in listed] == [(node_id, "healthy", 3, ["m"])]
        assert (await client.get("/api/provider/nodes", headers=headers_b)).json() == []
        assert (await client.post(f"/api/provider/nodes/{node_id}/drain", headers=headers_b)).status_code == 404

        await asyncio.sleep(settings.heartbeat_timeout_s + 0.3)
        listed = (await client.get("/api/provider/nodes", headers=headers_a)).json()
        assert listed[0]["status"] == "unhealthy"

        drained = await client.post(f"/api/provider/nodes/{node_id}/drain", headers=headers_a)
        assert drained.status_code == 202
        assert drained.json()["status"] == "draining"
        await asyncio.sleep(0.2)
        assert controls == [b'{"action":"drain"}']
        await node.close()

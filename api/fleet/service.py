"""Providers, node enrolment, revocation and drain, and a live view of the fleet.

Enrolment trades a one-time, expiring token for a node id; the node brings its own public nkey,
which becomes its NATS user with permissions for its own subjects only (``market.natsauth``).
Every api replica listens to heartbeats, so the provider API shows live load without a database
write per heartbeat; the schedulers persist status for the history.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

from api.errors import Conflict, NotFound, Unauthorized
from api.state import AppState
from market import keys, natsauth, subjects, wire
from market.ids import new_id
from market.models import ApiKey, EnrolmentToken, Model, Node, Provider, ProviderOffer, UsageRecord

log = logging.getLogger(__name__)

_heartbeat = wire.decoder(wire.Heartbeat)
NATS_AUTH_LOCK = 7_300_001
"""Advisory lock id: one replica at a time renders the NATS authorization file."""


class FleetService:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.live: dict[str, tuple[float, wire.Heartbeat]] = {}

    async def start(self) -> None:
        async def on_heartbeat(msg: Any) -> None:
            try:
                beat = _heartbeat.decode(msg.data)
            except msgspec.DecodeError:
                return
            if msg.subject != subjects.heartbeat(beat.node_id):
                return  # a node may only speak for itself (NATS lets it publish on its own subject)
            self.live[beat.node_id] = (time.monotonic(), beat)

        await self.state.nc.subscribe(subjects.HEARTBEATS, cb=on_heartbeat)

    def live_status(self, node: Node) -> tuple[str, wire.Heartbeat | None]:
        """The status a provider sees: revoked and draining win; otherwise heartbeats decide."""
        seen = self.live.get(node.id)
        beat = seen[1] if seen else None
        if node.revoked_at is not None:
            return "revoked", beat
        if node.status == "draining":
            return "draining", beat
        if seen is None:
            return ("unhealthy" if node.last_seen_at else node.status), None
        if time.monotonic() - seen[0] > self.state.settings.heartbeat_timeout_s:
            return "unhealthy", beat
        return beat.status if beat and beat.status != "starting" else "starting", beat

    def capacity(self, model: str) -> int:
        """Sequence slots (``max_num_seqs``) of the live, healthy nodes serving ``model`` now."""
        cutoff = time.monotonic() - self.state.settings.heartbeat_timeout_s
        return sum(
            beat.profile.max_num_seqs
            for seen, beat in self.live.values()
            if seen >= cutoff and beat.status == "healthy" and model in beat.models
        )

    # ---- providers -------------------------------------------------------------------------
    async def create_provider(self, name: str) -> tuple[Provider, str, str]:
        async with self.state.sessions() as session, session.begin():
            provider = Provider(id=new_id("provider"), name=name)
            session.add(provider)
            await session.flush()
            secret, digest, prefix = keys.generate("provider")
            key_id = new_id("key")
            session.add(
                ApiKey(
                    id=key_id,
                    role="provider",
                    provider_id=provider.id,
                    name=f"{name[:186]} provider key",  # a provider name may take the key name's 200
                    prefix=prefix,
                    secret_hash=digest,
                    scopes=["provider"],
                )
            )
        return provider, secret, key_id

    async def mint_enrolment_token(self, provider_id: str, ttl_s: int) -> tuple[EnrolmentToken, str]:
        secret, digest, _ = keys.generate("enrolment")
        token = EnrolmentToken(
            id=new_id("enrolment"),
            provider_id=provider_id,
            secret_hash=digest,
            expires_at=datetime.now(UTC) + timedelta(seconds=ttl_s),
        )
        async with self.state.sessions() as session, session.begin():
            session.add(token)
        return token, secret

    # ---- enrolment -------------------------------------------------------------------------
    async def enrol(self, secret: str, public_key: str, name: str, hardware: dict[str, Any]) -> Node:
        """Use the token once and create the node; then let it into NATS."""
        digest = keys.digest(secret)
        async with self.state.sessions() as session, session.begin():
            token = (
                await session.execute(
                    select(EnrolmentToken).where(EnrolmentToken.secret_hash == digest).with_for_update()
                )
            ).scalar_one_or_none()
            if token is None:
                raise Unauthorized(
                    "unknown enrolment token: mint one with POST /api/provider/enrolment-tokens",
                    code="invalid_enrolment_token",
                )
            if token.used_at is not None:
                raise Unauthorized("this enrolment token was already used; mint a new one", code="enrolment_token_used")
            if token.expires_at <= datetime.now(UTC):
                raise Unauthorized("this enrolment token has expired; mint a new one", code="enrolment_token_expired")
            if await session.scalar(select(Node.id).where(Node.nats_user == public_key)) is not None:
                raise Conflict("a node with this public key is already enrolled", code="node_key_in_use")
            node = Node(
                id=new_id("node"),
                provider_id=token.provider_id,
                name=name,
                status="starting",
                nats_user=public_key,
                hardware=hardware,
            )
            session.add(node)
            await session.flush()
            token.used_at = datetime.now(UTC)
            token.node_id = node.id
        await self.apply_nats_auth()
        return node

    async def set_status(self, provider_id: str, node_id: str, action: str) -> Node:
        async with self.state.sessions() as session, session.begin():
            node = (
                await session.execute(
                    select(Node).where(Node.id == node_id, Node.provider_id == provider_id).with_for_update()
                )
            ).scalar_one_or_none()
            if node is None:
                raise NotFound("node not found", code="node_not_found")
            if node.revoked_at is not None:
                raise Conflict("node is revoked", code="node_revoked")
            if action == "drain":
                node.status = "draining"
            else:
                node.status = "revoked"
                node.revoked_at = datetime.now(UTC)
        if action == "drain":
            await self.state.nc.publish(subjects.node_control(node_id), msgspec.json.encode({"action": "drain"}))
            await self.state.nc.publish(
                subjects.FLEET_EVENTS,
                wire.encode(wire.FleetEvent(kind="node_draining", node_id=node_id, at=time.time())),
            )
        else:
            # Order it off first (it may still be connected where NATS users are managed outside),
            # tell schedulers and api replicas, then cut its NATS user.
            await self.state.nc.publish(subjects.node_control(node_id), msgspec.json.encode({"action": "revoke"}))
            await self.state.nc.publish(
                subjects.FLEET_EVENTS,
                wire.encode(wire.FleetEvent(kind="node_revoked", node_id=node_id, at=time.time())),
            )
            await self.state.nc.flush()
            await self.apply_nats_auth()
        return node

    async def apply_nats_auth(self) -> None:
        """Render the node users into the embedded server's authorization file and reload it."""
        auth_dir = self.state.settings.nats_auth_dir
        if auth_dir is None:
            log.info("NATS authorization is managed outside this deployment; not rendering node users")
            return
        async with self.state.sessions() as session, session.begin():
            await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": NATS_AUTH_LOCK})
            rows = (
                await session.execute(
                    select(Node.id, Node.nats_user).where(Node.revoked_at.is_(None), Node.nats_user.is_not(None))
                )
            ).all()
            passwords = natsauth.load_or_create_service_passwords(auth_dir / "services.json")
            content = natsauth.render(passwords, [natsauth.NodeIdentity(r[0], r[1]) for r in rows if r[1]])
            await asyncio.to_thread(natsauth.write_atomically, auth_dir / "auth.conf", content)
            if not natsauth.reload_server(auth_dir / "nats.pid"):
                log.warning("could not signal nats-server to reload its authorization")

    async def offers_of(self, provider_id: str) -> list[ProviderOffer]:
        async with self.state.sessions() as session:
            return list(
                (
                    await session.scalars(
                        select(ProviderOffer)
                        .where(ProviderOffer.provider_id == provider_id)
                        .order_by(ProviderOffer.model)
                    )
                ).all()
            )

    async def set_offer(self, provider_id: str, model: str, input_price: int, output_price: int) -> ProviderOffer:
        async with self.state.sessions() as session, session.begin():
            if await session.get(Model, model) is None:
                raise NotFound(f"model '{model}' is not in the catalog", code="model_not_found")
            statement = (
                pg_insert(ProviderOffer)
                .values(
                    provider_id=provider_id,
                    model=model,
                    input_minor_per_million=input_price,
                    output_minor_per_million=output_price,
                )
                .on_conflict_do_update(
                    index_elements=[ProviderOffer.provider_id, ProviderOffer.model],
                    set_={
                        "input_minor_per_million": input_price,
                        "output_minor_per_million": output_price,
                        "updated_at": func.now(),
                    },
                )
                .returning(ProviderOffer)
            )
            offer: ProviderOffer = (await session.scalars(statement)).one()
        return offer

    async def withdraw_offer(self, provider_id: str, model: str) -> ProviderOffer:
        async with self.state.sessions() as session, session.begin():
            offer = await session.get(ProviderOffer, (provider_id, model))
            if offer is None:
                raise NotFound(f"no offer for model '{model}'", code="offer_not_found")
            await session.delete(offer)
        return offer

    async def served_by_node(self, provider_id: str) -> dict[str, tuple[int, int]]:
        """Tokens served and provider earnings (micros) per node, from the rated usage records."""
        async with self.state.sessions() as session:
            rows = (
                await session.execute(
                    select(
                        UsageRecord.node_id,
                        func.sum(UsageRecord.prompt_tokens + UsageRecord.billed_completion_tokens),
                        func.coalesce(func.sum(UsageRecord.provider_micros), 0),
                    )
                    .where(UsageRecord.provider_id == provider_id, UsageRecord.node_id.is_not(None))
                    .group_by(UsageRecord.node_id)
                )
            ).all()
        return {node_id: (int(tokens or 0), int(micros or 0)) for node_id, tokens, micros in rows if node_id}

    async def nodes_of(self, provider_id: str) -> list[Node]:
        async with self.state.sessions() as session:
            return list(
                (
                    await session.scalars(select(Node).where(Node.provider_id == provider_id).order_by(Node.created_at))
                ).all()
            )

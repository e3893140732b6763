"""Provider accounts (admin), the provider API, and node enrolment."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.params import FromPath
from msgspec import Meta, Struct
from sqlalchemy import select

from api.auth import Principal, principal_of, require_platform_admin, require_provider
from api.bodies import decode_body
from api.errors import InvalidRequest
from api.fleet.service import FleetService
from api.state import AppState
from market import natsauth
from market.models import Node, Provider, ProviderOffer

Name = Annotated[str, Meta(min_length=1, max_length=200)]


class ProviderIn(Struct, forbid_unknown_fields=True):
    name: Name


class ProviderOut(Struct):
    id: str
    name: str
    created_at: datetime
    key: str | None = None
    key_id: str | None = None


class EnrolmentTokenIn(Struct, forbid_unknown_fields=True):
    ttl_seconds: Annotated[int, Meta(ge=60, le=7 * 24 * 3600)] = 3600


class EnrolmentTokenOut(Struct):
    id: str
    token: str
    expires_at: datetime


class HardwareIn(Struct, forbid_unknown_fields=True):
    accelerator: Annotated[str, Meta(max_length=100)] = "cpu"
    memory_gib: Annotated[float, Meta(ge=0, le=100_000)] = 0.0
    count: Annotated[int, Meta(ge=1, le=1024)] = 1


class EnrolIn(Struct, forbid_unknown_fields=True):
    token: Annotated[str, Meta(min_length=1, max_length=200)]
    public_key: Annotated[str, Meta(min_length=56, max_length=56)]
    name: Annotated[str, Meta(max_length=200)] = ""
    hardware: HardwareIn = msgspec.field(default_factory=HardwareIn)


class EnrolOut(Struct):
    node_id: str
    provider_id: str
    nats_url: str
    heartbeat_interval_s: float


class OfferIn(Struct, forbid_unknown_fields=True):
    model: Annotated[str, Meta(min_length=1, max_length=200)]
    input_minor_per_million: Annotated[int, Meta(ge=0, le=10**12)]
    output_minor_per_million: Annotated[int, Meta(ge=0, le=10**12)]


class OfferOut(Struct):
    model: str
    input_minor_per_million: int
    output_minor_per_million: int
    updated_at: datetime


class NodeOut(Struct):
    id: str
    name: str
    status: str
    engine: str
    models: list[str]
    profile: dict[str, Any]
    hardware: dict[str, Any]
    created_at: datetime
    last_seen_at: datetime | None
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None
    slots: int | None = None
    tokens_served: int = 0
    """Prompt plus billed completion tokens of the requests this node served."""
    earnings_micros: int = 0
    """What the provider earned from them, in micros of the minor unit (rated usage only)."""


PROVIDER_IN = msgspec.json.Decoder(ProviderIn)
ENROLMENT_TOKEN_IN = msgspec.json.Decoder(EnrolmentTokenIn)
OFFER_IN = msgspec.json.Decoder(OfferIn)
ENROL_IN = msgspec.json.Decoder(EnrolIn)


def fleet(request: Request[Any, Any, Any]) -> FleetService:
    state: AppState = request.app.state.app_state
    service: FleetService = state.services["fleet"]
    return service


class AdminProvidersController(Controller):
    path = "/api/admin/providers"
    tags = ["admin"]
    guards = [require_platform_admin]

    @post("/", status_code=201)
    async def create(self, request: Request[Any, Any, Any]) -> ProviderOut:
        """Create a provider; its key is returned once."""
        body = decode_body(await request.body(), PROVIDER_IN, empty=b"{}")
        provider, secret, key_id = await fleet(request).create_provider(body.name)
        return ProviderOut(
            id=provider.id, name=provider.name, created_at=provider.created_at, key=secret, key_id=key_id
        )

    @get("/")
    async def list_providers(self, request: Request[Any, Any, Any]) -> list[ProviderOut]:
        state: AppState = request.app.state.app_state
        async with state.sessions() as session:
            rows = (await session.scalars(select(Provider).order_by(Provider.created_at))).all()
        return [ProviderOut(id=p.id, name=p.name, created_at=p.created_at) for p in rows]


class ProviderController(Controller):
    path = "/api/provider"
    tags = ["provider"]
    guards = [require_provider]

    @post("/enrolment-tokens", status_code=201)
    async def mint(self, request: Request[Any, Any, Any]) -> EnrolmentTokenOut:
        """A one-time, expiring token for `market node join --token`."""
        principal = await principal_of(request)
        body = decode_body(await request.body(), ENROLMENT_TOKEN_IN, empty=b"{}")
        assert principal.provider_id is not None
        token, secret = await fleet(request).mint_enrolment_token(principal.provider_id, body.ttl_seconds)
        return EnrolmentTokenOut(id=token.id, token=secret, expires_at=token.expires_at)

    @get("/nodes")
    async def nodes(self, request: Request[Any, Any, Any]) -> list[NodeOut]:
        """This provider's nodes with live status and load, tokens served and earnings."""
        principal = await principal_of(request)
        service = fleet(request)
        assert principal.provider_id is not None
        served = await service.served_by_node(principal.provider_id)
        out = []
        for node in await service.nodes_of(principal.provider_id):
            row = _node_out(service, node)
            row.tokens_served, row.earnings_micros = served.get(node.id, (0, 0))
            out.append(row)
        return out

    @get("/offers")
    async def offers(self, request: Request[Any, Any, Any]) -> list[OfferOut]:
        """This provider's asking prices per model (minor units per 1M tokens)."""
        principal = await principal_of(request)
        assert principal.provider_id is not None
        return [_offer_out(o) for o in await fleet(request).offers_of(principal.provider_id)]

    @put("/offers", status_code=200)
    async def set_offer(self, request: Request[Any, Any, Any]) -> OfferOut:
        """Set the price asked for a model; schedulers route by it at once, payouts follow it from
        the next price-book version."""
        principal = await principal_of(request)
        assert principal.provider_id is not None
        body = decode_body(await request.body(), OFFER_IN, empty=b"{}")
        offer = await fleet(request).set_offer(
            principal.provider_id, body.model, body.input_minor_per_million, body.output_minor_per_million
        )
        return _offer_out(offer)

    @delete("/offers/{model:path}", status_code=200)
    async def withdraw_offer(self, request: Request[Any, Any, Any], model: FromPath[str]) -> OfferOut:
        principal = await principal_of(request)
        assert principal.provider_id is not None
        return _offer_out(await fleet(request).withdraw_offer(principal.provider_id, model.lstrip("/")))

    @post("/nodes/{node_id:str}/drain", status_code=202)
    async def drain(self, request: Request[Any, Any, Any], node_id: FromPath[str]) -> NodeOut:
        """Finish in-flight work, take no more; the node then leaves."""
        return await _act(request, node_id, "drain")

    @post("/nodes/{node_id:str}/revoke", status_code=200)
    async def revoke(self, request: Request[Any, Any, Any], node_id: FromPath[str]) -> NodeOut:
        """Cut the node off NATS at once; its jobs fail over."""
        return await _act(request, node_id, "revoke")


async def _act(request: Request[Any, Any, Any], node_id: str, action: str) -> NodeOut:
    principal: Principal = await principal_of(request)
    assert principal.provider_id is not None
    service = fleet(request)
    node = await service.set_status(principal.provider_id, node_id, action)
    return _node_out(service, node)


def _offer_out(offer: ProviderOffer) -> OfferOut:
    return OfferOut(
        model=offer.model,
        input_minor_per_million=offer.input_minor_per_million,
        output_minor_per_million=offer.output_minor_per_million,
        updated_at=offer.updated_at,
    )


def _node_out(service: FleetService, node: Node) -> NodeOut:
    status, beat = service.live_status(node)
    return NodeOut(
        id=node.id,
        name=node.name,
        status=status,
        engine=beat.engine if beat else node.engine,
        models=list(beat.models) if beat else list(node.models or []),
        profile=msgspec.to_builtins(beat.profile) if beat else dict(node.profile or {}),
        hardware=msgspec.to_builtins(beat.hardware) if beat else dict(node.hardware or {}),
        created_at=node.created_at,
        last_seen_at=node.last_seen_at,
        running=beat.running if beat else None,
        waiting=beat.waiting if beat else None,
        kv_cache_usage=beat.kv_cache_usage if beat else None,
        slots=beat.slots if beat else None,
    )


class EnrolController(Controller):
    path = "/api/nodes"
    tags = ["nodes"]

    @post("/enrol", status_code=201)
    async def enrol(self, request: Request[Any, Any, Any]) -> EnrolOut:
        """A provider machine joins with a one-time token and its own public nkey."""
        body = decode_body(await request.body(), ENROL_IN, empty=b"{}")
        if not natsauth.is_user_public_key(body.public_key):
            raise InvalidRequest("public_key must be a NATS user public nkey (U...)", param="public_key")
        service = fleet(request)
        node = await service.enrol(body.token, body.public_key, body.name, msgspec.to_builtins(body.hardware))
        settings = service.state.settings
        return EnrolOut(
            node_id=node.id,
            provider_id=node.provider_id,
            nats_url=settings.nats_public_url or settings.require_nats_url(),
            heartbeat_interval_s=settings.heartbeat_interval_s,
        )


async def start_fleet_service(state: AppState) -> None:
    service = FleetService(state)
    await service.start()
    state.services["fleet"] = service


ROUTES = [AdminProvidersController, ProviderController, EnrolController]

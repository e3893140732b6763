"""Elastic reservations, self-served by tenants under ``/api/tenant/reservations``, and made or
changed on a tenant's behalf by its admins under ``/api/admin/tenants/{id}/reservations`` (a
platform admin, or the admin of the tenant's incubator: the tenant is billed for them either way).

A reservation holds ``slots`` requests in flight for one model in the ``reserved`` class (served
first by the schedulers, and allowed the headroom every node keeps from other classes), and up to
``burst_slots`` more in the ``burst`` class; admission counts them (``api.limits``, migration
0012). Slots are charged per hour, for the most held during the hour, at the price book's
``reservation_hour_minor``; tokens are billed as used at the class's prices. A tenant resizes one
whenever its traffic changes: growing takes effect at once if the fleet has room, shrinking too
(requests in flight finish; new ones are classed by the new size).

What the marketplace can promise is bounded by its live fleet: reservations for a model together
hold at most ``reservable_share`` of the sequence slots of the healthy nodes serving it now, so a
new or larger reservation beyond that is a 409. Sizing is serialised per model by the model row's
lock, taken before the reservation's; admission locks a tenant's quota row and then its
reservation's, never a model's, and sizing locks no quota row, so none of them can wait on another
in a cycle; two replicas cannot both hand out the last slots.

Capacity nobody may use is neither held nor charged: suspending a tenant ends its reservations, and
retiring a model ends every reservation of it (``end_all``, in the same transaction). Sizing takes
the tenant's row in share mode between the model's and the reservation's, so a suspension (tenant,
then its quota rows, then its reservations) and a reservation made or grown beside it cannot both
commit or deadlock; the model's row is taken ``FOR NO KEY UPDATE``, which lets a tenant's allowed
models be set (tenant row, then a key-share lock on the model by the foreign key) meanwhile.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from msgspec import UNSET, Meta, Struct, UnsetType
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from api.admin.access import require_scope, visible_tenant
from api.admin.schemas import Input, ModelName
from api.auth import Principal
from api.errors import Conflict, Forbidden, NotFound
from api.state import AppState
from market.ids import new_id
from market.models import (
    Model,
    PriceBookEntry,
    Reservation,
    ReservationChange,
    ReservationHold,
    Tenant,
    TenantModel,
    TenantQuota,
)
from market.models.billing import price_book_in_force

Slots = Annotated[int, Meta(ge=1, le=1_000_000)]
BurstSlots = Annotated[int, Meta(ge=0, le=1_000_000)]


class ReservationCreate(Input):
    model: ModelName
    slots: Slots
    """Requests in flight guaranteed (``reserved`` class), charged per hour."""
    burst_slots: BurstSlots = 0
    """Requests in flight allowed above ``slots`` (``burst`` class), billed per token as used."""


class ReservationResize(Input):
    slots: Slots | UnsetType = UNSET
    burst_slots: BurstSlots | UnsetType = UNSET


class ReservationOut(Struct, kw_only=True):
    id: str
    model: str
    slots: int
    burst_slots: int
    status: str
    in_flight: int
    """Requests running under it now, on every api replica (both classes)."""
    slot_hour_minor: int
    """The price of one slot for one hour now, in minor units of ``currency``."""
    hour_minor: int
    """What one hour at the current size costs (``slots * slot_hour_minor``)."""
    currency: str
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None
    backed: bool | None = None
    """Whether the live fleet backs the model's reservations now: their slots together within the
    reservable share of the healthy nodes serving it (capacity is checked when a reservation is
    made or grown; nodes that leave later shrink it). None for an ended reservation."""


async def _prices(session: AsyncSession, model: str, currency: str) -> dict[str, PriceBookEntry]:
    """The price book entries for ``model`` in force now, by admission class."""
    book = price_book_in_force(currency, func.now()).scalar_subquery()
    rows = await session.scalars(
        select(PriceBookEntry).where(PriceBookEntry.price_book_id == book, PriceBookEntry.model == model)
    )
    return {row.admission_class: row for row in rows}


async def _slot_hour_price(session: AsyncSession, model: str, currency: str, burst_slots: int) -> int:
    """The per-slot hourly price; 409 unless the price book prices the reservation (and its burst)."""
    prices = await _prices(session, model, currency)
    reserved = prices.get("reserved")
    if reserved is None or reserved.reservation_hour_minor is None:
        raise Conflict(f"the model '{model}' cannot be reserved: it has no reservation price", code="not_reservable")
    if burst_slots and "burst" not in prices:
        raise Conflict(f"the model '{model}' has no burst price; reserve it with burst_slots 0", code="not_reservable")
    return reserved.reservation_hour_minor


async def _check_capacity(session: AsyncSession, state: AppState, model: str, more: int) -> None:
    """409 unless ``more`` reserved slots fit in the model's reservable share of the live fleet.

    The caller holds the model row's lock, so the sum read here stays true until it commits."""
    held = await session.scalar(
        select(func.coalesce(func.sum(Reservation.slots), 0)).where(
            Reservation.model == model, Reservation.status == "active"
        )
    )
    capacity = state.services["fleet"].capacity(model)
    reservable = math.floor(capacity * state.settings.reservable_share)
    free = max(0, reservable - int(held or 0))
    if more > free:
        raise Conflict(
            f"not enough capacity to reserve {more} more slot(s) of '{model}': {free} of {reservable} reservable"
            f" slots are free (the live fleet serves {capacity}); try fewer slots, or later",
            code="insufficient_capacity",
        )


async def _lock_model(session: AsyncSession, name: str) -> Model | None:
    """Lock the model's row: it serialises reservation sizing for the model. ``FOR NO KEY UPDATE``:
    rows that refer to the model (a tenant's allowed models, inserted under the tenant's lock) may
    still be written meanwhile, or that and our wait for the tenant's row would be a cycle."""
    query = select(Model).where(Model.name == name).with_for_update(key_share=True)
    return (await session.execute(query)).scalar_one_or_none()


async def _lock_tenant(session: AsyncSession, tenant_id: str) -> str | None:
    """The tenant's status, its row held in share mode until commit: a suspension waits for us."""
    return await session.scalar(select(Tenant.status).where(Tenant.id == tenant_id).with_for_update(read=True))


async def _check_usable(
    session: AsyncSession, tenant_id: str, name: str, model: Model | None, tenant_status: str | None
) -> None:
    """404 unless the model is active, 409 if the tenant is suspended, 403 unless the tenant may use
    the model: what reserving more needs."""
    if model is None or not model.active:
        raise NotFound(f"the model '{name}' does not exist", code="model_not_found")
    if tenant_status != "active":
        raise Conflict("this tenant is suspended: it cannot reserve capacity", code="tenant_suspended")
    allowed = (await session.scalars(select(TenantModel.model_name).where(TenantModel.tenant_id == tenant_id))).all()
    if allowed and name not in allowed:
        raise Forbidden(f"your organisation may not use the model '{name}'", code="model_not_allowed")


async def _out(session: AsyncSession, state: AppState, reservations: list[Reservation]) -> list[ReservationOut]:
    ids = [r.id for r in reservations]
    rows = await session.execute(
        select(ReservationHold.reservation_id, func.sum(ReservationHold.reserved + ReservationHold.burst))
        .where(ReservationHold.reservation_id.in_(ids))
        .group_by(ReservationHold.reservation_id)
    )
    in_flight = {reservation_id: int(count or 0) for reservation_id, count in rows}
    models = {r.model for r in reservations if r.status == "active"}
    held: dict[str, int] = {}
    if models:
        totals = await session.execute(
            select(Reservation.model, func.sum(Reservation.slots))
            .where(Reservation.model.in_(models), Reservation.status == "active")
            .group_by(Reservation.model)
        )
        held = {model: int(total or 0) for model, total in totals}
    fleet = state.services["fleet"]
    share = state.settings.reservable_share
    backed = {m: math.floor(fleet.capacity(m) * share) >= held.get(m, 0) for m in models}
    currency = state.settings.currency
    out = []
    prices: dict[str, int] = {}
    for r in reservations:
        if r.model not in prices:
            entry = (await _prices(session, r.model, currency)).get("reserved")
            prices[r.model] = (entry.reservation_hour_minor or 0) if entry is not None else 0
        slot_hour = prices[r.model]
        out.append(
            ReservationOut(
                id=r.id,
                model=r.model,
                slots=r.slots,
                burst_slots=r.burst_slots,
                status=r.status,
                in_flight=in_flight.get(r.id, 0) if r.status == "active" else 0,
                slot_hour_minor=slot_hour,
                hour_minor=slot_hour * r.slots if r.status == "active" else 0,
                currency=currency,
                created_at=r.created_at,
                updated_at=r.updated_at,
                ended_at=r.ended_at,
                backed=backed.get(r.model) if r.status == "active" else None,
            )
        )
    return out


async def _list(session: AsyncSession, state: AppState, tenant_id: str) -> list[ReservationOut]:
    """A tenant's reservations, active first, newest first."""
    rows = await session.scalars(
        select(Reservation)
        .where(Reservation.tenant_id == tenant_id)
        .order_by(Reservation.status, Reservation.created_at.desc())
    )
    return await _out(session, state, list(rows.all()))


async def _own(session: AsyncSession, tenant_id: str, reservation_id: str, *, lock: bool = False) -> Reservation:
    query = select(Reservation).where(Reservation.id == reservation_id, Reservation.tenant_id == tenant_id)
    if lock:
        query = query.with_for_update().execution_options(populate_existing=True)
    reservation = (await session.execute(query)).scalar_one_or_none()
    if reservation is None:  # another tenant's is missing too
        raise NotFound("reservation not found", code="reservation_not_found")
    return reservation


async def create(
    session: AsyncSession, state: AppState, tenant_id: str, body: ReservationCreate, actor: str | None
) -> Reservation:
    model = await _lock_model(session, body.model)
    await _check_usable(session, tenant_id, body.model, model, await _lock_tenant(session, tenant_id))
    await _slot_hour_price(session, body.model, state.settings.currency, body.burst_slots)
    existing = await session.scalar(
        select(Reservation.id).where(
            Reservation.tenant_id == tenant_id, Reservation.model == body.model, Reservation.status == "active"
        )
    )
    if existing is not None:
        raise Conflict(
            f"you already hold reservation {existing} for '{body.model}'; resize it with PATCH",
            code="reservation_exists",
        )
    await _check_capacity(session, state, body.model, body.slots)
    reservation = Reservation(
        id=new_id("reservation"),
        tenant_id=tenant_id,
        model=body.model,
        slots=body.slots,
        burst_slots=body.burst_slots,
        created_by=actor,
    )
    session.add(reservation)
    await session.flush()
    session.add(
        ReservationChange(
            reservation_id=reservation.id, slots=body.slots, burst_slots=body.burst_slots, actor_key_id=actor
        )
    )
    await session.flush()
    await session.refresh(reservation)
    return reservation


async def resize(
    session: AsyncSession,
    state: AppState,
    tenant_id: str,
    reservation_id: str,
    body: ReservationResize,
    actor: str | None,
) -> Reservation:
    current = await _own(session, tenant_id, reservation_id)
    if current.status != "active":
        raise Conflict("this reservation has ended; create a new one", code="reservation_ended")
    model = await _lock_model(session, current.model)  # model, tenant, then reservation, as in create
    tenant_status = await _lock_tenant(session, tenant_id)
    reservation = await _own(session, tenant_id, reservation_id, lock=True)
    if reservation.status != "active":
        raise Conflict("this reservation has ended; create a new one", code="reservation_ended")
    slots = reservation.slots if isinstance(body.slots, UnsetType) else body.slots
    burst = reservation.burst_slots if isinstance(body.burst_slots, UnsetType) else body.burst_slots
    if burst > reservation.burst_slots:
        await _slot_hour_price(session, reservation.model, state.settings.currency, burst)
    if slots > reservation.slots:  # growing needs what creating does; shrinking never fails
        await _check_usable(session, tenant_id, reservation.model, model, tenant_status)
        await _check_capacity(session, state, reservation.model, slots - reservation.slots)
    if (slots, burst) != (reservation.slots, reservation.burst_slots):
        reservation.slots, reservation.burst_slots = slots, burst
        session.add(
            ReservationChange(reservation_id=reservation.id, slots=slots, burst_slots=burst, actor_key_id=actor)
        )
        await session.flush()
        await session.refresh(reservation)
    return reservation


async def end(session: AsyncSession, tenant_id: str, reservation_id: str, actor: str | None) -> Reservation:
    reservation = await _own(session, tenant_id, reservation_id, lock=True)
    if reservation.status == "active":
        reservation.status = "ended"
        reservation.ended_at = func.now()  # the database's clock, as the changes' (hourly charges)
        session.add(ReservationChange(reservation_id=reservation.id, slots=0, burst_slots=0, actor_key_id=actor))
        await session.flush()
        await session.refresh(reservation)
    return reservation


async def end_all(
    session: AsyncSession, actor: str | None, *, tenant_id: str | None = None, model: str | None = None
) -> int:
    """End every active reservation of ``tenant_id`` (being suspended) or of ``model`` (being
    retired), in the caller's transaction; returns how many. The hour they end in is still charged,
    as when a tenant ends one; reinstating restores none.

    Locks as admission does, which in one statement locks each tenant's quota row and then its
    reservation's, tenants in id order: a tenant's quota rows first, or a model's reservations in
    tenant order, so that neither can wait on a batch of admissions that waits on it."""
    query = select(Reservation).where(Reservation.status == "active")
    if tenant_id is not None:
        await session.execute(
            select(TenantQuota.period)
            .where(TenantQuota.tenant_id == tenant_id)
            .order_by(TenantQuota.period)
            .with_for_update()
        )
        query = query.where(Reservation.tenant_id == tenant_id)
    if model is not None:
        query = query.where(Reservation.model == model)
    query = query.order_by(Reservation.tenant_id, Reservation.model).with_for_update()
    active = (await session.scalars(query)).all()
    for reservation in active:
        reservation.status = "ended"
        reservation.ended_at = func.now()
        session.add(ReservationChange(reservation_id=reservation.id, slots=0, burst_slots=0, actor_key_id=actor))
    await session.flush()
    return len(active)


def _tenant_id(principal: Principal) -> str:
    assert principal.tenant_id is not None  # the tenant router admits tenant keys only
    return principal.tenant_id


class TenantReservationController(Controller):
    path = "/reservations"
    tags = ["tenant"]

    @get("/")
    async def list_reservations(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal]
    ) -> list[ReservationOut]:
        """This tenant's reservations, active first, with what runs under each now."""
        async with app_state.sessions() as session:
            return await _list(session, app_state, _tenant_id(principal))

    @post("/", guards=[require_scope("manage")])
    async def create_reservation(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        data: JSONBody[ReservationCreate],
    ) -> ReservationOut:
        """Reserve ``slots`` requests in flight for a model (409 if the fleet cannot back them)."""
        async with app_state.sessions.begin() as session:
            reservation = await create(session, app_state, _tenant_id(principal), data, principal.key_id)
            return (await _out(session, app_state, [reservation]))[0]

    @get("/{reservation_id:str}")
    async def get_reservation(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], reservation_id: FromPath[str]
    ) -> ReservationOut:
        async with app_state.sessions() as session:
            reservation = await _own(session, _tenant_id(principal), reservation_id)
            return (await _out(session, app_state, [reservation]))[0]

    @patch("/{reservation_id:str}", guards=[require_scope("manage")])
    async def resize_reservation(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        reservation_id: FromPath[str],
        data: JSONBody[ReservationResize],
    ) -> ReservationOut:
        """Grow or shrink at once; each hour is charged for the most slots held in it."""
        async with app_state.sessions.begin() as session:
            reservation = await resize(
                session, app_state, _tenant_id(principal), reservation_id, data, principal.key_id
            )
            return (await _out(session, app_state, [reservation]))[0]

    @delete("/{reservation_id:str}", status_code=200, guards=[require_scope("manage")])
    async def end_reservation(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], reservation_id: FromPath[str]
    ) -> ReservationOut:
        """End it now: the current hour is its last charged; later requests are on-demand."""
        async with app_state.sessions.begin() as session:
            reservation = await end(session, _tenant_id(principal), reservation_id, principal.key_id)
            return (await _out(session, app_state, [reservation]))[0]


class AdminReservationController(Controller):
    """The same operations for a tenant's admins; another incubator's tenant is not found (404)."""

    path = "/tenants/{tenant_id:str}/reservations"
    tags = ["admin"]

    @get("/")
    async def list_reservations(
        self, app_state: NamedDependency[AppState], principal: NamedDependency[Principal], tenant_id: FromPath[str]
    ) -> list[ReservationOut]:
        async with app_state.sessions() as session:
            await visible_tenant(session, principal, tenant_id)
            return await _list(session, app_state, tenant_id)

    @post("/")
    async def create_reservation(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        tenant_id: FromPath[str],
        data: JSONBody[ReservationCreate],
    ) -> ReservationOut:
        async with app_state.sessions.begin() as session:
            await visible_tenant(session, principal, tenant_id)
            reservation = await create(session, app_state, tenant_id, data, principal.key_id)
            return (await _out(session, app_state, [reservation]))[0]

    @patch("/{reservation_id:str}")
    async def resize_reservation(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        tenant_id: FromPath[str],
        reservation_id: FromPath[str],
        data: JSONBody[ReservationResize],
    ) -> ReservationOut:
        async with app_state.sessions.begin() as session:
            await visible_tenant(session, principal, tenant_id)
            reservation = await resize(session, app_state, tenant_id, reservation_id, data, principal.key_id)
            return (await _out(session, app_state, [reservation]))[0]

    @delete("/{reservation_id:str}", status_code=200)
    async def end_reservation(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        tenant_id: FromPath[str],
        reservation_id: FromPath[str],
    ) -> ReservationOut:
        async with app_state.sessions.begin() as session:
            await visible_tenant(session, principal, tenant_id)
            reservation = await end(session, tenant_id, reservation_id, principal.key_id)
            return (await _out(session, app_state, [reservation]))[0]

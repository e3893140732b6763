"""Request and response bodies of the admin and tenant self-service APIs.

Request bodies forbid unknown fields and bound every number, so a typo or an absurd value is a
clear 400 naming the field rather than a silent no-op or a database error.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"\S")]
OptionalName = Annotated[str, Meta(max_length=200)]
PerMinute = Annotated[int, Meta(ge=1, le=1_000_000_000)]
"""Requests or tokens per minute (the columns are 32-bit)."""
Tokens = Annotated[int, Meta(ge=0, le=1_000_000_000_000_000)]
PositiveTokens = Annotated[int, Meta(ge=1, le=1_000_000_000_000_000)]
Minor = Annotated[int, Meta(ge=0, le=1_000_000_000_000_000)]
Id = Annotated[str, Meta(min_length=1, max_length=40)]
ModelName = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^\S+$")]
Scope = Literal["inference", "manage"]
TenantStatus = Literal["active", "suspended"]


class Input(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are an error."""


# Incubators and pools


class IncubatorCreate(Input):
    name: Name


class PoolSet(Input):
    """The incubator's pool for the current period (platform admin only)."""

    tokens: Tokens
    credits: Minor = 0
    """Prepaid credits in minor units of the platform currency."""


class PoolOut(Struct, kw_only=True):
    incubator_id: str
    period: str
    tokens: int
    credits: int
    allocated_tokens: int
    allocated_credits: int
    available_tokens: int
    available_credits: int


class IncubatorOut(Struct, kw_only=True):
    id: str
    name: str
    created_at: datetime
    pool: PoolOut | None
    """The pool for the current period, if the platform has set one."""


# Keys


class KeyCreate(Input):
    name: OptionalName = ""
    expires_at: Annotated[datetime, Meta(tz=True)] | None = None
    expires_in_days: Annotated[int, Meta(ge=1, le=3650)] | None = None
    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None
    scopes: Annotated[list[Scope], Meta(min_length=1, max_length=2)] | None = None
    """Tenant keys only: ``inference`` (token API) and ``manage`` (self-service keys). Default both."""


class KeyOut(Struct, kw_only=True):
    id: str
    name: str
    prefix: str
    role: str
    tenant_id: str | None
    incubator_id: str | None
    scopes: list[str]
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyOut, kw_only=True):
    key: str
    """The secret. Shown once: only its hash is stored."""


# Tenants


class TenantCreate(Input):
    name: Name
    incubator_id: Id | None = None
    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None
    max_price_minor_per_million: Annotated[int, Meta(ge=0, le=2_000_000_000)] | None = None
    allowed_providers: Annotated[list[Id], Meta(max_length=100)] | None = None


class TenantUpdate(Input):
    """Only the fields present change; ``null`` clears a limit."""

    name: Name | UnsetType = UNSET
    status: TenantStatus | UnsetType = UNSET
    requests_per_minute: PerMinute | UnsetType | None = UNSET
    tokens_per_minute: PerMinute | UnsetType | None = UNSET
    max_price_minor_per_million: Annotated[int, Meta(ge=0, le=2_000_000_000)] | UnsetType | None = UNSET
    allowed_providers: Annotated[list[Id], Meta(max_length=100)] | UnsetType | None = UNSET


class TenantOut(Struct, kw_only=True):
    id: str
    name: str
    incubator_id: str | None
    status: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_price_minor_per_million: int | None
    allowed_providers: list[str] | None
    created_at: datetime
    updated_at: datetime


class TenantPage(Struct, kw_only=True):
    data: list[TenantOut]
    has_more: bool
    next_after: str | None
    """Pass as ``after`` to get the next page."""


# Grants and quota


class GrantCreate(Input):
    """Tokens for the current period, drawn from the tenant's incubator pool (if it has one)."""

    tokens: PositiveTokens
    credits: Minor = 0
    note: Annotated[str, Meta(max_length=500)] = ""


class GrantResize(Input):
    tokens: Tokens
    credits: Minor | UnsetType = UNSET


class GrantEventOut(Struct, kw_only=True):
    action: str
    tokens_before: int
    tokens_after: int
    credits_before: int
    credits_after: int
    actor_key_id: str | None
    at: datetime


class GrantOut(Struct, kw_only=True):
    id: str
    tenant_id: str
    incubator_id: str | None
    period: str
    tokens: int
    credits: int
    status: str
    note: str
    created_by: str | None
    created_at: datetime
    revoked_at: datetime | None
    history: list[GrantEventOut]


class QuotaOut(Struct, kw_only=True):
    """The tenant's token budget for the current period."""

    period: str
    granted: int
    held: int
    """Reserved by requests in flight (prompt plus max_tokens), returned when they finish."""
    used: int
    remaining: int
    credits_granted: int
    soft_threshold_reached: bool


# Models


class TenantModelsSet(Input):
    """The models the tenant may call; an empty list allows every active model."""

    models: Annotated[list[ModelName], Meta(max_length=500)]


class TenantModelsOut(Struct, kw_only=True):
    models: list[str]
    all_active: bool


class ModelCreate(Input):
    name: ModelName
    context_length: Annotated[int, Meta(ge=1, le=100_000_000)]
    owned_by: Annotated[str, Meta(min_length=1, max_length=100)] = "market"
    active: bool = True


class ModelUpdate(Input):
    context_length: Annotated[int, Meta(ge=1, le=100_000_000)] | UnsetType = UNSET
    owned_by: Annotated[str, Meta(min_length=1, max_length=100)] | UnsetType = UNSET
    active: bool | UnsetType = UNSET


class ModelOut(Struct, kw_only=True):
    name: str
    context_length: int
    owned_by: str
    active: bool
    created_at: datetime


def is_set(value: object) -> bool:
    return value is not msgspec.UNSET

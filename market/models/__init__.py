"""The database schema, shared by api, scheduler and billing (they meet here, not in each other).

Each area has its own module; importing this package registers every table on ``Base.metadata``,
which the migrations' drift check compares against.
"""

from market.models.billing import (
    Invoice,
    InvoiceLine,
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    PayoutRate,
    PriceBook,
    PriceBookEntry,
    ProviderStatement,
    StripeCustomer,
    StripeEvent,
    UsageInFlight,
    UsageOutboxEntry,
    UsageRecord,
)
from market.models.catalog import Model
from market.models.fleet import EnrolmentToken, Node, Provider, ProviderOffer
from market.models.quota import (
    Grant,
    GrantEvent,
    IncubatorPool,
    LimiterInstance,
    QuotaHold,
    RateLimitBucket,
    TenantModel,
    TenantQuota,
)
from market.models.reservations import Reservation, ReservationChange, ReservationHold
from market.models.tenancy import ApiKey, Incubator, Tenant

__all__ = ["ApiKey", "EnrolmentToken", "Incubator", "Model", "Node", "Provider", "Tenant"]
__all__ += [
    "Invoice",
    "InvoiceLine",
    "LedgerAccount",
    "LedgerEntry",
    "LedgerTransaction",
    "PayoutRate",
    "PriceBook",
    "PriceBookEntry",
    "ProviderStatement",
    "StripeCustomer",
    "StripeEvent",
    "UsageInFlight",
    "UsageOutboxEntry",
    "UsageRecord",
]
__all__ += ["Grant", "GrantEvent", "IncubatorPool", "LimiterInstance", "QuotaHold", "RateLimitBucket"]
__all__ += ["ProviderOffer", "TenantModel", "TenantQuota"]
__all__ += ["Reservation", "ReservationChange", "ReservationHold"]

"""Money in integer minor units with the currency beside them; never floats.

Per-token prices are tiny fractions of a cent, so rating works in *micro-units* of the minor unit
(1 cent = 1,000,000 micros) and rounds only when an invoice line is produced. The rounding is
half-up on the invoice total so that summing lines never drifts from the ledger by more than one
minor unit per line.
"""

from __future__ import annotations

from dataclasses import dataclass

MICROS_PER_MINOR = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are quoted per 1M tokens


@dataclass(frozen=True, slots=True)
class Money:
    """An amount in minor units (cents for usd) of ``currency``."""

    minor: int
    currency: str = "usd"

    def __post_init__(self) -> None:
        if not isinstance(self.minor, int) or isinstance(self.minor, bool):
            raise TypeError(f"Money.minor must be an int, got {type(self.minor).__name__}")

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.minor + other.minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.minor - other.minor, self.currency)

    def _same(self, other: Money) -> None:
        if other.currency != self.currency:
            raise ValueError(f"cannot combine {self.currency} with {other.currency}")

    def __str__(self) -> str:
        sign = "-" if self.minor < 0 else ""
        whole, cents = divmod(abs(self.minor), 100)
        return f"{sign}{whole}.{cents:02d} {self.currency.upper()}"


def token_cost_micros(tokens: int, price_minor_per_million: int) -> int:
    """Cost of ``tokens`` at a price in minor units per 1M tokens, in micros of the minor unit.

    Exact: minor/1M tokens * tokens * 1M micros/minor = price * tokens micros.
    """
    if tokens < 0 or price_minor_per_million < 0:
        raise ValueError("tokens and price must be non-negative")
    return tokens * price_minor_per_million * MICROS_PER_MINOR // TOKENS_PER_PRICE_UNIT


def micros_to_minor(micros: int) -> int:
    """Round micros to whole minor units, half up (away from zero for negatives)."""
    sign = -1 if micros < 0 else 1
    return sign * ((abs(micros) + MICROS_PER_MINOR // 2) // MICROS_PER_MINOR)

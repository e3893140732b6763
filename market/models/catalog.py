"""The models tenants can call."""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from market.db import Base, Timestamped


class Model(Timestamped, Base):
    """A model name the marketplace sells; nodes declare which of these they serve."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    context_length: Mapped[int]
    """Prompt plus completion tokens must fit in this; checked at admission (400 otherwise)."""
    owned_by: Mapped[str] = mapped_column(String(100), server_default="market")
    active: Mapped[bool] = mapped_column(server_default="true")

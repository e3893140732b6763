"""streams in flight checkpointed, so an api process that dies mid-stream still bills them

An api process that died while relaying a stream left no usage event for it: the tenant had the
tokens, the provider did the work, nobody was billed or paid. Every api process now writes, every
``MARKET_USAGE_CHECKPOINT`` seconds, the usage event each of its streams would end with if it
ended now. The statement that stores a checkpointed request's final event marks its row ``final``
(a tombstone no later checkpoint overwrites, kept ten minutes). Non-final rows of a process that
stopped heartbeating are moved to ``usage_outbox`` and published by a live replica.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 13:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_in_flight",
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(40), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("event", sa.LargeBinary(), nullable=False),
        sa.Column("final", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_usage_in_flight")),
    )
    op.create_index(op.f("ix_usage_in_flight_holder"), "usage_in_flight", ["holder"])


def downgrade() -> None:
    op.drop_index(op.f("ix_usage_in_flight_holder"), table_name="usage_in_flight")
    op.drop_table("usage_in_flight")

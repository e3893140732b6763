"""usage events kept in PostgreSQL until JetStream has them

The api kept a finished request's usage event in memory until JetStream acknowledged it, so an
api process that died (or stopped while NATS was out of reach) lost those events: tokens served
and never billed. ``usage_outbox`` holds each event from the request's end (before the client
sees it end) until the ack; rows another process left behind are published by a live replica.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 10:05:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_outbox",
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("event", sa.LargeBinary(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_usage_outbox")),
    )
    op.create_index(op.f("ix_usage_outbox_stored_at"), "usage_outbox", ["stored_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_usage_outbox_stored_at"), table_name="usage_outbox")
    op.drop_table("usage_outbox")

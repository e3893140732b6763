"""checkpoints claimed from a process taken for dead are kept, so its final event bills the rest

A replica cut off from PostgreSQL for over a minute while it relays a stream is taken for dead:
another replica publishes the stream's last checkpoint. Its final event, stored once it reaches
PostgreSQL again, was then dropped as a repeat of the same request id, and the tokens relayed
after that checkpoint went unbilled and unpaid. A claimed checkpoint now stays (``claimed``, kept
two days), and the final event's store sees it and bills the difference as ``<request id>.rest``.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 18:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("usage_in_flight", sa.Column("claimed", sa.Boolean(), server_default="false", nullable=False))


def downgrade() -> None:
    op.drop_column("usage_in_flight", "claimed")

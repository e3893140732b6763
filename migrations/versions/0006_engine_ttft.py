"""usage records keep the engine's part of the time to first token

Usage events carry ``engine_ttft_ms`` (the engine's own time to first output, as the node timed
it) beside ``ttft_ms`` (arrival at the api to the first token leaving for the client); the ledger
kept only the latter, so the marketplace's own part could not be told from a slow provider later.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 02:05:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("engine_ttft_ms", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("usage_records", "engine_ttft_ms")

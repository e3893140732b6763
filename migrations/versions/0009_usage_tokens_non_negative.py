"""usage records' token counts are never negative

The billing worker rejects such events before they reach the ledger; this is the database's
backstop, so nothing that writes usage records can bill a negative count as a credit.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 10:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_check_constraint(
        op.f("ck_usage_records_tokens_non_negative"),
        "usage_records",
        "prompt_tokens >= 0 AND completion_tokens >= 0 AND relayed_completion_tokens >= 0"
        " AND billed_completion_tokens >= 0",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_usage_records_tokens_non_negative"), "usage_records", type_="check")

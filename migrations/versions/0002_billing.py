"""billing: usage records, price book, double-entry ledger, invoices, provider statements, Stripe ids

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 17:46:15.746797
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ledger_accounts",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "kind IN ('tenant', 'credit', 'provider', 'platform', 'grant_pool', 'external')",
            name=op.f("ck_ledger_accounts_kind"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_accounts")),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("account_id", sa.String(length=100), nullable=False),
        sa.Column("transaction_id", sa.String(length=120), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "transaction_id", name=op.f("pk_ledger_entries")),
    )
    op.create_table(
        "ledger_transactions",
        sa.Column("id", sa.String(length=120), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=True),
        sa.Column("provider_id", sa.String(length=40), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("posted_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("memo", sa.String(length=500), server_default="", nullable=False),
        sa.CheckConstraint(
            "kind IN ('usage', 'reservation', 'credit_grant', 'top_up', 'invoice', 'payment', 'payout')",
            name=op.f("ck_ledger_transactions_kind"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_transactions")),
    )
    op.create_index(
        "ix_ledger_transactions_kind_occurred_at",
        "ledger_transactions",
        ["kind", "occurred_at"],
        unique=False,
        postgresql_where=sa.text("kind <> 'usage'"),
    )
    op.create_table(
        "price_books",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("platform_margin_bps", sa.Integer(), nullable=False),
        sa.Column("note", sa.String(length=500), server_default="", nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("platform_margin_bps BETWEEN 0 AND 10000", name=op.f("ck_price_books_margin")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_price_books")),
        sa.UniqueConstraint("currency", "effective_from", name=op.f("uq_price_books_currency_effective_from")),
        sa.UniqueConstraint("version", name=op.f("uq_price_books_version")),
    )
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_events")),
    )
    op.create_table(
        "usage_records",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("admission_class", sa.String(length=16), nullable=False),
        sa.Column("node_id", sa.String(length=40), nullable=True),
        sa.Column("provider_id", sa.String(length=40), nullable=True),
        sa.Column("reservation_id", sa.String(length=40), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("relayed_completion_tokens", sa.Integer(), nullable=False),
        sa.Column("billed_completion_tokens", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("price_book_id", sa.String(length=40), nullable=True),
        sa.Column("tenant_micros", sa.BigInteger(), nullable=True),
        sa.Column("provider_micros", sa.BigInteger(), nullable=True),
        sa.Column("platform_micros", sa.BigInteger(), nullable=True),
        sa.Column("ingested_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "(tenant_micros IS NULL AND provider_micros IS NULL AND platform_micros IS NULL) OR tenant_micros = provider_micros + platform_micros",
            name=op.f("ck_usage_records_balanced"),
        ),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_usage_records")),
    )
    op.create_index("ix_usage_records_provider_id_ended_at", "usage_records", ["provider_id", "ended_at"], unique=False)
    op.create_index("ix_usage_records_tenant_id_ended_at", "usage_records", ["tenant_id", "ended_at"], unique=False)
    op.create_index(
        "ix_usage_records_unrated",
        "usage_records",
        ["request_id"],
        unique=False,
        postgresql_where=sa.text("tenant_micros IS NULL"),
    )
    op.create_table(
        "price_book_entries",
        sa.Column("price_book_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("admission_class", sa.String(length=16), nullable=False),
        sa.Column("input_minor_per_million", sa.BigInteger(), nullable=False),
        sa.Column("output_minor_per_million", sa.BigInteger(), nullable=False),
        sa.Column("reservation_hour_minor", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "admission_class IN ('reserved', 'burst', 'on_demand')", name=op.f("ck_price_book_entries_admission_class")
        ),
        sa.CheckConstraint(
            "input_minor_per_million >= 0 AND output_minor_per_million >= 0 AND (reservation_hour_minor IS NULL OR reservation_hour_minor >= 0)",
            name=op.f("ck_price_book_entries_non_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["price_book_id"],
            ["price_books.id"],
            name=op.f("fk_price_book_entries_price_book_id_price_books"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("price_book_id", "model", "admission_class", name=op.f("pk_price_book_entries")),
    )
    op.create_table(
        "price_book_payouts",
        sa.Column("price_book_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("provider_id", sa.String(length=40), nullable=False),
        sa.Column("input_minor_per_million", sa.BigInteger(), nullable=False),
        sa.Column("output_minor_per_million", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "input_minor_per_million >= 0 AND output_minor_per_million >= 0",
            name=op.f("ck_price_book_payouts_non_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["price_book_id"],
            ["price_books.id"],
            name=op.f("fk_price_book_payouts_price_book_id_price_books"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("price_book_id", "model", "provider_id", name=op.f("pk_price_book_payouts")),
    )
    op.create_table(
        "provider_statements",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("provider_id", sa.String(length=40), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("period_end", sa.Date(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("earnings_micros", sa.BigInteger(), nullable=False),
        sa.Column("earnings_minor", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("stripe_transfer_id", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'paid')", name=op.f("ck_provider_statements_status")),
        sa.ForeignKeyConstraint(
            ["provider_id"],
            ["providers.id"],
            name=op.f("fk_provider_statements_provider_id_providers"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_statements")),
        sa.UniqueConstraint(
            "provider_id",
            "period_start",
            "currency",
            name=op.f("uq_provider_statements_provider_id_period_start_currency"),
        ),
    )
    op.create_index(op.f("ix_provider_statements_provider_id"), "provider_statements", ["provider_id"], unique=False)
    op.create_table(
        "invoices",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("period_end", sa.Date(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="open", nullable=False),
        sa.Column("subtotal_minor", sa.BigInteger(), nullable=False),
        sa.Column("credit_applied_minor", sa.BigInteger(), nullable=False),
        sa.Column("total_minor", sa.BigInteger(), nullable=False),
        sa.Column("stripe_invoice_id", sa.String(length=100), nullable=True),
        sa.Column("stripe_status", sa.String(length=32), nullable=True),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("status IN ('open', 'paid', 'void', 'uncollectible')", name=op.f("ck_invoices_status")),
        sa.CheckConstraint("total_minor = subtotal_minor - credit_applied_minor", name=op.f("ck_invoices_total")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_invoices_tenant_id_tenants"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("stripe_invoice_id", name=op.f("uq_invoices_stripe_invoice_id")),
        sa.UniqueConstraint(
            "tenant_id", "period_start", "currency", name=op.f("uq_invoices_tenant_id_period_start_currency")
        ),
    )
    op.create_index(op.f("ix_invoices_tenant_id"), "invoices", ["tenant_id"], unique=False)
    op.create_table(
        "stripe_customers",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("customer_id", sa.String(length=100), nullable=False),
        sa.Column("subscription_id", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_stripe_customers_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_stripe_customers")),
        sa.UniqueConstraint("customer_id", name=op.f("uq_stripe_customers_customer_id")),
    )
    op.create_table(
        "invoice_lines",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("invoice_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("admission_class", sa.String(length=16), nullable=True),
        sa.Column("description", sa.String(length=300), nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("stripe_invoice_item_id", sa.String(length=100), nullable=True),
        sa.CheckConstraint("kind IN ('usage', 'reservation', 'credit')", name=op.f("ck_invoice_lines_kind")),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_invoice_lines_invoice_id_invoices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoice_lines")),
        sa.UniqueConstraint("stripe_invoice_item_id", name=op.f("uq_invoice_lines_stripe_invoice_item_id")),
    )
    op.create_index(op.f("ix_invoice_lines_invoice_id"), "invoice_lines", ["invoice_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_invoice_lines_invoice_id"), table_name="invoice_lines")
    op.drop_table("invoice_lines")
    op.drop_table("stripe_customers")
    op.drop_index(op.f("ix_invoices_tenant_id"), table_name="invoices")
    op.drop_table("invoices")
    op.drop_index(op.f("ix_provider_statements_provider_id"), table_name="provider_statements")
    op.drop_table("provider_statements")
    op.drop_table("price_book_payouts")
    op.drop_table("price_book_entries")
    op.drop_index(
        "ix_usage_records_unrated", table_name="usage_records", postgresql_where=sa.text("tenant_micros IS NULL")
    )
    op.drop_index("ix_usage_records_tenant_id_ended_at", table_name="usage_records")
    op.drop_index("ix_usage_records_provider_id_ended_at", table_name="usage_records")
    op.drop_table("usage_records")
    op.drop_table("stripe_events")
    op.drop_table("price_books")
    op.drop_index(
        "ix_ledger_transactions_kind_occurred_at",
        table_name="ledger_transactions",
        postgresql_where=sa.text("kind <> 'usage'"),
    )
    op.drop_table("ledger_transactions")
    op.drop_table("ledger_entries")
    op.drop_table("ledger_accounts")

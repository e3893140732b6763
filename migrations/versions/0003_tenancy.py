"""tenancy: incubator pools, grants, tenant quotas, allowed models, rate limits; admission functions

The admission functions live in the database so that admitting a request (model check, per-minute
limits per key and tenant, quota hold) is one round trip and one transaction, serialised on the
tenant's quota row, however many api replicas there are.

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-25 17:44:37.817762
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CURRENT_PERIOD = """
CREATE FUNCTION market_current_period() RETURNS date
LANGUAGE sql STABLE AS $$ SELECT (date_trunc('month', now() AT TIME ZONE 'UTC'))::date $$
"""

# Admit one request: model, context length, allowed models, four GCRA limits (requests and
# tokens per minute, per key and per tenant), then the quota hold. Nothing is written unless all
# pass. Rows are locked in one order (key bucket, tenant bucket, quota, holder); settle and the
# sweep lock quota before holder too, so concurrent callers cannot deadlock. GCRA: a limit of r
# per minute is one "theoretical arrival time" (tat); a cost of n moves it by n*60/r seconds and
# is allowed while tat stays within 60 s of now. Kept to few statements: each one costs on the
# hot path of every token request. The limiter's connections run with synchronous_commit off
# (set per connection, not here: a statement each call): holds and rate buckets are transient,
# and the ledger, not the quota row, is what bills.
ADMIT = """
CREATE FUNCTION market_admit(
    p_holder text, p_tenant text, p_key text, p_model text, p_prompt bigint, p_max bigint,
    p_key_rpm integer, p_key_tpm integer, p_tenant_rpm integer, p_tenant_tpm integer,
    OUT status text, OUT detail text, OUT retry_after double precision, OUT period date,
    OUT granted bigint, OUT held bigint, OUT used bigint,
    OUT limit_requests integer, OUT remaining_requests integer, OUT reset_requests double precision,
    OUT limit_tokens integer, OUT remaining_tokens integer, OUT reset_tokens double precision)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_now double precision := extract(epoch FROM clock_timestamp());
    v_hold bigint := p_prompt + p_max;
    v_period date := (date_trunc('month', now() AT TIME ZONE 'UTC'))::date;
    v_context integer;
    v_allowed boolean;
    v_kinds text[] := ARRAY['key_requests', 'key_tokens', 'tenant_requests', 'tenant_tokens'];
    v_rates integer[] := ARRAY[p_key_rpm, p_key_tpm, p_tenant_rpm, p_tenant_tpm];
    v_costs bigint[] := ARRAY[1, p_prompt + p_max, 1, p_prompt + p_max];
    v_tats double precision[] := ARRAY[0, 0, 0, 0]::double precision[];
    v_a double precision;
    v_b double precision;
    v_new double precision;
    v_over double precision;
    v_rem integer;
    v_worst double precision := -1;
BEGIN
    period := v_period;
    SELECT m.context_length,
           NOT EXISTS (SELECT 1 FROM tenant_models t WHERE t.tenant_id = p_tenant)
           OR EXISTS (SELECT 1 FROM tenant_models t WHERE t.tenant_id = p_tenant AND t.model_name = p_model)
      INTO v_context, v_allowed
      FROM models m WHERE m.name = p_model AND m.active;
    IF NOT FOUND THEN
        status := 'model_not_found';
        RETURN;
    END IF;
    IF NOT v_allowed THEN
        status := 'model_not_allowed';
        RETURN;
    END IF;
    IF v_hold > v_context THEN
        status := 'context_length_exceeded';
        detail := v_context::text;
        RETURN;
    END IF;

    IF p_key_rpm IS NOT NULL OR p_key_tpm IS NOT NULL THEN
        SELECT b.requests_tat, b.tokens_tat INTO v_a, v_b FROM rate_limit_buckets b WHERE b.scope = p_key FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO rate_limit_buckets (scope) VALUES (p_key) ON CONFLICT DO NOTHING;
            SELECT b.requests_tat, b.tokens_tat INTO v_a, v_b FROM rate_limit_buckets b WHERE b.scope = p_key FOR UPDATE;
        END IF;
        v_tats[1] := v_a;
        v_tats[2] := v_b;
    END IF;
    IF p_tenant_rpm IS NOT NULL OR p_tenant_tpm IS NOT NULL THEN
        SELECT b.requests_tat, b.tokens_tat INTO v_a, v_b FROM rate_limit_buckets b WHERE b.scope = p_tenant FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO rate_limit_buckets (scope) VALUES (p_tenant) ON CONFLICT DO NOTHING;
            SELECT b.requests_tat, b.tokens_tat INTO v_a, v_b FROM rate_limit_buckets b WHERE b.scope = p_tenant FOR UPDATE;
        END IF;
        v_tats[3] := v_a;
        v_tats[4] := v_b;
    END IF;

    FOR i IN 1..4 LOOP
        CONTINUE WHEN v_rates[i] IS NULL;
        IF v_costs[i] > v_rates[i] THEN
            status := 'too_large:' || v_kinds[i];
            detail := v_rates[i]::text;
            RETURN;
        END IF;
        v_new := greatest(v_tats[i], v_now) + v_costs[i] * 60.0 / v_rates[i];
        v_over := v_new - v_now - 60.0;
        IF v_over > 1e-6 THEN
            IF v_over > v_worst THEN
                v_worst := v_over;
                status := 'rate:' || v_kinds[i];
                detail := v_rates[i]::text;
            END IF;
            v_new := greatest(v_tats[i], v_now);
        END IF;
        v_tats[i] := v_new;
        v_rem := greatest(0, floor((60.0 - (v_new - v_now)) * v_rates[i] / 60.0 + 1e-6)::integer);
        IF i % 2 = 1 THEN
            IF remaining_requests IS NULL OR v_rem < remaining_requests THEN
                limit_requests := v_rates[i];
                remaining_requests := v_rem;
                reset_requests := greatest(v_new - v_now, 0);
            END IF;
        ELSIF remaining_tokens IS NULL OR v_rem < remaining_tokens THEN
            limit_tokens := v_rates[i];
            remaining_tokens := v_rem;
            reset_tokens := greatest(v_new - v_now, 0);
        END IF;
    END LOOP;
    IF status IS NOT NULL THEN
        retry_after := v_worst;
        RETURN;
    END IF;

    UPDATE tenant_quotas q SET held = q.held + v_hold
     WHERE q.tenant_id = p_tenant AND q.period = v_period AND q.used + q.held + v_hold <= q.granted
    RETURNING q.granted, q.held, q.used INTO granted, held, used;
    IF NOT FOUND THEN
        SELECT q.granted, q.held, q.used INTO granted, held, used
          FROM tenant_quotas q WHERE q.tenant_id = p_tenant AND q.period = v_period;
        granted := coalesce(granted, 0);
        held := coalesce(held, 0);
        used := coalesce(used, 0);
        status := 'insufficient_quota';
        RETURN;
    END IF;
    IF p_key_rpm IS NOT NULL OR p_key_tpm IS NOT NULL THEN
        UPDATE rate_limit_buckets b SET requests_tat = v_tats[1], tokens_tat = v_tats[2] WHERE b.scope = p_key;
    END IF;
    IF p_tenant_rpm IS NOT NULL OR p_tenant_tpm IS NOT NULL THEN
        UPDATE rate_limit_buckets b SET requests_tat = v_tats[3], tokens_tat = v_tats[4] WHERE b.scope = p_tenant;
    END IF;
    UPDATE quota_holds h SET held = h.held + v_hold
     WHERE h.holder = p_holder AND h.tenant_id = p_tenant AND h.period = v_period;
    IF NOT FOUND THEN
        INSERT INTO quota_holds AS h (holder, tenant_id, period, held) VALUES (p_holder, p_tenant, v_period, v_hold)
        ON CONFLICT (holder, tenant_id, period) DO UPDATE SET held = h.held + excluded.held;
    END IF;
    status := 'ok';
END
$fn$
"""

# Settle one admission (the common case when settles do not pile up): the same rules as the
# batch function below, in three statements. Quota row first, then the holder row.
SETTLE_ONE = """
CREATE FUNCTION market_settle_one(
    p_holder text, p_tenant text, p_period date, p_hold bigint, p_used bigint, p_soft double precision,
    OUT crossed boolean, OUT granted bigint, OUT used bigint)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_notified timestamptz;
    v_release bigint;
BEGIN
    crossed := false;
    SELECT q.soft_notified_at INTO v_notified FROM tenant_quotas q
     WHERE q.tenant_id = p_tenant AND q.period = p_period FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- every writer of a holder row holds the quota row's lock first, so this read is stable
    UPDATE quota_holds h SET held = h.held - x.release
      FROM (SELECT least(i.held, p_hold) AS release FROM quota_holds i
             WHERE i.holder = p_holder AND i.tenant_id = p_tenant AND i.period = p_period) x
     WHERE h.holder = p_holder AND h.tenant_id = p_tenant AND h.period = p_period
    RETURNING x.release INTO v_release;
    UPDATE tenant_quotas q
       SET held = q.held - least(q.held, coalesce(v_release, 0)),
           used = q.used + p_used,
           soft_notified_at = CASE
               WHEN q.soft_notified_at IS NULL AND q.granted > 0 AND q.used + p_used >= p_soft * q.granted
               THEN now() ELSE q.soft_notified_at END
     WHERE q.tenant_id = p_tenant AND q.period = p_period
    RETURNING q.granted, q.used, (v_notified IS NULL AND q.soft_notified_at IS NOT NULL) INTO granted, used, crossed;
END
$fn$
"""

# Settle a batch of admissions: release what each held (never more than its holder, the api
# process that admitted it, still holds, so a hold already released by the dead-holder sweep is
# not released twice), count the use, and report tenants whose use crossed the soft threshold for
# the first time this period. Rows are locked in (tenant, period) order: concurrent batches on
# other replicas cannot deadlock with this one.
SETTLE = """
CREATE FUNCTION market_settle(
    p_holders text[], p_tenants text[], p_periods date[], p_holds bigint[], p_used bigint[], p_soft double precision)
RETURNS TABLE (crossed_tenant_id text, crossed_period date, crossed_granted bigint, crossed_used bigint)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r record;
    v_notified timestamptz;
    v_have bigint;
    v_release bigint;
    v_row tenant_quotas%ROWTYPE;
BEGIN
    FOR r IN
        SELECT x.t AS tenant_id, x.p AS period, sum(x.u)::bigint AS use,
               array_agg(x.holder ORDER BY x.holder) AS holders, array_agg(x.h ORDER BY x.holder) AS holds
        FROM (
            SELECT s.holder, s.t, s.p, sum(s.h)::bigint AS h, sum(s.u)::bigint AS u
            FROM unnest(p_holders, p_tenants, p_periods, p_holds, p_used) AS s(holder, t, p, h, u)
            GROUP BY s.holder, s.t, s.p
        ) x
        GROUP BY x.t, x.p ORDER BY x.t, x.p
    LOOP
        SELECT q.soft_notified_at INTO v_notified FROM tenant_quotas q
         WHERE q.tenant_id = r.tenant_id AND q.period = r.period FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        v_release := 0;
        FOR i IN 1..array_length(r.holders, 1) LOOP
            SELECT h.held INTO v_have FROM quota_holds h
             WHERE h.holder = r.holders[i] AND h.tenant_id = r.tenant_id AND h.period = r.period FOR UPDATE;
            v_have := least(coalesce(v_have, 0), r.holds[i]);
            IF v_have > 0 THEN
                UPDATE quota_holds h SET held = h.held - v_have
                 WHERE h.holder = r.holders[i] AND h.tenant_id = r.tenant_id AND h.period = r.period;
                v_release := v_release + v_have;
            END IF;
        END LOOP;
        UPDATE tenant_quotas q
           SET held = q.held - least(q.held, v_release),
               used = q.used + r.use,
               soft_notified_at = CASE
                   WHEN q.soft_notified_at IS NULL AND q.granted > 0 AND q.used + r.use >= p_soft * q.granted
                   THEN now() ELSE q.soft_notified_at END
         WHERE q.tenant_id = r.tenant_id AND q.period = r.period
        RETURNING q.* INTO v_row;
        IF v_notified IS NULL AND v_row.soft_notified_at IS NOT NULL THEN
            crossed_tenant_id := r.tenant_id;
            crossed_period := r.period;
            crossed_granted := v_row.granted;
            crossed_used := v_row.used;
            RETURN NEXT;
        END IF;
    END LOOP;
END
$fn$
"""

# Give back the holds of api processes that stopped heartbeating (crashed mid-request), so a
# crash never strands a tenant's quota until the end of the month.
RELEASE_DEAD_HOLDERS = """
CREATE FUNCTION market_release_dead_holders(p_stale_seconds double precision) RETURNS bigint
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    r record;
    v_held bigint;
    v_total bigint := 0;
BEGIN
    FOR r IN
        SELECT h.holder, h.tenant_id, h.period FROM quota_holds h
          LEFT JOIN limiter_instances i ON i.id = h.holder
         WHERE i.id IS NULL OR i.seen_at < now() - make_interval(secs => p_stale_seconds)
         ORDER BY h.tenant_id, h.period, h.holder
    LOOP
        PERFORM 1 FROM tenant_quotas q WHERE q.tenant_id = r.tenant_id AND q.period = r.period FOR UPDATE;
        v_held := NULL;
        DELETE FROM quota_holds h
         WHERE h.holder = r.holder AND h.tenant_id = r.tenant_id AND h.period = r.period
        RETURNING h.held INTO v_held;
        IF coalesce(v_held, 0) > 0 THEN
            UPDATE tenant_quotas q SET held = q.held - least(q.held, v_held)
             WHERE q.tenant_id = r.tenant_id AND q.period = r.period;
            v_total := v_total + v_held;
        END IF;
    END LOOP;
    DELETE FROM limiter_instances i WHERE i.seen_at < now() - make_interval(secs => p_stale_seconds);
    RETURN v_total;
END
$fn$
"""

FUNCTIONS = (CURRENT_PERIOD, ADMIT, SETTLE_ONE, SETTLE, RELEASE_DEAD_HOLDERS)
FUNCTION_SIGNATURES = (
    "market_release_dead_holders(double precision)",
    "market_settle(text[], text[], date[], bigint[], bigint[], double precision)",
    "market_settle_one(text, text, date, bigint, bigint, double precision)",
    "market_admit(text, text, text, text, bigint, bigint, integer, integer, integer, integer)",
    "market_current_period()",
)


def upgrade() -> None:
    # ### commands auto generated by Alembic - please adjust! ###
    op.create_table(
        "limiter_instances",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_limiter_instances")),
    )
    op.create_table(
        "rate_limit_buckets",
        sa.Column("scope", sa.String(length=40), nullable=False),
        sa.Column("requests_tat", sa.Double(), server_default="0", nullable=False),
        sa.Column("tokens_tat", sa.Double(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("scope", name=op.f("pk_rate_limit_buckets")),
        prefixes=["UNLOGGED"],
    )
    op.create_table(
        "incubator_pools",
        sa.Column("incubator_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.Date(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("credits_minor", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("allocated_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("allocated_credits_minor", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "allocated_tokens >= 0 AND allocated_tokens <= tokens AND allocated_credits_minor >= 0 AND allocated_credits_minor <= credits_minor",
            name=op.f("ck_incubator_pools_within_pool"),
        ),
        sa.ForeignKeyConstraint(
            ["incubator_id"],
            ["incubators.id"],
            name=op.f("fk_incubator_pools_incubator_id_incubators"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("incubator_id", "period", name=op.f("pk_incubator_pools")),
    )
    op.create_table(
        "grants",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("incubator_id", sa.String(length=40), nullable=True),
        sa.Column("period", sa.Date(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("credits_minor", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("status", sa.String(length=16), server_default="active", nullable=False),
        sa.Column("note", sa.String(length=500), server_default="", nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("status IN ('active', 'revoked')", name=op.f("ck_grants_status")),
        sa.CheckConstraint("tokens >= 0 AND credits_minor >= 0", name=op.f("ck_grants_non_negative")),
        sa.ForeignKeyConstraint(
            ["incubator_id"], ["incubators.id"], name=op.f("fk_grants_incubator_id_incubators"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_grants_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grants")),
    )
    op.create_index("ix_grants_tenant_id_period", "grants", ["tenant_id", "period"], unique=False)
    op.create_table(
        "quota_holds",
        sa.Column("holder", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.Date(), nullable=False),
        sa.Column("held", sa.BigInteger(), server_default="0", nullable=False),
        sa.CheckConstraint("held >= 0", name=op.f("ck_quota_holds_non_negative")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_quota_holds_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("holder", "tenant_id", "period", name=op.f("pk_quota_holds")),
    )
    op.create_table(
        "tenant_models",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_name"],
            ["models.name"],
            name=op.f("fk_tenant_models_model_name_models"),
            onupdate="CASCADE",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_models_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "model_name", name=op.f("pk_tenant_models")),
    )
    op.create_table(
        "tenant_quotas",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.Date(), nullable=False),
        sa.Column("granted", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("held", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("used", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("credits_granted_minor", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("soft_notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("credits_granted_minor >= 0", name=op.f("ck_tenant_quotas_credits_non_negative")),
        sa.CheckConstraint("granted >= 0 AND held >= 0 AND used >= 0", name=op.f("ck_tenant_quotas_non_negative")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_quotas_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "period", name=op.f("pk_tenant_quotas")),
    )
    op.create_table(
        "grant_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("tokens_before", sa.BigInteger(), nullable=False),
        sa.Column("tokens_after", sa.BigInteger(), nullable=False),
        sa.Column("credits_before_minor", sa.BigInteger(), nullable=False),
        sa.Column("credits_after_minor", sa.BigInteger(), nullable=False),
        sa.Column("actor_key_id", sa.String(length=40), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("action IN ('granted', 'resized', 'revoked')", name=op.f("ck_grant_events_action")),
        sa.ForeignKeyConstraint(
            ["grant_id"], ["grants.id"], name=op.f("fk_grant_events_grant_id_grants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grant_events")),
    )
    op.create_index(op.f("ix_grant_events_grant_id"), "grant_events", ["grant_id"], unique=False)
    # ### end Alembic commands ###
    for statement in FUNCTIONS:
        op.execute(statement)


def downgrade() -> None:
    for name in FUNCTION_SIGNATURES:
        op.execute(f"DROP FUNCTION IF EXISTS {name}")
    # ### commands auto generated by Alembic - please adjust! ###
    op.drop_index(op.f("ix_grant_events_grant_id"), table_name="grant_events")
    op.drop_table("grant_events")
    op.drop_table("tenant_quotas")
    op.drop_table("tenant_models")
    op.drop_table("quota_holds")
    op.drop_index("ix_grants_tenant_id_period", table_name="grants")
    op.drop_table("grants")
    op.drop_table("incubator_pools")
    op.drop_table("rate_limit_buckets")
    op.drop_table("limiter_instances")
    # ### end Alembic commands ###

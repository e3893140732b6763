"""admission in batches: market_admit_many

A burst of requests from one tenant serialises on its quota row; admitting them one round trip
each made the last of 50 wait for 49 statements. The limiter now sends everything that queued
while its previous statement ran as one call to this function (group commit, as settles do).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 12:50:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Admit a batch with the rules of market_admit, one call of it per request, each request's
# answer returned with its position (1-based) in the arrays. Locks follow market_admit's order
# (key bucket, tenant bucket, quota, holder) across the whole batch: every key bucket the batch
# needs first, in key order (created first where missing, also in key order), then the requests
# tenant by tenant, so a tenant's bucket and quota rows are taken in tenant order. Single admits,
# other batches, settles and the dead-holder sweep take their rows in that same order, so none
# of them can deadlock with a batch. A request's refusal is its own row; it fails no other.
ADMIT_MANY = """
CREATE FUNCTION market_admit_many(
    p_holder text, p_tenants text[], p_keys text[], p_models text[], p_prompts bigint[], p_maxes bigint[],
    p_key_rpm integer[], p_key_tpm integer[], p_tenant_rpm integer[], p_tenant_tpm integer[])
RETURNS TABLE (
    ord integer, status text, detail text, retry_after double precision, period date,
    granted bigint, held bigint, used bigint,
    limit_requests integer, remaining_requests integer, reset_requests double precision,
    limit_tokens integer, remaining_tokens integer, reset_tokens double precision)
LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
    v_keys text[];
BEGIN
    SELECT coalesce(array_agg(DISTINCT s.k ORDER BY s.k), '{}') INTO v_keys
      FROM unnest(p_keys, p_key_rpm, p_key_tpm) AS s(k, a, b)
     WHERE s.a IS NOT NULL OR s.b IS NOT NULL;
    INSERT INTO rate_limit_buckets (scope) SELECT k FROM unnest(v_keys) AS k ORDER BY k ON CONFLICT DO NOTHING;
    PERFORM 1 FROM rate_limit_buckets b WHERE b.scope = ANY (v_keys) ORDER BY b.scope FOR UPDATE;
    FOR r IN
        SELECT s.*
          FROM unnest(p_tenants, p_keys, p_models, p_prompts, p_maxes, p_key_rpm, p_key_tpm, p_tenant_rpm,
                      p_tenant_tpm) WITH ORDINALITY AS s(t, k, m, pr, mx, krpm, ktpm, trpm, ttpm, n)
         ORDER BY s.t, s.n
    LOOP
        RETURN QUERY
            SELECT r.n::integer, a.*
              FROM market_admit(p_holder, r.t, r.k, r.m, r.pr, r.mx, r.krpm, r.ktpm, r.trpm, r.ttpm) AS a;
    END LOOP;
END
$fn$
"""

SIGNATURE = (
    "market_admit_many(text, text[], text[], text[], bigint[], bigint[], integer[], integer[], integer[], integer[])"
)


def upgrade() -> None:
    op.execute(ADMIT_MANY)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")

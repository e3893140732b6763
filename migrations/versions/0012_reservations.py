"""elastic reservations: tables, and admission classes in market_admit and the settles

``reservations`` (one active per tenant and model), ``reservation_changes`` (sizes over time, for
the hourly charge) and ``reservation_holds`` (requests in flight per api process and reservation).

Admission (``market_admit``, asked with ``p_classify``) now answers the request's class: for a
tenant holding an active reservation for the model it locks the tenant's quota row and then the
reservation's (buckets, quota, reservation, holders: the one order every writer keeps; settles and
the sweep never lock a reservation, the reservation API never a quota row), counts the requests in
flight under it on every replica, per class, and admits ``reserved`` while fewer than ``slots`` run
reserved, else ``burst`` while fewer than ``burst_slots`` run burst, else refuses
``reservation_full``; everyone else is ``on_demand``. The settles take the reservation and class
(NULL for none) and give the count back; the dead-holder sweep drops a dead process's counts with
its holds. The new parameters default to what an api process from before this migration means
(no classing, nothing to give back), so it keeps working through a rolling deploy.

The functions' bodies are edited in place (anchors checked), as in 0007, so this migration cannot
drift from 0003's definitions of everything else; ``market_admit_many`` is restated with the new
parameter and columns.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 20:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIT = "market_admit(text, text, text, text, bigint, bigint, integer, integer, integer, integer)"
ADMIT_NEW = "market_admit(text, text, text, text, bigint, bigint, integer, integer, integer, integer, boolean)"
ADMIT_MANY = (
    "market_admit_many(text, text[], text[], text[], bigint[], bigint[], integer[], integer[], integer[], integer[])"
)
ADMIT_MANY_NEW = (
    "market_admit_many(text, text[], text[], text[], bigint[], bigint[], integer[], integer[], integer[], integer[],"
    " boolean)"
)
SETTLE_ONE = "market_settle_one(text, text, date, bigint, bigint, double precision)"
SETTLE_ONE_NEW = "market_settle_one(text, text, date, bigint, bigint, double precision, text, text)"
SETTLE = "market_settle(text[], text[], date[], bigint[], bigint[], double precision)"
SETTLE_NEW = "market_settle(text[], text[], date[], bigint[], bigint[], double precision, text[], text[])"
SWEEP = "market_release_dead_holders(double precision)"

# [(anchor, replacement)] per function: each anchor must occur exactly once in its definition.
_CLASSIFY_ARG = (
    "p_tenant_tpm integer, OUT status text",
    "p_tenant_tpm integer, p_classify boolean DEFAULT false, OUT status text",
)
_CLASS_OUT = (
    "OUT reset_tokens double precision)",
    "OUT reset_tokens double precision, OUT admission_class text, OUT reservation text)",
)
_ADMIT_VARS = (
    "v_worst double precision := -1;\n",
    "v_worst double precision := -1;\n    v_res text;\n    v_slots integer;\n    v_burst integer;\n"
    "    v_reserved bigint;\n    v_bursting bigint;\n",
)
# Classing is asked for (p_classify): an api process from before this migration does not ask, and
# does not give counts back either, so it must not take any (its requests stay on_demand). The
# quota row is locked before the reservation's, so that a batch holding the quota row for one
# request (another model's) and a single admit holding the reservation's cannot wait on each other.
_ADMIT_CLASS = (
    "    UPDATE tenant_quotas q SET held = q.held + v_hold\n",
    """    admission_class := 'on_demand';
    IF p_classify THEN
        SELECT r.id INTO v_res FROM reservations r
         WHERE r.tenant_id = p_tenant AND r.model = p_model AND r.status = 'active';
    END IF;
    IF v_res IS NOT NULL THEN
        PERFORM 1 FROM tenant_quotas q WHERE q.tenant_id = p_tenant AND q.period = v_period FOR UPDATE;
        SELECT r.slots, r.burst_slots INTO v_slots, v_burst FROM reservations r
         WHERE r.id = v_res AND r.status = 'active' FOR UPDATE;
        IF NOT FOUND THEN  -- ended meanwhile
            v_res := NULL;
        ELSE
            SELECT coalesce(sum(h.reserved), 0), coalesce(sum(h.burst), 0) INTO v_reserved, v_bursting
              FROM reservation_holds h WHERE h.reservation_id = v_res;
            IF v_reserved < v_slots THEN
                admission_class := 'reserved';
            ELSIF v_bursting < v_burst THEN
                admission_class := 'burst';
            ELSE
                status := 'reservation_full';
                detail := v_slots::text || '/' || v_burst::text;
                retry_after := 1;
                RETURN;
            END IF;
            reservation := v_res;
        END IF;
    END IF;
    UPDATE tenant_quotas q SET held = q.held + v_hold
""",
)
_ADMIT_HOLD = (
    "    status := 'ok';\nEND",
    """    IF v_res IS NOT NULL THEN
        INSERT INTO reservation_holds AS h (holder, reservation_id, reserved, burst)
        VALUES (p_holder, v_res, CASE WHEN admission_class = 'reserved' THEN 1 ELSE 0 END,
                CASE WHEN admission_class = 'burst' THEN 1 ELSE 0 END)
        ON CONFLICT (holder, reservation_id) DO UPDATE
           SET reserved = h.reserved + excluded.reserved, burst = h.burst + excluded.burst;
    END IF;
    status := 'ok';
END""",
)
_SETTLE_ONE_ARG = (
    "p_soft double precision, OUT crossed",
    "p_soft double precision, p_reservation text DEFAULT NULL::text, p_class text DEFAULT NULL::text, OUT crossed",
)
_SETTLE_ONE_RELEASE = (
    "RETURNING x.release INTO v_release;\n",
    """RETURNING x.release INTO v_release;
    IF p_reservation IS NOT NULL THEN
        UPDATE reservation_holds h
           SET reserved = greatest(0, h.reserved - CASE WHEN p_class = 'reserved' THEN 1 ELSE 0 END),
               burst = greatest(0, h.burst - CASE WHEN p_class = 'burst' THEN 1 ELSE 0 END)
         WHERE h.holder = p_holder AND h.reservation_id = p_reservation;
    END IF;
""",
)
_SETTLE_ARG = (
    "p_soft double precision)",
    "p_soft double precision, p_reservations text[] DEFAULT NULL::text[], p_classes text[] DEFAULT NULL::text[])",
)
# After the loop, once every quota row of the batch is locked (a batch spanning a month's end locks
# two per tenant; giving counts back between them could wait on an admit holding the second).
_SETTLE_RELEASE = (
    "    END LOOP;\nEND",
    """    END LOOP;
    UPDATE reservation_holds h
       SET reserved = greatest(0, h.reserved - x.reserved), burst = greatest(0, h.burst - x.burst)
      FROM (SELECT s.holder, s.res, count(*) FILTER (WHERE s.cls = 'reserved')::integer AS reserved,
                   count(*) FILTER (WHERE s.cls = 'burst')::integer AS burst
              FROM unnest(p_holders, p_reservations, p_classes) AS s(holder, res, cls)
             WHERE s.res IS NOT NULL
             GROUP BY s.holder, s.res) x
     WHERE h.holder = x.holder AND h.reservation_id = x.res;
END""",
)
_SWEEP_RELEASE = (
    "RETURNING h.held INTO v_held;\n",
    """RETURNING h.held INTO v_held;
        DELETE FROM reservation_holds x
         WHERE x.holder = r.holder
           AND x.reservation_id IN (SELECT v.id FROM reservations v WHERE v.tenant_id = r.tenant_id);
""",
)

_ADMIT_MANY_SQL = """
CREATE FUNCTION market_admit_many(
    p_holder text, p_tenants text[], p_keys text[], p_models text[], p_prompts bigint[], p_maxes bigint[],
    p_key_rpm integer[], p_key_tpm integer[], p_tenant_rpm integer[], p_tenant_tpm integer[]{param})
RETURNS TABLE (
    ord integer, status text, detail text, retry_after double precision, period date,
    granted bigint, held bigint, used bigint,
    limit_requests integer, remaining_requests integer, reset_requests double precision,
    limit_tokens integer, remaining_tokens integer, reset_tokens double precision{extra})
LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
    v_keys text[];
BEGIN
    SELECT coalesce(array_agg(DISTINCT s.k ORDER BY s.k), '{{}}') INTO v_keys
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
              FROM market_admit(p_holder, r.t, r.k, r.m, r.pr, r.mx, r.krpm, r.ktpm, r.trpm, r.ttpm{arg}) AS a;
    END LOOP;
END
$fn$
"""


def _edit(function: str, edits: Sequence[tuple[str, str]], *, drop: str | None = None) -> None:
    """Rewrite ``function``'s definition with ``edits``; ``drop`` it first when its signature changes."""
    definition: str = op.get_bind().execute(sa.text(f"SELECT pg_get_functiondef('{function}'::regprocedure)")).scalar()
    for old, new in edits:
        if definition.count(old) != 1:
            raise RuntimeError(f"{function} does not contain exactly one {old!r}")
        definition = definition.replace(old, new)
    if drop is not None:
        op.execute(f"DROP FUNCTION {drop}")
    op.execute(definition)


def _undo(edits: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(new, old) for old, new in reversed(edits)]


def upgrade() -> None:
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("burst_slots", sa.Integer(), server_default="0", nullable=False),
        sa.Column("status", sa.String(length=16), server_default="active", nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("slots >= 1 AND burst_slots >= 0", name=op.f("ck_reservations_sizes")),
        sa.CheckConstraint("status IN ('active', 'ended')", name=op.f("ck_reservations_status")),
        sa.ForeignKeyConstraint(
            ["model"],
            ["models.name"],
            name=op.f("fk_reservations_model_models"),
            ondelete="RESTRICT",
            onupdate="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_reservations_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reservations")),
    )
    op.create_index(op.f("ix_reservations_tenant_id"), "reservations", ["tenant_id"])
    op.create_index(
        "uq_reservations_active_tenant_model",
        "reservations",
        ["tenant_id", "model"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "reservation_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("reservation_id", sa.String(length=40), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("burst_slots", sa.Integer(), nullable=False),
        sa.Column("actor_key_id", sa.String(length=40), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["reservation_id"],
            ["reservations.id"],
            name=op.f("fk_reservation_changes_reservation_id_reservations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reservation_changes")),
    )
    op.create_index(op.f("ix_reservation_changes_reservation_id"), "reservation_changes", ["reservation_id"])
    op.create_table(
        "reservation_holds",
        sa.Column("holder", sa.String(length=40), nullable=False),
        sa.Column("reservation_id", sa.String(length=40), nullable=False),
        sa.Column("reserved", sa.Integer(), server_default="0", nullable=False),
        sa.Column("burst", sa.Integer(), server_default="0", nullable=False),
        sa.CheckConstraint("reserved >= 0 AND burst >= 0", name=op.f("ck_reservation_holds_non_negative")),
        sa.ForeignKeyConstraint(
            ["reservation_id"],
            ["reservations.id"],
            name=op.f("fk_reservation_holds_reservation_id_reservations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("holder", "reservation_id", name=op.f("pk_reservation_holds")),
    )
    op.create_index(op.f("ix_reservation_holds_reservation_id"), "reservation_holds", ["reservation_id"])

    op.execute(f"DROP FUNCTION {ADMIT_MANY}")
    _edit(ADMIT, [_CLASSIFY_ARG, _CLASS_OUT, _ADMIT_VARS, _ADMIT_CLASS, _ADMIT_HOLD], drop=ADMIT)
    op.execute(
        _ADMIT_MANY_SQL.format(
            param=", p_classify boolean DEFAULT false",
            extra=", admission_class text, reservation text",
            arg=", p_classify",
        )
    )
    _edit(SETTLE_ONE, [_SETTLE_ONE_ARG, _SETTLE_ONE_RELEASE], drop=SETTLE_ONE)
    _edit(SETTLE, [_SETTLE_ARG, _SETTLE_RELEASE], drop=SETTLE)
    _edit(SWEEP, [_SWEEP_RELEASE])


def downgrade() -> None:
    _edit(SWEEP, _undo([_SWEEP_RELEASE]))
    _edit(SETTLE_NEW, _undo([_SETTLE_ARG, _SETTLE_RELEASE]), drop=SETTLE_NEW)
    _edit(SETTLE_ONE_NEW, _undo([_SETTLE_ONE_ARG, _SETTLE_ONE_RELEASE]), drop=SETTLE_ONE_NEW)
    op.execute(f"DROP FUNCTION {ADMIT_MANY_NEW}")
    _edit(ADMIT_NEW, _undo([_CLASSIFY_ARG, _CLASS_OUT, _ADMIT_VARS, _ADMIT_CLASS, _ADMIT_HOLD]), drop=ADMIT_NEW)
    op.execute(_ADMIT_MANY_SQL.format(param="", extra="", arg=""))
    op.drop_table("reservation_holds")
    op.drop_table("reservation_changes")
    op.drop_table("reservations")

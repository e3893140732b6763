"""admission checks the prompt against the context, not the whole hold

``market_admit`` refused a request whose hold (prompt plus max_tokens, times ``n`` choices)
exceeded the model's context length. The context bounds each choice's sequence, not their sum:
a request for two choices without max_tokens (each may run to the end of the context) always
failed. The api checks prompt plus max_tokens per choice before admission, and the engine
enforces the exact count; here only a prompt that fills the context alone is refused.

The function's body is edited in place (one condition) rather than restated, so this migration
cannot drift from 0003's definition of everything else.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 10:10:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION = "market_admit(text, text, text, text, bigint, bigint, integer, integer, integer, integer)"
_HOLD = "IF v_hold > v_context THEN"
_PROMPT = "IF p_prompt >= v_context THEN"


def _swap(old: str, new: str) -> None:
    op.execute(
        f"""
DO $do$
DECLARE
    v_def text := pg_get_functiondef('{_FUNCTION}'::regprocedure);
BEGIN
    IF position('{old}' IN v_def) = 0 THEN
        RAISE EXCEPTION 'market_admit does not contain: {old}';
    END IF;
    EXECUTE replace(v_def, '{old}', '{new}');
END
$do$
"""
    )


def upgrade() -> None:
    _swap(_HOLD, _PROMPT)


def downgrade() -> None:
    _swap(_PROMPT, _HOLD)

"""Write a batch of usage events into the ledger: one SQL statement, set-based, exactly once.

A batch goes to PostgreSQL as one array per column (``unnest``), and a single statement records,
rates and posts it: ``INSERT INTO usage_records ... ON CONFLICT (request_id) DO NOTHING RETURNING``
yields only the requests never seen before, and only those get a ledger transaction (tenant debit =
provider credit + platform revenue). A duplicated or redelivered event therefore changes nothing,
whichever worker sees it and however often. Rating happens in the same statement against the price
book version in force when the request ended, so there is no round trip per event.

A ``refused`` event (work a node did on a request whose admission, run beside its placement,
refused it) charges the tenant nothing and pays the provider as usual: the platform bears it.

An event whose model has no price in force is still recorded, unrated (``tenant_micros`` NULL) and
without a ledger transaction; ``rate_pending`` posts it once a price exists, and reconcile lists it
until then. Ingest never blocks on a missing price and never invents one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from market.wire import UsageEvent

_RATING = """
books AS (
    SELECT id, platform_margin_bps, effective_from,
           lead(effective_from, 1, 'infinity'::timestamptz) OVER (ORDER BY effective_from) AS effective_to
    FROM price_books WHERE currency = {currency}
),
rated AS (
    SELECT s.*,
           CASE WHEN p.model IS NOT NULL THEN b.id END AS price_book_id,
           CASE WHEN s.outcome = 'refused' AND p.model IS NOT NULL THEN 0
                ELSE s.prompt_tokens * p.input_minor_per_million
                     + s.billed_completion_tokens * p.output_minor_per_million
           END AS tenant_micros,
           CASE WHEN p.model IS NULL THEN NULL
                WHEN s.provider_id IS NULL THEN 0
                WHEN po.model IS NOT NULL THEN s.prompt_tokens * po.input_minor_per_million
                                             + s.billed_completion_tokens * po.output_minor_per_million
                ELSE (s.prompt_tokens * p.input_minor_per_million
                      + s.billed_completion_tokens * p.output_minor_per_million)
                     * (10000 - b.platform_margin_bps) / 10000
           END AS provider_micros
    FROM src s
    LEFT JOIN books b ON s.ended_at >= b.effective_from AND s.ended_at < b.effective_to
    LEFT JOIN price_book_entries p
           ON p.price_book_id = b.id AND p.model = s.model AND p.admission_class = s.admission_class
    LEFT JOIN LATERAL (
        SELECT x.model, x.input_minor_per_million, x.output_minor_per_million
        FROM price_book_payouts x
        WHERE x.price_book_id = b.id AND x.model = s.model AND x.provider_id IN (s.provider_id, '*')
        ORDER BY x.provider_id = '*'
        LIMIT 1
    ) po ON true
)"""

_POSTING = """
posted AS (SELECT * FROM changed WHERE tenant_micros IS NOT NULL),
legs AS (
    SELECT p.request_id, l.account_id, l.kind, l.owner_id, l.amount
    FROM posted p CROSS JOIN LATERAL (VALUES
        ('tenant:' || p.tenant_id, 'tenant', p.tenant_id, p.tenant_micros),
        ('provider:' || p.provider_id, 'provider', p.provider_id, -p.provider_micros),
        ('platform:revenue', 'platform', 'revenue', -p.platform_micros)
    ) AS l(account_id, kind, owner_id, amount)
    WHERE l.amount <> 0
),
accounts AS (
    INSERT INTO ledger_accounts (id, kind, owner_id, currency)
    SELECT DISTINCT account_id, kind, owner_id, {currency} FROM legs ORDER BY account_id
    ON CONFLICT (id) DO NOTHING
),
headers AS (
    INSERT INTO ledger_transactions (id, kind, currency, tenant_id, provider_id, model, occurred_at)
    SELECT request_id, 'usage', {currency}, tenant_id, provider_id, model, ended_at FROM posted
),
entries AS (
    INSERT INTO ledger_entries (transaction_id, account_id, amount_micros)
    SELECT request_id, account_id, amount FROM legs
)"""

INGEST_SQL = "".join(  # composed from constants only; every value is a bind parameter
    [
        """
WITH ev AS (
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
        $9::text[], $10::int4[], $11::int4[], $12::int4[], $13::float8[], $14::float8[], $15::float8[],
        $16::float8[], $17::float8[]
    ) AS e(request_id, tenant_id, key_id, model, admission_class, node_id, provider_id, reservation_id,
           outcome, prompt_tokens, completion_tokens, relayed_completion_tokens, started_s, ended_s,
           ttft_ms, duration_ms, engine_ttft_ms)
),
src AS (
    SELECT ev.*, to_timestamp(started_s) AS started_at, to_timestamp(ended_s) AS ended_at,
           CASE WHEN completion_tokens = 0 THEN relayed_completion_tokens
                ELSE least(completion_tokens, relayed_completion_tokens) END AS billed_completion_tokens
    FROM ev
),""",
        _RATING.format(currency="$18"),
        """,
changed AS (
    INSERT INTO usage_records (
        request_id, tenant_id, key_id, model, admission_class, node_id, provider_id, reservation_id, outcome,
        prompt_tokens, completion_tokens, relayed_completion_tokens, billed_completion_tokens,
        started_at, ended_at, ttft_ms, engine_ttft_ms, duration_ms, currency, price_book_id,
        tenant_micros, provider_micros, platform_micros)
    SELECT s.request_id, s.tenant_id, s.key_id, s.model, s.admission_class, s.node_id, s.provider_id,
           s.reservation_id, s.outcome, s.prompt_tokens, s.completion_tokens, s.relayed_completion_tokens,
           s.billed_completion_tokens, s.started_at, s.ended_at, s.ttft_ms, s.engine_ttft_ms, s.duration_ms, $18,
           s.price_book_id, s.tenant_micros, s.provider_micros, s.tenant_micros - s.provider_micros
    FROM rated s
    ORDER BY s.request_id
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, tenant_id, provider_id, model, ended_at, tenant_micros, provider_micros, platform_micros
),""",
        _POSTING.format(currency="$18"),
        """
SELECT count(*) AS recorded, count(*) FILTER (WHERE tenant_micros IS NULL) AS unrated FROM changed
""",
    ]
)

RATE_PENDING_SQL = "".join(
    [
        """
WITH src AS (
    SELECT request_id, model, admission_class, provider_id, outcome, prompt_tokens, billed_completion_tokens, ended_at
    FROM usage_records
    WHERE tenant_micros IS NULL AND currency = $1 AND request_id > $3
    ORDER BY request_id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),""",
        _RATING.format(currency="$1"),
        """,
changed AS (
    UPDATE usage_records u
    SET price_book_id = r.price_book_id, tenant_micros = r.tenant_micros,
        provider_micros = r.provider_micros, platform_micros = r.tenant_micros - r.provider_micros
    FROM rated r
    WHERE u.request_id = r.request_id AND u.tenant_micros IS NULL AND r.tenant_micros IS NOT NULL
    RETURNING u.request_id, u.tenant_id, u.provider_id, u.model, u.ended_at,
              u.tenant_micros, u.provider_micros, u.platform_micros
),""",
        _POSTING.format(currency="$1"),
        """
SELECT (SELECT count(*) FROM changed) AS posted, (SELECT count(*) FROM src) AS scanned,
       (SELECT max(request_id) FROM src) AS last
""",
    ]
)


@dataclass(frozen=True, slots=True)
class BatchResult:
    received: int
    recorded: int
    """New usage records; ``received - recorded`` were duplicates."""
    unrated: int
    """New records with no price in force (recorded, not yet in the ledger)."""


def columns(events: Sequence[UsageEvent]) -> list[list[object]]:
    """The batch as one list per column, in the order ``INGEST_SQL`` unnests them ($1 to $17; $18
    is the currency)."""
    cols: list[list[object]] = [[] for _ in range(17)]
    (
        request_id,
        tenant_id,
        key_id,
        model,
        admission_class,
        node_id,
        provider_id,
        reservation_id,
        outcome,
        prompt,
        completion,
        relayed,
        started,
        ended,
        ttft,
        duration,
        engine_ttft,
    ) = (c.append for c in cols)
    for e in events:
        request_id(e.request_id)
        tenant_id(e.tenant_id)
        key_id(e.key_id)
        model(e.model)
        admission_class(e.admission_class)
        node_id(e.node_id)
        provider_id(e.provider_id)
        reservation_id(e.reservation_id)
        outcome(e.outcome)
        prompt(e.prompt_tokens)
        completion(e.completion_tokens)
        relayed(e.relayed_completion_tokens)
        started(e.started_at)
        ended(e.ended_at)
        ttft(e.ttft_ms)
        duration(e.duration_ms)
        engine_ttft(e.engine_ttft_ms)
    return cols


def unique_by_request(events: Iterable[UsageEvent]) -> list[UsageEvent]:
    """First event per request id (a redelivery may land in the same batch as the original)."""
    seen: dict[str, UsageEvent] = {}
    for event in events:
        seen.setdefault(event.request_id, event)
    return list(seen.values())


async def store_batch(conn: asyncpg.Connection, events: Sequence[UsageEvent], currency: str) -> BatchResult:
    """Record, rate and post a batch in one transaction; commits before returning."""
    batch = unique_by_request(events)
    if not batch:
        return BatchResult(len(events), 0, 0)
    async with conn.transaction():
        row = await conn.fetchrow(INGEST_SQL, *columns(batch), currency)
    assert row is not None
    return BatchResult(len(events), int(row["recorded"]), int(row["unrated"]))


async def rate_pending(conn: asyncpg.Connection, currency: str, limit: int = 10_000) -> int:
    """Rate and post unrated usage whose price now exists; returns how many were posted.

    Walks the unrated rows in request-id order, ``limit`` at a time, past those that still have
    no price: a pass that re-read the first ``limit`` would never reach later rows behind them.
    """
    posted, after = 0, ""
    while True:
        async with conn.transaction():
            row = await conn.fetchrow(RATE_PENDING_SQL, currency, limit, after)
        assert row is not None
        posted += int(row["posted"])
        if int(row["scanned"]) < limit or row["last"] is None:
            return posted
        after = row["last"]

"""Prove the books: usage records = rated usage = ledger, every transaction balanced, invoices whole.

Each check is one query that returns the offending rows (at most ``limit`` of each kind are kept,
the count is exact). Any finding is a difference and ``market billing reconcile`` exits non-zero,
including requests whose engine-reported completion tokens differ from what the api relayed: the
provider's node is not trusted to bill, so every disagreement is shown to a human.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

_RERATE = """
WITH books AS (
    SELECT id, currency, effective_from, platform_margin_bps,
           lead(effective_from, 1, 'infinity'::timestamptz)
               OVER (PARTITION BY currency ORDER BY effective_from) AS effective_to
    FROM price_books
),
expected AS (
    SELECT u.request_id, u.price_book_id, b.id AS want_price_book_id, u.tenant_micros, u.provider_micros,
           CASE WHEN u.outcome = 'refused' AND p.model IS NOT NULL THEN 0
                ELSE p.input_minor_per_million * u.prompt_tokens
                     + p.output_minor_per_million * u.billed_completion_tokens
           END AS want_tenant,
           CASE WHEN u.provider_id IS NULL THEN 0
                WHEN own.provider_id IS NOT NULL THEN own.input_minor_per_million * u.prompt_tokens
                                                   + own.output_minor_per_million * u.billed_completion_tokens
                WHEN every.provider_id IS NOT NULL THEN every.input_minor_per_million * u.prompt_tokens
                                                     + every.output_minor_per_million * u.billed_completion_tokens
                ELSE (p.input_minor_per_million * u.prompt_tokens
                      + p.output_minor_per_million * u.billed_completion_tokens)
                     * (10000 - b.platform_margin_bps) / 10000
           END AS want_provider
    FROM usage_records u
    LEFT JOIN books b
           ON b.currency = u.currency AND u.ended_at >= b.effective_from AND u.ended_at < b.effective_to
    LEFT JOIN price_book_entries p
           ON p.price_book_id = b.id AND p.model = u.model AND p.admission_class = u.admission_class
    LEFT JOIN price_book_payouts own
           ON own.price_book_id = b.id AND own.model = u.model AND own.provider_id = u.provider_id
    LEFT JOIN price_book_payouts every
           ON every.price_book_id = b.id AND every.model = u.model AND every.provider_id = '*'
    WHERE u.tenant_micros IS NOT NULL
)
SELECT request_id, price_book_id, want_price_book_id, tenant_micros, want_tenant, provider_micros, want_provider
FROM expected
WHERE want_tenant IS DISTINCT FROM tenant_micros OR want_provider IS DISTINCT FROM provider_micros
   OR want_price_book_id IS DISTINCT FROM price_book_id
ORDER BY request_id
"""

CHECKS: dict[str, str] = {
    # Usage records carry no foreign keys (ingest speed): usage of a tenant or provider that does
    # not exist is charged or owed to nobody who can be invoiced or paid.
    "usage_of_unknown_tenants": """
        SELECT u.tenant_id, count(*) AS requests FROM usage_records u
        WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = u.tenant_id)
        GROUP BY u.tenant_id ORDER BY u.tenant_id
    """,
    "usage_of_unknown_providers": """
        SELECT u.provider_id, count(*) AS requests FROM usage_records u
        WHERE u.provider_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM providers p WHERE p.id = u.provider_id)
        GROUP BY u.provider_id ORDER BY u.provider_id
    """,
    "unbalanced_transactions": """
        SELECT transaction_id, sum(amount_micros) AS off_by_micros
        FROM ledger_entries GROUP BY transaction_id HAVING sum(amount_micros) <> 0 ORDER BY transaction_id
    """,
    "entries_without_transaction": """
        SELECT e.transaction_id, e.account_id FROM ledger_entries e
        LEFT JOIN ledger_transactions t ON t.id = e.transaction_id
        WHERE t.id IS NULL ORDER BY e.transaction_id
    """,
    "entries_without_account": """
        SELECT DISTINCT e.account_id FROM ledger_entries e
        LEFT JOIN ledger_accounts a ON a.id = e.account_id WHERE a.id IS NULL ORDER BY e.account_id
    """,
    "rated_usage_without_ledger": """
        SELECT u.request_id, u.tenant_micros FROM usage_records u
        LEFT JOIN ledger_transactions t ON t.id = u.request_id AND t.kind = 'usage'
        WHERE u.tenant_micros IS NOT NULL AND t.id IS NULL ORDER BY u.request_id
    """,
    "ledger_usage_without_record": """
        SELECT t.id AS request_id FROM ledger_transactions t
        LEFT JOIN usage_records u ON u.request_id = t.id AND u.tenant_micros IS NOT NULL
        WHERE t.kind = 'usage' AND u.request_id IS NULL ORDER BY t.id
    """,
    "ledger_differs_from_rating": """
        WITH legs AS (
            SELECT e.transaction_id,
                   sum(e.amount_micros) FILTER (WHERE e.account_id LIKE 'tenant:%') AS tenant,
                   -sum(e.amount_micros) FILTER (WHERE e.account_id LIKE 'provider:%') AS provider,
                   -sum(e.amount_micros) FILTER (WHERE e.account_id = 'platform:revenue') AS platform
            FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.transaction_id AND t.kind = 'usage'
            GROUP BY e.transaction_id
        )
        SELECT u.request_id, u.tenant_micros, l.tenant AS ledger_tenant, u.provider_micros,
               l.provider AS ledger_provider, u.platform_micros, l.platform AS ledger_platform
        FROM usage_records u JOIN legs l ON l.transaction_id = u.request_id
        WHERE coalesce(l.tenant, 0) <> u.tenant_micros OR coalesce(l.provider, 0) <> u.provider_micros
           OR coalesce(l.platform, 0) <> u.platform_micros
        ORDER BY u.request_id
    """,
    "rating_differs_from_price_book": _RERATE,
    "unrated_usage": """
        SELECT request_id, tenant_id, model, admission_class, ended_at FROM usage_records
        WHERE tenant_micros IS NULL ORDER BY request_id
    """,
    "token_count_mismatches": """
        SELECT request_id, tenant_id, provider_id, node_id, completion_tokens AS engine_completion_tokens,
               relayed_completion_tokens, billed_completion_tokens
        FROM usage_records WHERE completion_tokens <> relayed_completion_tokens ORDER BY request_id
    """,
    "invoice_lines_differ_from_total": """
        SELECT i.id AS invoice_id, i.total_minor, sum(l.amount_minor) AS lines_minor
        FROM invoices i JOIN invoice_lines l ON l.invoice_id = i.id
        GROUP BY i.id, i.total_minor HAVING sum(l.amount_minor) <> i.total_minor ORDER BY i.id
    """,
    "invoice_differs_from_usage": """
        WITH billed AS (
            SELECT l.invoice_id, sum(l.amount_micros) AS micros FROM invoice_lines l
            WHERE l.kind = 'usage' GROUP BY l.invoice_id
        ),
        used AS (
            SELECT i.id AS invoice_id, sum(u.tenant_micros) AS micros
            FROM invoices i JOIN usage_records u
              ON u.tenant_id = i.tenant_id AND u.currency = i.currency AND u.tenant_micros IS NOT NULL
             AND u.outcome <> 'refused'  -- not on invoices: the platform's cost
             AND u.ended_at >= i.period_start::timestamp AT TIME ZONE 'UTC'
             AND u.ended_at < i.period_end::timestamp AT TIME ZONE 'UTC'
            GROUP BY i.id
        )
        SELECT coalesce(b.invoice_id, u.invoice_id) AS invoice_id, b.micros AS invoiced_micros,
               u.micros AS usage_micros
        FROM billed b FULL JOIN used u USING (invoice_id)
        WHERE b.micros IS DISTINCT FROM u.micros ORDER BY 1
    """,
}


@dataclass
class Finding:
    check: str
    count: int
    rows: list[dict[str, object]] = field(default_factory=list)


@dataclass
class Report:
    findings: list[Finding]
    totals: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.findings

    def render(self) -> str:
        lines = ["billing reconcile"]
        for name, value in self.totals.items():
            lines.append(f"  {name:<34} {value:>22,}")
        if self.ok:
            lines.append("OK: ledger = rated usage = usage records; every transaction balances")
        for finding in self.findings:
            lines.append(f"DIFFERENCE {finding.check}: {finding.count}")
            for row in finding.rows:
                lines.append("  " + " ".join(f"{k}={v}" for k, v in row.items()))
            if finding.count > len(finding.rows):
                lines.append(f"  ... and {finding.count - len(finding.rows)} more")
        return "\n".join(lines)


_TOTALS = """
SELECT
  (SELECT count(*) FROM usage_records) AS usage_records,
  (SELECT count(*) FROM usage_records WHERE tenant_micros IS NOT NULL) AS rated_usage_records,
  (SELECT coalesce(sum(tenant_micros), 0) FROM usage_records) AS rated_tenant_micros,
  (SELECT coalesce(sum(e.amount_micros), 0) FROM ledger_entries e
     JOIN ledger_transactions t ON t.id = e.transaction_id AND t.kind = 'usage'
    WHERE e.account_id LIKE 'tenant:%') AS ledger_usage_tenant_micros,
  (SELECT coalesce(sum(amount_micros), 0) FROM ledger_entries) AS ledger_sum_micros
"""


async def reconcile(session: AsyncSession, limit: int = 50) -> Report:
    """Run every check in one repeatable-read snapshot, so a running worker cannot race it."""
    await session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
    findings = []
    for name, sql in CHECKS.items():
        limited = text(f"SELECT count(*) OVER () AS _count, q.* FROM ({sql}) AS q LIMIT :limit")  # noqa: S608
        rows = [dict(row._mapping) for row in await session.execute(limited, {"limit": limit})]
        if rows:
            count = int(str(rows[0]["_count"]))
            findings.append(Finding(name, count, [{k: v for k, v in r.items() if k != "_count"} for r in rows]))
    totals_row = (await session.execute(text(_TOTALS))).one()
    totals = {key: int(value) for key, value in totals_row._mapping.items()}
    if totals["rated_tenant_micros"] != totals["ledger_usage_tenant_micros"] or totals["ledger_sum_micros"] != 0:
        findings.append(Finding("totals", 1, [dict(totals)]))
    return Report(findings, totals)

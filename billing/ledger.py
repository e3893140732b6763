"""Ledger postings the billing worker owns beyond usage: reservation commitments.

Every amount here is micros of the minor unit unless the name says ``_minor``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from market.money import MICROS_PER_MINOR


def hour_start(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return at.replace(minute=0, second=0, microsecond=0)


POST_RESERVATION_HOURS_SQL = """
WITH hours AS (
    SELECT r.id, r.tenant_id, r.model, h.hour
    FROM reservations r
    CROSS JOIN LATERAL generate_series(
        date_trunc('hour', greatest(r.created_at, $2::timestamptz) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
        $3::timestamptz - interval '1 hour',
        interval '1 hour'
    ) AS h(hour)
    WHERE r.created_at < $3 AND (r.ended_at IS NULL OR (r.ended_at > $2 AND h.hour < r.ended_at))
),
sized AS (
    SELECT hr.*,
           'resv:' || hr.id || ':' || to_char(hr.hour AT TIME ZONE 'UTC', 'YYYYMMDD"T"HH24') AS txn,
           (SELECT max(c.slots) FROM reservation_changes c
             WHERE c.reservation_id = hr.id AND c.at < hr.hour + interval '1 hour'
               AND c.at >= coalesce((SELECT max(p.at) FROM reservation_changes p
                                      WHERE p.reservation_id = hr.id AND p.at <= hr.hour), '-infinity')
           ) AS slots
    FROM hours hr
),
priced AS (
    SELECT s.*, e.reservation_hour_minor::bigint * s.slots * $4::bigint AS micros
    FROM sized s
    CROSS JOIN LATERAL (
        SELECT b.id FROM price_books b WHERE b.currency = $1 AND b.effective_from <= s.hour
        ORDER BY b.effective_from DESC LIMIT 1
    ) bk
    JOIN price_book_entries e
      ON e.price_book_id = bk.id AND e.model = s.model AND e.admission_class = 'reserved'
     AND e.reservation_hour_minor IS NOT NULL
    WHERE s.slots > 0 AND NOT EXISTS (SELECT 1 FROM ledger_transactions t WHERE t.id = s.txn)
),
legs AS (
    SELECT p.txn, l.account_id, l.kind, l.owner_id, l.amount
    FROM priced p CROSS JOIN LATERAL (VALUES
        ('tenant:' || p.tenant_id, 'tenant', p.tenant_id, p.micros),
        ('platform:revenue', 'platform', 'revenue', -p.micros)
    ) AS l(account_id, kind, owner_id, amount)
    WHERE l.amount <> 0
),
accounts AS (
    INSERT INTO ledger_accounts (id, kind, owner_id, currency)
    SELECT DISTINCT account_id, kind, owner_id, $1 FROM legs ORDER BY account_id
    ON CONFLICT (id) DO NOTHING
),
headers AS (
    INSERT INTO ledger_transactions (id, kind, currency, tenant_id, model, occurred_at, memo)
    SELECT txn, 'reservation', $1, tenant_id, model, hour,
           'reservation ' || id || ': ' || slots || ' slot(s) for the hour from '
           || to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24') || ':00 UTC'
    FROM priced WHERE micros > 0
    ON CONFLICT (id) DO NOTHING
    RETURNING id
),
entries AS (
    INSERT INTO ledger_entries (transaction_id, account_id, amount_micros)
    SELECT l.txn, l.account_id, l.amount FROM legs l JOIN headers h ON h.id = l.txn
)
SELECT count(*) AS posted FROM headers
"""


async def post_reservation_hours(conn: asyncpg.Connection, currency: str, since: datetime, until: datetime) -> int:
    """Charge every reservation-hour that ended in ``[since, until)`` and is not charged yet.

    An hour costs the most slots the reservation held during it (elastic: growing mid-hour bills
    the larger size from that hour, shrinking from the next), at the price book's hourly slot
    price in force when the hour began; hours the price book cannot price are left for a later
    run. Posted once per reservation-hour (``resv:<id>:<hour>``), so runs may overlap or repeat.
    ``until`` is rounded down to the hour: a running hour is charged once it has ended. Returns
    how many hours were posted. The caller owns the transaction.
    """
    end = hour_start(until)
    posted = await conn.fetchval(POST_RESERVATION_HOURS_SQL, currency, since, end, MICROS_PER_MINOR)
    return int(posted or 0)

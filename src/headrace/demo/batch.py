"""One tick's rows, written as one database transaction in one round trip.

Rows accumulate as columns; :meth:`TickBatch.write` sends one statement per
table (``INSERT ... SELECT FROM unnest(arrays)`` or ``UPDATE ... FROM
unnest(arrays)``) in pipeline mode, in foreign-key order, and commits.
Times are integer microseconds until they are written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, LiteralString

import psycopg

from headrace.demo.actions import Truth
from headrace.demo.clock import from_us

_INSERT_CUSTOMERS = """
INSERT INTO customers (id, full_name, email, country, risk_band, created_at)
SELECT * FROM unnest(%b::int8[], %b::text[], %b::text[], %b::text[], %b::text[],
                     %b::timestamptz[])
"""
_INSERT_ACCOUNTS = """
INSERT INTO accounts (id, customer_id, tier, status, balance, currency, opened_at, updated_at)
SELECT u.id, u.customer_id, u.tier, 'active', u.balance::numeric / 100, u.currency, u.at, u.at
FROM unnest(%b::int8[], %b::int8[], %b::text[], %b::int8[], %b::text[], %b::timestamptz[])
     AS u(id, customer_id, tier, balance, currency, at)
"""
_INSERT_CARDS = """
INSERT INTO cards (id, account_id, kind, card_present, online, status, last4, issued_at,
                   expires_on)
SELECT u.id, u.account_id, 'physical', true, true, 'active', u.last4, u.at,
       (date_trunc('month', u.at) + interval '4 years')::date
FROM unnest(%b::int8[], %b::int8[], %b::text[], %b::timestamptz[]) AS u(id, account_id, last4, at)
"""
_INSERT_LOGINS = """
INSERT INTO logins (id, customer_id, success, failure_reason, device, ip, country, at)
SELECT u.id, u.customer_id, u.success, u.reason, u.device, u.ip::inet, u.country, u.at
FROM unnest(%b::int8[], %b::int8[], %b::bool[], %b::text[], %b::text[], %b::text[], %b::text[],
            %b::timestamptz[]) AS u(id, customer_id, success, reason, device, ip, country, at)
"""
_INSERT_TRANSACTIONS = """
INSERT INTO transactions (id, account_id, card_id, merchant_id, parent_id, amount, currency,
                          channel, type, status, decline_reason, country, device, ip,
                          created_at, updated_at)
SELECT u.id, u.account_id, u.card_id, u.merchant_id, u.parent_id, u.amount::numeric / 100,
       u.currency, u.channel, u.type, u.status, NULL, u.country, u.device, u.ip::inet, u.at, u.at
FROM unnest(%b::int8[], %b::int8[], %b::int8[], %b::int8[], %b::int8[], %b::int8[], %b::text[],
            %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
            %b::timestamptz[])
     AS u(id, account_id, card_id, merchant_id, parent_id, amount, currency, channel, type,
          status, country, device, ip, at)
"""
_UPDATE_TRANSACTIONS = """
UPDATE transactions AS t SET status = u.status, decline_reason = u.reason, updated_at = u.at
FROM unnest(%b::int8[], %b::text[], %b::text[], %b::timestamptz[]) AS u(id, status, reason, at)
WHERE t.id = u.id
"""
_INSERT_LEDGER = """
INSERT INTO ledger_entries (id, account_id, transaction_id, kind, delta, balance_after, at)
SELECT u.id, u.account_id, u.transaction_id, u.kind, u.delta::numeric / 100,
       u.balance_after::numeric / 100, u.at
FROM unnest(%b::int8[], %b::int8[], %b::int8[], %b::text[], %b::int8[], %b::int8[],
            %b::timestamptz[]) AS u(id, account_id, transaction_id, kind, delta, balance_after, at)
"""
_UPDATE_ACCOUNTS = """
UPDATE accounts AS a SET balance = u.balance::numeric / 100, updated_at = u.at
FROM unnest(%b::int8[], %b::int8[], %b::timestamptz[]) AS u(id, balance, at)
WHERE a.id = u.id
"""
_INSERT_TRUTH = """
INSERT INTO fraud_ground_truth (scenario_id, family, account_id, customer_id, card_id,
                                started_at, ended_at, expected_rule, detail)
SELECT u.scenario_id, u.family, u.account_id, u.customer_id, u.card_id, u.started_at,
       u.ended_at, u.family, u.detail::jsonb
FROM unnest(%b::int8[], %b::text[], %b::int8[], %b::int8[], %b::int8[], %b::timestamptz[],
            %b::timestamptz[], %b::text[])
     AS u(scenario_id, family, account_id, customer_id, card_id, started_at, ended_at, detail)
"""

# Column positions whose values are microsecond times (converted on write).
_TIME_COLUMNS: dict[str, tuple[int, ...]] = {
    "customers": (5,),
    "accounts": (5,),
    "cards": (3,),
    "logins": (7,),
    "transactions": (13,),
    "ledger": (6,),
    "truth": (5, 6),
}
_SQL: dict[str, LiteralString] = {
    "customers": _INSERT_CUSTOMERS,
    "accounts": _INSERT_ACCOUNTS,
    "cards": _INSERT_CARDS,
    "logins": _INSERT_LOGINS,
    "transactions": _INSERT_TRANSACTIONS,
    "ledger": _INSERT_LEDGER,
    "truth": _INSERT_TRUTH,
}


@dataclass
class TickBatch:
    """The rows of one tick, in write order."""

    rows: dict[str, list[tuple[Any, ...]]] = field(
        default_factory=lambda: {name: [] for name in _SQL}
    )
    # last status change per transaction in this tick: id -> (status, reason, at)
    status: dict[int, tuple[str, str | None, int]] = field(default_factory=dict)
    # balance after this tick per account: id -> (balance cents, at)
    balances: dict[int, tuple[int, int]] = field(default_factory=dict)

    def add(self, table: str, row: tuple[Any, ...]) -> None:
        """Append a row to one of the insert statements."""
        self.rows[table].append(row)

    def add_truth(self, truth: Truth, ended_us: int) -> None:
        """Append a scenario's ground-truth row, ending now (detail goes out as JSON)."""
        self.rows["truth"].append(
            (
                truth.scenario_id,
                truth.family,
                truth.account.id,
                truth.account.customer_id,
                truth.card_id,
                truth.started_us,
                ended_us,
                json.dumps(truth.detail, sort_keys=True),
            )
        )

    def changes(self) -> int:
        """Row changes this batch makes (inserts plus updated rows)."""
        return sum(len(r) for r in self.rows.values()) + len(self.status) + len(self.balances)

    def empty(self) -> bool:
        """Whether there is nothing to write."""
        return not self.status and not self.balances and not any(self.rows.values())

    def statements(self) -> list[tuple[LiteralString, list[list[Any]]]]:
        """The statements and their array parameters, in foreign-key order."""
        out: list[tuple[LiteralString, list[list[Any]]]] = []

        def columns(name: str) -> list[list[Any]]:
            cols = [list(c) for c in zip(*self.rows[name], strict=True)]
            for index in _TIME_COLUMNS[name]:
                cols[index] = [from_us(v) for v in cols[index]]
            return cols

        for name in ("customers", "accounts", "cards", "logins", "transactions"):
            if self.rows[name]:
                out.append((_SQL[name], columns(name)))
        if self.status:
            changes = list(self.status.values())
            out.append(
                (
                    _UPDATE_TRANSACTIONS,
                    [
                        list(self.status),
                        [status for status, _, _ in changes],
                        [reason for _, reason, _ in changes],
                        [from_us(at) for _, _, at in changes],
                    ],
                )
            )
        if self.rows["ledger"]:
            out.append((_SQL["ledger"], columns("ledger")))
        if self.balances:
            balances = list(self.balances.values())
            out.append(
                (
                    _UPDATE_ACCOUNTS,
                    [
                        list(self.balances),
                        [cents for cents, _ in balances],
                        [from_us(at) for _, at in balances],
                    ],
                )
            )
        if self.rows["truth"]:
            out.append((_SQL["truth"], columns("truth")))
        return out

    def write(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        """Write everything in one transaction, pipelined (one round trip)."""
        statements = self.statements()
        if not statements:
            return
        with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
            for sql, params in statements:
                cur.execute(sql, params)

"""One tick's rows, written as one database transaction in one round trip.

Rows accumulate per table; :meth:`TickBatch.write` sends one statement per
table (``INSERT ... SELECT FROM unnest(arrays)`` or ``UPDATE ... FROM
unnest(arrays)``) in pipeline mode, in foreign-key order, and commits.

Each column travels as one array literal in text (``{1,2,3}``), built with
``str.join``: several times cheaper in Python than adapting every element.
Times stay integer microseconds until PostgreSQL turns them into
timestamps (``'epoch' + n * 1 us``, exact for any realistic date).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, LiteralString

import psycopg

from headrace.demo.actions import Truth

_INSERT_CUSTOMERS = """
INSERT INTO customers (id, full_name, email, country, risk_band, created_at)
SELECT u.id, u.full_name, u.email, u.country, u.risk_band,
       timestamptz 'epoch' + u.at * interval '1 microsecond'
FROM unnest(%s::int8[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int8[])
     AS u(id, full_name, email, country, risk_band, at)
"""
_INSERT_ACCOUNTS = """
INSERT INTO accounts (id, customer_id, tier, status, balance, currency, opened_at, updated_at)
SELECT u.id, u.customer_id, u.tier, 'active', u.balance::numeric / 100, u.currency,
       timestamptz 'epoch' + u.at * interval '1 microsecond',
       timestamptz 'epoch' + u.at * interval '1 microsecond'
FROM unnest(%s::int8[], %s::int8[], %s::text[], %s::int8[], %s::text[], %s::int8[])
     AS u(id, customer_id, tier, balance, currency, at)
"""
_INSERT_CARDS = """
INSERT INTO cards (id, account_id, kind, card_present, online, status, last4, issued_at,
                   expires_on)
SELECT u.id, u.account_id, 'physical', true, true, 'active', u.last4,
       timestamptz 'epoch' + u.at * interval '1 microsecond',
       (date_trunc('month', timestamptz 'epoch' + u.at * interval '1 microsecond')
        + interval '4 years')::date
FROM unnest(%s::int8[], %s::int8[], %s::text[], %s::int8[]) AS u(id, account_id, last4, at)
"""
_INSERT_LOGINS = """
INSERT INTO logins (id, customer_id, success, failure_reason, device, ip, country, at)
SELECT u.id, u.customer_id, u.success, u.reason, u.device, u.ip::inet, u.country,
       timestamptz 'epoch' + u.at * interval '1 microsecond'
FROM unnest(%s::int8[], %s::int8[], %s::bool[], %s::text[], %s::text[], %s::text[], %s::text[],
            %s::int8[]) AS u(id, customer_id, success, reason, device, ip, country, at)
"""
_INSERT_TRANSACTIONS = """
INSERT INTO transactions (id, account_id, card_id, merchant_id, parent_id, amount, currency,
                          channel, type, status, decline_reason, country, device, ip,
                          created_at, updated_at)
SELECT u.id, u.account_id, u.card_id, u.merchant_id, u.parent_id, u.amount::numeric / 100,
       u.currency, u.channel, u.type, u.status, NULL, u.country, u.device, u.ip::inet,
       timestamptz 'epoch' + u.at * interval '1 microsecond',
       timestamptz 'epoch' + u.at * interval '1 microsecond'
FROM unnest(%s::int8[], %s::int8[], %s::int8[], %s::int8[], %s::int8[], %s::int8[], %s::text[],
            %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int8[])
     AS u(id, account_id, card_id, merchant_id, parent_id, amount, currency, channel, type,
          status, country, device, ip, at)
"""
_UPDATE_TRANSACTIONS = """
UPDATE transactions AS t
SET status = u.status, decline_reason = u.reason,
    updated_at = timestamptz 'epoch' + u.at * interval '1 microsecond'
FROM unnest(%s::int8[], %s::text[], %s::text[], %s::int8[]) AS u(id, status, reason, at)
WHERE t.id = u.id
"""
_INSERT_LEDGER = """
INSERT INTO ledger_entries (id, account_id, transaction_id, kind, delta, balance_after, at)
SELECT u.id, u.account_id, u.transaction_id, u.kind, u.delta::numeric / 100,
       u.balance_after::numeric / 100, timestamptz 'epoch' + u.at * interval '1 microsecond'
FROM unnest(%s::int8[], %s::int8[], %s::int8[], %s::text[], %s::int8[], %s::int8[], %s::int8[])
     AS u(id, account_id, transaction_id, kind, delta, balance_after, at)
"""
_UPDATE_ACCOUNTS = """
UPDATE accounts AS a
SET balance = u.balance::numeric / 100,
    updated_at = timestamptz 'epoch' + u.at * interval '1 microsecond'
FROM unnest(%s::int8[], %s::int8[], %s::int8[]) AS u(id, balance, at)
WHERE a.id = u.id
"""
_INSERT_TRUTH = """
INSERT INTO fraud_ground_truth (scenario_id, family, account_id, customer_id, card_id,
                                started_at, ended_at, expected_rule, detail)
SELECT u.scenario_id, u.family, u.account_id, u.customer_id, u.card_id,
       timestamptz 'epoch' + u.started * interval '1 microsecond',
       timestamptz 'epoch' + u.ended * interval '1 microsecond', u.family, u.detail::jsonb
FROM unnest(%s::int8[], %s::text[], %s::int8[], %s::int8[], %s::int8[], %s::int8[], %s::int8[],
            %s::text[])
     AS u(scenario_id, family, account_id, customer_id, card_id, started, ended, detail)
"""


def int_array(values: Sequence[int | None]) -> str:
    """A PostgreSQL array literal of integers (None as NULL)."""
    if None in values:
        return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"
    return "{" + ",".join(map(str, values)) + "}"


def _quoted(value: str | None) -> str:
    if value is None:
        return "NULL"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def text_array(values: Sequence[str | None]) -> str:
    """A PostgreSQL array literal of strings, each quoted (None as NULL)."""
    if not values:
        return "{}"
    present = [v for v in values if v is not None]
    bare = "".join(present)
    if '"' not in bare and "\\" not in bare:  # nothing to escape: quote by joining
        if len(present) == len(values):
            return '{"' + '","'.join(present) + '"}'
        return "{" + ",".join(["NULL" if v is None else '"' + v + '"' for v in values]) + "}"
    return "{" + ",".join(map(_quoted, values)) + "}"


def bool_array(values: Sequence[bool]) -> str:
    """A PostgreSQL array literal of booleans."""
    return "{" + ",".join("t" if v else "f" for v in values) + "}"


_Encoder = Callable[[Any], str]
_I, _T, _B = int_array, text_array, bool_array

# (statement, how each column is written) per insert, in column order
_INSERTS: dict[str, tuple[LiteralString, tuple[_Encoder, ...]]] = {
    "customers": (_INSERT_CUSTOMERS, (_I, _T, _T, _T, _T, _I)),
    "accounts": (_INSERT_ACCOUNTS, (_I, _I, _T, _I, _T, _I)),
    "cards": (_INSERT_CARDS, (_I, _I, _T, _I)),
    "logins": (_INSERT_LOGINS, (_I, _I, _B, _T, _T, _T, _T, _I)),
    "transactions": (_INSERT_TRANSACTIONS, (_I, _I, _I, _I, _I, _I, *(_T,) * 7, _I)),
    "ledger": (_INSERT_LEDGER, (_I, _I, _I, _T, _I, _I, _I)),
    "truth": (_INSERT_TRUTH, (_I, _T, _I, _I, _I, _I, _I, _T)),
}


def _encode(rows: Sequence[tuple[Any, ...]], encoders: tuple[_Encoder, ...]) -> list[str]:
    columns = zip(*rows, strict=True)
    return [encode(column) for encode, column in zip(encoders, columns, strict=True)]


@dataclass
class TickBatch:
    """The rows of one tick, in write order (times in microseconds)."""

    rows: dict[str, list[tuple[Any, ...]]] = field(
        default_factory=lambda: {name: [] for name in _INSERTS}
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

    def statements(self) -> list[tuple[LiteralString, list[str]]]:
        """The statements and their array parameters, in foreign-key order."""
        out: list[tuple[LiteralString, list[str]]] = []
        for name in ("customers", "accounts", "cards", "logins", "transactions"):
            if self.rows[name]:
                sql, encoders = _INSERTS[name]
                out.append((sql, _encode(self.rows[name], encoders)))
        if self.status:
            changes = list(self.status.values())
            out.append(
                (
                    _UPDATE_TRANSACTIONS,
                    [
                        int_array(list(self.status)),
                        text_array([status for status, _, _ in changes]),
                        text_array([reason for _, reason, _ in changes]),
                        int_array([at for _, _, at in changes]),
                    ],
                )
            )
        if self.rows["ledger"]:
            sql, encoders = _INSERTS["ledger"]
            out.append((sql, _encode(self.rows["ledger"], encoders)))
        if self.balances:
            balances = list(self.balances.values())
            out.append(
                (
                    _UPDATE_ACCOUNTS,
                    [
                        int_array(list(self.balances)),
                        int_array([cents for cents, _ in balances]),
                        int_array([at for _, at in balances]),
                    ],
                )
            )
        if self.rows["truth"]:
            sql, encoders = _INSERTS["truth"]
            out.append((sql, _encode(self.rows["truth"], encoders)))
        return out

    def write(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        """Write everything in one transaction, pipelined (one round trip)."""
        statements = self.statements()
        if not statements:
            return
        with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
            for sql, params in statements:
                cur.execute(sql, params)

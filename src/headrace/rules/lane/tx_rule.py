"""What the lane's rules over the transactions table share: their columns, how the net
change is read, and the rule watermark (``RuleJob.advance``; seeded as a rebuild does).

Velocity burst, amount spike, impossible travel, structuring and card testing each read
the transactions table's :data:`~headrace.rules.triggers.TX_FIELDS` (the account as
int64, the event time as µs since the epoch) and move a watermark past every batch.
"""

from __future__ import annotations

import duckdb

from headrace.rules.config import TransactionsTable
from headrace.rules.lane.alert import to_us
from headrace.rules.lane.changes import Convert, NetChange, integers, micros
from headrace.rules.lane.saved import RuleSaved
from headrace.rules.triggers import TX_FIELDS
from headrace.source.changes import TableRef
from headrace.store.duckdb.schema import mirror_table

EVIDENCE_FIELDS = tuple(name for name in TX_FIELDS if name not in ("account", "t"))
"""The fields a window row keeps beside its account and time (its evidence)."""
AMOUNT = EVIDENCE_FIELDS.index("amount")
MERCHANT = EVIDENCE_FIELDS.index("merchant")


def tx_columns(tx: TransactionsTable) -> dict[str, str]:
    """Each of :data:`TX_FIELDS` (``t``: the event time) -> its source column."""
    return {name: getattr(tx, "time" if name == "t" else name) for name in TX_FIELDS}


def tx_wanted(columns: dict[str, str]) -> dict[str, Convert | None]:
    """How :func:`~headrace.rules.lane.changes.net_change` reads ``columns``: the account
    as int64, the time as µs, the rest as they come."""
    wanted: dict[str, Convert | None] = {column: None for column in columns.values()}
    wanted[columns["account"]] = integers
    wanted[columns["t"]] = micros
    return wanted


def time_sql(column: str) -> str:
    """The event-time column as the SQL rules read it."""
    return f'CAST("{column}" AS TIMESTAMPTZ)'


def seeded_watermark(
    con: duckdb.DuckDBPyConnection, ref: TableRef, time: str, saved: RuleSaved | None
) -> int | None:
    """The watermark a rebuild starts from: the mirror's newest ``least(t, now())``
    (None: empty), or the lane's own record's when ``saved`` is given."""
    if saved is not None:
        return saved.watermark_us
    (newest,) = con.execute(
        f"SELECT max(least({time_sql(time)}, now())) FROM {mirror_table(ref)}"
    ).fetchall()[0]
    return None if newest is None else to_us(newest)


def advance(
    watermark_us: int | None, earliest_us: int, *changes: NetChange | None
) -> tuple[int, int | None]:
    """``(W, W')``: the watermark before the batch (the earliest possible before any) and
    after it, ``max(W, newest_mark)`` over the rule's tables' changes (a batch without a
    live row leaves it alone)."""
    previous = watermark_us if watermark_us is not None else earliest_us
    marks = [c.newest_mark for c in changes if c is not None and c.newest_mark is not None]
    if not marks:
        return previous, watermark_us
    newest = max(marks)
    return previous, newest if watermark_us is None else max(previous, newest)

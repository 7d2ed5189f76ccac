"""Retention: history rows and rollup buckets older than configured are dropped.

A rollup's horizon is aligned down to its coarsest grain (a coarse bucket
is either whole or gone) and only moves forward; it is stored
(``headrace.rollups.retained_from``) and deltas of older buckets are ignored
from then on, so a late change to an old row cannot resurrect a dropped
bucket with a partial (or negative) count.
"""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb

from headrace.engine.registry import RollupRuntime
from headrace.engine.rollup import BUCKET
from headrace.engine.tables import TableModel
from headrace.store.duckdb.schema import META


def retain_history(con: duckdb.DuckDBPyConnection, model: TableModel, now: datetime) -> int | None:
    """Delete a table's history rows committed before ``now - retention``; rows deleted."""
    retention = model.config.retention
    if retention is None or not model.config.history:
        return None
    count = con.execute(
        f"DELETE FROM {model.history} WHERE _hr_commit_ts < ?", [now - retention]
    ).fetchall()
    return int(count[0][0]) if count else 0


def horizon_of(runtime: RollupRuntime, now: datetime) -> datetime | None:
    """The start of the oldest bucket a rollup keeps at ``now``."""
    retention = runtime.config.retention
    if retention is None:
        return None
    coarsest = int(max(runtime.config.grains).total_seconds())
    cutoff = int((now - retention).timestamp())
    return datetime.fromtimestamp(cutoff - cutoff % coarsest, UTC)


def retain_rollup(
    con: duckdb.DuckDBPyConnection, name: str, runtime: RollupRuntime, now: datetime
) -> int | None:
    """Move a rollup's horizon forward and drop older groups; groups dropped."""
    plan = runtime.plan
    horizon = horizon_of(runtime, now)
    if horizon is None or plan is None or not runtime.active:
        return None
    if runtime.retained_from is not None and horizon <= runtime.retained_from:
        return 0
    dropped = 0
    for table in plan.owned_tables():
        count = con.execute(f"DELETE FROM {table} WHERE {BUCKET} < ?", [horizon]).fetchall()
        if table == plan.state and count:
            dropped = int(count[0][0])
    runtime.retained_from = horizon
    con.execute(
        f"UPDATE {META}.rollups SET retained_from = ?, updated_at = now() WHERE name = ?",
        [horizon, name],
    )
    return dropped

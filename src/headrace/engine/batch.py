"""Applying one segment of a batch: resolve every table, write, maintain the rollups.

Order matters and is the same for every segment:

1. each table's changes become full row versions, touched keys and end rows
   (:mod:`headrace.engine.resolve`) — reading the mirrors as they were before
   the segment;
2. looked-up dimensions of end rows are resolved in the statement creating
   them (changes of looked-up tables in the same segment included, in commit
   order);
3. then each table's start rows are taken out of its mirror (one
   ``DELETE … RETURNING``), history rows are appended (deleted rows' values
   come from the start rows), and the end rows go into the mirrors;
4. each active rollup appends its delta (end rows +1, start rows -1) to its
   state and side tables (compacted now and then, between batches), or, with
   min/max, MERGEs it: groups whose extreme was retracted take the value
   recomputed from the updated mirror in the same statement;
5. stream jobs run, per-table row counts and freshness are updated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import duckdb
import pyarrow as pa

from headrace.engine.batch_changes import load_changes
from headrace.engine.extremes import merge_extremes
from headrace.engine.inherit import fill_inherited
from headrace.engine.lookup import lookup_joins
from headrace.engine.mirror import write_dead_letters, write_history, write_mirror
from headrace.engine.registry import Registry, RollupRuntime
from headrace.engine.resolve import TableWork, compute_net, take_start_rows
from headrace.engine.rollup import RollupPlan
from headrace.engine.tables import DEAD
from headrace.jobs.runtime import StreamJobs
from headrace.source.changes import TableRef, TableSchema
from headrace.store.duckdb.arrow_scan import release_arrow
from headrace.store.duckdb.prepared import execute_cached
from headrace.store.duckdb.results import rows_written
from headrace.store.duckdb.schema import META


def apply_segment(
    con: duckdb.DuckDBPyConnection,
    registry: Registry,
    jobs: StreamJobs,
    items: Sequence[tuple[TableSchema, pa.Table]],
    transactions: pa.Table,
    *,
    in_pieces: bool = False,
) -> tuple[int, list[TableWork]]:
    """Apply one segment's changes; returns (dead letters written, the tables' work).
    ``transactions``: the batch's :func:`~headrace.engine.batch_changes.transaction_starts`;
    ``in_pieces``: a piece of a batch applied in pieces (one long store transaction)."""
    dead = 0
    works: dict[TableRef, TableWork] = {}
    for index, (schema, data) in enumerate(items):
        model = registry.tables[schema.table]
        if model.state == DEAD:
            reason = model.reason or "table stopped"
            dead += write_dead_letters(
                con, model.name, reason, schema, data, keep_nothing=in_pieces
            )
            continue
        works[model.ref] = load_changes(
            con, model, schema, data, index, transactions=transactions, keep_nothing=in_pieces
        )
    try:
        _write_segment(con, registry, jobs, works)
    finally:
        for work in works.values():
            if work.touched_keys is not None:
                release_arrow(con, work.keys, keep_nothing=work.keep_nothing)
            if work.changes_view:
                release_arrow(con, work.changes_input, keep_nothing=False)
    return dead, list(works.values())


def _write_segment(
    con: duckdb.DuckDBPyConnection,
    registry: Registry,
    jobs: StreamJobs,
    works: Mapping[TableRef, TableWork],
) -> None:
    """Steps 1-5 of the module docstring for the loaded tables."""
    _resolve(con, registry, works)
    for work in works.values():
        if work.model.config.history:
            write_history(con, work)
    for work in works.values():
        if work.model.config.mirror:
            write_mirror(con, work)
    for index, runtime in enumerate(registry.rollups.values()):
        if runtime.active and runtime.plan is not None:
            table_work = works.get(runtime.plan.table.ref)
            if table_work is not None:
                apply_rollup(con, runtime, runtime.plan, table_work, index)
    for plan, touched in registry.tracking.values():
        table_work = works.get(plan.table.ref)
        if table_work is not None:
            track_groups(con, plan, table_work, touched)
    if jobs:
        jobs.apply(con, works.values(), registry.tables)
    write_table_meta(con, list(works.values()))


def _resolve(
    con: duckdb.DuckDBPyConnection, registry: Registry, works: Mapping[TableRef, TableWork]
) -> None:
    # Inherited values first (a looked-up value may be an unchanged TOAST value).
    for work in works.values():
        if work.model.config.mirror:
            fill_inherited(con, work)
    for work in works.values():
        if not work.model.config.mirror:
            continue
        joins = None
        if work.model.lookups:
            targets = {}
            for name, lookup in work.model.lookups.items():
                target = registry.tables[lookup.target]
                target_work = works.get(lookup.target) if target.state != DEAD else None
                targets[name] = (target, target_work)
            joins = lookup_joins(con, work, targets)
        compute_net(con, work, joins)
    # Last: taking the start rows out of the mirrors changes what the steps above read.
    for work in works.values():
        if work.model.config.mirror:
            take_start_rows(con, work)


def apply_rollup(
    con: duckdb.DuckDBPyConnection,
    runtime: RollupRuntime,
    plan: RollupPlan,
    work: TableWork,
    index: int,
) -> None:
    """Merge (min/max) or append (everything else) one table's batch effect into one
    rollup's state and side tables."""
    horizon = runtime.retained_from
    params: list[object] = [horizon] if horizon is not None else []
    sides = plan.side_tables()
    # The state and side deltas read the same rows: the weighted ones, or for
    # floating sums the netted ones (materialized when side tables read them too:
    # every statement costs a few ms whatever its size).
    with_horizon = horizon is not None
    if not plan.needs_net():
        source = f"({plan.weighted_sql(work.start, work.end, with_horizon)})"
    elif sides:
        source = f"_hr_n_{index}"
        netted = plan.net_sql(work.start, work.end, with_horizon)
        con.execute(f"CREATE OR REPLACE TEMP TABLE {source} AS {netted}", params)
        params = []
    else:
        source = f"({plan.net_sql(work.start, work.end, with_horizon)})"
    appended = 0
    if plan.extremes():
        appended += merge_extremes(
            con,
            plan,
            f"_hr_d_{index}",
            (source, params),
            retracts=bool(work.start_rows),
            mirror_reads=runtime.mirror_reads,
        )
    else:
        appended += rows_written(
            execute_cached(con, plan.insert_sql(f"({plan.delta_sql(source)})"), params)
        )
    for measure in sides:
        delta = f"({plan.side_delta_sql(measure, source)})"
        appended += rows_written(execute_cached(con, plan.side_insert_sql(measure, delta), params))
    runtime.appended += appended


def track_groups(
    con: duckdb.DuckDBPyConnection, plan: RollupPlan, work: TableWork, touched: str
) -> None:
    """Add the groups of a batch's start and end rows (under ``plan``, a rollup being
    rebuilt) to ``touched`` (see :mod:`headrace.engine.rebuild`)."""
    parts = [
        plan.groups_sql(rows)
        for rows, count in ((work.start, work.start_rows), (work.end, work.end_rows))
        if count
    ]
    if parts:
        con.execute(f"INSERT INTO {touched} SELECT * FROM ({' UNION '.join(parts)})")


def write_table_meta(con: duckdb.DuckDBPyConnection, works: Sequence[TableWork]) -> None:
    """Row counts (end rows - start rows), freshness and position of the batch's tables,
    in one statement."""
    if not works:
        return
    rows = ", ".join("(?, ?, ?, ?)" for _ in works)
    params: list[object] = []
    for work in works:
        delta = work.end_rows - work.start_rows if work.model.config.mirror else 0
        params += [work.model.name, delta, work.last_commit_ts, work.last_lsn]
    con.execute(
        f"""UPDATE {META}.tables AS t SET rows = t.rows + v.delta,
               last_commit_ts = greatest(t.last_commit_ts, CAST(v.commit_ts AS TIMESTAMPTZ)),
               last_lsn = greatest(t.last_lsn, CAST(v.lsn AS UBIGINT)), applied_at = now()
            FROM (VALUES {rows}) v(table_name, delta, commit_ts, lsn)
            WHERE t.table_name = v.table_name""",
        params,
    )

"""Min/max under retraction: which groups lost their extreme, and their new one.

A sum or a count takes a retraction by subtracting; a min or a max cannot: when
a batch retracts (updates away or deletes) the row holding a group's current
extreme, the next one is the nearest value left, which each group's reserve
holds (:mod:`headrace.engine.reserve`). Per batch, for a rollup with min/max
measures:

1. the batch's in-bound values are appended to the reserves
   (:func:`~headrace.engine.reserve.append_sql`);
2. :func:`flagged_delta_sql`: the per-group delta plus ``_hr_flag``, whether the
   batch retracted the group's current extreme (read from the state before the
   MERGE, in a statement of its own: a MERGE reading its own target is not
   safe), and for the flagged groups their reserves' ends after the batch;
3. :func:`read_flagged`: how many groups are flagged and whether a reserve ran
   out (one row). No flagged group: the plain MERGE;
4. the MERGE, flagged groups taking their reserve's end (:func:`reserve_delta_sql`).

When a flagged group's reserve ran out (a bounded side with no value left), the
flagged groups are recomputed from the (already updated) mirror instead
(:func:`recomputed_delta_sql`) and those groups' reserves refilled from it
(:func:`refill`): rare, and the only mirror read. That recompute reads only
mirror rows whose time falls in the flagged buckets' range, as a filter on the
raw time column, which DuckDB checks against each row group's min/max; within
that range the rows are matched exactly on dimensions and bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb

from headrace.engine.reserve import (
    COUNT,
    VALUE,
    Reserve,
    append_sql,
    bounds_select,
    reserve_select,
    sides_sql,
    thin_sql,
    trim_sql,
    update_bounds_sql,
)
from headrace.engine.rollup import BUCKET, FLAG, RollupPlan, grain_us, time_to_epoch_us
from headrace.pipeline.model import quote_ident
from headrace.store.duckdb.prepared import execute_cached
from headrace.store.duckdb.results import rows_written

_ZONED = ("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass
class MirrorReads:
    """How often a rollup's min/max went back to the mirror since the process started.
    Both stay near 0 while the reserves hold; a workload that keeps taking the extremes
    themselves (the smallest payments deleted first, say) makes them climb."""

    batches: int = 0
    """Batches in which a flagged group's kept values at one end all went, so the flagged
    groups were recomputed from the mirror within the batch."""
    groups_refilled: int = 0
    """Groups whose reserve ran thin and was rebuilt from the mirror between batches."""


@dataclass(frozen=True)
class FlaggedRange:
    """The buckets of a batch's flagged groups: first and last bucket start, and
    whether a group without time (NULL bucket) is among them."""

    first: datetime | None
    last: datetime | None
    nulls: bool


def flagged_delta_sql(plan: RollupPlan, rows: str) -> str:
    """:meth:`RollupPlan.delta_sql` plus ``_hr_flag``, the state's reserve bounds and, for
    flagged groups, each reserve's ends (``_hr_x<j>_low``, ``_hr_x<j>_high``,
    ``_hr_x<j>_bounded``; step 2 of the module docstring)."""
    conditions = [c for m in plan.extremes() if (c := m.recompute_condition("s", "d")) is not None]
    bounds = "".join(f", s.{r.lo}, s.{r.hi}" for r in plan.reserves)
    delta = (
        f"SELECT d.*{bounds}, coalesce({' OR '.join(conditions)}, false) AS {FLAG} "
        f"FROM ({plan.delta_sql(rows)}) d LEFT JOIN {plan.state} s ON {plan.match('s', 'd')}"
    )
    ends, joins = [], []
    for reserve in plan.reserves:
        x = f"x{reserve.index}"
        ends += [f"{x}.{c}" for c in (reserve.low, reserve.high, reserve.bounded)]
        sides = sides_sql(reserve, plan.group_columns, f"(SELECT * FROM d WHERE {FLAG})")
        joins.append(f"LEFT JOIN ({sides}) {x} ON {plan.match('d', x)}")
    return f"WITH d AS ({delta}) SELECT d.*, {', '.join(ends)} FROM d {' '.join(joins)}"


def _exhausted(plan: RollupPlan) -> str:
    """Over a :func:`flagged_delta_sql` row ``d``: some reserve of the group ran out."""
    return "(" + " OR ".join(r.exhausted("d") for r in plan.reserves) + ")"


def read_flagged(con: duckdb.DuckDBPyConnection, plan: RollupPlan, delta: str) -> tuple[int, bool]:
    """Flagged groups in ``delta`` (a :func:`flagged_delta_sql` table), and whether the
    reserve of one of them ran out."""
    exhausted = _exhausted(plan)
    row = execute_cached(
        con, f"SELECT count(*), coalesce(bool_or({exhausted}), false) FROM {delta} d WHERE {FLAG}"
    ).fetchone()
    return (int(row[0]), bool(row[1])) if row is not None else (0, False)


def reserve_delta_sql(plan: RollupPlan, delta: str) -> str:
    """``delta`` with each min/max measure's recomputed value (``_hr_m<i>_r``) taken from
    its reserve's end, for :meth:`RollupPlan.merge_sql` with ``recomputed``."""
    parts = []
    for measure in plan.extremes():
        reserve = measure.reserve
        if reserve is None:  # every min/max measure gets one when its rollup is planned
            raise RuntimeError(f"min/max measure {measure.name} has no reserve")
        end = reserve.low if measure.function == "min" else reserve.high
        parts.append(f"d.{end} AS {measure.part('r')}")
    return f"SELECT d.*, {', '.join(parts)} FROM {delta} d"


def refill_exhausted(con: duckdb.DuckDBPyConnection, plan: RollupPlan, delta: str) -> None:
    """Refill from the (updated) mirror the reserves of the flagged groups of ``delta``
    whose reserve ran out."""
    groups = ", ".join(plan.group_columns)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _hr_refill AS SELECT {groups} FROM {delta} d "
        f"WHERE {FLAG} AND {_exhausted(plan)}"
    )
    for reserve in plan.reserves:
        refill(con, plan, reserve, "_hr_refill")


def refill(con: duckdb.DuckDBPyConnection, plan: RollupPlan, reserve: Reserve, groups: str) -> None:
    """Rebuild ``reserve`` and its bounds in the state, for the groups listed in table
    ``groups``, from the mirror (as a build of the rollup would)."""
    columns = ", ".join([*plan.group_columns, VALUE, COUNT])
    rows = plan.mirror_rows(groups)
    con.execute(f"DELETE FROM {reserve.table} r USING {groups} g WHERE {plan.match('r', 'g')}")
    con.execute(
        f"INSERT INTO {reserve.table} ({columns}) "
        f"{reserve_select(reserve, plan.group_columns, rows)}"
    )
    # A group of `groups` with no mirror row left gets no bounds row: its state row is
    # gone too (its row count reached 0).
    bounds = f"({bounds_select(reserve, plan.group_columns, rows)})"
    con.execute(update_bounds_sql(reserve, plan.group_columns, plan.state, bounds))


def maintain_reserves(con: duckdb.DuckDBPyConnection, plan: RollupPlan) -> int:
    """Between batches, after a compaction cycle: trim the reserves' oversized groups,
    rebuild their thin ones from the mirror (see :mod:`headrace.engine.reserve`).
    Returns the groups rebuilt (a group counts once per reserve)."""
    refilled = 0
    for reserve in plan.reserves:
        for statement in trim_sql(reserve, plan.group_columns, plan.state):
            con.execute(statement)
        # CREATE TABLE AS returns its row count: the thin groups' count comes for free.
        thin = rows_written(
            con.execute(thin_sql(reserve, plan.group_columns, plan.state, "_hr_thin"))
        )
        if thin:
            refill(con, plan, reserve, "_hr_thin")
            refilled += thin
    return refilled


def read_flagged_range(con: duckdb.DuckDBPyConnection, delta: str) -> FlaggedRange:
    """The flagged groups' buckets in ``delta`` (a :func:`flagged_delta_sql` table)."""
    row = con.execute(
        f"SELECT min({BUCKET}), max({BUCKET}), bool_or({BUCKET} IS NULL) FROM {delta} WHERE {FLAG}"
    ).fetchone()
    if row is None:  # an aggregate always returns its row
        return FlaggedRange(None, None, False)
    first, last, nulls = row
    return FlaggedRange(first, last, bool(nulls))


def time_prefilter(plan: RollupPlan, flagged: FlaggedRange) -> tuple[str, list[object]]:
    """A filter on the time column of mirror rows ``m`` keeping (at least) every row of
    the flagged buckets, and its parameters. On the raw column for timestamps and
    dates, so DuckDB skips row groups by their min/max; on the column's epoch
    microseconds for any other time type (exact, but every row is read)."""
    column = f"m.{quote_ident(plan.time_column)}"
    parts: list[str] = []
    params: list[object] = []
    if flagged.first is not None and flagged.last is not None:
        first = flagged.first.astimezone(UTC)
        end = flagged.last.astimezone(UTC) + timedelta(microseconds=grain_us(plan.config.grain))
        if plan.time_type in _ZONED:
            parts.append(_between(column, "TIMESTAMPTZ", "<"))
            params += [first, end]
        elif plan.time_type == "TIMESTAMP":  # naive times are UTC (time_to_epoch_us)
            parts.append(_between(column, "TIMESTAMP", "<"))
            params += [first.replace(tzinfo=None), end.replace(tzinfo=None)]
        elif plan.time_type == "DATE":  # a superset: whole days, the last one included
            parts.append(_between(column, "DATE", "<="))
            params += [first.date(), end.date()]
        else:
            epoch = time_to_epoch_us(column, plan.time_type)
            parts.append(f"({epoch} >= ? AND {epoch} < ?)")
            params += [(first - _EPOCH) // _MICROSECOND, (end - _EPOCH) // _MICROSECOND]
    if flagged.nulls:
        parts.append(f"{column} IS NULL")
    return "(" + " OR ".join(parts) + ")", params


def _between(column: str, cast: str, upper: str) -> str:
    return f"({column} >= CAST(? AS {cast}) AND {column} {upper} CAST(? AS {cast}))"


def recomputed_delta_sql(plan: RollupPlan, delta: str, prefilter: str) -> str:
    """``delta`` (a :func:`flagged_delta_sql` table) plus, for its flagged groups, the
    extremes recomputed from the (already updated) mirror (``_hr_m<i>_r``), reading
    only mirror rows that pass ``prefilter`` (:func:`time_prefilter`).

    Only mirror rows that can belong to a flagged group are projected (see
    :func:`_flagged_mirror_rows`): projecting every mirror row (bucket
    arithmetic, expressions) and probing it costs milliseconds per 100k rows.
    """
    flagged = f"(SELECT * FROM {delta} WHERE {FLAG})"
    groups = ", ".join(f"p.{c}" for c in plan.group_columns)
    aggregates = []
    recomputed = []
    for measure in plan.extremes():
        for part, build in zip(measure.state_parts(), measure.build(), strict=True):
            aggregates.append(f"{build} AS {part}")
            recomputed.append(f"r.{part} AS {measure.part('r')}")
    mirror_rows, exact = _flagged_mirror_rows(plan, flagged, prefilter)
    semi = "" if exact else f"SEMI JOIN {flagged} f ON {plan.match('p', 'f')} "
    return (
        f"SELECT d.*, {', '.join(recomputed)} FROM {delta} d LEFT JOIN ("
        f"SELECT {groups}, {', '.join(aggregates)} FROM ({plan.projection(mirror_rows)}) p "
        f"{semi}GROUP BY {groups}) r ON {plan.match('d', 'r')}"
    )


def _flagged_mirror_rows(plan: RollupPlan, flagged: str, prefilter: str) -> tuple[str, bool]:
    """The mirror rows of the ``flagged`` groups, selected on raw mirror columns; and
    whether exactly those (else a superset, to be matched on the projection).

    Rows pass ``prefilter`` (the flagged buckets' time range) first. With
    dimensions that are mirror columns (plain or looked up): a semi join on
    them (DuckDB pushes the few values into the scan as a filter) with each
    group's bucket as a time range, exact when every dimension is such a
    column. Otherwise the rows of the time range (matched on the projection)."""
    rows = f"SELECT m.* FROM {plan.table.mirror} m"
    plain = [d for d in plan.dimensions if d.mirror_column is not None]
    if not plain:
        return f"({rows} WHERE {prefilter})", False
    g = grain_us(plan.config.grain)
    time = f"m.{quote_ident(plan.time_column)}"
    t = time_to_epoch_us(time, plan.time_type)
    # Buckets are aligned: bucket(t) = b <=> b <= t < b + grain.
    on = [f"m.{quote_ident(str(d.mirror_column))} IS NOT DISTINCT FROM k.{d.column}" for d in plain]
    b = f"epoch_us(k.{BUCKET})"
    on.append(f"(({t} >= {b} AND {t} < {b} + {g}) OR ({time} IS NULL AND k.{BUCKET} IS NULL))")
    semi = f"SEMI JOIN {flagged} k ON {' AND '.join(on)}"
    return f"({rows} {semi} WHERE {prefilter})", len(plain) == len(plan.dimensions)


def merge_extremes(
    con: duckdb.DuckDBPyConnection,
    plan: RollupPlan,
    delta: str,
    rows: tuple[str, list[object]],
    *,
    retracts: bool,
    mirror_reads: MirrorReads,
) -> int:
    """MERGE a batch into a rollup with min/max (the module docstring's steps).
    ``rows``: the batch's rows (weighted or netted) and their parameters;
    ``retracts``: whether the batch has old row versions (else nothing can be
    retracted); ``delta``: the name of the temp table of step 2; ``mirror_reads``:
    counts a batch that had to read the mirror. Returns the rows appended to the
    reserves (they count towards the rollup's compaction)."""
    source, params = rows
    appended = 0
    for reserve in plan.reserves:
        sql = append_sql(reserve, plan.group_columns, plan.state, source)
        appended += rows_written(execute_cached(con, sql, params))
    if not retracts:  # insert-only: nothing retracted, nothing to recompute
        con.execute(plan.merge_sql(f"({plan.delta_sql(source)})"), params)
        return appended
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {delta} AS {flagged_delta_sql(plan, source)}", params
    )
    flagged, exhausted = read_flagged(con, plan, delta)
    if not flagged:
        con.execute(plan.merge_sql(delta))
        return appended
    if not exhausted:
        con.execute(plan.merge_sql(f"({reserve_delta_sql(plan, delta)})", recomputed=True))
        return appended
    prefilter, params = time_prefilter(plan, read_flagged_range(con, delta))
    con.execute(
        plan.merge_sql(f"({recomputed_delta_sql(plan, delta, prefilter)})", recomputed=True),
        params,
    )
    refill_exhausted(con, plan, delta)
    mirror_reads.batches += 1
    return appended

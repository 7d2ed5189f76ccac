"""Min/max under retraction: which groups lost their extreme, and their new one.

A sum or a count takes a retraction by subtracting; a min or a max cannot: when
a batch retracts (updates away or deletes) the row holding a group's current
extreme, the next one is somewhere in the mirror. Per batch, for a rollup with
min/max measures:

1. :func:`flagged_delta_sql`: the per-group delta plus ``_hr_flag``, whether the
   batch retracted the group's current extreme (read from the state before the
   MERGE, in a statement of its own: a MERGE reading its own target is not safe);
2. :func:`read_flagged_range`: the bucket range of the flagged groups, read back
   (one row). No flagged group: the plain MERGE, no mirror read;
3. :func:`recomputed_delta_sql`: the delta with, for the flagged groups, the
   extremes recomputed from the (already updated) mirror, which the MERGE uses
   where the retracted value was the extreme.

The recompute reads only mirror rows whose time falls in the flagged buckets'
range, as a filter on the raw time column, which DuckDB checks against each
row group's min/max: rows arrive in roughly time order, so an extreme
retracted in a recent bucket reads the newest row groups, not the whole
mirror (whose size grows with the history kept). Within that range the rows
are matched exactly on dimensions and bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb

from headrace.engine.rollup import BUCKET, FLAG, RollupPlan, grain_us, time_to_epoch_us
from headrace.pipeline.model import quote_ident

_ZONED = ("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class FlaggedRange:
    """The buckets of a batch's flagged groups: first and last bucket start, and
    whether a group without time (NULL bucket) is among them."""

    first: datetime | None
    last: datetime | None
    nulls: bool

    @property
    def empty(self) -> bool:
        return self.first is None and not self.nulls


def flagged_delta_sql(plan: RollupPlan, rows: str) -> str:
    """:meth:`RollupPlan.delta_sql` plus ``_hr_flag`` (step 1 of the module docstring)."""
    conditions = [c for m in plan.extremes() if (c := m.recompute_condition("s", "d")) is not None]
    return (
        f"SELECT d.*, coalesce({' OR '.join(conditions)}, false) AS {FLAG} "
        f"FROM ({plan.delta_sql(rows)}) d LEFT JOIN {plan.state} s ON {plan.match('s', 'd')}"
    )


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
) -> None:
    """MERGE a batch into a rollup with min/max (the module docstring's steps).
    ``rows``: the batch's rows (weighted or netted) and their parameters;
    ``retracts``: whether the batch has old row versions (else nothing can be
    retracted); ``delta``: the name of the temp table of step 1."""
    source, params = rows
    if not retracts:  # insert-only: nothing retracted, nothing to recompute
        con.execute(plan.merge_sql(f"({plan.delta_sql(source)})"), params)
        return
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {delta} AS {flagged_delta_sql(plan, source)}", params
    )
    flagged = read_flagged_range(con, delta)
    if flagged.empty:
        con.execute(plan.merge_sql(delta))
        return
    prefilter, params = time_prefilter(plan, flagged)
    con.execute(
        plan.merge_sql(f"({recomputed_delta_sql(plan, delta, prefilter)})", recomputed=True),
        params,
    )

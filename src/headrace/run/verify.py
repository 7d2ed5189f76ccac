"""Compare a store with PostgreSQL: every mirror and every rollup grain, recomputed there.

Used by the crash tests and ``headrace bench pipeline``: with the source
quiet and the store caught up to the same LSN, each rollup view must equal
the same GROUP BY run on PostgreSQL, and each mirror the table itself.

The reference query buckets with ``floor(epoch / grain) * grain`` (UTC, as
the engine does), groups by the dimensions (a looked-up dimension joins the
looked-up table: equal to the engine's "value at the time of the event"
only while the looked-up rows do not change), and computes each measure
with PostgreSQL's own aggregate (``count(DISTINCT ...)`` for both distinct
counts; the approximate one is allowed a few percent). Dimensions and
conditions written as SQL expressions must be valid in both dialects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import duckdb
import psycopg

from headrace.pipeline.model import COMMIT_TIME, MeasureFn, PipelineConfig, RollupConfig
from headrace.pipeline.model import quote_ident as q
from headrace.store.duckdb.schema import grain_label, history_table, mirror_table

APPROX_TOLERANCE = 0.05


@dataclass
class Comparison:
    """What differed: one entry per mirror or rollup view, with a few example rows."""

    checked: list[str] = field(default_factory=list)
    mismatches: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def describe(self) -> str:
        if self.ok:
            return f"{len(self.checked)} views and mirrors equal PostgreSQL"
        return "; ".join(f"{name}: {detail}" for name, detail in self.mismatches.items())


def _primary_key(pg: psycopg.Connection[tuple[Any, ...]], table: str) -> list[str]:
    rows = pg.execute(
        """SELECT a.attname FROM pg_index i
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
           WHERE i.indrelid = %s::regclass AND i.indisprimary
           ORDER BY array_position(i.indkey, a.attnum)""",
        (table,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def reference_sql(
    config: PipelineConfig,
    rollup: RollupConfig,
    grain_seconds: int,
    pg: psycopg.Connection[tuple[Any, ...]],
) -> tuple[str, set[int]]:
    """PostgreSQL SQL computing one grain of ``rollup`` from scratch; approximate columns."""
    ref, table_config = config.table(rollup.table)
    time = rollup.time or table_config.event_time
    if time == COMMIT_TIME:
        raise ValueError(f"rollup {rollup.name} buckets by commit time: no reference on PostgreSQL")
    g = grain_seconds
    bucket = f"to_timestamp(floor(extract(epoch from t.{q(time)}) / {g}) * {g}) AS bucket"
    joins = []
    dims = []
    for index, dim in enumerate(rollup.dimensions):
        if dim.column is not None:
            dims.append(f"t.{q(dim.column)}")
        elif dim.expr is not None:
            dims.append(f"({dim.expr})")
        elif dim.lookup is not None:
            target, _ = config.table(dim.lookup.table)
            key = _primary_key(pg, target.qualified)
            on = " AND ".join(
                f"lk{index}.{q(k)} = t.{q(c)}" for k, c in zip(key, dim.lookup.on, strict=True)
            )
            joins.append(f"LEFT JOIN {q(target.schema)}.{q(target.name)} lk{index} ON {on}")
            dims.append(f"lk{index}.{q(dim.lookup.column)}")
    measures = []
    approx: set[int] = set()
    for index, measure in enumerate(rollup.measures):
        value = measure.value_sql
        where = f" FILTER (WHERE {measure.where})" if measure.where else ""
        fn = measure.fn
        if fn is MeasureFn.COUNT:
            measures.append(f"count({value or '*'}){where}")
        elif fn in (MeasureFn.COUNT_DISTINCT, MeasureFn.APPROX_COUNT_DISTINCT):
            measures.append(f"count(DISTINCT {value}){where}")
            if fn is MeasureFn.APPROX_COUNT_DISTINCT:
                approx.add(1 + len(dims) + index)
        else:
            measures.append(f"{fn.value}({value}){where}")
    groups = ", ".join(str(i) for i in range(1, len(dims) + 2))
    dims = [f"{sql} AS {q(d.name)}" for sql, d in zip(dims, rollup.dimensions, strict=True)]
    measures = [f"{sql} AS {q(m.name)}" for sql, m in zip(measures, rollup.measures, strict=True)]
    select = ", ".join([bucket, *dims, *measures])
    source = f"{q(ref.schema)}.{q(ref.name)} t {' '.join(joins)}"
    # Identifiers are quoted; expressions come from the validated pipeline file.
    return f"SELECT {select} FROM {source} GROUP BY {groups}", approx  # noqa: S608


def _value(value: object) -> object:
    if isinstance(value, datetime):
        return round(value.timestamp(), 6)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return value.normalize()
    return value


def _sort_key(row: Sequence[object]) -> tuple[tuple[bool, str, str], ...]:
    return tuple((v is None, type(v).__name__, str(v)) for v in row)


def _normalized(rows: Sequence[Sequence[object]]) -> list[tuple[object, ...]]:
    return sorted((tuple(_value(v) for v in row) for row in rows), key=_sort_key)


def _close(a: object, b: object, approximate: bool) -> bool:
    if a == b:
        return True
    if a is None or b is None:
        return False
    if approximate and isinstance(a, int) and isinstance(b, int):
        return abs(a - b) <= max(2, math.ceil(APPROX_TOLERANCE * max(a, b)))
    numbers = (int, float, Decimal)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    return False


def _compare_rows(
    expected: list[tuple[object, ...]], got: list[tuple[object, ...]], approx: set[int]
) -> str | None:
    if len(expected) != len(got):
        missing = [r for r in expected if r not in got][:3]
        extra = [r for r in got if r not in expected][:3]
        return f"{len(got)} rows, PostgreSQL has {len(expected)}; missing {missing} extra {extra}"
    for want, have in zip(expected, got, strict=True):
        if len(want) != len(have) or not all(
            _close(a, b, i in approx) for i, (a, b) in enumerate(zip(want, have, strict=True))
        ):
            return f"row {have} should be {want}"
    return None


def compare_store(
    config: PipelineConfig,
    pg: psycopg.Connection[tuple[Any, ...]],
    duck: duckdb.DuckDBPyConnection,
    *,
    mirrors: bool = True,
) -> Comparison:
    """Compare every mirror (its source columns) and every rollup grain with PostgreSQL."""
    result = Comparison()
    if mirrors:
        for ref, table_config in config.table_refs.items():
            if not table_config.mirror:
                continue
            columns = [
                str(r[0])
                for r in pg.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                    (ref.schema, ref.name),
                ).fetchall()
            ]
            listed = ", ".join(q(c) for c in columns)
            name = f"mirror.{ref.name}"
            result.checked.append(name)
            pg_sql = f"SELECT {listed} FROM {q(ref.schema)}.{q(ref.name)}"  # noqa: S608 - quoted
            duck_sql = f"SELECT {listed} FROM {mirror_table(ref)}"  # noqa: S608 - quoted
            expected = _normalized(pg.execute(pg_sql.encode()).fetchall())
            got = _normalized(duck.execute(duck_sql).fetchall())
            problem = _compare_rows(expected, got, set())
            if problem is not None:
                result.mismatches[name] = problem
    for rollup in config.rollups:
        for grain in rollup.grains:
            view = f"rollup.{rollup.name}_{grain_label(grain)}"
            result.checked.append(view)
            sql, approx = reference_sql(config, rollup, int(grain.total_seconds()), pg)
            expected = _normalized(pg.execute(sql.encode()).fetchall())
            got = _normalized(duck.execute(f"SELECT * FROM {view}").fetchall())  # noqa: S608
            problem = _compare_rows(expected, got, approx)
            if problem is not None:
                result.mismatches[view] = problem
    return result


def duplicate_history_rows(
    config: PipelineConfig, duck: duckdb.DuckDBPyConnection
) -> dict[str, int]:
    """Per history table, how many (_hr_lsn, _hr_seq) pairs occur more than once."""
    out: dict[str, int] = {}
    for ref, table_config in config.table_refs.items():
        if not table_config.history:
            continue
        history = history_table(ref)
        duplicates = (
            f"SELECT count(*) FROM (SELECT _hr_lsn, _hr_seq FROM {history} "  # noqa: S608 - quoted
            "WHERE _hr_op <> 'S' GROUP BY ALL HAVING count(*) > 1)"
        )
        rows = duck.execute(duplicates).fetchall()
        out[ref.qualified] = int(rows[0][0])
    return out

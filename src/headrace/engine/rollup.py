"""A rollup compiled against its table: the SQL that builds, maintains and serves it.

Everything a rollup does is one of these statements, run by the engine in
the batch's transaction:

- :meth:`RollupPlan.projection`: rows of the table (mirror, or a batch's
  old/new row versions) → (bucket, dimension values, measure inputs);
- :meth:`RollupPlan.net_sql`: old versions weighted -1 and new ones +1,
  identical projections cancelled (an update that does not touch the
  rollup's columns contributes nothing);
- :meth:`RollupPlan.delta_sql` / :meth:`RollupPlan.merge_sql`: the per-group
  delta merged into ``rollup.<name>__state`` (groups reaching 0 rows are
  deleted), side tables likewise;
- with min/max, each group also keeps its values near the extremes (a reserve,
  :mod:`headrace.engine.reserve`); the delta flags the groups whose extreme the
  batch retracted, and the MERGE takes their next extremes from the reserve
  (:mod:`headrace.engine.extremes`);
- :meth:`RollupPlan.table_selects`: each of its tables from the mirror (one
  GROUP BY each), for creation, rebuild and the snapshot;
- :func:`~headrace.engine.rollup_view.view_sql`: ``rollup.<name>_<grain>`` for
  each grain.

Buckets are epoch-aligned in UTC: ``floor(epoch_us(t) / grain) * grain``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import duckdb

from headrace.engine.measures import (
    ApproxCountDistinct,
    CountDistinct,
    Extreme,
    Measure,
    MeasureInputs,
    Sum,
    make_measure,
)
from headrace.engine.reserve import COUNT, KEEP, VALUE, Reserve, match_sql, reserve_select
from headrace.engine.tables import LookupColumn, TableModel
from headrace.engine.types import is_integer
from headrace.errors import ConfigError
from headrace.pipeline.expressions import expression_columns
from headrace.pipeline.model import COMMIT_TIME, MeasureFn, RollupConfig, quote_ident
from headrace.source.changes import TableRef
from headrace.store.duckdb.schema import (
    EVENT_TS,
    ROLLUP,
    ROWS,
    grain_label,
    rollup_state,
    rollup_view,
)

BUCKET = "bucket"
FLAG = "_hr_flag"
"""Column of a min/max delta: the batch retracted the group's current extreme."""


def grain_us(grain: timedelta) -> int:
    return int(grain.total_seconds()) * 1_000_000


def bucket_sql(epoch_us: str, grain: timedelta) -> str:
    """SQL flooring an epoch-microseconds expression to a bucket start (TIMESTAMPTZ, UTC)."""
    g = grain_us(grain)
    return f"make_timestamptz(({epoch_us}) - ((({epoch_us}) % {g}) + {g}) % {g})"


def time_to_epoch_us(column_sql: str, duck_type: str) -> str:
    """Epoch microseconds of a timestamp / timestamptz / date column (naive times are UTC)."""
    if duck_type == "DATE":
        return f"epoch_us(CAST({column_sql} AS TIMESTAMP))"
    return f"epoch_us({column_sql})"


@dataclass(frozen=True)
class Dimension:
    """A dimension: its output name, its SQL over a row, its state column."""

    name: str
    sql: str
    column: str
    mirror_column: str | None = None
    """The mirror column the dimension's value is (a plain or looked-up column), if it is
    one: the min/max recompute prefilters the mirror on it."""


def definition_json(config: RollupConfig, time_column: str) -> str:
    """What identifies a rollup's state: a change means the state must be rebuilt.
    With min/max, the reserve's depth too (a store built before reserves existed, or
    with another depth, is rebuilt)."""
    definition: dict[str, object] = {"rollup": config.model_dump(mode="json"), "time": time_column}
    if any(m.fn in (MeasureFn.MIN, MeasureFn.MAX) for m in config.measures):
        definition["reserve"] = KEEP
    return json.dumps(definition, sort_keys=True)


class RollupPlan:
    """A :class:`RollupConfig` bound to its table's columns (see the module docstring)."""

    def __init__(
        self,
        config: RollupConfig,
        table: TableModel,
        lookups: dict[str, LookupColumn],
        con: duckdb.DuckDBPyConnection,
    ) -> None:
        self.config = config
        self.table = table
        self.name = config.name
        self.state = rollup_state(config.name)
        time = config.time or table.config.event_time
        if time == COMMIT_TIME:
            self.time_column, time_type = EVENT_TS, "TIMESTAMPTZ"
        else:
            column = table.column(time)
            if column is None or column.dropped:
                raise ConfigError(
                    f"rollup {self.name}: {table.name} has no column {time!r} for its time",
                    "fix `time` (or the table's `event_time`) in the pipeline file",
                )
            self.time_column, time_type = time, column.duck_type
        self.time_type = time_type
        self.epoch_us = time_to_epoch_us(quote_ident(self.time_column), time_type)
        self.definition = definition_json(config, self.time_column)

        self.dimensions: list[Dimension] = []
        self.lookup_deps: set[tuple[TableRef, str]] = set()
        self.lookup_columns: list[str] = []
        self.input_sql: dict[str, str] = {}
        """Measure inputs (values, filters) by projection column, shared when equal."""
        columns = self._plan_dimensions(lookups)
        inputs, measure_columns = self._plan_inputs()
        self.columns = columns | measure_columns | ({time} if time != COMMIT_TIME else set())
        missing = sorted(c for c in self.columns if (col := table.column(c)) is None or col.dropped)
        if missing:
            raise ConfigError(
                f"rollup {self.name}: {table.name} has no column(s) {', '.join(missing)}",
                "fix the rollup's columns and expressions in the pipeline file",
            )
        types = self._bind(con)
        self.dimension_types = [types[d.column] for d in self.dimensions]
        self.measures: list[Measure] = []
        for index, (measure, measure_inputs) in enumerate(
            zip(config.measures, inputs, strict=True)
        ):
            value_type = types.get(measure_inputs.value) if measure_inputs.value else None
            sum_type = None
            if measure.fn in (MeasureFn.SUM, MeasureFn.AVG):
                sum_type = self._sum_type(con, str(value_type), measure.name)
            self.measures.append(make_measure(measure, index, measure_inputs, value_type, sum_type))
        self.reserves: list[Reserve] = []
        """The min/max measures' reserves (one per distinct value and filter)."""
        for extreme in self.extremes():
            extreme.reserve = self._reserve_for(extreme.inputs)

    def _reserve_for(self, inputs: MeasureInputs) -> Reserve:
        for reserve in self.reserves:
            if (reserve.value, reserve.filter) == (inputs.value, inputs.filter):
                return reserve
        if inputs.value is None:  # min/max always have a value (the config requires one)
            raise ConfigError(f"rollup {self.name}: a min/max measure has no value")
        index = len(self.reserves)
        table = rollup_state(self.name, f"reserve_{index}")
        self.reserves.append(Reserve(index, inputs.value, inputs.filter, table))
        return self.reserves[-1]

    def _plan_dimensions(self, lookups: dict[str, LookupColumn]) -> set[str]:
        """Fill :attr:`dimensions`; the source columns they read."""
        columns: set[str] = set()
        for index, dim in enumerate(self.config.dimensions):
            if dim.column is not None:
                sql = quote_ident(dim.column)
                mirror_column: str | None = dim.column
                columns.add(dim.column)
            elif dim.expr is not None:
                sql = f"({dim.expr})"
                mirror_column = None
                columns |= expression_columns(dim.expr)
            elif dim.lookup is not None:
                hidden = LookupColumn.column_name(dim.lookup)
                if hidden not in lookups:
                    raise ConfigError(
                        f"rollup {self.name}: the looked-up table {dim.lookup.table} is unknown",
                        "capture it under source.tables",
                    )
                sql = quote_ident(hidden)
                mirror_column = hidden
                columns |= set(dim.lookup.on)
                self.lookup_deps.add((TableRef.parse(dim.lookup.table), dim.lookup.column))
                self.lookup_columns.append(hidden)
            else:
                raise ConfigError(f"rollup {self.name}: dimension {dim.name} has no source")
            self.dimensions.append(Dimension(dim.name, sql, f"_hr_d{index}", mirror_column))
        return columns

    def _plan_inputs(self) -> tuple[list[MeasureInputs], set[str]]:
        """Fill :attr:`input_sql`; each measure's inputs and the source columns they read."""
        columns: set[str] = set()
        inputs: list[MeasureInputs] = []
        for measure in self.config.measures:
            for sql in (measure.expr, measure.where):
                if sql is not None:
                    columns |= expression_columns(sql)
            if measure.column is not None:
                columns.add(measure.column)
            value = measure.value_sql
            value_name = self._input(value) if value is not None else None
            where = f"coalesce(({measure.where}), false)" if measure.where is not None else None
            filter_name = self._input(where) if where is not None else None
            inputs.append(MeasureInputs(value_name, filter_name))
        return inputs, columns

    # ----------------------------------------------------------------- binding

    def _input(self, sql: str) -> str:
        for name, existing in self.input_sql.items():
            if existing == sql:
                return name
        name = f"_hr_i{len(self.input_sql)}"
        self.input_sql[name] = sql
        return name

    def _bind(self, con: duckdb.DuckDBPyConnection) -> dict[str, str]:
        """Let DuckDB bind every expression against the mirror: types, or a ConfigError."""
        try:
            rows = con.execute(f"DESCRIBE {self.projection(self.table.mirror)}").fetchall()
        except duckdb.Error as exc:
            raise ConfigError(
                f"rollup {self.name}: DuckDB rejects an expression: {str(exc).splitlines()[0]}",
                "fix the rollup's expressions (DuckDB SQL over the table's columns)",
            ) from exc
        return {str(r[0]): str(r[1]) for r in rows}

    def _sum_type(self, con: duckdb.DuckDBPyConnection, value_type: str, measure: str) -> str:
        if is_integer(value_type):
            return "HUGEINT"
        try:
            rows = con.execute(f"SELECT typeof(sum(CAST(NULL AS {value_type})))").fetchall()
        except duckdb.Error as exc:
            raise ConfigError(
                f"rollup {self.name}: measure {measure} sums a {value_type}, which has no sum",
                "sum a numeric column or expression",
            ) from exc
        return str(rows[0][0])

    # -------------------------------------------------------------- structure

    @property
    def group_columns(self) -> list[str]:
        return [BUCKET, *(d.column for d in self.dimensions)]

    def match(self, left: str, right: str) -> str:
        """Join condition on the group columns (NULL matches NULL)."""
        return match_sql(self.group_columns, left, right)

    def distinct_measures(self) -> list[CountDistinct]:
        """Every exact and approximate count distinct, in the rollup's order."""
        return [m for m in self.measures if isinstance(m, CountDistinct)]

    def side_tables(self) -> list[CountDistinct]:
        """The distinct measures whose side tables batches maintain (each its own
        :meth:`side_owner`)."""
        return [m for m in self.distinct_measures() if self.side_owner(m) is m]

    def side_owner(self, measure: CountDistinct) -> CountDistinct:
        """The measure whose side table holds ``measure``'s rows: of the distinct measures
        of the same value and filter, the first exact one, else the first one. An
        approximate count's registers derive from an exact count's values (the view does
        it), never the other way round; two of the same kind keep the same rows."""
        same = [m for m in self.distinct_measures() if m.inputs == measure.inputs]
        if isinstance(measure, ApproxCountDistinct):
            exact = [m for m in same if not isinstance(m, ApproxCountDistinct)]
            return exact[0] if exact else same[0]
        return next(m for m in same if not isinstance(m, ApproxCountDistinct))

    def extremes(self) -> list[Extreme]:
        return [m for m in self.measures if isinstance(m, Extreme)]

    def side_table(self, measure: CountDistinct) -> str:
        """The table holding ``measure``'s rows (its :meth:`side_owner`'s)."""
        owner = self.side_owner(measure)
        return rollup_state(self.name, owner.side_table or f"side_{owner.index}")

    def owned_tables(self) -> list[str]:
        return [
            self.state,
            *(self.side_table(m) for m in self.side_tables()),
            *(r.table for r in self.reserves),
        ]

    def views(self) -> list[str]:
        return [rollup_view(self.name, g) for g in self.config.grains]

    def view_names(self) -> list[str]:
        return [f"{ROLLUP}.{self.name}_{grain_label(g)}" for g in self.config.grains]

    # -------------------------------------------------------------- projection

    def projection(self, source: str, where: str | None = None) -> str:
        """Rows of ``source`` (mirror-shaped) → bucket, dimension values, measure inputs."""
        parts = [f"{bucket_sql(self.epoch_us, self.config.grain)} AS {BUCKET}"]
        parts += [f"{d.sql} AS {d.column}" for d in self.dimensions]
        parts += [f"{sql} AS {name}" for name, sql in self.input_sql.items()]
        clause = f" WHERE {where}" if where else ""
        return f"SELECT {', '.join(parts)} FROM {source}{clause}"

    @staticmethod
    def horizon_filter(horizon_param: bool) -> str | None:
        return f"({BUCKET} >= ? OR {BUCKET} IS NULL)" if horizon_param else None

    def weighted_sql(self, start: str, end: str, with_horizon: bool) -> str:
        """Weighted rows of a batch: ``-1`` per old version, ``+1`` per new one."""
        keep = self.horizon_filter(with_horizon)
        body = (
            f"SELECT -1 AS _hr_w, * FROM ({self.projection(start)}) "
            f"UNION ALL SELECT 1 AS _hr_w, * FROM ({self.projection(end)})"
        )
        return f"SELECT * FROM ({body}) WHERE {keep}" if keep else body

    def net_sql(self, start: str, end: str, with_horizon: bool) -> str:
        """:meth:`weighted_sql` with identical projections cancelled (netted)."""
        columns = ", ".join([*self.group_columns, *self.input_sql])
        return (
            f"SELECT {columns}, sum(_hr_w) AS _hr_w "
            f"FROM ({self.weighted_sql(start, end, with_horizon)}) "
            f"GROUP BY ALL HAVING sum(_hr_w) <> 0"
        )

    def needs_net(self) -> bool:
        """Whether deltas must come from netted rows rather than the weighted ones.

        Count, sum and avg deltas are linear in the weights, so an unchanged
        row's -1 and +1 cancel inside the aggregate anyway (one GROUP BY saved
        per batch). Min/max do not need netting either: a value retracted and
        re-added in the same batch can only flag its group for a recompute
        from the mirror, which is always exact (and rare: only when that value
        is the group's extreme). Floating-point sums do: adding and
        subtracting the same value would accumulate rounding.
        """
        return any(
            isinstance(m, Sum) and m.sum_type in ("DOUBLE", "FLOAT", "REAL") for m in self.measures
        )

    def delta_sql(self, net: str) -> str:
        """Per-group delta of the state table from weighted (or netted) rows."""
        parts = [*self.group_columns, f"CAST(sum(_hr_w) AS BIGINT) AS {ROWS}"]
        for measure in self.measures:
            parts += [f"{expr} AS {name}" for name, expr in measure.delta()]
        return f"SELECT {', '.join(parts)} FROM {net} GROUP BY {', '.join(self.group_columns)}"

    def merge_sql(self, delta: str, recomputed: bool = False) -> str:
        """MERGE a delta into the state: add, delete groups reaching 0 rows, insert new groups.

        With ``recomputed`` (a :func:`~headrace.engine.extremes.recomputed_delta_sql`
        delta), a group whose extreme the batch retracted takes the recomputed value.
        """
        sets = [f"{ROWS} = s.{ROWS} + d.{ROWS}"]
        for measure in self.measures:
            if recomputed and isinstance(measure, Extreme):
                sets += measure.merge_recomputed("s", "d")
            else:
                sets += measure.merge("s", "d")
        names = [*self.group_columns, ROWS]
        values = [f"d.{c}" for c in names]
        for measure in self.measures:
            names += measure.state_parts()
            values += measure.insert("d")
        return (
            f"MERGE INTO {self.state} s USING {delta} d ON {self.match('s', 'd')} "
            f"WHEN MATCHED AND s.{ROWS} + d.{ROWS} = 0 THEN DELETE "
            f"WHEN MATCHED THEN UPDATE SET {', '.join(sets)} "
            f"WHEN NOT MATCHED AND d.{ROWS} > 0 THEN INSERT ({', '.join(names)}) "
            f"VALUES ({', '.join(values)})"
        )

    @property
    def appends_state(self) -> bool:
        """Whether batches append their deltas to the state instead of merging them.

        Without min/max every state part is a sum, so a group's value is the
        sum of its rows: a batch appends one delta row per touched group (an
        INSERT costs a fraction of a MERGE), the views sum per group, and
        :meth:`compact_sql` folds the rows together now and then, a slice at a
        time (see :meth:`~headrace.engine.compaction.Compactor.step`). Side tables
        (count distinct, HyperLogLog) are always appended to.
        """
        return not self.extremes()

    def insert_sql(self, delta: str) -> str:
        """Append a delta (groups whose delta is all zero are left out)."""
        columns = [*self.group_columns, ROWS]
        for measure in self.measures:
            columns += measure.state_parts()
        nonzero = " OR ".join(f"{c} <> 0" for c in columns[len(self.group_columns) :])
        names = ", ".join(columns)
        return f"INSERT INTO {self.state} ({names}) SELECT {names} FROM {delta} WHERE {nonzero}"

    def side_insert_sql(self, measure: CountDistinct, delta: str) -> str:
        keys = [name for name, _ in measure.side_keys()]
        names = ", ".join([*self.group_columns, *keys, "_hr_n"])
        return f"INSERT INTO {self.side_table(measure)} ({names}) SELECT {names} FROM {delta}"

    def compacted_tables(self) -> list[tuple[str, list[str], list[str]]]:
        """(table, key columns, summed columns) of every table deltas are appended to;
        the first summed column counts rows (a key whose count sums to 0 is gone)."""
        tables: list[tuple[str, list[str], list[str]]] = []
        if self.appends_state:
            parts = [p for m in self.measures for p in m.state_parts()]
            tables.append((self.state, self.group_columns, [ROWS, *parts]))
        for measure in self.side_tables():
            keys = [name for name, _ in measure.side_keys()]
            tables.append((self.side_table(measure), [*self.group_columns, *keys], ["_hr_n"]))
        for reserve in self.reserves:
            tables.append((reserve.table, [*self.group_columns, VALUE], [COUNT]))
        return tables

    @staticmethod
    def compact_sql(
        table: tuple[str, list[str], list[str]], slices: int = 1, index: int = 0
    ) -> list[str]:
        """Statements folding one table's rows into one row per key, for the keys whose
        hash falls in slice ``index`` of ``slices`` (all keys when ``slices`` is 1)."""
        name, keys, summed = table
        where = f" WHERE hash({', '.join(keys)}) % {slices} = {index}" if slices > 1 else ""
        sums = ", ".join(f"sum({c}) AS {c}" for c in summed)
        return [
            f"CREATE OR REPLACE TEMP TABLE _hr_compact AS SELECT {', '.join(keys)}, {sums} "
            f"FROM {name}{where} GROUP BY ALL HAVING sum({summed[0]}) > 0",
            f"DELETE FROM {name}{where}",
            f"INSERT INTO {name} BY NAME SELECT * FROM _hr_compact",
        ]

    def side_delta_sql(self, measure: CountDistinct, net: str) -> str:
        keys = measure.side_keys()
        columns = [*self.group_columns, *(f"{sql} AS {name}" for name, sql in keys)]
        condition = measure.condition()
        where = f" WHERE {condition}" if condition else ""
        return (
            f"SELECT {', '.join(columns)}, CAST(sum(_hr_w) AS BIGINT) AS _hr_n FROM {net}{where} "
            f"GROUP BY ALL HAVING sum(_hr_w) <> 0"
        )

    # ------------------------------------------------------------------- build

    def build_select(self, with_horizon: bool, groups: str | None = None) -> str:
        """The state rows from the mirror: all, or those of the groups (bucket and
        dimension values) listed in table ``groups``."""
        keep = self.horizon_filter(with_horizon)
        parts = [*self.group_columns, f"CAST(count(*) AS BIGINT) AS {ROWS}"]
        for measure in self.measures:
            parts += [
                f"{b} AS {p}" for p, b in zip(measure.state_parts(), measure.build(), strict=True)
            ]
        for reserve in self.reserves:
            parts += reserve.bounds_sql("p")
        where = f" WHERE {keep}" if keep else ""
        return (
            f"SELECT {', '.join(parts)} FROM {self.mirror_rows(groups)} p{where} "
            f"GROUP BY {', '.join(self.group_columns)}"
        )

    def reserve_build_select(
        self, reserve: Reserve, with_horizon: bool, groups: str | None = None
    ) -> str:
        """A reserve's rows from the mirror (all, or those of ``groups``), under the bounds
        :meth:`build_select` computes from the same rows."""
        keep = self.horizon_filter(with_horizon)
        rows = f"(SELECT * FROM {self.mirror_rows(groups)}{f' WHERE {keep}' if keep else ''})"
        return reserve_select(reserve, self.group_columns, rows)

    def table_selects(self, with_horizon: bool) -> dict[str, Callable[[str | None], str]]:
        """Each owned table and the SELECT computing its rows from the mirror (all, or
        those of the groups listed in a table), the state first."""
        selects: dict[str, Callable[[str | None], str]] = {
            self.state: partial(self.build_select, with_horizon)
        }
        for measure in self.side_tables():
            selects[self.side_table(measure)] = partial(
                self.side_build_select, measure, with_horizon
            )
        for reserve in self.reserves:
            selects[reserve.table] = partial(self.reserve_build_select, reserve, with_horizon)
        return selects

    def side_build_select(
        self, measure: CountDistinct, with_horizon: bool, groups: str | None = None
    ) -> str:
        """A side table's rows from the mirror (all, or those of ``groups``)."""
        keys = measure.side_keys()
        columns = [*self.group_columns, *(f"{sql} AS {name}" for name, sql in keys)]
        conditions = [c for c in (measure.condition(), self.horizon_filter(with_horizon)) if c]
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        return (
            f"SELECT {', '.join(columns)}, CAST(count(*) AS BIGINT) AS _hr_n "
            f"FROM {self.mirror_rows(groups)}{where} GROUP BY ALL"
        )

    def mirror_rows(self, groups: str | None) -> str:
        """Projected mirror rows (a subquery): all, or those of the groups listed in
        table ``groups``."""
        rows = f"({self.projection(self.table.mirror)})"
        if groups is None:
            return rows
        return (
            f"(SELECT p.* FROM {rows} p SEMI JOIN (SELECT DISTINCT "
            f"{', '.join(self.group_columns)} FROM {groups}) g ON {self.match('p', 'g')})"
        )

    def groups_sql(self, rows: str) -> str:
        """The distinct groups (bucket and dimension values) of mirror-shaped ``rows``."""
        columns = ", ".join(self.group_columns)
        return f"SELECT DISTINCT {columns} FROM ({self.projection(rows)})"

"""A real pipeline for engine tests: PostgreSQL → pgoutput slot → batcher → engine → DuckDB.

Changes are read from a logical slot with ``pg_logical_slot_get_binary_changes``
(the bytes a walsender would send), fed to the real :class:`Batcher`, cut
into batches at chosen transaction boundaries and applied by the engine.
The expected results are computed by PostgreSQL itself, from the same data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from headrace.alerts.ids import AlertIds
from headrace.alerts.store import ALERTS
from headrace.engine.engine import Engine
from headrace.engine.results import AppliedBatch, SnapshotLoaded
from headrace.pipeline.load import parse_pipeline
from headrace.pipeline.model import MeasureFn, PipelineConfig, RollupConfig
from headrace.rules.lane.lane import RulesLane
from headrace.source.changes import ChangeBatch
from headrace.source.postgres.batcher import Batcher
from headrace.source.postgres.snapshot import SnapshotSettings, Snapshotter
from headrace.store.duckdb.schema import grain_label
from headrace.store.duckdb.store import DuckDBStore
from tests.conftest import PgDatabase
from tests.source.pgoutput_slot import LogicalSlot, select

COMMIT = ord("C")


@dataclass
class Harness:
    """One pipeline under test."""

    db: PgDatabase
    config: PipelineConfig
    store_path: Path
    slot: LogicalSlot
    batcher: Batcher
    store: DuckDBStore = field(init=False)
    engine: Engine = field(init=False)
    applied: list[AppliedBatch] = field(default_factory=list)
    lane: RulesLane | None = None
    """The rules lane, when :meth:`start_lane` started it (``rules.in_memory``)."""

    def __post_init__(self) -> None:
        self.open()

    def start_lane(self) -> RulesLane:
        """Run the rules of ``rules.in_memory`` in the real rules lane, as ``headrace run``
        does: every synced batch goes to the lane first; the engine waits for it."""
        rules = self.config.rules
        assert rules is not None
        assert rules.in_memory
        ids = AlertIds(ALERTS)
        ids.register(self.store.writer)
        self.lane = RulesLane(rules, self.store, tuple(self.config.sinks), ids).start()
        self.engine.before_commit = self.lane.before_engine_commit
        return self.lane

    def stop_lane(self) -> None:
        if self.lane is not None:
            self.engine.before_commit = None
            self.lane.stop()
            self.lane.ids.forget(self.store.writer)
            self.lane = None

    def open(self) -> None:
        self.store = DuckDBStore(self.store_path)
        self.engine = Engine(self.config, self.store)

    def snapshot(self, **settings: Any) -> SnapshotLoaded:
        """Create the slot with the real exported-snapshot copy and bulk-load it."""
        snapshotter = Snapshotter(
            SnapshotSettings(
                dsn=self.db.dsn,
                tables=tuple(self.config.table_refs),
                slot=self.slot.slot,
                publication=self.slot.publication,
                **settings,
            )
        )
        with contextlib.closing(snapshotter.chunks()) as chunks:
            return self.engine.load_snapshot(chunks)

    def reopen(self) -> None:
        self.store.close()
        self.open()

    def close(self) -> None:
        self.stop_lane()
        self.store.close()

    def execute(self, *statements: str) -> None:
        """Run statements in PostgreSQL, each in its own transaction."""
        for statement in statements:
            self.db.execute(statement)

    def transaction(self, *statements: str) -> None:
        """Run statements in PostgreSQL in one transaction."""
        with self.db.connect(autocommit=False) as conn:
            for statement in statements:
                conn.execute(statement.encode())
            conn.commit()

    def batches(self, cut: Callable[[], bool] | None = None) -> list[ChangeBatch]:
        """Drain the slot into batches, cutting after a commit whenever ``cut()`` says so."""
        out: list[ChangeBatch] = []
        for lsn, payload in self.slot.changes():
            self.batcher.feed(lsn, payload)
            if payload[:1] == bytes([COMMIT]) and cut is not None and cut():
                batch = self.batcher.take()
                if batch is not None:
                    out.append(batch)
        batch = self.batcher.take()
        if batch is not None:
            out.append(batch)
        return out

    def sync(self, cut: Callable[[], bool] | None = None) -> list[AppliedBatch]:
        """Apply everything committed in PostgreSQL so far."""
        applied = []
        for batch in self.batches(cut):
            if self.lane is not None:
                self.lane.offer(batch)
            applied.append(self.engine.apply(batch))
        self.applied.extend(applied)
        return applied

    # ---------------------------------------------------------- comparisons

    def pg(self, query: str) -> list[tuple[object, ...]]:
        return select(self.db, query)

    def duck(self, query: str) -> list[tuple[object, ...]]:
        cursor = self.store.cursor()
        try:
            return cursor.execute(query).fetchall()
        finally:
            cursor.close()

    def assert_mirror(self, table: str, columns: Sequence[str]) -> None:
        cols = ", ".join(f'"{c}"' for c in columns)
        expected = normalized(self.pg(f"SELECT {cols} FROM {table}"))
        got = normalized(self.duck(f"SELECT {cols} FROM mirror.{table}"))
        assert got == expected, diff_message(f"mirror.{table}", expected, got)

    def assert_rollup(
        self, name: str, source: str | None = None, lookups: dict[str, str] | None = None
    ) -> None:
        """Every grain of rollup ``name`` equals the same GROUP BY on PostgreSQL.

        ``source`` is the PostgreSQL FROM clause (default: the rollup's table);
        ``lookups`` maps looked-up dimension names to SQL over it.
        """
        rollup = self.config.rollup(name)
        for grain in rollup.grains:
            view = f"rollup.{name}_{grain_label(grain)}"
            pg_sql, approx = reference_sql(rollup, grain.total_seconds(), source, lookups or {})
            expected = normalized(self.pg(pg_sql))
            got = normalized(self.duck(f"SELECT * FROM {view}"))
            assert_rows_close(view, expected, got, approx)

    def assert_reserves(self, *names: str) -> None:
        """Each min/max reserve of rollups ``names`` holds exactly its groups' mirror values
        beyond their bounds (all of them when the bounds are NULL), with their row counts
        (see :mod:`headrace.engine.reserve`)."""
        for name in names:
            plan = self.engine.registry.rollups[name].plan
            assert plan is not None, name
            groups = ", ".join(plan.group_columns)
            for reserve in plan.reserves:
                value = f"p.{reserve.value}"
                expected = self.duck(
                    f"SELECT {', '.join(f'p.{c}' for c in plan.group_columns)}, {value}, "
                    f"count(*) FROM {plan.mirror_rows(None)} p "
                    f"JOIN {plan.state} s ON {plan.match('p', 's')} "
                    f"WHERE {reserve.condition('p')} AND {reserve.in_bounds(value, 's')} "
                    f"GROUP BY ALL ORDER BY ALL"
                )
                got = self.duck(
                    f"SELECT {groups}, _hr_value, sum(_hr_n) FROM {reserve.table} "
                    f"GROUP BY ALL HAVING sum(_hr_n) <> 0 ORDER BY ALL"
                )
                assert got == expected, f"{name} reserve {reserve.index}"


def make_harness(
    db: PgDatabase, tmp_path: Path, yaml_text: str, *, publication: str = "p", snapshot: bool = True
) -> Harness:
    """A pipeline on already created tables: publication, then the real snapshot (which
    creates the slot) loaded by the engine, then streaming from the slot."""
    config = parse_pipeline(yaml_text.replace("DSN", db.dsn))
    slot = LogicalSlot(db, slot=f"s_{publication}", publication=publication)
    tables = ", ".join(config.source.tables)
    db.execute(f"CREATE PUBLICATION {publication} FOR TABLE {tables}")
    harness = Harness(db, config, tmp_path / "store.duckdb", slot, Batcher())
    if snapshot:
        harness.snapshot()
    else:
        db.execute(f"SELECT pg_create_logical_replication_slot('{slot.slot}', 'pgoutput')")
    harness.batcher = Batcher(slot.registry())
    return harness


# ------------------------------------------------------------------ reference


def recorded_source(recorded: dict[int, str | None], column: str = "recorded_tier") -> str:
    """``tx`` joined to the tier PostgreSQL returned when each row version was written."""
    if not recorded:
        values = "(SELECT NULL::bigint AS id, NULL::text AS tier WHERE false)"
    else:
        keys = ",".join(str(k) for k in recorded)
        tiers = ",".join("NULL" if v is None else f"'{v}'" for v in recorded.values())
        arrays = f"ARRAY[{keys}]::bigint[], ARRAY[{tiers}]::text[]"
        values = f"(SELECT * FROM unnest({arrays}) AS r(id, tier))"
    return f"(SELECT tx.*, r.tier AS {column} FROM tx LEFT JOIN {values} r ON r.id = tx.id) src"


def reference_sql(
    rollup: RollupConfig, grain_seconds: float, source: str | None, lookups: dict[str, str]
) -> tuple[str, set[int]]:
    """PostgreSQL SQL computing a rollup view from scratch; indexes of approximate columns."""
    time = rollup.time or "ts"
    g = int(grain_seconds)
    bucket = f"to_timestamp(floor(extract(epoch from {time}) / {g}) * {g})"
    dims = []
    for dim in rollup.dimensions:
        if dim.column is not None:
            dims.append(f'"{dim.column}"')
        elif dim.expr is not None:
            dims.append(f"({dim.expr})")
        else:
            dims.append(lookups[dim.name])
    measures = []
    approx: set[int] = set()
    for index, measure in enumerate(rollup.measures):
        value = measure.value_sql
        where = f" FILTER (WHERE {measure.where})" if measure.where else ""
        fn = measure.fn
        if fn is MeasureFn.COUNT:
            measures.append(f"count({value or '*'}){where}")
        elif fn is MeasureFn.COUNT_DISTINCT or fn is MeasureFn.APPROX_COUNT_DISTINCT:
            measures.append(f"count(DISTINCT {value}){where}")
            if fn is MeasureFn.APPROX_COUNT_DISTINCT:
                approx.add(1 + len(dims) + index)
        else:
            measures.append(f"{fn.value}({value}){where}")
    groups = ", ".join(str(i) for i in range(1, len(dims) + 2))
    select_list = ", ".join([bucket, *dims, *measures])
    return f"SELECT {select_list} FROM {source or rollup.table} GROUP BY {groups}", approx


def _norm(value: object) -> object:
    if isinstance(value, Decimal):
        return value.normalize()
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, datetime):
        return value.timestamp()
    return value


def normalized(rows: Sequence[Sequence[object]]) -> list[tuple[Any, ...]]:
    """Rows with comparable values (exact decimals, rounded floats), sorted."""
    out = [tuple(_norm(value) for value in row) for row in rows]
    return sorted(out, key=lambda r: tuple((v is None, str(type(v)), str(v)) for v in r))


def assert_rows_close(
    what: str, expected: list[tuple[Any, ...]], got: list[tuple[Any, ...]], approx: set[int]
) -> None:
    """Equal rows; approximate distinct counts within 5% (or 2); averages to 1e-6."""
    assert len(got) == len(expected), diff_message(what, expected, got)
    for want, have in zip(expected, got, strict=True):
        for index, (a, b) in enumerate(zip(want, have, strict=True)):
            if index in approx:
                assert isinstance(a, int), (what, want, have)
                assert isinstance(b, int), (what, want, have)
                assert abs(a - b) <= max(2, math.ceil(0.05 * a)), diff_message(what, expected, got)
            elif isinstance(a, float | Decimal) or isinstance(b, float | Decimal):
                assert a is not None, diff_message(what, expected, got)
                assert b is not None, diff_message(what, expected, got)
                # Floats arrive rounded to 6 places (see _norm): compare at that precision.
                close = math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-6)
                assert close, diff_message(what, expected, got)
            else:
                assert a == b, diff_message(what, expected, got)


def diff_message(what: str, expected: Sequence[object], got: Sequence[object]) -> str:
    missing = [r for r in expected if r not in got]
    extra = [r for r in got if r not in expected]
    return f"{what} differs from PostgreSQL:\n  missing: {missing[:10]}\n  extra: {extra[:10]}"

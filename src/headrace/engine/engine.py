"""The engine: change batches and snapshots in, exact mirrors, history and rollups out.

Use it from one thread (the writer)::

    store = DuckDBStore(config.store.path)
    engine = Engine(config, store)
    if engine.position() is None:
        engine.load_snapshot(chunks)          # bulk path, one transaction
    for batch in source:                      # resume from engine.position()
        applied = engine.apply(batch)         # effects + position: one transaction
        confirm_slot(applied.position)        # only now is it durable
        engine.maintain()                     # rebuild requests, retention, checkpoint

Every batch's effects (mirror rows, history rows, rollup state, per-table
freshness, dead letters, schema versions) and the new source position are
written in ONE DuckDB transaction; after a crash the store holds either all
of a batch or none of it, and :meth:`Engine.position` says where to resume.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from headrace.engine.lookup import fill_lookup_column, resolve_lookups
from headrace.engine.mirror import write_dead_letters, write_history, write_mirror
from headrace.engine.registry import Registry, RollupRuntime
from headrace.engine.resolve import (
    TableWork,
    compute_net,
    count_rows,
    fill_inherited,
    load_changes,
    register_transactions,
    unregister_transactions,
)
from headrace.engine.results import AppliedBatch, EngineStatus, RetentionApplied, SnapshotLoaded
from headrace.engine.rollup import BUCKET, RECOMPUTE, RollupPlan
from headrace.engine.schema_change import apply_schema_change, diff_schema
from headrace.engine.tables import DEAD, TableModel, signature
from headrace.engine.types import storable_table
from headrace.errors import HeadraceError, StoreError
from headrace.jobs.runtime import StreamJobs
from headrace.pipeline.model import PipelineConfig, RollupConfig, quote_ident
from headrace.source.changes import (
    LSN,
    SEQ,
    ChangeBatch,
    SnapshotChunk,
    TableChanges,
    TableRef,
    TableSchema,
)
from headrace.store.duckdb.schema import EVENT_TS, META, ROW_LSN
from headrace.store.duckdb.store import DuckDBStore

log = logging.getLogger(__name__)


@dataclass
class _Segment:
    """Changes between two schema changes: (table model or None, its changes) in order."""

    schema_changes: list[tuple[TableSchema, int]]
    items: list[tuple[TableSchema, pa.Table]]


class Engine:
    """Incremental maintenance of one pipeline into one DuckDB store (see module docstring)."""

    def __init__(self, config: PipelineConfig, store: DuckDBStore) -> None:
        self.config = config
        self.store = store
        self.source = config.source.name
        self.registry = Registry(config)
        self.jobs = StreamJobs.from_config(config)
        """Stream jobs (rules, scores, metric alerts) run inside each batch's transaction."""
        self._rebuilds: queue.Queue[tuple[str, RollupConfig | None]] = queue.Queue()
        self._load()

    def _load(self) -> None:
        con = self.store.writer
        with self.store.transaction():
            self.registry.load(con)
            self.registry.setup_rollups(con)
            self.jobs.setup(con)
        stored = self.store.read_position(self.source)
        self._position = stored.lsn if stored is not None else None

    # ------------------------------------------------------------------ API

    def position(self) -> int | None:
        """The durable source position (resume point), ``None`` before the first snapshot."""
        return self._position

    def declare_tables(self, schemas: Iterable[TableSchema]) -> None:
        """Make tables known before any data (creates mirrors, history, and ready rollups)."""
        with self._transaction() as con:
            for schema in schemas:
                self._ensure_table(con, schema, lsn=None)
            self.registry.setup_rollups(con)

    def apply(self, batch: ChangeBatch) -> AppliedBatch:
        """Apply one batch: its effects and ``batch.position`` in one store transaction."""
        self._run_rebuild_requests()
        started = time.perf_counter()
        changes, skipped = self._unapplied(batch)
        per_table: dict[str, int] = {}
        dead_letters = 0
        position = max(batch.position, self._position or 0)
        with self._transaction() as con:
            for table_changes in changes:
                self._ensure_table(con, table_changes.schema, lsn=_first_lsn(table_changes.data))
            self.registry.setup_rollups(con)
            if changes:
                register_transactions(con, [tc.data for tc in changes])
            try:
                for segment in self._segments(changes):
                    for schema, lsn in segment.schema_changes:
                        self._schema_change(con, schema, lsn)
                    dead, works = self._apply_segment(con, segment.items)
                    dead_letters += dead
                    for work in works:
                        name = work.model.name
                        per_table[name] = per_table.get(name, 0) + work.num_changes
            finally:
                if changes:
                    unregister_transactions(con)
            self.store.write_position(con, self.source, position, batch.last_commit_ts)
        self._position = position
        total = sum(per_table.values())
        event = self.store.publish(position, batch.last_commit_ts, sorted(per_table), total)
        self.store.maybe_checkpoint()
        return AppliedBatch(
            position=position,
            commit_ts=batch.last_commit_ts,
            version=event.version,
            changes=total,
            tables=per_table,
            dead_letters=dead_letters,
            skipped=skipped,
            seconds=time.perf_counter() - started,
        )

    def load_snapshot(self, chunks: Iterable[SnapshotChunk]) -> SnapshotLoaded:
        """Bulk-load a consistent snapshot: Arrow appends into the mirrors, then each rollup
        computed from its mirror with one GROUP BY; position = the snapshot's consistent point.

        Tables receiving chunks are emptied first (a snapshot replaces what was there).
        Everything is one transaction: an interrupted snapshot leaves nothing behind.
        """
        started = time.perf_counter()
        rows: dict[TableRef, int] = {}
        position = self._position or 0
        snapshot_time = datetime.now(UTC)
        with self._transaction() as con:
            for chunk in chunks:
                model = self._ensure_table(con, chunk.schema, lsn=chunk.consistent_point)
                if model is None:
                    continue
                if model.ref not in rows:
                    if model.config.mirror:
                        con.execute(f"DELETE FROM {model.mirror}")
                    rows[model.ref] = 0
                self._append_snapshot(con, model, chunk, snapshot_time)
                rows[model.ref] += chunk.rows.num_rows
                position = max(position, chunk.consistent_point)
            loaded = [self.registry.tables[ref] for ref in rows]
            built = set(self.registry.setup_rollups(con))
            for model in self.registry.tables.values():
                for lookup in model.lookups.values():
                    if model.ref in rows or lookup.target in rows:
                        fill_lookup_column(con, model, lookup, self.registry.tables[lookup.target])
            for name, runtime in self.registry.rollups.items():
                if runtime.active and runtime.plan is not None and name not in built:
                    tables = {runtime.plan.table.ref} | {t for t, _ in runtime.plan.lookup_deps}
                    if tables & set(rows):
                        self.registry.build(con, name)
            self.jobs.after_snapshot(con, rows, self.registry.tables)
            for model in loaded:
                self._write_snapshot_meta(con, model, position, snapshot_time)
            self.store.write_position(con, self.source, position, None)
        self._position = position
        seconds = time.perf_counter() - started
        event = self.store.publish(
            position, None, sorted(m.name for m in loaded), sum(rows.values()), kind="snapshot"
        )
        self.store.checkpoint()
        return SnapshotLoaded(
            position=position,
            rows={ref.qualified: n for ref, n in rows.items()},
            seconds=seconds,
            version=event.version,
        )

    def rebuild(self, name: str, config: RollupConfig | None = None) -> None:
        """Recompute rollup ``name`` from the mirror (optionally with a new definition) and
        swap it in atomically, at the current position. Call from the writer thread."""
        with self._transaction() as con:
            self.registry.build(con, name, config)
        position = self._position or 0
        self.store.publish(position, None, [], 0, kind="rebuild")

    def request_rebuild(self, name: str, config: RollupConfig | None = None) -> None:
        """Ask for a rebuild from any thread; it runs before the next batch or maintain()."""
        self._rebuilds.put((name, config))

    def maintain(self, now: datetime | None = None) -> RetentionApplied:
        """Between batches: pending rebuilds, retention, and a checkpoint when due."""
        self._run_rebuild_requests()
        applied = self.enforce_retention(now)
        self.store.maybe_checkpoint()
        return applied

    def enforce_retention(self, now: datetime | None = None) -> RetentionApplied:
        """Drop history rows and rollup buckets older than their configured retention."""
        now = now or datetime.now(UTC)
        history: dict[str, int] = {}
        groups: dict[str, int] = {}
        with self._transaction() as con:
            for model in self.registry.tables.values():
                retention = model.config.retention
                if retention is None or not model.config.history:
                    continue
                count = con.execute(
                    f"DELETE FROM {model.history} WHERE _hr_commit_ts < ?", [now - retention]
                ).fetchall()
                history[model.name] = int(count[0][0]) if count else 0
            for name, runtime in self.registry.rollups.items():
                dropped = self._retain_rollup(con, name, runtime, now)
                if dropped is not None:
                    groups[name] = dropped
        return RetentionApplied(history, groups)

    def status(self) -> EngineStatus:
        """Position, per-table freshness, rollup states, dead letters (reads the store)."""
        dead = self.store.query(f"SELECT count(*) AS n FROM {META}.dead_letters")
        return EngineStatus(
            position=self._position,
            version=self.store.version,
            tables=self.store.table_status(),
            rollups=self.store.rollup_status(),
            dead_letters=int(dead.column("n")[0].as_py()),
            wal_bytes=self.store.wal_bytes(),
        )

    def paused_rollups(self) -> dict[str, str]:
        """Rollups not maintained right now, with the reason."""
        return {
            name: runtime.reason or runtime.state
            for name, runtime in self.registry.rollups.items()
            if not runtime.active
        }

    # ------------------------------------------------------------ internals

    def _transaction(self):  # type: ignore[no-untyped-def]
        return _EngineTransaction(self)

    def _reload_after_failure(self) -> None:
        try:
            self._load()
        except HeadraceError:
            log.exception("reloading the engine state after a failed transaction failed")

    def _run_rebuild_requests(self) -> None:
        while True:
            try:
                name, config = self._rebuilds.get_nowait()
            except queue.Empty:
                return
            self.rebuild(name, config)

    def _unapplied(self, batch: ChangeBatch) -> tuple[list[TableChanges], int]:
        """The batch's changes of transactions not yet in the store (commit LSN >= position)."""
        position = self._position
        out: list[TableChanges] = []
        skipped = 0
        for table_changes in batch.tables:
            data = table_changes.data
            if position is not None and data.num_rows:
                keep = pc.greater_equal(data[LSN], pa.scalar(position, pa.uint64()))
                kept = data.filter(keep)
                skipped += data.num_rows - kept.num_rows
                data = kept
            if data.num_rows:
                out.append(TableChanges(table_changes.schema, data))
        return out, skipped

    def _ensure_table(
        self, con: duckdb.DuckDBPyConnection, schema: TableSchema, lsn: int | None
    ) -> TableModel | None:
        known = self.registry.tables.get(schema.table)
        if known is not None:
            if not known.source_columns:
                # First sight after a restart: adopt the source's columns if they match.
                change = diff_schema(known, schema)
                if change.is_empty:
                    known.source_columns = schema.columns
            return known
        model = self.registry.declare(con, schema)
        if model is None:
            log.warning("changes of %s ignored: the table is not in the pipeline", schema.table)
        return model

    def _segments(self, changes: list[TableChanges]) -> list[_Segment]:
        """Split a batch where a table's schema changes, so each part sees one schema."""
        ordered = sorted(changes, key=lambda tc: _first_seq(tc.data))
        current = {
            ref: signature(model.source_columns) for ref, model in self.registry.tables.items()
        }
        boundaries: list[tuple[int, TableSchema, int]] = []
        for table_changes in ordered:
            ref = table_changes.table
            if ref not in self.registry.tables:
                continue
            if current.get(ref) != signature(table_changes.schema.columns):
                boundaries.append(
                    (
                        _first_seq(table_changes.data),
                        table_changes.schema,
                        _first_lsn(table_changes.data),
                    )
                )
                current[ref] = signature(table_changes.schema.columns)
        items = [(tc.schema, tc.data) for tc in ordered if tc.table in self.registry.tables]
        if not boundaries:
            return [_Segment([], items)]
        cuts = [seq for seq, _, _ in boundaries]
        segments = []
        edges = [None, *cuts, None]
        for index in range(len(edges) - 1):
            low, high = edges[index], edges[index + 1]
            sliced = []
            for schema, data in items:
                mask = None
                if low is not None:
                    mask = pc.greater_equal(data[SEQ], low)
                if high is not None:
                    upper = pc.less(data[SEQ], high)
                    mask = upper if mask is None else pc.and_(mask, upper)
                part = data.filter(mask) if mask is not None else data
                if part.num_rows:
                    sliced.append((schema, part))
            changes_here = [(s, lsn) for seq, s, lsn in boundaries if seq == low]
            segments.append(_Segment(changes_here, sliced))
        return segments

    def _schema_change(self, con: duckdb.DuckDBPyConnection, schema: TableSchema, lsn: int) -> None:
        model = self.registry.tables[schema.table]
        if model.state == DEAD:
            model.source_columns = schema.columns
            return
        change = diff_schema(model, schema)
        if change.is_empty:
            model.source_columns = schema.columns
            return
        if change.incompatible:
            reason = f"schema change at LSN {lsn}: {'; '.join(change.incompatible)}"
            log.error(
                "table %s stopped: %s; its changes go to headrace.dead_letters", model.name, reason
            )
            model.state, model.reason = DEAD, reason
            model.source_columns = schema.columns
            model.version += 1
            model.record_version(con, lsn, change.describe())
            for name in self.registry.rollups_on(model.ref):
                self.registry.pause(con, name, f"table {model.name} stopped: {reason}")
            return
        log.info("table %s schema change at LSN %d: %s", model.name, lsn, change.describe())
        apply_schema_change(con, model, schema, change, lsn)
        if change.dropped:
            for name in self.registry.rollups_reading(model.ref, set(change.dropped)):
                self.registry.pause(
                    con,
                    name,
                    f"column(s) {', '.join(change.dropped)} of {model.name} dropped at LSN {lsn}; "
                    "change the rollup and rebuild it",
                )
        widened = {name for name, _, _ in change.widened}
        if widened:
            for column in widened:
                for fact, hidden in self.registry.lookup_columns_on(model.ref, column):
                    new_type = model.column(column).duck_type  # type: ignore[union-attr]
                    con.execute(
                        f"ALTER TABLE {fact.mirror} ALTER COLUMN {quote_ident(hidden)} TYPE {new_type}"
                    )
                    fact.lookup_types[hidden] = new_type
            for name in self.registry.rollups_reading(model.ref, widened):
                self.registry.build(con, name)

    def _apply_segment(
        self, con: duckdb.DuckDBPyConnection, items: Sequence[tuple[TableSchema, pa.Table]]
    ) -> tuple[int, list[TableWork]]:
        dead = 0
        works: dict[TableRef, TableWork] = {}
        for index, (schema, data) in enumerate(items):
            model = self.registry.tables[schema.table]
            if model.state == DEAD:
                dead += write_dead_letters(con, model.name, model.reason or "table stopped", data)
                continue
            works[model.ref] = load_changes(con, model, schema, data, index)
        for work in works.values():
            if work.model.config.mirror:
                fill_inherited(con, work)
                compute_net(con, work)
        for work in works.values():
            if work.model.lookups and work.model.config.mirror:
                targets = {}
                for name, lookup in work.model.lookups.items():
                    target = self.registry.tables[lookup.target]
                    target_work = works.get(lookup.target) if target.state != DEAD else None
                    targets[name] = (target, target_work)
                resolve_lookups(con, work, targets)
        for work in works.values():
            if work.model.config.history:
                write_history(con, work)
        for work in works.values():
            if work.model.config.mirror:
                write_mirror(con, work)
        for index, runtime in enumerate(self.registry.rollups.values()):
            if not runtime.active or runtime.plan is None:
                continue
            work = works.get(runtime.plan.table.ref)
            if work is not None:
                self._apply_rollup(con, runtime, runtime.plan, work, index)
        if self.jobs:
            for work in works.values():
                if work.model.config.mirror:
                    count_rows(con, work)
            self.jobs.apply(con, works.values(), self.registry.tables)
        for work in works.values():
            self._write_table_meta(con, work)
        return dead, list(works.values())

    def _apply_rollup(
        self,
        con: duckdb.DuckDBPyConnection,
        runtime: RollupRuntime,
        plan: RollupPlan,
        work: TableWork,
        index: int,
    ) -> None:
        net, delta = f"_hr_n_{index}", f"_hr_d_{index}"
        horizon = runtime.retained_from
        params = [horizon] if horizon is not None else []
        netted = plan.net_sql(work.start, work.end, horizon is not None)
        con.execute(f"CREATE OR REPLACE TEMP TABLE {net} AS {netted}", params)
        con.execute(f"CREATE OR REPLACE TEMP TABLE {delta} AS {plan.delta_sql(net)}")
        con.execute(plan.merge_sql(delta))
        for measure in plan.side_tables():
            side = f"_hr_x_{index}_{measure.index}"
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE {side} AS {plan.side_delta_sql(measure, net)}"
            )
            con.execute(plan.side_merge_sql(measure, side))
        if plan.extremes():
            flagged = f"(SELECT * FROM {delta} WHERE {RECOMPUTE})"
            low, high, count, nulls = con.execute(
                f"SELECT min({BUCKET}), max({BUCKET}), count(*), "
                f"count(*) FILTER (WHERE {BUCKET} IS NULL) FROM {flagged}"
            ).fetchall()[0]
            if count:
                ranged = not nulls and low is not None
                bounds = [low, high + plan.config.grain] if ranged else []  # type: ignore[operator]
                con.execute(plan.recompute_sql(flagged, ranged), bounds)

    def _retain_rollup(
        self, con: duckdb.DuckDBPyConnection, name: str, runtime: RollupRuntime, now: datetime
    ) -> int | None:
        retention = runtime.config.retention
        plan = runtime.plan
        if retention is None or plan is None or not runtime.active:
            return None
        coarsest = int(max(runtime.config.grains).total_seconds())
        cutoff = int((now - retention).timestamp())
        horizon = datetime.fromtimestamp(cutoff - cutoff % coarsest, UTC)
        if runtime.retained_from is not None and horizon <= runtime.retained_from:
            return 0
        dropped = 0
        for table in plan.owned_tables():
            count = con.execute(f"DELETE FROM {table} WHERE {BUCKET} < ?", [horizon]).fetchall()
            dropped += int(count[0][0]) if table == plan.state and count else 0
        runtime.retained_from = horizon
        con.execute(
            f"UPDATE {META}.rollups SET retained_from = ?, updated_at = now() WHERE name = ?",
            [horizon, name],
        )
        return dropped

    def _append_snapshot(
        self,
        con: duckdb.DuckDBPyConnection,
        model: TableModel,
        chunk: SnapshotChunk,
        snapshot_time: datetime,
    ) -> None:
        data = storable_table(chunk.rows)
        present = set(data.column_names)
        columns = []
        for column in model.columns:
            source = quote_ident(column.name) if column.name in present else "NULL"
            columns.append((column.name, f"CAST({source} AS {column.duck_type})"))
        con.register("_hr_snapshot", data)
        try:
            if model.config.mirror:
                extra = [(ROW_LSN, f"CAST({chunk.consistent_point} AS UBIGINT)")]
                if model.commit_time:
                    extra.append((EVENT_TS, "CAST(? AS TIMESTAMPTZ)"))
                names = ", ".join(quote_ident(n) for n, _ in columns + extra)
                values = ", ".join(sql for _, sql in columns + extra)
                con.execute(
                    f"INSERT INTO {model.mirror} ({names}) SELECT {values} FROM _hr_snapshot",
                    [snapshot_time] if model.commit_time else [],
                )
            if model.config.history:
                meta = [
                    ("_hr_lsn", f"CAST({chunk.consistent_point} AS UBIGINT)"),
                    ("_hr_commit_ts", "CAST(? AS TIMESTAMPTZ)"),
                    ("_hr_xid", "CAST(NULL AS BIGINT)"),
                    ("_hr_seq", "CAST(0 AS INTEGER)"),
                    ("_hr_op", "'S'"),
                ]
                names = ", ".join(quote_ident(n) for n, _ in meta + columns)
                values = ", ".join(sql for _, sql in meta + columns)
                con.execute(
                    f"INSERT INTO {model.history} ({names}) SELECT {values} FROM _hr_snapshot",
                    [snapshot_time],
                )
        finally:
            con.unregister("_hr_snapshot")

    def _write_snapshot_meta(
        self, con: duckdb.DuckDBPyConnection, model: TableModel, position: int, at: datetime
    ) -> None:
        rows = 0
        if model.config.mirror:
            rows = int(con.execute(f"SELECT count(*) FROM {model.mirror}").fetchall()[0][0])
        con.execute(
            f"""UPDATE {META}.tables SET rows = ?, last_lsn = ?, applied_at = now(),
                   last_commit_ts = coalesce(last_commit_ts, ?)
                WHERE table_name = ?""",
            [rows, position, at, model.name],
        )

    @staticmethod
    def _write_table_meta(con: duckdb.DuckDBPyConnection, work: TableWork) -> None:
        """Row count (end rows - start rows), freshness and position of one table."""
        delta = "0"
        if work.model.config.mirror:
            delta = f"(SELECT count(*) FROM {work.end}) - (SELECT count(*) FROM {work.start})"
        con.execute(
            f"""UPDATE {META}.tables SET rows = rows + {delta},
                   last_commit_ts = greatest(last_commit_ts, ?),
                   last_lsn = greatest(last_lsn, ?), applied_at = now()
                WHERE table_name = ?""",
            [work.last_commit_ts, work.last_lsn, work.model.name],
        )


class _EngineTransaction:
    """The store's transaction; on failure the engine reloads its state from the store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._context = engine.store.transaction()

    def __enter__(self) -> duckdb.DuckDBPyConnection:
        return self._context.__enter__()

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> bool:
        try:
            self._context.__exit__(kind, error, trace)  # type: ignore[arg-type]
        except Exception:
            self.engine._reload_after_failure()
            raise
        if error is not None:
            self.engine._reload_after_failure()
            if isinstance(error, duckdb.Error):
                raise StoreError(
                    f"the store refused a batch: {str(error).splitlines()[0]}",
                    "nothing of the batch was stored; this is a bug or a full disk — "
                    "report it with the log",
                ) from error
        return False


def _first_seq(data: pa.Table) -> int:
    value = pc.min(data[SEQ]).as_py()
    return int(value) if value is not None else 0


def _first_lsn(data: pa.Table) -> int:
    value = pc.min(data[LSN]).as_py() if data.num_rows else None
    return int(value) if value is not None else 0


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)

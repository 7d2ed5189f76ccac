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
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from types import TracebackType

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from headrace.alerts.delivery import prune_delivered
from headrace.engine.batch import apply_segment
from headrace.engine.batch_changes import earliest_starts
from headrace.engine.compaction import Compactor
from headrace.engine.extremes import MirrorReads
from headrace.engine.key_index import sync_key_index
from headrace.engine.lookup import fill_lookup_column
from headrace.engine.rebuild import OnlineRebuild, RebuildDone, RebuildRequest, describe_failure
from headrace.engine.registry import Registry
from headrace.engine.results import (
    AppliedBatch,
    EngineStatus,
    PiecesProgress,
    RetentionApplied,
    SnapshotLoaded,
)
from headrace.engine.retention import retain_history, retain_rollup
from headrace.engine.schema_change import diff_schema, follow_schema_change, indexes_in_the_way
from headrace.engine.segments import split_segments
from headrace.engine.snapshot import append_chunk, write_snapshot_meta
from headrace.engine.tables import DEAD, TableModel
from headrace.errors import HeadraceError, StoreError, format_lsn
from headrace.jobs.runtime import StreamJobs
from headrace.pipeline.model import PipelineConfig, RollupConfig
from headrace.source.changes import (
    LSN,
    ChangeBatch,
    SnapshotChunk,
    TableChanges,
    TableRef,
    TableSchema,
)
from headrace.store.duckdb.schema import META
from headrace.store.duckdb.store import DuckDBStore

log = logging.getLogger(__name__)


class Engine:
    """Incremental maintenance of one pipeline into one DuckDB store (see module docstring)."""

    def __init__(self, config: PipelineConfig, store: DuckDBStore) -> None:
        self.config = config
        self.store = store
        self.source = config.source.name
        self.registry = Registry(config)
        self.jobs = StreamJobs.from_config(config)
        """Stream jobs (rules, scores, metric alerts) run inside each batch's transaction."""
        self._rebuilds: queue.Queue[RebuildRequest] = queue.Queue()
        self._online: OnlineRebuild | None = None
        """The rebuild running while batches go on, if any (one at a time)."""
        self.rebuild_gate: threading.Event | None = None
        """Tests only: a running rebuild computes once this is set (batches go on)."""
        self.before_commit: Callable[[duckdb.DuckDBPyConnection, int], None] | None = None
        """Called with the batch's transaction and position just before its COMMIT (the
        rules lane waits there until it recorded the batch, and its alerts are copied:
        :meth:`headrace.rules.lane.lane.RulesLane.before_engine_commit`)."""
        self.applying: PiecesProgress | None = None
        """While a batch in pieces is applied: how far (read by the status thread)."""
        self.after_piece: Callable[[], None] | None = None
        """Called after each piece of a batch in pieces is applied, inside the batch's
        transaction (the run's ``between_pieces`` fault point for crash tests)."""
        self._load()

    def _load(self) -> None:
        con = self.store.writer
        stored = self.store.read_position(self.source)
        with self.store.transaction():
            self.registry.load(con)
            self.registry.setup_rollups(con)
            self.jobs.setup(con)
            if stored is not None:  # before the first snapshot, after_snapshot builds them
                self.jobs.rebuild_redefined(con, self.registry.tables)
        self._position = stored.lsn if stored is not None else None

    # ------------------------------------------------------------------ API

    def position(self) -> int | None:
        """The durable source position (resume point), ``None`` before the first snapshot."""
        return self._position

    def mirror_reads(self) -> dict[str, MirrorReads]:
        """Per rollup with min/max: how often it read the mirror since the process started
        (copies; safe from any thread)."""
        return {
            name: replace(runtime.mirror_reads)
            for name, runtime in list(self.registry.rollups.items())
            if runtime.plan is not None and runtime.plan.reserves
        }

    def declare_tables(self, schemas: Iterable[TableSchema]) -> None:
        """Make tables known before any data (creates mirrors, history, and ready rollups)."""
        with self._transaction() as con:
            for schema in schemas:
                self._ensure_table(con, schema)
            self.registry.setup_rollups(con)

    def apply(self, batch: ChangeBatch) -> AppliedBatch:
        """Apply one batch: its effects and ``batch.position`` in one store transaction."""
        self._run_rebuild_requests()
        started = time.perf_counter()
        self._set_threads(batch.num_changes)
        position = max(batch.position, self._position or 0)
        if batch.in_pieces:
            log.info(
                "a batch of %d changes (a large transaction): applied %d at a time, in one "
                "store transaction",
                batch.num_changes,
                sum(t.num_rows for t in batch.tables),
            )
            self.applying = PiecesProgress(batch.num_changes, 0, 0, time.monotonic())
        try:
            self._drop_indexes_in_the_way(batch)
            return self._apply(batch, started, position)
        finally:
            self.applying = None

    def _drop_indexes_in_the_way(self, batch: ChangeBatch) -> None:
        """Drop the key indexes that would stop ``batch``'s type changes, in a store
        transaction of their own (:func:`~headrace.engine.schema_change.indexes_in_the_way`)."""
        models = indexes_in_the_way(self.registry, batch.tables, in_pieces=batch.in_pieces)
        if not models:
            return
        with self._transaction() as con:
            for model in models:
                log.info(
                    "index on the key of %s dropped for a type change or a batch in pieces",
                    model.mirror,
                )
                sync_key_index(con, model, enabled=False)

    def _set_threads(self, changes: int) -> None:
        """DuckDB on every core for a large batch, else on ``store.streaming_threads``."""
        store = self.config.store
        large = 0 < store.parallel_batch_changes <= changes
        self.store.set_threads(0 if large else store.streaming_threads)

    def _apply(self, batch: ChangeBatch, started: float, position: int) -> AppliedBatch:
        skipped = 0
        per_table: dict[str, int] = {}
        dead_letters = 0
        with self._transaction() as con:
            # A huge transaction comes in pieces (ChangeBatch.pieces): each is applied
            # like a segment, in this one transaction; memory holds one piece.
            starts: pa.Table | None = None
            for piece in batch.pieces():
                changes, unapplied = self._unapplied(piece)
                skipped += unapplied
                for table_changes in changes:
                    self._ensure_table(con, table_changes.schema)
                self.registry.setup_rollups(con)
                # Every piece numbers changes within their transaction from its first
                # change in the batch, which may lie in an earlier piece.
                starts = earliest_starts(starts, [tc.data for tc in changes])
                for segment in split_segments(changes, self.registry.tables):
                    if segment.schema_changes and self._online is not None:
                        self._restart_rebuild()
                    for schema, lsn in segment.schema_changes:
                        follow_schema_change(con, self.registry, schema, lsn)
                    dead, works = apply_segment(
                        con,
                        self.registry,
                        self.jobs,
                        segment.items,
                        starts,
                        in_pieces=batch.in_pieces,
                    )
                    dead_letters += dead
                    for work in works:
                        name = work.model.name
                        per_table[name] = per_table.get(name, 0) + work.num_changes
                if self.applying is not None:
                    done = self.applying
                    self.applying = replace(
                        done,
                        applied=done.applied + sum(t.num_rows for t in piece),
                        pieces=done.pieces + 1,
                    )
                if batch.in_pieces and self.after_piece is not None:
                    self.after_piece()
            self.store.write_position(con, self.source, position, batch.last_commit_ts)
            if self.before_commit is not None:
                self.before_commit(con, position)
        self._position = position
        total = sum(per_table.values())
        event = self.store.publish(position, batch.last_commit_ts, sorted(per_table), total)
        visible_at = time.time()
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
            visible_at=visible_at,
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
                model = self._ensure_table(con, chunk.schema)
                if model is None:
                    continue
                if model.ref not in rows:
                    if model.config.mirror:
                        con.execute(f"DELETE FROM {model.mirror}")
                    if model.key_index:  # built again once loaded, in bulk
                        sync_key_index(con, model, enabled=False)
                    rows[model.ref] = 0
                append_chunk(con, model, chunk, snapshot_time)
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
                write_snapshot_meta(con, model, position, snapshot_time)
            self.store.write_position(con, self.source, position, None)
        self._position = position
        self._index_snapshot(loaded, rows)
        seconds = time.perf_counter() - started
        event = self.store.publish(
            position, None, sorted(m.name for m in loaded), sum(rows.values()), kind="snapshot"
        )
        # No CHECKPOINT here: bulk appends bypass the WAL (DuckDB writes them to
        # the file at commit); the periodic checkpoint policy covers the rest.
        return SnapshotLoaded(
            position=position,
            rows={ref.qualified: n for ref, n in rows.items()},
            seconds=seconds,
            version=event.version,
        )

    def _index_snapshot(self, loaded: list[TableModel], rows: dict[TableRef, int]) -> None:
        """The key indexes of the mirrors a snapshot filled, in a transaction of their own
        (in the snapshot's, DuckDB held its COMMIT 2 s for a 5M-row index), checkpointed
        at once: DuckDB logs a new index whole (40 MB for 5M keys), and the stream's first
        checkpoint would otherwise pay for it."""
        with self._transaction() as con:
            built = self.registry.key_indexes.after_snapshot(
                con, loaded, {ref.qualified: n for ref, n in rows.items()}
            )
        if built:
            self.store.checkpoint()

    def rebuild(self, name: str, config: RollupConfig | None = None) -> None:
        """Recompute rollup ``name`` from the mirror (optionally with a new definition) and
        swap it in atomically, at the current position, now (no batch runs meanwhile).
        Call from the writer thread; :meth:`request_rebuild` does it while streaming."""
        with self._transaction() as con:
            self.registry.build(con, name, config)
        position = self._position or 0
        self.store.publish(position, None, [], 0, kind="rebuild")

    def request_rebuild(
        self,
        name: str,
        config: RollupConfig | None = None,
        on_done: RebuildDone | None = None,
    ) -> None:
        """Ask for a rebuild from any thread. It starts before the next batch (or
        :meth:`maintain`), computes in the background while batches go on, and is swapped
        in between two later batches (:mod:`headrace.engine.rebuild`); ``on_done`` is
        called on the writer thread when it ends, either way."""
        self._rebuilds.put(RebuildRequest(name, config, on_done))

    @property
    def rebuilding(self) -> bool:
        """A requested rebuild is queued or running."""
        return self._online is not None or not self._rebuilds.empty()

    def finish_rebuilds(self, timeout_s: float | None = None) -> bool:
        """Wait for every requested rebuild and swap it in (writer thread); False if
        ``timeout_s`` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.rebuilding:
            online = self._online
            if online is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not online.done.wait(left):
                    return False
            self._run_rebuild_requests()
        return True

    def abandon_rebuilds(self, reason: str) -> None:
        """Drop the running and queued rebuilds (e.g. when stopping), telling who asked."""
        online, self._online = self._online, None
        requests = [online.request] if online is not None else []
        if online is not None:
            online.abandon(self.registry)
        while not self._rebuilds.empty():
            requests.append(self._rebuilds.get_nowait())
        for request in requests:
            if request.on_done is not None:
                request.on_done(False, f"rebuild of {request.name} not done: {reason}")

    def maintain(self, now: datetime | None = None) -> RetentionApplied:
        """Between batches: pending rebuilds, retention, rollup compaction and a
        checkpoint when due."""
        self._run_rebuild_requests()
        applied = self.enforce_retention(now)
        self.compact_rollups()
        self.review_key_indexes()
        self.store.maybe_checkpoint()
        return applied

    def review_key_indexes(self) -> None:
        """Build or drop mirrors' key indexes as ``store.mirror_key_index`` says
        (:meth:`~headrace.engine.key_index.KeyIndexKeeper.review`), in a transaction of
        their own."""
        keeper = self.registry.key_indexes
        models = [m for m in self.registry.tables.values() if m.state != DEAD]
        now = time.monotonic()
        if keeper.due(models, now):
            with self._transaction() as con:
                changed = keeper.review(con, models, now)
            if any(built for _model, built in changed):
                self.store.checkpoint()  # the new index's WAL (see load_snapshot)

    def compact_rollups(self, *, force: bool = False, budget_s: float = 0.025) -> list[str]:
        """Fold appended rollup deltas together
        (:meth:`~headrace.engine.compaction.Compactor.step`): compaction steps, each its
        own transaction, until ``budget_s`` is spent (at least one); with ``force``,
        every active rollup completely, now. The names worked on."""
        if force:
            names = [name for name, runtime in self.registry.rollups.items() if runtime.active]
            if names:
                with self._transaction() as con:
                    for name in names:
                        Compactor.fold_all(con, self.registry.rollups[name])
            return names
        done: list[str] = []
        deadline = time.perf_counter() + budget_s
        compactor = self.registry.compactor
        for name in compactor.due(self.registry.rollups):
            while True:
                with self._transaction() as con:
                    worked = compactor.step(con, self.registry.rollups[name])
                if not worked:
                    break
                if name not in done:
                    done.append(name)
                if not self.registry.rollups[name].compaction or time.perf_counter() > deadline:
                    break
            if time.perf_counter() > deadline:
                break
        return done

    def enforce_retention(self, now: datetime | None = None) -> RetentionApplied:
        """Drop history rows, rollup buckets and delivered alert outbox rows older than
        their configured retention."""
        now = now or datetime.now(UTC)
        history: dict[str, int] = {}
        groups: dict[str, int] = {}
        with self._transaction() as con:
            for model in self.registry.tables.values():
                deleted = retain_history(con, model, now)
                if deleted is not None:
                    history[model.name] = deleted
            for name, runtime in self.registry.rollups.items():
                dropped = retain_rollup(con, name, runtime, now)
                if dropped is not None:
                    groups[name] = dropped
            # Delivered alert outbox rows older than their sink's keep_delivered.
            prune_delivered(con, self.config.sinks, now)
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

    def _transaction(self) -> _EngineTransaction:
        return _EngineTransaction(self)

    def _reload_after_failure(self) -> None:
        try:
            self._load()
        except HeadraceError:
            log.exception("reloading the engine state after a failed transaction failed")

    def _run_rebuild_requests(self) -> None:
        """Swap in a rebuild whose rows are ready; start the next requested one."""
        online = self._online
        if online is not None:
            if not online.done.is_set():
                return
            self._online = None
            self._install(online)
        while self._online is None and not self._rebuilds.empty():
            self._start(self._rebuilds.get_nowait())

    def _restart_rebuild(self) -> None:
        """A schema change is coming: the running rebuild's snapshot would not show it,
        so it starts over after this batch (its reader is stopped first: DuckDB must
        not alter a table under an open read of it)."""
        online, self._online = self._online, None
        if online is None:
            return
        online.abandon(self.registry)
        online.done.wait()
        log.info("rebuild of %s starts over after a schema change", online.name)
        self._rebuilds.put(online.request)

    def _start(self, request: RebuildRequest) -> None:
        try:
            with self._transaction() as con:
                planned = self.registry.plan_rebuild(con, request.name, request.config)
            runtime = self.registry.rollups.get(request.name)
            self._online = OnlineRebuild.start(
                self.store,
                self.registry,
                request,
                planned,
                horizon=runtime.retained_from if runtime is not None else None,
                gate=self.rebuild_gate,
            )
            log.info(
                "rebuilding %s in the background from %s; streaming goes on",
                request.name,
                format_lsn(self._position or 0),
            )
        except (HeadraceError, duckdb.Error) as exc:
            self._rebuild_failed(request, exc)

    def _install(self, online: OnlineRebuild) -> None:
        request = online.request
        try:
            with self._transaction() as con:
                online.install(con, self.registry)
        except (HeadraceError, duckdb.Error) as exc:
            self._rebuild_failed(request, exc)
            return
        position = self._position or 0
        self.store.publish(position, None, [], 0, kind="rebuild")
        seconds = time.monotonic() - request.requested_at
        message = f"rebuilt {request.name} in {seconds:.2f} s at {format_lsn(position)}"
        log.info("%s (streaming went on meanwhile)", message)
        if request.on_done is not None:
            request.on_done(True, message)

    def _rebuild_failed(self, request: RebuildRequest, exc: BaseException) -> None:
        self.registry.tracking.pop(request.name, None)
        message = describe_failure(request.name, exc)
        log.error("%s", message)
        if request.on_done is not None:
            request.on_done(False, message)

    def _unapplied(self, tables: tuple[TableChanges, ...]) -> tuple[list[TableChanges], int]:
        """The changes of transactions not yet in the store (commit LSN >= position)."""
        position = self._position
        out: list[TableChanges] = []
        skipped = 0
        for table_changes in tables:
            data = table_changes.data
            # Only the first batches after a restart hold applied changes: filtering every
            # column of every chunk of a merged batch is skipped when none is.
            if position is not None and data.num_rows and pc.min(data[LSN]).as_py() < position:
                keep = pc.greater_equal(data[LSN], pa.scalar(position, pa.uint64()))
                kept = data.filter(keep)
                skipped += data.num_rows - kept.num_rows
                data = kept
            if data.num_rows:
                out.append(TableChanges(table_changes.schema, data))
        return out, skipped

    def _ensure_table(
        self, con: duckdb.DuckDBPyConnection, schema: TableSchema
    ) -> TableModel | None:
        known = self.registry.tables.get(schema.table)
        if known is not None:
            if not known.source_columns and diff_schema(known, schema).is_empty:
                # First sight after a restart: the source sends the columns we hold.
                known.source_columns = schema.columns
            return known
        model = self.registry.declare(con, schema)
        if model is None:
            log.warning("changes of %s ignored: the table is not in the pipeline", schema.table)
        return model


class _EngineTransaction:
    """The store's transaction; on failure the engine reloads its state from the store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # The store's transaction rolls back and re-raises; this adds the reload.
        self._context = engine.store.transaction()

    def __enter__(self) -> duckdb.DuckDBPyConnection:
        return self._context.__enter__()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            self._context.__exit__(kind, error, trace)
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

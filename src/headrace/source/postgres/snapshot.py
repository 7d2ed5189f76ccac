"""The consistent initial snapshot, handed over to streaming without gap or duplicate.

How the hand-over works: ``CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')``
creates the slot and, at the same instant, exports a snapshot that sees
exactly the transactions committed before the slot's *consistent point*.
Every table is copied under that snapshot; streaming the slot from the
consistent point then delivers exactly the transactions committed after it.
Snapshot rows plus streamed changes equal the source, with nothing missed and
nothing twice, however busy the source is during the copy.

The exported snapshot lives only while the exporting replication connection
stays idle (its next command ends it), so that connection is held, unused,
until every copy is done, then closed; the slot stays for the stream.

Tables copy in parallel worker threads, each on its own connection inside a
``REPEATABLE READ`` transaction that imported the snapshot; a table larger
than ``range_pages`` heap pages is split into CTID ranges copied in parallel
(TID range scans, PostgreSQL 14+). COPY output is decoded in bulk into Arrow
(see :mod:`.snapshot_copy` and :mod:`.snapshot_binary`). Chunks reach the consumer through a bounded
queue, so memory stays bounded by ``workers + queue_chunks`` chunks.

Schema versions: every snapshot schema has ``version`` 1 and carries the
table's ``relation_oid``. The stream's batcher numbers versions per source
process from the Relation messages it sees, so the two numberings are not
comparable. A consumer reconciling a snapshot with a stream compares column
lists (names, type OIDs and modifiers, key flags: :func:`same_columns`), not
version numbers.

Cost (measured on 2 cores, 1M rows of int8, numeric(18,2), text,
timestamptz, bool): tables whose column types all have a simple binary form
are copied in binary (:mod:`.snapshot_binary`): the server spends ~0.4-0.6
CPU-s instead of ~0.9 for CSV, and the client ~0.45-0.5 receiving (one
Python call per row, holding the GIL: libpq hands over one message per row)
plus ~0.22-0.25 decoding (instead of ~0.65 CSV parsing and conversion).
Other tables are copied as CSV. Storing into DuckDB costs another ~0.5-0.65
CPU-s, in DuckDB's threads, concurrently with the copy (the consumer appends
while the workers receive the next chunks). End to end that is 1.6-2.0
CPU-s per 1M rows on the slower machine of earlier sessions (at most 1.0-1.25M
rows/s with perfect overlap, 0.5-0.8M in practice), 1.15-1.3 CPU-s and
1.17-1.32M rows/s on the faster one; ``headrace bench snapshot`` prints the
budget of each run.

Interrupted snapshots: when the copy fails or the consumer stops early (the
chunk iterator is closed), the half-made slot is dropped. After a crash that
left the slot behind, run the snapshot again with
``if_slot_exists="replace"`` (or call :func:`drop_slot` first): the leftover
slot cannot give a snapshot any more, so it is dropped and made anew.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import sql

from headrace.errors import ConfigError, SourceError, format_lsn
from headrace.source.changes import SnapshotChunk, TableRef, TableSchema
from headrace.source.postgres.connect_errors import connect_sql
from headrace.source.postgres.preflight import (
    check_server,
    check_slot_capacity,
    slot_in_use,
    slot_state,
    slots_exhausted,
)
from headrace.source.postgres.replication import ReplicationConnection
from headrace.source.postgres.snapshot_catalog import TablePlan, read_table_plans
from headrace.source.postgres.snapshot_copy import open_snapshot_connection
from headrace.source.postgres.snapshot_progress import ProgressCallback, TableProgress
from headrace.source.postgres.snapshot_workers import CopyWorkers, RangeCopied, TableRows
from headrace.source.postgres.types import TypeRegistry


@dataclass(frozen=True)
class SnapshotSettings:
    """What to snapshot and how."""

    dsn: str
    """libpq connection string of the source database (the user needs REPLICATION)."""
    tables: tuple[TableRef, ...]
    """Tables to copy, in the order their first chunks are scheduled."""
    slot: str
    """Name of the logical replication slot to create (pgoutput)."""
    publication: str | None = None
    """When set, copy only the columns and rows the publication publishes
    (its column lists and row filters, PostgreSQL 15+), so snapshot rows look
    like streamed ones; every table must be in it."""
    workers: int = 2
    """Parallel copy connections (threads). One thread receives at most
    ~1.5-2M rows/s (the per-row receive holds the GIL) while parsing and
    converting run outside it, so 2-3 keep both the client and a server
    busy; more only add contention."""
    chunk_rows: int = 131_072
    """Rows per :class:`SnapshotChunk` (at most; a chunk also closes at
    ``chunk_bytes``, and the last chunk of a range is smaller)."""
    chunk_bytes: int = 32 << 20
    """Bytes of COPY output per chunk at most, bounding memory for wide rows."""
    range_pages: int = 1024
    """Heap pages (8 kB) per CTID range; a larger table is split into ranges
    copied in parallel (small enough that the workers finish together).
    0 copies every table whole."""
    queue_chunks: int = 4
    """Converted chunks waiting for the consumer at most (backpressure)."""
    if_slot_exists: Literal["error", "replace"] = "error"
    """What to do when the slot already exists: ``error`` (the safe default:
    it may belong to a running pipeline) or ``replace`` (drop it and start
    over, e.g. after a crash during a previous snapshot)."""
    slot_release_timeout_s: float = 10.0
    """How long to wait for a slot to become inactive before dropping it (a
    crashed consumer's walsender can take a moment to exit)."""


@dataclass(frozen=True)
class ExportedSnapshot:
    """A slot's exported snapshot: copy under ``name``, stream from ``consistent_point``."""

    slot: str
    consistent_point: int
    name: str


@dataclass(frozen=True)
class SnapshotResult:
    """What a finished snapshot copied."""

    exported: ExportedSnapshot
    schemas: tuple[TableSchema, ...]
    rows: dict[TableRef, int]
    seconds: float

    @property
    def consistent_point(self) -> int:
        """The LSN to start streaming the slot from."""
        return self.exported.consistent_point

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


@dataclass
class _TableState:
    plan: TablePlan
    ranges_left: int
    rows: int = 0
    pages_done: int = 0
    started: float | None = None


class Snapshotter:
    """Creates the slot with an exported snapshot and copies every table under it.

    ``progress`` (optional) is called with a :class:`TableProgress` after each
    chunk, from the consuming thread. Usage::

        snapshotter = Snapshotter(settings)
        with contextlib.closing(snapshotter.chunks()) as chunks:
            for chunk in chunks:
                ...  # chunk.schema, chunk.rows (Arrow), chunk.consistent_point
        stream_from = snapshotter.result.consistent_point
    """

    def __init__(
        self, settings: SnapshotSettings, progress: ProgressCallback | None = None
    ) -> None:
        if settings.workers < 1 or settings.chunk_rows < 1 or settings.queue_chunks < 1:
            raise ConfigError(
                "snapshot settings out of range: workers, chunk_rows and queue_chunks must be >= 1",
                "fix the snapshot settings",
            )
        if not settings.tables or len(set(settings.tables)) != len(settings.tables):
            raise ConfigError(
                "the snapshot needs at least one table, each named once",
                "list every table to copy once (schema.table)",
            )
        self.settings = settings
        self.progress = progress
        self._result: SnapshotResult | None = None

    @property
    def result(self) -> SnapshotResult:
        """The finished snapshot; only after :meth:`chunks` ran to its end."""
        if self._result is None:
            raise SourceError("the snapshot has not finished", "consume every chunk first")
        return self._result

    def chunks(self) -> Generator[SnapshotChunk, None, None]:
        """Create the slot, copy every table, yield the rows in chunks.

        Every table yields at least one chunk (an empty one when it has no
        rows), so a consumer learns every schema. If iteration stops before
        the end (an error, or the iterator is closed), the slot is dropped.
        """
        settings = self.settings
        self._prepare_slot()
        replication = ReplicationConnection(settings.dsn, application_name="headrace-snapshot")
        created = False
        completed = False
        try:
            consistent_point, name = _create_slot(replication, settings.slot)
            created = True
            exported = ExportedSnapshot(settings.slot, consistent_point, name)
            # The replication connection stays idle from here on: its next
            # command would end the exported snapshot.
            yield from self.copy_exported(exported)
            completed = True
        finally:
            replication.close()
            if created and not completed:
                with contextlib.suppress(SourceError, psycopg.Error):
                    drop_slot(settings.dsn, settings.slot, settings.slot_release_timeout_s)

    def copy_exported(self, exported: ExportedSnapshot) -> Generator[SnapshotChunk, None, None]:
        """Copy every table under a snapshot exported elsewhere (no slot handling).

        For a caller that created the slot on its own replication connection
        and keeps it idle until this iterator is exhausted.
        """
        settings = self.settings
        started = time.monotonic()
        catalog = open_snapshot_connection(settings.dsn, exported.name)
        events: Generator[TableRows | RangeCopied, None, None] | None = None
        try:
            registry = TypeRegistry.load(catalog)
            plans = read_table_plans(
                catalog,
                settings.tables,
                registry=registry,
                publication=settings.publication,
                range_pages=settings.range_pages,
            )
            # Keep DDL (ALTER, TRUNCATE, VACUUM FULL) off the tables until the
            # copy ends: this transaction holds ACCESS SHARE locks till then.
            catalog.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                    sql.SQL(", ").join(
                        sql.Identifier(p.schema.table.schema, p.schema.table.name) for p in plans
                    )
                )
            )
            states = {p.schema.table: _TableState(p, len(p.ranges)) for p in plans}
            workers = CopyWorkers(
                dsn=settings.dsn,
                snapshot_name=exported.name,
                plans=plans,
                registry=registry,
                workers=settings.workers,
                chunk_rows=settings.chunk_rows,
                chunk_bytes=settings.chunk_bytes,
                queue_chunks=settings.queue_chunks,
            )
            events = workers.run()
            for event in events:
                state = states[event.plan.schema.table]
                if state.started is None:
                    state.started = time.monotonic()
                if isinstance(event, TableRows):
                    state.rows += event.rows.num_rows
                    self._report(state, finished=False)
                    yield SnapshotChunk(event.plan.schema, event.rows, exported.consistent_point)
                elif isinstance(event, RangeCopied):
                    state.ranges_left -= 1
                    state.pages_done += event.copy_range.pages
                    finished = state.ranges_left == 0
                    self._report(state, finished=finished)
                    if finished and state.rows == 0:
                        empty = state.plan.schema.arrow_schema().empty_table()
                        yield SnapshotChunk(state.plan.schema, empty, exported.consistent_point)
        finally:
            # Stop the workers before the catalog transaction lets go of the locks.
            if events is not None:
                events.close()
            catalog.close()
        self._result = SnapshotResult(
            exported=exported,
            schemas=tuple(p.schema for p in plans),
            rows={table: state.rows for table, state in states.items()},
            seconds=time.monotonic() - started,
        )

    def _report(self, state: _TableState, *, finished: bool) -> None:
        if self.progress is None:
            return
        plan = state.plan
        self.progress(
            TableProgress(
                table=plan.schema.table,
                rows=state.rows,
                estimated_rows=plan.estimated_rows,
                pages_done=state.pages_done,
                pages=plan.pages,
                started=state.started or time.monotonic(),
                finished=finished,
            )
        )

    def _prepare_slot(self) -> None:
        """Check the server, and drop a leftover slot when told to replace it."""
        settings = self.settings
        with connect_sql(settings.dsn, autocommit=True) as conn:
            check_server(conn)
            state = slot_state(conn, settings.slot)
            if state is None:
                check_slot_capacity(conn)
                return
            if state.slot_type != "logical" or state.database != conn.info.dbname:
                raise SourceError(
                    f"the replication slot {settings.slot} exists and belongs to something else "
                    f"(a {state.slot_type} slot of database {state.database})",
                    "pick another slot name for this pipeline",
                )
        if settings.if_slot_exists != "replace":
            raise SourceError(
                f"the replication slot {settings.slot} already exists, so no snapshot can be "
                "exported from it (a slot exports one only when it is created)",
                "if it is left over from an interrupted snapshot, start over with "
                "if_slot_exists='replace' (it is dropped and made anew); if a pipeline "
                "streams from it, resume streaming instead, or pick another slot name",
            )
        drop_slot(settings.dsn, settings.slot, settings.slot_release_timeout_s)


def drop_slot(dsn: str, slot: str, timeout_s: float = 10.0) -> bool:
    """Drop ``slot`` once it is inactive; returns False when there was none.

    Waits up to ``timeout_s`` for a lingering walsender to let go of it,
    then raises :class:`SourceError` naming the process that holds it.
    """
    deadline = time.monotonic() + timeout_s
    with connect_sql(dsn, autocommit=True) as conn:
        while True:
            state = slot_state(conn, slot)
            if state is None:
                return False
            if state.active_pid is None:
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                except psycopg.errors.UndefinedObject:
                    return False
                except psycopg.errors.ObjectInUse:
                    pass  # taken again between the check and the drop: wait
                else:
                    return True
            if time.monotonic() > deadline:
                raise slot_in_use(slot, state.active_pid)
            time.sleep(0.1)


def same_columns(a: TableSchema, b: TableSchema) -> bool:
    """Whether two schemas of a table (e.g. snapshot and stream) describe the same rows."""
    return [(c.name, c.type_oid, c.type_modifier, c.is_key) for c in a.columns] == [
        (c.name, c.type_oid, c.type_modifier, c.is_key) for c in b.columns
    ]


def _create_slot(replication: ReplicationConnection, slot: str) -> tuple[int, str]:
    try:
        return replication.create_slot_with_snapshot(slot)
    except psycopg.errors.DuplicateObject as exc:
        raise SourceError(
            f"the replication slot {slot} was created by someone else meanwhile",
            "give each pipeline its own slot name",
        ) from exc
    except psycopg.errors.ConfigurationLimitExceeded as exc:
        raise slots_exhausted() from exc
    except psycopg.Error as exc:
        raise SourceError(
            f"could not create the replication slot {slot}: {str(exc).strip()}",
            "check wal_level = logical, the REPLICATION privilege and free slots",
        ) from exc


def describe(result: SnapshotResult) -> str:
    """One line about a finished snapshot, for logs and the CLI."""
    rate = result.total_rows / result.seconds if result.seconds > 0 else 0.0
    return (
        f"snapshot of {len(result.schemas)} tables, {result.total_rows:,} rows in "
        f"{result.seconds:.1f}s ({rate:,.0f} rows/s); stream slot {result.exported.slot} "
        f"from {format_lsn(result.consistent_point)}"
    )

"""The first run: snapshot every table into the store, then hand over to streaming.

1. The publication is made sure of (the snapshot copies what it publishes).
2. The store is marked "snapshot in progress" (``headrace.store_info``, key
   ``snapshot``) before anything is copied.
3. The :class:`Snapshotter` creates the slot with an exported snapshot and
   copies every table in parallel; the engine bulk-loads the chunks and the
   consistent point as the position, all in ONE store transaction.
4. The exporting replication connection is closed when the copy ends; the
   caller then streams the slot from the stored position.

A crash anywhere before the store's COMMIT leaves no position and the
marker set: the next run drops the leftover slot (it can never export a
snapshot again), clears whatever a previous attempt could have left, and
starts over. No row is loaded twice: the store commits the whole snapshot or
none of it. A slot that exists while the store has no position and no
marker is not ours to drop, so that is an error unless ``replace_slot``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pyarrow as pa

from headrace.engine.engine import Engine
from headrace.engine.results import SnapshotLoaded
from headrace.errors import SourceError
from headrace.pipeline.check_catalog import raise_source_problems
from headrace.pipeline.model import PipelineConfig
from headrace.run.faults import Faults
from headrace.run.pipeline_source import snapshot_settings, source_dsn
from headrace.run.settings import RunSettings
from headrace.source.changes import SnapshotChunk, TableRef
from headrace.source.postgres import preflight
from headrace.source.postgres.connect_errors import connect_sql
from headrace.source.postgres.snapshot import Snapshotter, describe
from headrace.source.postgres.snapshot_progress import ProgressCallback
from headrace.store.duckdb.schema import META
from headrace.store.duckdb.store import DuckDBStore

log = logging.getLogger("headrace.run")

STORE_CHUNK_ROWS = 2 * 122_880
"""Rows per chunk handed to the store at least (where the copy allows): two
DuckDB row groups (see :func:`_coalesced`)."""
MARKER_KEY = "snapshot"
IN_PROGRESS = "in_progress"
# Only constants are formatted into these statements; values are parameters.
_SELECT_MARKER = f"SELECT value FROM {META}.store_info WHERE key = ?"  # noqa: S608
_DELETE_MARKER = f"DELETE FROM {META}.store_info WHERE key = ?"  # noqa: S608
_INSERT_MARKER = f"INSERT INTO {META}.store_info VALUES (?, ?)"  # noqa: S608


class SnapshotInterruptedError(Exception):
    """The snapshot was stopped on request (SIGINT/SIGTERM); nothing was stored."""


def read_marker(store: DuckDBStore) -> dict[str, object] | None:
    """The snapshot marker, None when no snapshot is in progress."""
    rows = store.writer.execute(_SELECT_MARKER, [MARKER_KEY]).fetchall()
    if not rows or rows[0][0] is None:
        return None
    value = json.loads(str(rows[0][0]))
    return value if isinstance(value, dict) else None


def _write_marker(store: DuckDBStore, value: dict[str, object] | None) -> None:
    with store.transaction() as con:
        con.execute(_DELETE_MARKER, [MARKER_KEY])
        if value is not None:
            con.execute(_INSERT_MARKER, [MARKER_KEY, json.dumps(value)])


def clear_marker(store: DuckDBStore) -> None:
    """Forget the marker (the snapshot is committed: the position says so now)."""
    _write_marker(store, None)


def _clear_leftovers(engine: Engine) -> None:
    """Empty the mirrors and histories an earlier, interrupted attempt could have filled."""
    with engine.store.transaction() as con:
        for model in engine.registry.tables.values():
            if model.config.mirror:
                con.execute(f"DELETE FROM {model.mirror}")  # noqa: S608 - quoted name
            if model.config.history:
                con.execute(f"DELETE FROM {model.history}")  # noqa: S608 - quoted name


def _check_source(config: PipelineConfig, config_file: str) -> bool:
    """Check the server, the publication and every column the pipeline names against
    the tables as they are, before a slot is created (a mistake found later would leave
    a slot behind, holding WAL); returns whether the slot exists already."""
    source = config.source
    with connect_sql(source_dsn(config), autocommit=True) as conn:
        preflight.check_server(conn)
        preflight.ensure_publication(
            conn, source.publication, tuple(config.table_refs), create=True
        )
        raise_source_problems(conn, config, config_file)
        return preflight.slot_state(conn, source.slot) is not None


def _chunks(
    chunks: Iterator[SnapshotChunk],
    faults: Faults,
    stop: threading.Event,
    on_chunk: Callable[[], None],
) -> Iterator[SnapshotChunk]:
    for chunk in _coalesced(chunks, STORE_CHUNK_ROWS):
        if stop.is_set():
            raise SnapshotInterruptedError
        yield chunk
        faults.reached("snapshot_chunk", stop)
        on_chunk()
    if stop.is_set():
        raise SnapshotInterruptedError


def _coalesced(chunks: Iterator[SnapshotChunk], min_rows: int) -> Iterator[SnapshotChunk]:
    """The chunks, with a table's consecutive ones joined (zero-copy) into chunks of
    at least ``min_rows`` rows where possible.

    Why: DuckDB writes an append of whole row groups to the file while it runs
    (in parallel, overlapping the copy); smaller appends wait in memory and are
    written by the COMMIT, a serial tail of ~0.2 s per 1M rows. Memory stays
    bounded: every waiting table is handed over once ``min_rows`` rows wait in
    all. An empty chunk (a table without rows) passes at once.
    """
    waiting: dict[TableRef, list[SnapshotChunk]] = {}
    waiting_rows = 0
    for chunk in chunks:
        if chunk.rows.num_rows == 0 and chunk.schema.table not in waiting:
            yield chunk
            continue
        waiting.setdefault(chunk.schema.table, []).append(chunk)
        waiting_rows += chunk.rows.num_rows
        if waiting_rows >= min_rows:
            yield from (_joined(parts) for parts in waiting.values())
            waiting.clear()
            waiting_rows = 0
    yield from (_joined(parts) for parts in waiting.values())


def _joined(parts: list[SnapshotChunk]) -> SnapshotChunk:
    if len(parts) == 1:
        return parts[0]
    last = parts[-1]
    rows = pa.concat_tables([part.rows for part in parts])
    return SnapshotChunk(last.schema, rows, max(part.consistent_point for part in parts))


def snapshot_into_store(
    engine: Engine,
    config: PipelineConfig,
    run: RunSettings,
    *,
    faults: Faults,
    stop: threading.Event,
    progress: ProgressCallback | None = None,
    on_chunk: Callable[[], None] = lambda: None,
    replace_slot: bool = False,
    config_file: str = "the pipeline file",
) -> SnapshotLoaded:
    """Snapshot every configured table into the store (see module docstring);
    ``config_file`` names the pipeline file in errors about it."""
    store = engine.store
    marker = read_marker(store)
    interrupted = marker is not None and marker.get("state") == IN_PROGRESS
    slot = config.source.slot
    if _check_source(config, config_file) and not (interrupted or replace_slot):
        raise SourceError(
            f"the replication slot {slot} exists but the store {store.path} has no position: "
            "this store never loaded a snapshot from it",
            "if the slot is left over (e.g. the store file was deleted), run again with "
            "--replace-slot to drop it and snapshot anew; if another pipeline streams from "
            "it, give this pipeline its own slot name (source.slot)",
        )
    if marker is not None and interrupted:
        log.warning(
            "an earlier snapshot (started %s) did not finish: starting over", marker.get("started")
        )
        _clear_leftovers(engine)
    _write_marker(
        store,
        {"state": IN_PROGRESS, "slot": slot, "started": datetime.now(UTC).isoformat()},
    )
    snapshotter = Snapshotter(snapshot_settings(config, run, replace_slot=True), progress=progress)
    with contextlib.closing(snapshotter.chunks()) as chunks:
        loaded = engine.load_snapshot(_chunks(chunks, faults, stop, on_chunk))
    faults.reached("after_snapshot")
    clear_marker(store)
    log.info("%s", describe(snapshotter.result))
    return loaded

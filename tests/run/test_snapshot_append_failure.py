"""The store failing to append a snapshot chunk while the copy workers wait on a full queue.

The copy threads (receive, decode) and the appending thread (the store) run
concurrently, joined by a bounded queue. When the append fails, the workers
are blocked putting into that full queue: the failure must surface at once
as the store's error, the workers must stop and close their connections,
the half-made slot must go, and the store must hold nothing of it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from headrace.engine.engine import Engine
from headrace.errors import StoreError
from headrace.pipeline.load import parse_pipeline
from headrace.source.changes import SnapshotChunk, TableRef
from headrace.source.postgres.snapshot import SnapshotSettings, Snapshotter
from headrace.store.duckdb.schema import MIRROR
from headrace.store.duckdb.store import DuckDBStore
from tests.conftest import PgDatabase

_PIPELINE = """
source:
  dsn: "{dsn}"
  slot: snap
  tables:
    t: {{}}
store:
  path: "{store}"
"""
# Long enough for every worker to fill the queue and block on it.
_BLOCKED_S = 0.5
# Far more than stopping takes (workers poll their stop flag every 0.2 s),
# far less than a hang.
_STOP_WITHIN_S = 5.0


def _failing_on_second(chunks: Iterator[SnapshotChunk]) -> Iterator[SnapshotChunk]:
    """The first chunk as copied; then, once the workers are blocked, a chunk the
    store cannot append (text where the mirror has a bigint)."""
    first = next(chunks)
    yield first
    time.sleep(_BLOCKED_S)
    second = next(chunks)
    bad = pa.table(
        {
            "id": pa.array(["not a number"] * second.rows.num_rows),
            "v": second.rows.column("v"),
        }
    )
    yield SnapshotChunk(second.schema, bad, second.consistent_point)


def _copy_connections(pg_db: PgDatabase) -> list[object]:
    return [
        row[0]
        for row in pg_db.fetchall(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'headrace-snapshot%%'"
        )
    ]


def test_append_failing_while_workers_wait_stops_everything(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    pg_db.execute(
        "CREATE TABLE t (id int8 PRIMARY KEY, v text);"
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20000) g"
    )
    config = parse_pipeline(
        _PIPELINE.format(dsn=pg_db.dsn, store=tmp_path / "store.duckdb"), "test.yaml"
    )
    store = DuckDBStore(config.store.path)
    try:
        engine = Engine(config, store)
        settings = SnapshotSettings(
            dsn=pg_db.dsn,
            tables=(TableRef.parse("t"),),
            slot="snap",
            chunk_rows=500,
            range_pages=10,
            queue_chunks=1,
        )
        snapshotter = Snapshotter(settings)
        started = time.monotonic()
        with (
            pytest.raises(StoreError, match="the store refused") as caught,
            contextlib.closing(snapshotter.chunks()) as chunks,
        ):
            engine.load_snapshot(_failing_on_second(chunks))
        assert time.monotonic() - started < _BLOCKED_S + _STOP_WITHIN_S
        assert "Could not convert" in str(caught.value.__cause__)
        # The workers closed their connections, the slot is gone ...
        assert _copy_connections(pg_db) == []
        assert pg_db.fetchall("SELECT slot_name FROM pg_replication_slots") == []
        # ... and the store holds nothing of the snapshot (one transaction: not
        # even the mirror table it created).
        assert engine.status().position is None
        assert TableRef.parse("t") not in engine.registry.tables
        mirrors = store.writer.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = ?", [MIRROR]
        ).fetchall()
        assert mirrors == []
    finally:
        store.close()

"""Interrupted snapshots: the half-made slot goes away, and starting over works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from headrace.errors import SourceError
from headrace.source.changes import TableRef
from headrace.source.postgres.replication import ReplicationConnection, StreamOptions
from headrace.source.postgres.snapshot import SnapshotSettings, Snapshotter, drop_slot
from tests.conftest import PgDatabase


def slots(pg_db: PgDatabase) -> list[str]:
    return [str(r[0]) for r in pg_db.fetchall("SELECT slot_name FROM pg_replication_slots")]


def make_table(pg_db: PgDatabase, rows: int = 20_000) -> None:
    pg_db.execute(
        "CREATE TABLE t (id int8 PRIMARY KEY, v text);"
        f"INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, {rows}) g"
    )


def settings_for(pg_db: PgDatabase, **options: object) -> SnapshotSettings:
    defaults: dict[str, object] = {
        "slot": "snap",
        "chunk_rows": 500,
        "range_pages": 10,
        "queue_chunks": 1,
    }
    return SnapshotSettings(
        dsn=pg_db.dsn,
        tables=(TableRef.parse("t"),),
        **{**defaults, **options},  # type: ignore[arg-type]
    )


def copied_ids(snapshotter: Snapshotter) -> list[int]:
    ids: list[int] = []
    for chunk in snapshotter.chunks():
        ids.extend(chunk.rows.column("id").to_pylist())
    return sorted(ids)


def test_consumer_stopping_early_drops_the_slot(pg_db: PgDatabase) -> None:
    make_table(pg_db)
    chunks = Snapshotter(settings_for(pg_db)).chunks()
    next(chunks)
    assert slots(pg_db) == ["snap"]
    chunks.close()
    assert slots(pg_db) == []
    # No copy connection is left behind either.
    assert (
        pg_db.fetchall(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'headrace-snapshot%%'"
        )
        == []
    )
    # And it can start over.
    assert copied_ids(Snapshotter(settings_for(pg_db))) == list(range(1, 20_001))


def test_failed_copy_raises_and_drops_the_slot(pg_db: PgDatabase) -> None:
    make_table(pg_db)
    chunks = Snapshotter(settings_for(pg_db, workers=2)).chunks()
    next(chunks)

    def kill_copies() -> None:
        pg_db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'headrace-snapshot' AND backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()"
        )

    killer = threading.Thread(target=kill_copies)
    killer.start()
    killer.join()
    with pytest.raises(SourceError) as failure:
        for _ in chunks:
            pass
    assert failure.value.fix
    assert slots(pg_db) == []


def test_existing_slot_is_refused_unless_replaced(pg_db: PgDatabase) -> None:
    make_table(pg_db, rows=10)
    pg_db.execute("SELECT pg_create_logical_replication_slot('snap', 'pgoutput')")
    with pytest.raises(SourceError, match="already exists") as refused:
        list(Snapshotter(settings_for(pg_db)).chunks())
    assert "replace" in refused.value.fix
    assert slots(pg_db) == ["snap"]  # not touched
    pg_db.execute("SELECT pg_create_physical_replication_slot('physical')")
    with pytest.raises(SourceError, match="belongs to something else"):
        list(Snapshotter(settings_for(pg_db, slot="physical", if_slot_exists="replace")).chunks())
    pg_db.execute("SELECT pg_drop_replication_slot('physical')")
    assert copied_ids(Snapshotter(settings_for(pg_db, if_slot_exists="replace"))) == list(
        range(1, 11)
    )
    assert slots(pg_db) == ["snap"]


def test_drop_slot_waits_for_a_holder_then_names_it(pg_db: PgDatabase) -> None:
    assert drop_slot(pg_db.dsn, "nothing") is False
    pg_db.execute("CREATE TABLE t (id int8 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t")
    pg_db.execute("SELECT pg_create_logical_replication_slot('held', 'pgoutput')")
    holder = ReplicationConnection(pg_db.dsn)
    try:
        holder.start("held", 0, StreamOptions(publications=("p",)))
        with pytest.raises(SourceError, match=f"PID {holder.backend_pid}"):
            drop_slot(pg_db.dsn, "held", timeout_s=0.3)
        # A holder that goes away within the timeout is waited for.
        threading.Timer(0.5, holder.close).start()
        assert drop_slot(pg_db.dsn, "held", timeout_s=10) is True
    finally:
        holder.close()
    assert slots(pg_db) == []


CRASHING_SNAPSHOT = textwrap.dedent(
    """
    import sys, time
    from headrace.source.changes import TableRef
    from headrace.source.postgres.snapshot import Snapshotter, SnapshotSettings
    settings = SnapshotSettings(
        dsn=sys.argv[1], tables=(TableRef.parse("t"),), slot="snap",
        chunk_rows=500, range_pages=10, queue_chunks=1,
    )
    for chunk in Snapshotter(settings).chunks():
        print("copying", flush=True)
        time.sleep(60)
    """
)


def test_rerun_after_a_crash_mid_copy(pg_db: PgDatabase) -> None:
    make_table(pg_db)
    crashed = subprocess.Popen(
        [sys.executable, "-c", CRASHING_SNAPSHOT, pg_db.dsn],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        assert crashed.stdout is not None
        assert crashed.stdout.readline().strip() == "copying"
        os.kill(crashed.pid, signal.SIGKILL)
    finally:
        crashed.wait(10)
        if crashed.stdout is not None:
            crashed.stdout.close()
    assert slots(pg_db) == ["snap"]  # left behind, half made
    pg_db.execute("INSERT INTO t VALUES (0, 'after the crash')")
    snapshotter = Snapshotter(settings_for(pg_db, if_slot_exists="replace"))
    assert copied_ids(snapshotter) == list(range(20_001))
    # The new slot streams from the new snapshot's consistent point.
    (row,) = pg_db.fetchall(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'snap'"
    )
    high, _, low = str(row[0]).partition("/")
    assert (int(high, 16) << 32) | int(low, 16) == snapshotter.result.consistent_point

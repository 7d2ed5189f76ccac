"""The DuckDB store on a real file: layout, position, transactions, listeners, readers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from headrace.errors import StoreError
from headrace.pipeline.model import StoreConfig
from headrace.source.changes import TableRef
from headrace.store.base import CommitEvent
from headrace.store.duckdb.schema import FORMAT_VERSION, mirror_table, rollup_view
from headrace.store.duckdb.store import DEFAULT_ROW_GROUP_SIZE, DuckDBStore


@pytest.fixture
def store(tmp_path: Path) -> DuckDBStore:
    return DuckDBStore(tmp_path / "h.duckdb")


def test_layout(store: DuckDBStore) -> None:
    schemas = {
        r["schema_name"]
        for r in store.query("SELECT schema_name FROM duckdb_schemas()").to_pylist()
    }
    assert {"mirror", "history", "rollup", "headrace"} <= schemas
    tables = {
        r["table_name"]
        for r in store.query(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'headrace'"
        ).to_pylist()
    }
    assert {
        "position",
        "tables",
        "schema_versions",
        "dead_letters",
        "rollups",
        "store_info",
    } <= tables
    info = {
        r["key"]: r["value"]
        for r in store.query("SELECT key, value FROM headrace.store_info").to_pylist()
    }
    assert info["format_version"] == str(FORMAT_VERSION)
    store.close()


def test_names() -> None:
    assert mirror_table(TableRef("public", "tx")) == 'mirror."tx"'
    assert mirror_table(TableRef("sales", "tx")) == 'mirror."sales__tx"'
    assert rollup_view("vol", timedelta(minutes=5)) == 'rollup."vol_5m"'


def test_position_round_trip_and_reopen(store: DuckDBStore, tmp_path: Path) -> None:
    assert store.read_position("postgres") is None
    at = datetime(2024, 1, 1, tzinfo=UTC)
    with store.transaction() as con:
        store.write_position(con, "postgres", 100, at)
    with store.transaction() as con:
        store.write_position(con, "postgres", 200, None)  # a heartbeat keeps the commit time
    position = store.read_position("postgres")
    assert position is not None
    assert (position.lsn, position.commit_ts) == (200, at)
    store.close()
    again = DuckDBStore(tmp_path / "h.duckdb")
    assert again.read_position("postgres").lsn == 200  # type: ignore[union-attr]
    again.close()


def test_transaction_rolls_back_on_error(store: DuckDBStore) -> None:
    def fail_after_writing() -> None:
        with store.transaction() as con:
            store.write_position(con, "postgres", 5, None)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail_after_writing()
    assert store.read_position("postgres") is None
    store.close()


def test_listeners(store: DuckDBStore) -> None:
    seen: list[CommitEvent] = []

    def broken(event: CommitEvent) -> None:
        raise ValueError("a bad listener")

    unsubscribe = store.subscribe(seen.append)
    store.subscribe(broken)
    first = store.publish(10, None, ["public.t"], 3)
    store.publish(20, None, [], 0, kind="rebuild")
    unsubscribe()
    store.publish(30, None, [], 0)
    assert [e.version for e in seen] == [first.version, first.version + 1]
    assert seen[0].tables == ("public.t",)
    assert seen[1].kind == "rebuild"
    assert store.version == first.version + 2
    store.close()


def test_readers_use_their_own_cursor_while_the_writer_writes(store: DuckDBStore) -> None:
    store.writer.execute("CREATE TABLE mirror.t AS SELECT range AS i FROM range(100000)")
    results: list[int] = []

    def reader() -> None:
        for _ in range(20):
            results.append(int(store.query("SELECT count(*) AS n FROM mirror.t")["n"][0].as_py()))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(20):
        with store.transaction() as con:
            con.execute("INSERT INTO mirror.t VALUES (?)", [100000 + i])
    thread.join()
    assert len(results) == 20
    assert all(100000 <= n <= 100020 for n in results)
    store.close()


def test_checkpoint_policy(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "c.duckdb", checkpoint_wal_bytes=1024 * 1024)
    store.writer.execute("SET checkpoint_threshold = '1GB'")  # only ours
    store.writer.execute("CREATE TABLE mirror.big (i BIGINT, s VARCHAR)")
    for batch in range(30):  # small commits go to the WAL (large appends skip it)
        with store.transaction() as con:
            con.execute(
                "INSERT INTO mirror.big SELECT range, repeat('x', 100) FROM range(?, ?)",
                [batch * 1000, batch * 1000 + 1000],
            )
    assert store.wal_bytes() > 1024 * 1024
    wal = store.wal_bytes()
    assert store.maybe_checkpoint()
    assert store.wal_bytes() < 1024 * 1024
    assert not store.maybe_checkpoint()
    figures = store.checkpoints.document()
    assert figures["count"] == 1
    assert figures["wal_bytes"] == wal
    assert figures["seconds"] == figures["longest_s"] > 0
    store.close()


@pytest.mark.parametrize("row_group_size", [4096, 122_880])
def test_an_append_of_whole_row_groups_skips_the_wal(tmp_path: Path, row_group_size: int) -> None:
    path = tmp_path / "g.duckdb"
    store = DuckDBStore(path, row_group_size=row_group_size)
    store.writer.execute("SET checkpoint_threshold = '1GB'")  # only ours
    store.writer.execute("CREATE TABLE mirror.big (i BIGINT, s VARCHAR)")
    before = store.wal_bytes()
    with store.transaction() as con:  # ~2 MB of rows, 5 groups of 4,096
        con.execute("INSERT INTO mirror.big SELECT range, 'row ' || range FROM range(20000)")
    logged = store.wal_bytes() - before
    groups = store.writer.execute(
        "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('mirror.big')"
    ).fetchone()
    store.close()
    if row_group_size == 4096:
        # Written compressed to the file by the INSERT; the WAL says only where.
        assert logged < 100_000
        assert groups is not None
        assert groups[0] >= 4
    else:  # less than a group: every row goes through the WAL (and the next checkpoint)
        assert logged > 200_000
    reopened = DuckDBStore(path, read_only=True)
    assert reopened.query("SELECT count(*) AS n FROM mirror.big")["n"][0].as_py() == 20000
    reopened.close()


def test_the_configured_row_group_size_is_the_stores_default() -> None:
    assert StoreConfig().row_group_size == DEFAULT_ROW_GROUP_SIZE


def test_read_only_and_one_writer(tmp_path: Path) -> None:
    path = tmp_path / "r.duckdb"
    DuckDBStore(path).close()
    reader = DuckDBStore(path, read_only=True)
    assert reader.read_position("postgres") is None
    with pytest.raises(StoreError, match="read-only"), reader.transaction():
        pass
    reader.close()


def test_a_new_store_in_a_new_directory_and_a_missing_one_read_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "pipelines" / "s.duckdb"
    with pytest.raises(StoreError, match=r"there is no store at .*s\.duckdb") as caught:
        DuckDBStore(path, read_only=True)
    assert "headrace run" in caught.value.fix
    DuckDBStore(path).close()  # the writer creates the directories
    DuckDBStore(path, read_only=True).close()


def test_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE x (i int)")
    con.close()
    with pytest.raises(StoreError, match="not a headrace store"):
        DuckDBStore(path, read_only=True)


def test_other_format_version(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    store = DuckDBStore(path)
    store.writer.execute(
        "UPDATE headrace.store_info SET value = '999' WHERE key = 'format_version'"
    )
    store.close()
    with pytest.raises(StoreError, match="format version 999"):
        DuckDBStore(path)


def test_streaming_threads_hold_for_the_writer_and_readers(store: DuckDBStore) -> None:
    store.set_threads(1)
    reader = store.cursor()
    try:
        assert store.writer.sql("SELECT current_setting('threads')").fetchall() == [(1,)]
        assert reader.sql("SELECT current_setting('threads')").fetchall() == [(1,)]
        store.set_threads(0)  # DuckDB's default: one per core
        cores = reader.sql("SELECT current_setting('threads')").fetchall()[0][0]
        assert cores == (os.cpu_count() or 1)
    finally:
        reader.close()


_APPEND_THEN_HANG = """
import sys, time
from headrace.store.duckdb.store import DuckDBStore
store = DuckDBStore(sys.argv[1], row_group_size=4096)
with store.transaction() as con:
    con.execute("CREATE TABLE mirror.big (i BIGINT, s VARCHAR)")
    con.execute("INSERT INTO mirror.big SELECT range, 'row ' || range FROM range(10000)")
con = store.writer
con.execute("BEGIN")
for start in range(10000, 400000, 50000):  # whole row groups, written before the commit
    con.execute(
        "INSERT INTO mirror.big SELECT range, 'row ' || range FROM range(?, ?)",
        [start, start + 50000],
    )
print("appended", flush=True)
time.sleep(600)
"""


def test_a_crash_amid_appended_row_groups_keeps_the_last_commit(tmp_path: Path) -> None:
    """Row groups an uncommitted transaction already wrote to the file are not data."""
    path = tmp_path / "k.duckdb"
    with subprocess.Popen(
        [sys.executable, "-c", _APPEND_THEN_HANG, str(path)], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "appended"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
    store = DuckDBStore(path, row_group_size=4096)
    assert store.query("SELECT count(*) AS n FROM mirror.big")["n"][0].as_py() == 10000
    with store.transaction() as con:  # the file takes writes and a checkpoint again
        con.execute("INSERT INTO mirror.big SELECT range, 'x' FROM range(10000, 60000)")
    store.checkpoint()
    assert store.query("SELECT count(*) AS n FROM mirror.big")["n"][0].as_py() == 60000
    store.close()

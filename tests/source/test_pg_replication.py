"""The replication transport on raw pgoutput bytes, against a real PostgreSQL."""

from __future__ import annotations

import time

import psycopg
import pytest

from headrace.errors import SourceError
from headrace.source.postgres.connect_errors import ConnectionLostError
from headrace.source.postgres.replication import (
    ReplicationConnection,
    StreamOptions,
    parse_pg_lsn,
    replication_conninfo,
)
from headrace.source.postgres.replication_stream import Payload
from tests.conftest import PgDatabase

Messages = list[tuple[int, bytes]]


def _setup(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int8 PRIMARY KEY, note text)")
    pg_db.execute("CREATE PUBLICATION p FOR TABLE t")


def _slot_confirmed(pg_db: PgDatabase, slot: str) -> int:
    (row,) = pg_db.fetchall(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return parse_pg_lsn(str(row[0]))


def _drain_until(conn: ReplicationConnection, messages: Messages, commits: int) -> None:
    """Collect payloads until ``commits`` Commit messages arrived (10 s at most)."""

    def collect(start: int, payload: Payload) -> None:
        messages.append((start, bytes(payload)))

    deadline = time.monotonic() + 10
    while sum(1 for _, p in messages if p[:1] == b"C") < commits:
        assert time.monotonic() < deadline, f"only {len(messages)} messages arrived"
        conn.drain(collect, 0.2)


def test_conninfo_keeps_user_options_and_adds_ours() -> None:
    info = replication_conninfo("host=h dbname=d options='-c work_mem=8MB'")
    assert "replication=database" in info
    assert "work_mem=8MB" in info
    assert "TimeZone=UTC" in info
    assert "IntervalStyle=postgres" in info


def test_stream_options_render() -> None:
    rendered = StreamOptions(publications=("p", 'we"ird')).render()
    assert rendered == (
        '(proto_version \'2\', publication_names \'"p","we""ird"\', '
        "messages 'true', streaming 'true')"
    )


def test_identify_and_stream_raw_messages(pg_db: PgDatabase) -> None:
    _setup(pg_db)
    with ReplicationConnection(pg_db.dsn) as conn:
        identity = conn.identify_system()
        assert identity.dbname == pg_db.name
        assert identity.timeline >= 1
        start = conn.create_slot("s")
        assert start >= identity.wal_position
        with pg_db.connect() as sql:
            for txn in range(3):
                with sql.transaction():
                    for i in range(5):
                        sql.execute("INSERT INTO t VALUES (%s, 'x')", (txn * 10 + i,))
        conn.start("s", 0, StreamOptions(publications=("p",)))
        messages: Messages = []
        _drain_until(conn, messages, commits=3)
    kinds = b"".join(p[:1] for _, p in messages)
    assert kinds == b"BR" + b"I" * 5 + b"C" + (b"B" + b"I" * 5 + b"C") * 2
    # XLogData positions never go backwards.
    starts = [s for s, _ in messages if s]
    assert starts == sorted(starts)


def test_drain_returns_on_timeout_when_idle(pg_db: PgDatabase) -> None:
    _setup(pg_db)
    with ReplicationConnection(pg_db.dsn) as conn:
        conn.create_slot("s")
        conn.start("s", 0, StreamOptions(publications=("p",)))
        began = time.monotonic()
        assert conn.drain(lambda start, payload: None, 0.3) == 0
        # Returns by the timeout (sooner when a keepalive came in), never hangs.
        assert time.monotonic() - began < 5.0


def test_status_never_ahead_of_confirmed_never_backwards(pg_db: PgDatabase) -> None:
    _setup(pg_db)
    with ReplicationConnection(pg_db.dsn, status_interval_s=0.05) as conn:
        consistent = conn.create_slot("s")
        for i in range(3):
            pg_db.execute(f"INSERT INTO t VALUES ({i}, 'x')")
        conn.start("s", 0, StreamOptions(publications=("p",)))
        messages: Messages = []
        _drain_until(conn, messages, commits=3)
        commit_ends = [start for start, p in messages if p[:1] == b"C"]
        # Everything was received, nothing confirmed: the slot stays put.
        for _ in range(5):
            conn.drain(lambda start, payload: None, 0.1)
        assert _slot_confirmed(pg_db, "s") == consistent

        conn.confirm(commit_ends[0])
        conn.send_status()
        assert _eventually(lambda: _slot_confirmed(pg_db, "s") == commit_ends[0])
        conn.confirm(consistent)  # lower: ignored
        assert conn.confirmed == commit_ends[0]
        conn.send_status()
        conn.drain(lambda start, payload: None, 0.2)
        assert _slot_confirmed(pg_db, "s") == commit_ends[0]

        conn.confirm(commit_ends[2])
        # Sent within the status interval by the receive loop, without an explicit send.
        for _ in range(5):
            conn.drain(lambda start, payload: None, 0.1)
        assert _slot_confirmed(pg_db, "s") == commit_ends[2]


def test_keepalive_requests_are_answered(pg_db: PgDatabase) -> None:
    """With wal_sender_timeout at 2 s the server asks for replies; answering keeps it alive."""
    _setup(pg_db)
    dsn = pg_db.dsn + " options='-c wal_sender_timeout=2s'"
    with ReplicationConnection(dsn, status_interval_s=3600) as conn:
        conn.create_slot("s")
        conn.start("s", 0, StreamOptions(publications=("p",)))
        _drain_for(conn, 5.0)
        assert conn.server_wal_end > 0  # keepalives arrived
        pg_db.execute("INSERT INTO t VALUES (1, 'still alive')")
        messages: Messages = []
        _drain_until(conn, messages, commits=1)


def test_exported_snapshot_is_usable_while_idle(pg_db: PgDatabase) -> None:
    _setup(pg_db)
    pg_db.execute("INSERT INTO t VALUES (1, 'before')")
    with ReplicationConnection(pg_db.dsn) as conn:
        consistent, snapshot = conn.create_slot_with_snapshot("s")
        pg_db.execute("INSERT INTO t VALUES (2, 'after')")
        with pg_db.connect(autocommit=False) as reader:
            reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            reader.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'".encode())
            rows = reader.execute("SELECT id FROM t ORDER BY id").fetchall()
            reader.rollback()
        assert rows == [(1,)]
        conn.start("s", consistent, StreamOptions(publications=("p",)))
        messages: Messages = []
        _drain_until(conn, messages, commits=1)
        inserts = [p for _, p in messages if p[:1] == b"I"]
        assert len(inserts) == 1
        assert b"after" in inserts[0]


def test_terminated_walsender_raises_connection_lost(pg_db: PgDatabase) -> None:
    _setup(pg_db)
    with ReplicationConnection(pg_db.dsn) as conn:
        conn.create_slot("s")
        conn.start("s", 0, StreamOptions(publications=("p",)))
        pg_db.execute(f"SELECT pg_terminate_backend({conn.backend_pid})")
        with pytest.raises(ConnectionLostError):
            _drain_for(conn, 10.0)


def test_connect_without_replication_privilege_is_final(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE ROLE plain_user LOGIN")
    try:
        with pytest.raises(SourceError) as caught:
            ReplicationConnection(pg_db.dsn + " user=plain_user")
        assert not isinstance(caught.value, ConnectionLostError)
        assert "REPLICATION" in caught.value.what
        assert "ALTER ROLE" in caught.value.fix
    finally:
        pg_db.execute("DROP ROLE plain_user")


def test_server_down_is_worth_a_retry() -> None:
    with pytest.raises(ConnectionLostError):
        ReplicationConnection("host=127.0.0.1 port=1 dbname=x user=x", connect_timeout_s=1)


def test_unknown_server_error_on_command_is_reraised(pg_db: PgDatabase) -> None:
    with ReplicationConnection(pg_db.dsn) as conn, pytest.raises(psycopg.errors.UndefinedObject):
        conn.drop_slot("no_such_slot")


def _drain_for(conn: ReplicationConnection, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.drain(lambda start, payload: None, 0.2)


def _eventually(check: object, timeout: float = 5.0) -> bool:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())

"""Each preflight error says what happened and what to do (real PostgreSQL servers)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from headrace.errors import SourceError
from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.source.changes import TableRef
from headrace.source.postgres import preflight
from headrace.source.postgres.replication import ReplicationConnection, StreamOptions
from tests.conftest import PgDatabase

T = TableRef("public", "t")


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[ThrowawayPostgres]:
    """Two replication slots at most, and at most 1 MB of WAL kept for a slot."""
    with ThrowawayPostgres(
        settings={"max_replication_slots": "2", "max_slot_wal_keep_size": "1MB"}
    ) as cluster:
        yield cluster


def _connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(dsn, autocommit=True)


def test_wal_level_not_logical() -> None:
    with (
        ThrowawayPostgres(settings={"wal_level": "replica"}) as cluster,
        _connect(cluster.dsn()) as conn,
        pytest.raises(SourceError) as caught,
    ):
        preflight.check_server(conn)
    assert "wal_level = replica" in caught.value.what
    assert "ALTER SYSTEM SET wal_level = logical" in caught.value.fix
    assert "restart" in caught.value.fix


def test_missing_replication_privilege(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE ROLE no_repl LOGIN")
    try:
        with _connect(pg_db.dsn + " user=no_repl") as conn, pytest.raises(SourceError) as caught:
            preflight.check_server(conn)
        assert caught.value.what == (
            "the user no_repl has no REPLICATION privilege, so it cannot stream changes"
        )
        assert "ALTER ROLE no_repl WITH REPLICATION" in caught.value.fix
        pg_db.execute("ALTER ROLE no_repl WITH REPLICATION")
        with _connect(pg_db.dsn + " user=no_repl") as conn:
            preflight.check_server(conn)
    finally:
        pg_db.execute("DROP ROLE no_repl")


def test_missing_table(pg_db: PgDatabase) -> None:
    with _connect(pg_db.dsn) as conn, pytest.raises(SourceError) as caught:
        preflight.ensure_publication(conn, "p", [TableRef("public", "nope")], create=True)
    assert caught.value.what == f"the table public.nope does not exist in database {pg_db.name}"
    assert "schema-qualified" in caught.value.fix
    assert pg_db.fetchall("SELECT 1 FROM pg_publication WHERE pubname = 'p'") == []


def test_missing_publication_is_created_for_the_tables(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg_db.execute('CREATE TABLE "Other" (id int PRIMARY KEY)')
    pg_db.execute("CREATE TABLE unrelated (id int PRIMARY KEY)")
    tables = [T, TableRef("public", "Other")]
    with _connect(pg_db.dsn) as conn:
        with pytest.raises(SourceError) as caught:
            preflight.ensure_publication(conn, "p", tables, create=False)
        assert caught.value.what == "the publication p does not exist"
        assert (
            caught.value.fix == "create it: CREATE PUBLICATION p FOR TABLE public.t, public.Other;"
        )
        assert preflight.ensure_publication(conn, "p", tables, create=True)
        assert not preflight.ensure_publication(conn, "p", tables, create=True)
    published = pg_db.fetchall(
        "SELECT tablename FROM pg_publication_tables WHERE pubname = 'p' ORDER BY 1"
    )
    assert published == [("Other",), ("t",)]


def test_publication_lacking_a_table(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg_db.execute("CREATE TABLE u (id int PRIMARY KEY)")
    pg_db.execute("CREATE PUBLICATION p FOR TABLE t")
    with _connect(pg_db.dsn) as conn, pytest.raises(SourceError) as caught:
        preflight.ensure_publication(conn, "p", [T, TableRef("public", "u")], create=True)
    assert caught.value.what == "the publication p does not publish public.u"
    assert "ALTER PUBLICATION p ADD TABLE public.u;" in caught.value.fix


def test_table_without_replica_identity_is_not_published(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int)")
    with _connect(pg_db.dsn) as conn:
        with pytest.raises(SourceError) as caught:
            preflight.ensure_publication(conn, "p", [T], create=True)
        assert "no primary key and no replica identity" in caught.value.what
        assert "REPLICA IDENTITY FULL" in caught.value.fix
        conn.execute("ALTER TABLE t REPLICA IDENTITY FULL")
        assert preflight.ensure_publication(conn, "p", [T], create=True)


def test_dropped_slot(pg_db: PgDatabase) -> None:
    with _connect(pg_db.dsn) as conn:
        assert preflight.check_slot(conn, "s", start_position=0) is None  # may be created
        with pytest.raises(SourceError) as caught:
            preflight.check_slot(conn, "s", start_position=0x1_0000_0010)
    assert caught.value.what.startswith(
        "the replication slot s does not exist, but the stored position is 1/10: "
        "the slot was dropped"
    )
    assert "new snapshot" in caught.value.fix


def test_slot_in_use(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg_db.execute("CREATE PUBLICATION p FOR TABLE t")
    with ReplicationConnection(pg_db.dsn) as stream:
        stream.create_slot("s")
        stream.start("s", 0, StreamOptions(publications=("p",)))
        pid = stream.backend_pid
        with _connect(pg_db.dsn) as conn, pytest.raises(preflight.SlotInUseError) as caught:
            preflight.check_slot(conn, "s", start_position=0)
        assert (
            caught.value.what == f"the replication slot s is in use by another process (PID {pid})"
        )
        assert f"pg_terminate_backend({pid})" in caught.value.fix
        # The server's own refusal is explained the same way.
        with ReplicationConnection(pg_db.dsn) as second:
            with pytest.raises(psycopg.errors.ObjectInUse) as refused:
                second.start("s", 0, StreamOptions(publications=("p",)))
            explained = preflight.explain_slot_error("s", 0, refused.value)
        assert isinstance(explained, preflight.SlotInUseError)
        assert f"PID {pid}" in explained.what


def test_slot_moved_past_stored_position(pg_db: PgDatabase) -> None:
    with _connect(pg_db.dsn) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
        state = preflight.slot_state(conn, "s")
        assert state is not None
        assert state.confirmed_flush_lsn
        with pytest.raises(SourceError) as caught:
            preflight.check_slot(conn, "s", start_position=state.confirmed_flush_lsn - 1)
    assert "past the stored position" in caught.value.what


def test_slot_of_another_plugin(pg_db: PgDatabase) -> None:
    with _connect(pg_db.dsn) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('s', 'test_decoding')")
        with pytest.raises(SourceError) as caught:
            preflight.check_slot(conn, "s", start_position=0)
    assert "plugin test_decoding" in caught.value.what


def test_no_free_slot(small_cluster: ThrowawayPostgres) -> None:
    with _connect(small_cluster.dsn()) as conn:
        for name in ("a", "b"):
            conn.execute(
                f"SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')".encode()
            )
        try:
            with pytest.raises(SourceError) as caught:
                preflight.check_slot(conn, "c", start_position=0)
            assert caught.value.what == (
                "all 2 replication slots of the server are in use (max_replication_slots)"
            )
            assert "pg_drop_replication_slot" in caught.value.fix
            with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as refused:
                conn.execute("SELECT pg_create_logical_replication_slot('c', 'pgoutput')")
            explained = preflight.explain_slot_error("c", 0, refused.value)
            assert explained is not None
            assert "max_replication_slots" in explained.what
        finally:
            for name in ("a", "b"):
                conn.execute(f"SELECT pg_drop_replication_slot('{name}')".encode())


def test_invalidated_slot(small_cluster: ThrowawayPostgres) -> None:
    """A slot that fell more than max_slot_wal_keep_size behind loses its WAL."""
    with _connect(small_cluster.dsn()) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('lagging', 'pgoutput')")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS filler (v text)")
            for _ in range(4):
                conn.execute(
                    "INSERT INTO filler SELECT repeat('x', 100) FROM generate_series(1, 1000)"
                )
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            state = preflight.slot_state(conn, "lagging")
            assert state is not None
            assert state.wal_status == "lost"
            with pytest.raises(SourceError) as caught:
                preflight.check_slot(conn, "lagging", start_position=0)
            assert caught.value.what.startswith(
                "the replication slot lagging was invalidated: the server removed WAL it "
                "still needed"
            )
            assert "pg_drop_replication_slot('lagging')" in caught.value.fix
            assert "max_slot_wal_keep_size" in caught.value.fix
            # Streaming from it anyway: the server's refusal gets the same explanation.
            with ReplicationConnection(small_cluster.dsn()) as stream:
                with pytest.raises(psycopg.Error) as refused:
                    stream.start("lagging", 0, StreamOptions(publications=("p",)))
                explained = preflight.explain_slot_error("lagging", 0, refused.value)
            assert explained is not None
            assert "was invalidated" in explained.what
        finally:
            conn.execute("SELECT pg_drop_replication_slot('lagging')")

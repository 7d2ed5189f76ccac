"""The `bench pipeline` generator on a real PostgreSQL: where its updates and deletes land."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from headrace.bench.pipeline_workload import Mix, Workload, create_schema
from headrace.bench.pipeline_writers import ID_STRIDE, run_writers
from tests.conftest import PgDatabase

OLD = "SELECT id, status, amount, created_at FROM transactions WHERE id <= %s ORDER BY id"


def _rows(conn: psycopg.Connection[tuple[Any, ...]], highest: int) -> list[tuple[Any, ...]]:
    return conn.execute(OLD, (highest,)).fetchall()


def _stepped(
    conn: psycopg.Connection[tuple[Any, ...]], base_rows: int, steps: int, **options: Any
) -> Workload:
    """A workload's ``steps`` transactions over a table of ``base_rows`` rows."""
    create_schema(conn, base_rows)
    workload = Workload(conn, first_id=base_rows + 1, **options)
    for _ in range(steps):
        workload.step()
    return workload


def test_an_update_window_keeps_updates_and_deletes_among_the_newest_ids(
    pg_db: PgDatabase,
) -> None:
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        create_schema(conn, 2000)
        untouched = _rows(conn, 1500)  # older than the window, even before any insert
        workload = Workload(conn, first_id=2001, tx_rows=20, seed=3, update_window=500)
        for _ in range(60):
            workload.step()
        assert workload.result.updates > 0
        assert workload.result.deletes > 0
        assert _rows(conn, 1500) == untouched
        changed = conn.execute(
            "SELECT count(*) FROM transactions WHERE id > 1500 AND id <= 2000"
        ).fetchone()
        assert changed is not None
        assert changed[0] < 500  # deletes reached into the window


def test_without_a_window_the_whole_table_is_touched(pg_db: PgDatabase) -> None:
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        create_schema(conn, 2000)
        before = _rows(conn, 1000)
        workload = Workload(conn, first_id=2001, tx_rows=20, seed=3)
        for _ in range(60):
            workload.step()
        assert _rows(conn, 1000) != before


def test_writers_start_together_and_write_the_rate_asked_for(pg_db: PgDatabase) -> None:
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        create_schema(conn, 2000)
    options = {
        "dsn": pg_db.dsn,
        "rate": 4000,
        "seconds": 1.0,
        "first_id": 2001,
        "tx_rows": 20,
        "writers": 2,
    }
    result = run_writers(options)
    # Each writer writes its quota (2,000 changes) and stops: its last transaction is
    # due just before the second ends, so the whole rate is the one asked for.
    assert 4000 <= result.changes < 4000 + 2 * 20
    assert result.started_at < result.ended_at
    assert result.seconds == result.ended_at - result.started_at
    assert 0.95 <= result.seconds < 1.5
    assert result.rate > 0.95 * 4000
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        lsn = conn.execute(b"SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert lsn is not None
    assert 0 < result.end_lsn <= int(lsn[0])


def test_a_mix_sets_the_shares_of_inserts_updates_and_deletes(pg_db: PgDatabase) -> None:
    assert str(Mix.parse("40:20:40")) == "40:20:40"
    assert str(Mix.parse("1:1:2")) == "25:25:50"
    for bad in ("50:50", "a:b:c", "0:50:50", "50:-1:51"):
        with pytest.raises(ValueError, match="INSERTS:UPDATES:DELETES"):
            Mix.parse(bad)
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        workload = _stepped(conn, 2000, 200, tx_rows=10, seed=5, mix=Mix.parse("1:0:1"))
        result = workload.result
        assert result.updates == 0
        # Every delete finds its rows: each transaction changes tx_rows rows.
        assert result.changes == 10 * result.transactions
        assert 0.4 < result.deletes / result.changes < 0.6
        rows = conn.execute("SELECT count(*) FROM transactions").fetchone()
        assert rows is not None
        assert rows[0] == 2000 + result.inserts - result.deletes


def test_updates_and_deletes_find_live_rows_so_the_shares_are_exact(pg_db: PgDatabase) -> None:
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        workload = _stepped(conn, 500, 300, tx_rows=25, seed=7, mix=Mix.parse("30:20:50"))
        result = workload.result
        # With half the transactions deleting, ids ever inserted are mostly gone: drawing
        # among them would miss; drawing among the live ones never does.
        assert result.changes == 25 * result.transactions
        assert result.inserts + result.updates + result.deletes == result.changes
        rows = conn.execute("SELECT count(*) FROM transactions").fetchone()
        assert rows is not None
        assert rows[0] == 500 + result.inserts - result.deletes == workload.live_rows
        live = conn.execute("SELECT id FROM transactions ORDER BY id").fetchall()
        assert [i for (i,) in live] == [
            i + workload.low_id
            for i in range(workload.next_id - workload.low_id)
            if workload.live[i]
        ]


def test_a_writer_error_is_raised_after_the_others_finish(pg_db: PgDatabase) -> None:
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        create_schema(conn, 100)
        # Writer 1's ids (first_id + ID_STRIDE) are taken: its first insert fails.
        conn.execute(
            "INSERT INTO transactions SELECT id, 1, 1, 'approved', 'm1', now() "
            "FROM generate_series(%s::int8, %s::int8 + 5000) id",
            (101 + ID_STRIDE, 101 + ID_STRIDE),
        )
    options = {"dsn": pg_db.dsn, "rate": 0, "seconds": 1.0, "first_id": 101, "writers": 3}
    options |= {"tx_rows": 20, "mix": "1:0:0"}
    with pytest.raises(psycopg.errors.UniqueViolation):
        run_writers(options)
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:  # nothing left running
        busy = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> "
            "pg_backend_pid() AND datname = current_database()"
        ).fetchone()
    assert busy == (0,)

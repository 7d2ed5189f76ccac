"""A huge source transaction, decoded and applied a piece at a time, in one store transaction.

``headrace run --piece-changes 500`` against a real PostgreSQL: one transaction
of several thousand changes (updates moving rows between buckets and
statuses, deletes, inserts, over both tables) comes in pieces. Killed with
SIGKILL between two pieces, the store holds nothing of it; the next run
applies it whole: the store equals PostgreSQL, the history holds each change
once, with one ordinal per change within the transaction.
"""

from __future__ import annotations

import signal
from pathlib import Path

import duckdb
import psycopg

from headrace.errors import parse_lsn
from tests.conftest import PgDatabase
from tests.run.pipeline import RunProcess, make_pipeline
from tests.run.test_crash import store_and_slot

PIECE = "500"
ACCOUNT_UPDATES = 499  # ids 4, 8, ..., 1996


def _one_huge_transaction(dsn: str) -> int:
    """~6,000 changes in one transaction; returns the WAL position after its commit."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            b"UPDATE transactions SET amount = amount + 1, "
            b"status = CASE WHEN id % 5 = 0 THEN 'declined' ELSE status END, "
            b"created_at = created_at - interval '7 minutes'"
        )
        conn.execute(b"DELETE FROM transactions WHERE id % 11 = 0")
        conn.execute(b"UPDATE accounts SET region = 'eu' WHERE id % 4 = 0 AND id < 2000")
        conn.execute(
            b"INSERT INTO transactions SELECT g, 1 + g % 100, g / 10.0, 'approved', 'm7', "
            b"now() FROM generate_series(100001, 100800) g"
        )
        conn.commit()
        row = conn.execute(b"SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def test_kill_between_pieces_then_the_whole_transaction_once(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    pipeline = make_pipeline(pg_db, tmp_path)
    run = RunProcess(pipeline, "between_pieces:4", "--piece-changes", PIECE)
    run.wait_streaming()
    reported = pipeline.status().get("position")
    stored_before = int(reported) if isinstance(reported, int) else None
    end = _one_huge_transaction(pg_db.dsn)
    assert run.wait(120) == -signal.SIGKILL, run.output()
    stored, confirmed = store_and_slot(pipeline)
    assert stored is not None
    assert stored < end, "a piece of the transaction was committed on its own"
    assert stored_before is None or stored >= stored_before
    assert confirmed is None or confirmed <= stored

    again = RunProcess(pipeline, None, "--piece-changes", PIECE)
    again.wait_streaming()
    again.wait_position(end)
    assert again.terminate() == 0, again.output()
    pipeline.assert_equal_to_postgres()
    duck = duckdb.connect(pipeline.config.store.path, read_only=True)
    try:
        changes, ordinals, first, last = duck.execute(
            "SELECT count(*), count(DISTINCT _hr_seq), min(_hr_seq), max(_hr_seq) "
            "FROM history.transactions WHERE _hr_lsn = (SELECT max(_hr_lsn) "
            "FROM history.transactions)"
        ).fetchone() or (0, 0, 0, 0)
    finally:
        duck.close()
    assert changes > 4 * int(PIECE)
    # Ordinals number every change of the transaction (both tables) and continue across
    # pieces: the 499 accounts' updates come between these changes.
    assert (ordinals, first, last) == (changes, 0, changes + ACCOUNT_UPDATES - 1)

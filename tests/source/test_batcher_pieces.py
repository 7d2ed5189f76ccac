"""A huge transaction through the batcher: decoded a piece at a time, and its row messages
on disk while it arrives (real pgoutput output)."""

from __future__ import annotations

from pathlib import Path

import pytest

from headrace.errors import SourceError
from headrace.run.merge import materialized
from headrace.source.postgres.batcher import Batcher
from headrace.source.postgres.protocol import MSG_STREAM_ABORT, MSG_STREAM_START
from tests.conftest import PgDatabase
from tests.source.pgoutput_slot import LogicalSlot, acct_slot, op_kinds, rows_of


@pytest.fixture
def slot(pg_db: PgDatabase) -> LogicalSlot:
    return acct_slot(pg_db)


def test_batch_in_pieces_equals_the_batch_decoded_at_once(slot: LogicalSlot) -> None:
    """A huge transaction comes in pieces: together exactly the batch decoded at once
    (sequence numbers, values, schema versions), each piece at most the piece size."""
    db = slot.db
    db.execute("INSERT INTO acct VALUES (100000, 'small', 2, NULL, false)")
    with db.connect(autocommit=False) as big:
        big.execute(
            "INSERT INTO acct SELECT g, 'big', 1, NULL, true FROM generate_series(1, 2000) g"
        )
        big.execute("UPDATE acct SET balance = balance + 1 WHERE id % 3 = 0")
        big.execute("DELETE FROM acct WHERE id % 7 = 0")
        big.execute("TRUNCATE acct")
        big.execute("ALTER TABLE acct ADD COLUMN note text")
        big.execute("INSERT INTO acct (id, owner, note) VALUES (5000, 'late', 'x')")
        big.commit()
    db.execute("INSERT INTO acct (id, owner) VALUES (5001, 'after')")
    changes = slot.changes(work_mem="64kB")
    assert MSG_STREAM_START in op_kinds(changes)
    whole = slot.batch_from(changes)
    batcher = Batcher(slot.registry(), piece_changes=7)
    for lsn, payload in changes:
        batcher.feed(lsn, payload)
    pieced = batcher.take()
    assert pieced is not None
    assert not whole.in_pieces
    assert pieced.in_pieces
    assert pieced.num_changes == whole.num_changes == 1 + 2000 + 666 + 285 + 1 + 1 + 1
    assert sum(t.num_rows for t in pieced.tables) == 7
    pieces = list(pieced.pieces())
    assert len(pieces) == -(-whole.num_changes // 7)
    assert all(sum(t.num_rows for t in piece) <= 7 for piece in pieces)
    assert sum(n for _, n in pieced.rest_commits) == pieced.rest_changes
    assert materialized(pieced).tables == whole.tables
    assert list(pieced.pieces()) == pieces  # each reading decodes again, the same
    assert (pieced.position, pieced.transactions) == (whole.position, whole.transactions)
    versions = [{t.schema.version for t in piece} for piece in pieces]
    assert versions[0] == {1}
    assert versions[-1] == {2}


def _feed_spilling(
    batcher: Batcher, changes: list[tuple[int, bytes]], every: int = 50
) -> tuple[int, int]:
    """Feed ``changes``, calling ``spill_large`` every ``every`` messages as the source
    does after each read: (rows moved to disk, most rows held in memory before a call)."""
    moved = held = 0
    for number, (lsn, payload) in enumerate(changes):
        batcher.feed(lsn, payload)
        if number % every == 0:
            held = max(held, batcher.receiving_in_memory)
            moved += batcher.spill_large()
    return moved, held


def test_large_transactions_wait_on_disk_until_they_commit(slot: LogicalSlot) -> None:
    """Row messages of a transaction holding more than a piece in memory go to a spill
    file while it arrives; what comes out is the same batch, an aborted subtransaction's
    rows still dropped, and the spill file goes with the batch."""
    db = slot.db
    with db.connect(autocommit=False) as big:
        big.execute(
            "INSERT INTO acct SELECT g, 'big ' || g, 1, NULL, true FROM generate_series(1, 1500) g"
        )
        big.execute("SAVEPOINT s")
        big.execute(
            "INSERT INTO acct SELECT g, 'gone', 1, NULL, true FROM generate_series(1501, 2500) g"
        )
        big.execute("ROLLBACK TO SAVEPOINT s")
        big.execute("UPDATE acct SET balance = 2 WHERE id % 2 = 0")
        db.execute("INSERT INTO acct VALUES (100000, 'small', 2, NULL, false)")
        big.commit()
    changes = slot.changes(work_mem="64kB")
    assert MSG_STREAM_ABORT in op_kinds(changes)
    whole = slot.batch_from(changes)
    batcher = Batcher(slot.registry(), piece_changes=100)
    moved, held = _feed_spilling(batcher, changes)
    assert moved > 2000
    assert held <= 100 + 50
    pieced = batcher.take()
    assert pieced is not None
    assert pieced.num_changes == whole.num_changes == 1 + 1500 + 750
    assert materialized(pieced).tables == whole.tables
    assert list(pieced.pieces()) == list(pieced.pieces())
    rows = rows_of(materialized(pieced), "acct")
    assert "gone" not in {r["owner"] for r in rows}


def test_a_large_transaction_sent_again_is_not_kept(slot: LogicalSlot) -> None:
    """After a restart the slot may send again a transaction the store already has:
    below skip_before, its rows are dropped as they arrive, not buffered or spilled."""
    slot.db.execute("INSERT INTO acct SELECT g, 'x', 1, NULL, true FROM generate_series(1, 1500) g")
    changes = slot.changes(streaming=False)
    batcher = Batcher(slot.registry(), piece_changes=100)
    batcher.skip_before(changes[-1][0] + 1)
    moved, held = _feed_spilling(batcher, changes)
    assert moved == 0
    assert 0 < held <= 50
    batch = batcher.take()
    assert batch is None or batch.is_empty


def test_spill_directory_that_cannot_be_written_says_so(slot: LogicalSlot, tmp_path: Path) -> None:
    slot.db.execute("INSERT INTO acct SELECT g, 'x', 1, NULL, true FROM generate_series(1, 300) g")
    batcher = Batcher(slot.registry(), piece_changes=10, spill_dir=tmp_path / "missing")
    changes = slot.changes(work_mem="64kB")

    def feed_all() -> None:
        for lsn, payload in changes:
            batcher.feed(lsn, payload)
            batcher.spill_large()

    with pytest.raises(SourceError, match="cannot buffer a large transaction") as caught:
        feed_all()
    assert "missing" in str(caught.value)
    assert "nothing is lost" in caught.value.fix

"""A batch in pieces (a huge transaction) through the engine: one store transaction, the
progress the status shows, and the same store as the batch applied at once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from headrace.engine.results import PiecesProgress
from headrace.source.postgres.batcher import Batcher
from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness
from tests.engine.test_new_keys import SCHEMA, YAML  # the same ev table and rollup


@pytest.fixture
def h(pg_db: PgDatabase, tmp_path: Path) -> Iterator[Harness]:
    pg_db.execute(SCHEMA)
    harness = make_harness(pg_db, tmp_path, YAML)
    harness.batcher = Batcher(harness.slot.registry(), piece_changes=4)
    yield harness
    harness.close()


def test_progress_while_pieces_apply_and_one_version_for_the_batch(h: Harness) -> None:
    seen: list[PiecesProgress | None] = []
    h.engine.after_piece = lambda: seen.append(h.engine.applying)
    h.transaction(
        "UPDATE ev SET amount = amount * 10, kind = 'c' WHERE id <= 6",
        "DELETE FROM ev WHERE id > 17",
        "INSERT INTO ev SELECT i, 'd', i, '2024-01-02'::timestamptz FROM generate_series(30, 33) i",
    )
    versions_before = h.store.version
    applied = h.sync()
    assert len(applied) == 1
    assert applied[0].changes == 6 + 33 + 4
    assert [p.applied if p else None for p in seen] == [*range(4, 43, 4), 43]
    assert [p.pieces if p else None for p in seen] == list(range(1, 12))
    assert {p.changes for p in seen if p} == {43}
    assert h.engine.applying is None
    assert h.store.version == versions_before + 1  # readers saw one new version
    h.assert_mirror("ev", ["id", "kind", "amount", "ts"])
    h.assert_rollup("ev_sum")
    ordinals = h.duck("SELECT _hr_seq FROM history.ev WHERE _hr_op <> 'S' ORDER BY _hr_seq")
    assert [row[0] for row in ordinals] == list(range(43))


def test_a_large_batch_runs_duckdb_on_every_core(pg_db: PgDatabase, tmp_path: Path) -> None:
    pg_db.execute(SCHEMA)
    yaml = YAML + "store:\n  streaming_threads: 1\n  parallel_batch_changes: 10\n"
    harness = make_harness(pg_db, tmp_path, yaml)
    try:

        def threads() -> int:
            value = harness.duck("SELECT current_setting('threads')")[0][0]
            assert isinstance(value, int)
            return value

        harness.execute("UPDATE ev SET amount = amount + 1 WHERE id <= 3")
        harness.sync()
        assert threads() == 1
        harness.execute("UPDATE ev SET amount = amount + 1 WHERE id <= 12")  # 12 changes
        harness.sync()
        assert threads() == (os.cpu_count() or 1)
        harness.execute("UPDATE ev SET amount = amount + 1 WHERE id <= 2")
        harness.sync()
        assert threads() == 1
        harness.assert_mirror("ev", ["id", "kind", "amount", "ts"])
    finally:
        harness.close()

"""``bench cdc-fintech``'s decoding timer cuts batches as asked and counts every change."""

from __future__ import annotations

import pytest

from headrace.bench.cdc_fintech import time_decoding
from headrace.errors import HeadraceError
from tests.conftest import PgDatabase
from tests.source.pgoutput_slot import LogicalSlot


def test_batches_cut_per_commit_or_per_size(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int8 PRIMARY KEY, note text, amount numeric(18,2))")
    pg_db.execute("CREATE TABLE u (id int8 PRIMARY KEY, at timestamptz)")
    slot = LogicalSlot(pg_db).create()
    for step in range(6):
        pg_db.execute(
            f"INSERT INTO t SELECT g, 'n' || g, g / 4.0 FROM generate_series({step * 5}, "
            f"{step * 5 + 4}) AS g; INSERT INTO u VALUES ({step}, now())"
        )
    messages = slot.changes()

    per_commit = time_decoding(messages, commits_per_batch=1, repeat=1)
    assert (per_commit.changes, per_commit.batches) == (36, 6)
    assert per_commit.cpu_s > 0
    assert per_commit.us_per_change == pytest.approx(1e6 * per_commit.cpu_s / 36, rel=0.01)

    two = time_decoding(messages, commits_per_batch=2, repeat=2)
    assert (two.changes, two.batches) == (36, 3)

    by_size = time_decoding(messages, max_changes=13, repeat=1)
    assert (by_size.changes, by_size.batches) == (36, 2)  # 18 + 18: cut once past 13

    with pytest.raises(HeadraceError, match="no batch size"):
        time_decoding(messages, repeat=1)

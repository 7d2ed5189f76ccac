"""Insert-only batches under a key the source keeps unique start from no mirror rows,
without reading the mirror; any other batch still looks its keys up.

An append-only table (ledger entries, logins, events) is often the largest one, and
scanning its mirror for keys that cannot be there cost a full scan per batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from headrace.engine.batch_changes import load_changes, transaction_starts
from headrace.source.changes import ChangeBatch
from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness

YAML = """
source:
  dsn: "DSN"
  tables:
    ev: {event_time: ts, history: true}
    visit: {primary_key: [shop]}
rollups:
  - name: ev_sum
    table: ev
    grain: 5m
    dimensions: [kind]
    measures:
      - {name: n, fn: count}
      - {name: total, fn: sum, column: amount}
      - {name: top, fn: max, column: amount}
"""

SCHEMA = """
CREATE TABLE ev (id bigint PRIMARY KEY, kind text, amount int, ts timestamptz);
CREATE TABLE visit (id int PRIMARY KEY, shop text);
INSERT INTO ev SELECT i, (ARRAY['a','b'])[1 + i % 2], i, '2024-01-01'::timestamptz
  + i * interval '1 minute' FROM generate_series(1, 50) i;
INSERT INTO visit VALUES (1, 'north');
"""


@pytest.fixture
def h(pg_db: PgDatabase, tmp_path: Path) -> Iterator[Harness]:
    pg_db.execute(SCHEMA)
    harness = make_harness(pg_db, tmp_path, YAML)
    yield harness
    harness.close()


def _only_new_keys(h: Harness, batch: ChangeBatch) -> dict[str, bool]:
    """``TableWork.only_new_keys`` of each table of ``batch``, from the real loader."""
    con = duckdb.connect()
    try:
        transactions = transaction_starts([t.data for t in batch.tables])
        out = {}
        for index, changes in enumerate(batch.tables):
            model = h.engine.registry.tables[changes.schema.table]
            work = load_changes(
                con, model, changes.schema, changes.data, index, transactions=transactions
            )
            out[changes.schema.table.name] = work.only_new_keys
        return out
    finally:
        con.close()


def _assert_equal(h: Harness) -> None:
    h.assert_mirror("ev", ["id", "kind", "amount", "ts"])
    h.assert_rollup("ev_sum")


def test_insert_only_batches_skip_the_lookup_and_stay_exact(h: Harness) -> None:
    h.transaction("INSERT INTO ev VALUES (51, 'a', 500, '2024-01-01 00:01+00')")
    h.transaction("INSERT INTO ev VALUES (52, 'b', 7, '2024-01-01 00:02+00')")
    (batch,) = h.batches()
    assert _only_new_keys(h, batch) == {"ev": True}
    h.applied.append(h.engine.apply(batch))
    _assert_equal(h)
    # The history of an insert-only batch is its inserts.
    assert h.duck("SELECT count(*) FROM history.ev WHERE id IN (51, 52)") == [(2,)]

    # An update, a delete or a re-insert after a delete in the batch: keys are looked up.
    h.transaction("UPDATE ev SET amount = 1 WHERE id = 51")
    h.transaction("DELETE FROM ev WHERE id = 52", "INSERT INTO ev VALUES (52, 'a', 3, NULL)")
    h.transaction("INSERT INTO ev VALUES (53, 'b', 900, '2024-01-01 00:03+00')")
    (batch,) = h.batches()
    assert _only_new_keys(h, batch) == {"ev": False}
    h.applied.append(h.engine.apply(batch))
    _assert_equal(h)

    # Insert-only again after those: still exact (the retracted maximum included).
    h.transaction("INSERT INTO ev VALUES (54, 'a', 2, '2024-01-01 00:01+00')")
    h.sync()
    _assert_equal(h)


def test_a_configured_key_the_source_does_not_keep_unique_is_looked_up(h: Harness) -> None:
    """``visit`` is keyed by ``shop`` in the pipeline, but only ``id`` is unique in
    PostgreSQL: an insert may reuse a shop, whose mirror row it then replaces."""
    h.transaction("INSERT INTO visit VALUES (2, 'north')", "INSERT INTO visit VALUES (3, 'south')")
    (batch,) = h.batches()
    assert _only_new_keys(h, batch) == {"visit": False}
    h.applied.append(h.engine.apply(batch))
    assert sorted(h.duck("SELECT shop, id FROM mirror.visit")) == [("north", 2), ("south", 3)]


def test_replica_identity_full_is_looked_up(h: Harness) -> None:
    """REPLICA IDENTITY FULL flags every column as key, which promises no uniqueness."""
    h.execute("ALTER TABLE ev REPLICA IDENTITY FULL")
    h.transaction("INSERT INTO ev VALUES (60, 'a', 1, '2024-01-01 00:01+00')")
    (batch,) = h.batches()
    assert _only_new_keys(h, batch) == {"ev": False}
    h.applied.append(h.engine.apply(batch))
    _assert_equal(h)

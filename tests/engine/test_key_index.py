"""``store.mirror_key_index``: an integer-keyed mirror's rows found through an index.

The rows a batch updates and deletes are taken through the index (a ``DELETE … WHERE key
IN (…)``) instead of a scan; the mirror and the rollups must stay exact, also across a
type change of the key itself (DuckDB refuses ``ALTER COLUMN … TYPE`` on an indexed
table, even in the transaction that dropped the index: it is dropped in a transaction of
its own before the batch, and built again between batches), and turning the option off
drops the index at the next start. ``auto`` (the default) indexes a large mirror after
its snapshot and keeps the index only while most of the table's batches can use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from headrace.engine import key_index
from headrace.engine.key_index import MAX_KEYS, indexable, keys_in_list, max_keys
from headrace.source.changes import TableRef
from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness

YAML = """
source:
  dsn: "DSN"
  tables:
    t:
      event_time: ts
    pair: {}
store:
  mirror_key_index: true
rollups:
  - name: by_grp
    table: t
    grain: 1h
    dimensions: [grp]
    measures:
      - {name: n, fn: count}
      - {name: total, fn: sum, column: v}
      - {name: lo, fn: min, column: v}
      - {name: hi, fn: max, column: v}
"""


@pytest.fixture
def h(pg_db: PgDatabase, tmp_path: Path) -> Iterator[Harness]:
    pg_db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, grp text, v int, ts timestamptz);"
        "CREATE TABLE pair (a int, b text, v int, PRIMARY KEY (a, b));"
        "INSERT INTO t SELECT g, 'g' || (g % 3), g,"
        " '2024-01-01'::timestamptz + g * interval '7 min' FROM generate_series(1, 200) g;"
        "INSERT INTO pair VALUES (1, 'x', 1), (2, 'y', 2);"
    )
    harness = make_harness(pg_db, tmp_path, YAML)
    yield harness
    harness.close()


@pytest.fixture(autouse=True)
def every_key_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key through the index as cheap as a row scanned, so that these small tables'
    batches take the index path (:data:`~headrace.engine.key_index.ROWS_PER_KEY`)."""
    monkeypatch.setattr(key_index, "ROWS_PER_KEY", 1)


def indexes(h: Harness) -> list[str]:
    return sorted(str(r[0]) for r in h.duck("SELECT index_name FROM duckdb_indexes()"))


def test_updates_and_deletes_through_the_index_stay_exact(h: Harness) -> None:
    # Only the single integer key is indexed; the compound key scans as before.
    assert indexes(h) == ["t__hr_key"]
    model = h.engine.registry.tables[TableRef.parse("t")]
    assert model.key_index
    assert indexable(model)
    assert not h.engine.registry.tables[TableRef.parse("pair")].key_index
    h.execute(
        "UPDATE t SET v = v * 10, grp = 'moved' WHERE id % 7 = 0",
        "DELETE FROM t WHERE id % 11 = 0",
        "UPDATE t SET id = id + 1000 WHERE id = 5",  # the key itself moves
        "INSERT INTO t VALUES (5, 'g1', 5, '2024-01-01 03:00+00')",
        "UPDATE pair SET v = 3 WHERE a = 1",
        "DELETE FROM pair WHERE a = 2",
    )
    h.sync()
    h.assert_mirror("t", ["id", "grp", "v", "ts"])
    h.assert_mirror("pair", ["a", "b", "v"])
    h.assert_rollup("by_grp")
    h.assert_reserves("by_grp")


def test_a_type_change_of_the_key_drops_the_index_until_the_next_review(h: Harness) -> None:
    h.execute(
        "ALTER TABLE t ALTER COLUMN id TYPE bigint",
        "ALTER TABLE t ALTER COLUMN v TYPE bigint",
        "INSERT INTO t VALUES (5000000000, 'g0', 5000000000, '2024-01-01 01:00+00')",
        "UPDATE t SET v = v + 1 WHERE id IN (1, 2, 5000000000)",
        "DELETE FROM t WHERE id = 3",
    )
    h.sync()
    assert indexes(h) == []
    h.assert_mirror("t", ["id", "grp", "v", "ts"])
    types = {
        str(name): str(kind)
        for name, kind in h.duck(
            "SELECT column_name, data_type FROM duckdb_columns() "
            "WHERE schema_name = 'mirror' AND table_name = 't'"
        )
    }
    assert types["id"] == "BIGINT"
    h.engine.maintain()  # between batches: built again on the altered table
    assert indexes(h) == ["t__hr_key"]  # a BIGINT key qualifies too
    assert h.engine.registry.tables[TableRef.parse("t")].key_index
    h.execute("UPDATE t SET grp = 'after' WHERE id IN (4, 5000000000)")
    h.sync()
    h.assert_mirror("t", ["id", "grp", "v", "ts"])
    h.assert_rollup("by_grp")


def test_turned_off_the_index_is_dropped_at_the_next_start(h: Harness) -> None:
    h.config = h.config.model_copy(
        update={"store": h.config.store.model_copy(update={"mirror_key_index": False})}
    )
    h.reopen()
    assert indexes(h) == []
    h.execute("UPDATE t SET v = -v WHERE id < 20", "DELETE FROM t WHERE id BETWEEN 20 AND 25")
    h.sync()
    h.assert_mirror("t", ["id", "grp", "v", "ts"])
    h.assert_rollup("by_grp")


def test_only_as_many_keys_as_the_mirrors_size_pays_for_go_through_the_index(
    h: Harness,
) -> None:
    model = h.engine.registry.tables[TableRef.parse("t")]
    assert model.key_index_keys == 200  # one key a row here (ROWS_PER_KEY patched)
    assert keys_in_list(model, pa.array([3, 1, None])) == '"id" IN (3, 1)'
    assert keys_in_list(model, pa.array(range(200))) is not None
    assert keys_in_list(model, pa.array(range(201))) is None  # a scan is cheaper
    assert keys_in_list(model, pa.array([], pa.int64())) is None
    assert keys_in_list(model, pa.array(["1"])) is None  # never a literal that is not an integer


LOOKUP_YAML = """
source:
  dsn: "DSN"
  tables:
    acct: {}
    tx:
      event_time: ts
store:
  mirror_key_index: true
rollups:
  - name: by_level
    table: tx
    grain: 1h
    dimensions:
      - name: level
        lookup: {table: acct, on: acct_id, column: level}
    measures:
      - {name: n, fn: count}
"""


def test_a_looked_up_column_changing_type_drops_the_fact_tables_index(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    # The fact's mirror holds a copy of acct.level: its type follows, on an indexed table.
    pg_db.execute(
        "CREATE TABLE acct (id int PRIMARY KEY, level int);"
        "CREATE TABLE tx (id int PRIMARY KEY, acct_id int, ts timestamptz);"
        "INSERT INTO acct VALUES (1, 1), (2, 2);"
        "INSERT INTO tx SELECT g, 1 + g % 2, '2024-01-01'::timestamptz"
        " FROM generate_series(1, 50) g;"
    )
    h = make_harness(pg_db, tmp_path, LOOKUP_YAML)
    try:
        assert indexes(h) == ["acct__hr_key", "tx__hr_key"]
        h.execute(
            "ALTER TABLE acct ALTER COLUMN level TYPE bigint",
            "INSERT INTO acct VALUES (3, 5000000000)",
            "INSERT INTO tx VALUES (100, 3, '2024-01-01 00:30+00')",
            "UPDATE tx SET acct_id = 2 WHERE id < 5",
            "DELETE FROM tx WHERE id BETWEEN 10 AND 12",
        )
        h.sync()
        assert indexes(h) == []
        h.assert_mirror("tx", ["id", "acct_id", "ts"])
        # The accounts' levels never changed: the current join is the reference.
        joined = "(SELECT tx.*, acct.level FROM tx JOIN acct ON acct.id = tx.acct_id) AS tx"
        h.assert_rollup("by_level", joined, {"level": "level"})
    finally:
        h.close()


AUTO_YAML = YAML.replace("    pair: {}\n", "").replace(
    "mirror_key_index: true",
    "mirror_key_index_rows: ROWS",  # auto, the default
)


def auto_harness(pg_db: PgDatabase, tmp_path: Path, min_rows: int) -> Harness:
    pg_db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, grp text, v int, ts timestamptz);"
        "INSERT INTO t SELECT g, 'g' || (g % 3), g,"
        " '2024-01-01'::timestamptz + g * interval '7 min' FROM generate_series(1, 200) g;"
    )
    h = make_harness(pg_db, tmp_path, AUTO_YAML.replace("ROWS", str(min_rows)))
    h.engine.registry.key_indexes.review_s = 0.0  # judge at every maintain
    return h


def batches_of(h: Harness, count: int, statement: str) -> None:
    """``count`` batches of one transaction each, ``{i}`` in ``statement`` numbering them."""
    for i in range(count):
        h.execute(statement.format(i=i))
        h.sync()


def test_auto_indexes_a_large_mirror_while_its_batches_can_use_it(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    h = auto_harness(pg_db, tmp_path, min_rows=100)
    try:
        assert h.engine.config.store.mirror_key_index == "auto"  # the default
        assert indexes(h) == ["t__hr_key"]  # 200 rows loaded >= 100: built after the snapshot
        # ... and checkpointed at once: DuckDB logs a new index whole in its WAL.
        assert h.engine.store.checkpoints.count == 1
        assert h.engine.store.wal_bytes() < 100_000
        assert [(t.table_name, t.key_indexed) for t in h.engine.store.table_status()] == [
            ("public.t", True)  # what `headrace status` shows
        ]
        # Inserts of new keys never read the mirror: the index only costs them.
        batches_of(h, 10, "INSERT INTO t VALUES (1000 + {i}, 'g1', {i}, '2024-01-01 02:00+00')")
        h.engine.maintain()
        assert indexes(h) == []
        assert not h.engine.store.table_status()[0].key_indexed
        # Updates of a few old rows: the index serves them, so it comes back.
        batches_of(h, 10, "UPDATE t SET v = v + 1, grp = 'moved' WHERE id IN ({i} + 1, {i} + 50)")
        h.engine.maintain()
        assert indexes(h) == ["t__hr_key"]
        batches_of(h, 3, "DELETE FROM t WHERE id = {i} + 100")
        h.engine.maintain()  # too few batches counted to judge: unchanged
        assert indexes(h) == ["t__hr_key"]
        h.assert_mirror("t", ["id", "grp", "v", "ts"])
        h.assert_rollup("by_grp")
        h.reopen()  # kept across a restart
        assert indexes(h) == ["t__hr_key"]
        assert h.engine.registry.tables[TableRef.parse("t")].key_index
    finally:
        h.close()


def test_auto_leaves_a_small_mirror_unindexed(pg_db: PgDatabase, tmp_path: Path) -> None:
    h = auto_harness(pg_db, tmp_path, min_rows=1000)
    try:
        assert indexes(h) == []
        batches_of(h, 10, "UPDATE t SET v = -v WHERE id = {i} + 1")
        h.engine.maintain()
        assert indexes(h) == []  # batches that could use it, but 200 rows < 1,000
        h.assert_mirror("t", ["id", "grp", "v", "ts"])
    finally:
        h.close()


def test_the_keys_an_index_serves_grow_with_the_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the measured constant, not the fixture's
    assert max_keys(1_000) == 0
    assert max_keys(2_000_000) == 800  # measured break-even ~770 keys
    assert max_keys(5_000_000) == 2_000  # measured ~1,900
    assert max_keys(100_000_000) == MAX_KEYS

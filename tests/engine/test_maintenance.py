"""Incremental maintenance cases, each against real pgoutput and checked against PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness

YAML = """
source:
  dsn: "DSN"
  tables:
    t:
      event_time: ts
      history: true
rollups:
  - name: r
    table: t
    grain: 1h
    coarser: [1d]
    dimensions: [grp]
    measures:
      - {name: n, fn: count}
      - {name: lo, fn: min, column: v}
      - {name: hi, fn: max, column: v}
      - {name: hi_even, fn: max, column: v, where: "v % 2 = 0"}
      - {name: total, fn: sum, column: v}
      - {name: kinds, fn: count_distinct, column: kind}
      - {name: kinds_approx, fn: approx_count_distinct, column: kind}
      - {name: doc_chars, fn: sum, expr: "length(doc)"}
"""

COLUMNS = ["id", "grp", "v", "kind", "ts", "doc"]
BIG = "(SELECT string_agg(md5(i::text || '{seed}'), '') FROM generate_series(1, 80) i)"


@pytest.fixture
def h(pg_db: PgDatabase, tmp_path: Path) -> Iterator[Harness]:
    pg_db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, grp text, v int, kind text, ts timestamptz, doc text);"
        "ALTER TABLE t ALTER COLUMN doc SET STORAGE EXTERNAL;"
    )
    harness = make_harness(pg_db, tmp_path, YAML)
    yield harness
    harness.close()


def check(h: Harness) -> None:
    h.assert_mirror("t", COLUMNS)
    h.assert_rollup("r")


def big(seed: int) -> str:
    return BIG.format(seed=seed)


def test_toast_filled_from_the_mirror_and_within_a_batch(h: Harness) -> None:
    h.execute(f"INSERT INTO t VALUES (1, 'a', 1, 'x', '2024-01-01 00:00+00', {big(1)})")
    h.sync()
    # Unchanged TOAST value: PostgreSQL does not send it; the mirror has it.
    h.execute("UPDATE t SET v = 2 WHERE id = 1")
    batch = h.batches()[0]
    toasted = batch.tables[0].data.column("_hr_toast").to_pylist()
    assert toasted == [["doc"]]
    h.applied.append(h.engine.apply(batch))
    check(h)
    # A chain inside one batch, through a key move, ending at the mirror.
    h.transaction(
        "UPDATE t SET v = 3 WHERE id = 1",
        "UPDATE t SET id = 7 WHERE id = 1",
        "UPDATE t SET grp = 'b' WHERE id = 7",
    )
    h.execute(
        f"INSERT INTO t VALUES (2, 'a', 5, 'y', '2024-01-01 00:30+00', {big(2)})",
        "UPDATE t SET v = 6 WHERE id = 2",
        "UPDATE t SET id = 3 WHERE id = 2",
    )
    h.sync()
    check(h)
    rows = h.duck("SELECT _hr_op, id, length(doc) FROM history.t ORDER BY _hr_lsn, _hr_seq")
    assert all(length == 2560 for _, _, length in rows), rows
    h.execute("DELETE FROM t WHERE id = 3")
    h.sync()
    deleted = h.duck("SELECT id, length(doc) FROM history.t WHERE _hr_op = 'D'")
    assert deleted == [(3, 2560)]
    check(h)


def test_min_max_stay_exact_under_retraction(h: Harness) -> None:
    h.execute(
        "INSERT INTO t VALUES (1, 'a', 10, 'x', '2024-01-01 00:00+00', NULL),"
        " (2, 'a', 20, 'x', '2024-01-01 00:10+00', NULL),"
        " (3, 'a', 30, 'y', '2024-01-01 00:20+00', NULL)"
    )
    h.sync()
    check(h)
    for statements in (
        ["DELETE FROM t WHERE id = 3"],  # the max leaves: 20
        ["UPDATE t SET v = 5 WHERE id = 2"],  # max back to 10, min to 5
        ["UPDATE t SET ts = '2024-01-01 05:00+00' WHERE id = 1"],  # the max moves bucket
        ["UPDATE t SET v = 5 WHERE id = 1", "UPDATE t SET v = 50 WHERE id = 2"],
        ["UPDATE t SET v = NULL WHERE id = 2"],  # only NULLs left in a bucket
        ["DELETE FROM t"],
    ):
        h.execute(*statements)
        h.sync()
        check(h)
    assert h.duck("SELECT count(*) FROM rollup.r__state")[0][0] == 0


def test_count_distinct_under_deletes(h: Harness) -> None:
    h.execute(
        "INSERT INTO t SELECT i, 'a', i, CASE WHEN i <= 2 THEN 'x' ELSE 'y' END,"
        " '2024-01-01 00:00+00', NULL FROM generate_series(1, 3) i"
    )
    h.sync()
    assert h.duck("SELECT kinds, kinds_approx FROM rollup.r_1h") == [(2, 2)]
    h.execute("DELETE FROM t WHERE id = 1")  # one 'x' left
    h.sync()
    assert h.duck("SELECT kinds, kinds_approx FROM rollup.r_1h") == [(2, 2)]
    h.execute("DELETE FROM t WHERE id = 2")  # no 'x' left
    h.sync()
    assert h.duck("SELECT kinds, kinds_approx FROM rollup.r_1h") == [(1, 1)]
    h.engine.compact_rollups(force=True)  # the side table's appended deltas folded
    assert h.duck("SELECT _hr_value, _hr_n FROM rollup.r__distinct_5") == [("y", 1)]
    assert h.duck("SELECT kinds, kinds_approx FROM rollup.r_1h") == [(1, 1)]
    h.execute("UPDATE t SET kind = NULL WHERE id = 3")
    h.sync()
    assert h.duck("SELECT kinds, kinds_approx FROM rollup.r_1h") == [(0, 0)]
    check(h)


def test_several_changes_of_one_key_in_one_batch(h: Harness) -> None:
    h.execute("INSERT INTO t VALUES (1, 'a', 1, 'x', '2024-01-01 00:00+00', 'one')")
    h.sync()
    h.transaction(
        "INSERT INTO t VALUES (2, 'a', 2, 'x', '2024-01-01 00:00+00', 'two')",
        "UPDATE t SET v = 20 WHERE id = 2",
        "DELETE FROM t WHERE id = 2",  # insert -> update -> delete: nothing
        "UPDATE t SET id = 3 WHERE id = 1",  # key moves 1 -> 3 -> 4
        "UPDATE t SET id = 4, grp = 'b' WHERE id = 3",
        "INSERT INTO t VALUES (1, 'c', 100, 'z', '2024-01-02 00:00+00', 'new one')",  # key reused
    )
    h.transaction(  # swap keys 1 and 4 through 9
        "UPDATE t SET id = 9 WHERE id = 1",
        "UPDATE t SET id = 1 WHERE id = 4",
        "UPDATE t SET id = 4 WHERE id = 9",
    )
    batches = h.batches()
    assert len(batches) == 1
    h.engine.apply(batches[0])
    check(h)
    assert h.duck("SELECT id, grp FROM mirror.t ORDER BY id") == [(1, "b"), (4, "c")]


def test_truncate_in_batch_order(h: Harness) -> None:
    h.execute("INSERT INTO t VALUES (1, 'a', 1, 'x', '2024-01-01 00:00+00', 'before')")
    h.sync()
    h.execute(
        "INSERT INTO t VALUES (2, 'a', 2, 'x', '2024-01-01 00:00+00', 'wiped')",
        "UPDATE t SET v = 10 WHERE id = 1",
        "TRUNCATE t",
        "INSERT INTO t VALUES (2, 'b', 3, 'y', '2024-01-01 01:00+00', 'survives')",
        "UPDATE t SET v = 4 WHERE id = 2",
    )
    batches = h.batches()
    assert len(batches) == 1
    h.engine.apply(batches[0])
    check(h)
    assert h.duck("SELECT id, v, doc FROM mirror.t") == [(2, 4, "survives")]
    ops = [r[0] for r in h.duck("SELECT _hr_op FROM history.t ORDER BY _hr_lsn, _hr_seq")]
    assert ops == ["I", "I", "U", "T", "I", "U"]
    assert h.duck("SELECT rows FROM headrace.tables WHERE table_name = 'public.t'") == [(1,)]


def test_replica_identity_full(h: Harness) -> None:
    h.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    h.execute(
        f"INSERT INTO t VALUES (1, 'a', 1, 'x', '2024-01-01 00:00+00', {big(3)})",
        "UPDATE t SET v = 2 WHERE id = 1",
        "UPDATE t SET id = 2 WHERE id = 1",
        "DELETE FROM t WHERE id = 2",
        "INSERT INTO t VALUES (3, 'a', 1, 'x', '2024-01-01 00:00+00', 'x')",
    )
    h.sync()
    check(h)


HISTORY_ONLY = """
source:
  dsn: "DSN"
  tables:
    log: {mirror: false, history: true}
"""


def test_history_without_a_mirror(pg_db: PgDatabase, tmp_path: Path) -> None:
    pg_db.execute(
        "CREATE TABLE log (id int PRIMARY KEY, msg text, doc text);"
        "ALTER TABLE log ALTER COLUMN doc SET STORAGE EXTERNAL;"
        "ALTER TABLE log REPLICA IDENTITY FULL;"
    )
    h = make_harness(pg_db, tmp_path, HISTORY_ONLY)
    try:
        h.execute(
            f"INSERT INTO log VALUES (1, 'a', {big(4)})",
            "UPDATE log SET msg = 'b' WHERE id = 1",  # doc unchanged: from the old row (FULL)
            "DELETE FROM log WHERE id = 1",
        )
        h.sync()
        rows = h.duck("SELECT _hr_op, id, msg, length(doc) FROM history.log ORDER BY _hr_lsn")
        assert rows == [("I", 1, "a", 2560), ("U", 1, "b", 2560), ("D", 1, "b", 2560)]
        assert h.duck("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'mirror'") == [(0,)]
    finally:
        h.close()


LINEAR_YAML = """
source:
  dsn: "DSN"
  tables:
    t: {event_time: ts}
rollups:
  - name: lin
    table: t
    grain: 1h
    coarser: [1d]
    dimensions: [grp]
    measures:
      - {name: n, fn: count}
      - {name: total, fn: sum, column: v}
      - {name: mean, fn: avg, column: v}
      - {name: evens, fn: count, where: "v % 2 = 0"}
      - {name: kinds, fn: count_distinct, column: kind}
      - {name: kinds_approx, fn: approx_count_distinct, column: kind}
"""


def test_appended_deltas_compact_to_the_same_values(pg_db: PgDatabase, tmp_path: Path) -> None:
    """Linear rollups append a delta per batch; compaction folds them, values unchanged."""
    pg_db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, grp text, v int, kind text, ts timestamptz, doc text)"
    )
    h = make_harness(pg_db, tmp_path, LINEAR_YAML)
    try:
        for step in range(4):
            h.execute(
                f"INSERT INTO t SELECT i, 'g' || (i % 3), i, 'k' || (i % 5),"
                f" '2024-01-01 00:00+00'::timestamptz + (i % 7) * interval '50 minutes', NULL"
                f" FROM generate_series({step * 20 + 1}, {step * 20 + 20}) i",
                f"UPDATE t SET v = v + 1, grp = 'g9' WHERE id % 4 = {step}",
                f"DELETE FROM t WHERE id % 9 = {step}",
            )
            h.sync()
            h.assert_rollup("lin")
        before = h.duck("SELECT count(*) FROM rollup.lin__state")[0][0]
        assert h.engine.compact_rollups(force=True) == ["lin"]
        h.assert_rollup("lin")
        groups = h.duck(
            "SELECT count(*) FROM (SELECT DISTINCT bucket, _hr_d0 FROM rollup.lin__state)"
        )
        after = h.duck("SELECT count(*), min(_hr_rows) FROM rollup.lin__state")[0]
        assert isinstance(before, int)
        assert after[0] == groups[0][0]  # one row per group, none empty
        count = groups[0][0]
        assert isinstance(count, int)
        assert count < before
        assert isinstance(after[1], int)
        assert after[1] > 0
        duplicates = h.duck(
            "SELECT bucket, _hr_d0, _hr_value, count(*) FROM rollup.lin__distinct_4"
            " GROUP BY ALL HAVING count(*) > 1"
        )
        assert duplicates == []
        h.execute("DELETE FROM t")
        h.sync()
        h.engine.compact_rollups(force=True)
        assert h.duck("SELECT count(*) FROM rollup.lin_1h") == [(0,)]
        assert h.duck("SELECT count(*) FROM rollup.lin__state") == [(0,)]
    finally:
        h.close()


def test_compaction_in_slices_keeps_every_step_exact(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A compaction cycle folds one hash slice per step; the views are exact after each."""
    pg_db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, grp text, v int, kind text, ts timestamptz, doc text)"
    )
    h = make_harness(pg_db, tmp_path, LINEAR_YAML)
    try:
        compactor = h.engine.registry.compactor
        compactor.min_rows, compactor.step_rows = 1, 7
        h.execute(
            "INSERT INTO t SELECT i, 'g' || (i % 4), i, 'k' || (i % 6),"
            " '2024-01-01 00:00+00'::timestamptz + (i % 9) * interval '40 minutes', NULL"
            " FROM generate_series(1, 60) i"
        )
        h.sync()
        for step in range(3):
            h.execute(f"UPDATE t SET v = v + 1, grp = 'g' || ((id + {step}) % 5) WHERE id % 3 = 0")
            h.sync()
        steps = 0
        while h.engine.compact_rollups(budget_s=0):
            steps += 1
            h.assert_rollup("lin")
            if steps == 1:  # changes arriving in the middle of a cycle
                assert h.engine.registry.rollups["lin"].compaction
                h.execute("DELETE FROM t WHERE id % 7 = 0")
                h.sync()
                h.assert_rollup("lin")
        assert steps > 2  # the cycle really went slice by slice
        assert h.engine.registry.rollups["lin"].compaction == []
        h.engine.compact_rollups(force=True)
        h.assert_rollup("lin")
    finally:
        h.close()

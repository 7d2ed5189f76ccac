"""Distinct counts of the same value and filter share one side table.

An approximate count distinct beside an exact one of the same value and filter reads
the exact one's table (its registers derived from the values in the view), and two
distinct counts of the same kind keep one table: each estimate must equal the one a
rollup maintaining its own HyperLogLog table gives, exactly, under inserts, updates
and deletes, at every grain.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from headrace.engine.measures import ApproxCountDistinct
from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness

MEASURES_ALONE = """
      - {name: kinds_approx, fn: approx_count_distinct, column: kind}
      - {name: big_approx, fn: approx_count_distinct, column: kind, where: "v > 50"}
"""

YAML = f"""
source:
  dsn: "DSN"
  tables:
    t:
      event_time: ts
rollups:
  - name: s
    table: t
    grain: 1h
    coarser: [1d]
    dimensions: [grp]
    measures:
      - {{name: kinds, fn: count_distinct, column: kind}}
      - {{name: kinds_approx, fn: approx_count_distinct, column: kind}}
      - {{name: big_approx, fn: approx_count_distinct, column: kind, where: "v > 50"}}
      - {{name: big_approx_again, fn: approx_count_distinct, column: kind, where: "v > 50"}}
      - {{name: kinds_again, fn: count_distinct, column: kind}}
  - name: a
    table: t
    grain: 1h
    coarser: [1d]
    dimensions: [grp]
    measures:{MEASURES_ALONE}
  - name: a__x
    table: t
    grain: 1d
    measures:
      - {{name: n, fn: count}}
"""


@pytest.fixture
def h(pg_db: PgDatabase, tmp_path: Path) -> Iterator[Harness]:
    pg_db.execute("CREATE TABLE t (id int PRIMARY KEY, grp text, v int, kind text, ts timestamptz)")
    harness = make_harness(pg_db, tmp_path, YAML)
    yield harness
    harness.close()


def rollup_tables(h: Harness) -> list[str]:
    rows = h.duck("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'rollup' ORDER BY 1")
    return [str(r[0]) for r in rows]


def assert_estimates_equal(h: Harness) -> None:
    """The shared rollup's estimates are the stand-alone rollup's, and both equal
    PostgreSQL (exact counts exactly, estimates within the harness's tolerance)."""
    for grain in ("1h", "1d"):
        shared = h.duck(
            f"SELECT bucket, grp, kinds_approx, big_approx, big_approx_again "
            f"FROM rollup.s_{grain} ORDER BY ALL"
        )
        alone = h.duck(
            f"SELECT bucket, grp, kinds_approx, big_approx, big_approx FROM rollup.a_{grain} "
            f"ORDER BY ALL"
        )
        assert shared == alone, grain
        exact = h.duck(f"SELECT kinds, kinds_again FROM rollup.s_{grain}")
        assert all(kinds == again for kinds, again in exact)
    h.assert_rollup("s")
    h.assert_rollup("a")
    # Below ~10,000 values an estimate counts registers; the registers themselves, too.
    keys = ", ".join(f"{sql} AS {name}" for name, sql in ApproxCountDistinct.register_keys("kind"))
    derived = h.duck(
        f"SELECT bucket, _hr_d0, _hr_reg, max(_hr_rank) FROM (SELECT bucket, _hr_d0, {keys} FROM "
        "(SELECT bucket, _hr_d0, _hr_value AS kind FROM rollup.s__distinct_0 GROUP BY ALL "
        "HAVING sum(_hr_n) > 0)) GROUP BY ALL ORDER BY ALL"
    )
    kept = h.duck(
        "SELECT bucket, _hr_d0, _hr_reg, max(_hr_rank) FROM (SELECT bucket, _hr_d0, _hr_reg, "
        "_hr_rank FROM rollup.a__hll_0 GROUP BY ALL HAVING sum(_hr_n) > 0) "
        "GROUP BY ALL ORDER BY ALL"
    )
    assert derived == kept


def test_approximate_counts_read_the_exact_counts_table(h: Harness) -> None:
    rng = random.Random(7)  # noqa: S311 - a reproducible workload, not secrets
    ids: list[int] = []
    next_id = 1
    for round_number in range(6):
        statements = []
        rows = []
        for _ in range(400):
            rows.append(
                f"({next_id}, 'g{rng.randrange(3)}', {rng.randrange(100)}, "
                f"'k{rng.randrange(2000)}', '2024-01-01 00:00+00'::timestamptz "
                f"+ {rng.randrange(48)} * interval '1 hour')"
            )
            ids.append(next_id)
            next_id += 1
        statements.append(f"INSERT INTO t VALUES {', '.join(rows)}")
        moved = rng.sample(ids, 120)
        statements.append(
            "UPDATE t SET kind = 'k' || (id * 7 % 2500), v = (v + 37) % 100, "
            "ts = ts + interval '5 hours' "
            f"WHERE id IN ({', '.join(map(str, moved))})"
        )
        gone = set(rng.sample(ids, 60))
        statements.append(f"DELETE FROM t WHERE id IN ({', '.join(map(str, sorted(gone)))})")
        ids = [i for i in ids if i not in gone]
        h.execute(*statements)
        h.sync()
        assert_estimates_equal(h)
        if round_number == 3:
            h.engine.compact_rollups(force=True)
            assert_estimates_equal(h)
    # One table per value and filter: the exact count's, and the filtered estimate's.
    assert rollup_tables(h) == [
        "a__hll_0",
        "a__hll_1",
        "a__state",
        "a__x__state",
        "s__distinct_0",
        "s__hll_2",
        "s__state",
    ]
    for name in ("s", "a"):  # rebuilt from the mirror
        h.engine.registry.build(h.store.writer, name)
    assert_estimates_equal(h)
    # Rebuilding rollup a dropped its own tables, not those of rollup a__x.
    assert "a__x__state" in rollup_tables(h)
    h.assert_rollup("a__x")


def test_a_store_written_before_sharing_drops_the_unused_table(h: Harness) -> None:
    h.execute(
        "INSERT INTO t SELECT i, 'g', i, 'k' || i % 5, '2024-01-01 00:00+00' "
        "FROM generate_series(1, 20) i"
    )
    h.sync()
    # What an earlier version kept: the approximate count's own register table.
    h.store.writer.execute(
        'CREATE TABLE rollup."s__hll_1" AS SELECT * FROM rollup."a__hll_0" LIMIT 0'
    )
    h.reopen()
    h.execute("DELETE FROM t WHERE id <= 5")
    h.sync()
    assert "s__hll_1" not in rollup_tables(h)
    assert_estimates_equal(h)

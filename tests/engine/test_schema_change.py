"""Schema changes while streaming: added, dropped, widened, incompatible."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from headrace.pipeline.load import parse_pipeline
from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness

YAML = """
source:
  dsn: "DSN"
  tables:
    t:
      event_time: ts
      history: true
    other:
      event_time: ts
rollups:
  - name: by_kind
    table: t
    grain: 1h
    dimensions: [grp]
    measures:
      - {name: kinds, fn: count_distinct, column: kind}
      - {name: n, fn: count}
  - name: by_grp
    table: t
    grain: 1h
    coarser: [1d]
    dimensions: [grp]
    measures:
      - {name: n, fn: count}
      - {name: total, fn: sum, column: v}
      - {name: hi, fn: max, column: v}
      - {name: avg_price, fn: avg, column: price}
  - name: others
    table: other
    grain: 1h
    measures:
      - {name: n, fn: count}
"""


@pytest.fixture
def h(pg_db: PgDatabase, tmp_path: Path) -> Iterator[Harness]:
    pg_db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, grp varchar(5), v int, kind text, price numeric(8,2),"
        " ts timestamptz);"
        "CREATE TABLE other (id int PRIMARY KEY, ts timestamptz);"
        "INSERT INTO t VALUES (1, 'a', 1, 'x', 1.50, '2024-01-01 00:00+00'),"
        " (2, 'b', 2, 'y', 2.25, '2024-01-01 00:00+00');"
    )
    harness = make_harness(pg_db, tmp_path, YAML)
    yield harness
    harness.close()


def versions(h: Harness) -> list[tuple[int, str]]:
    return [
        (int(v), str(c))  # type: ignore[call-overload]
        for v, c in h.duck(
            "SELECT version, change FROM headrace.schema_versions WHERE table_name = 'public.t' "
            "ORDER BY version"
        )
    ]


def rollup_state(h: Harness, name: str) -> tuple[object, object]:
    rows = h.duck(f"SELECT state, reason FROM headrace.rollups WHERE name = '{name}'")
    return rows[0][0], rows[0][1]


def test_added_column(h: Harness) -> None:
    h.execute(
        "INSERT INTO t VALUES (3, 'a', 3, 'x', 1, '2024-01-01 00:00+00')",
        "ALTER TABLE t ADD COLUMN note text",
        "INSERT INTO t VALUES (4, 'a', 4, 'z', 2, '2024-01-01 00:00+00', 'hello')",
        "UPDATE t SET v = 10 WHERE id = 1",
    )
    batches = h.batches()
    assert len(batches) == 1  # one batch, two schema versions of t
    h.engine.apply(batches[0])
    h.assert_mirror("t", ["id", "grp", "v", "kind", "price", "ts", "note"])
    assert h.duck("SELECT id, note FROM history.t WHERE _hr_op <> 'S' ORDER BY _hr_lsn") == [
        (3, None),
        (4, "hello"),
        (1, None),
    ]
    assert versions(h)[-1] == (2, "added note text")
    assert h.duck("SELECT schema_version FROM headrace.tables WHERE table_name = 'public.t'") == [
        (2,)
    ]
    for name in ("by_kind", "by_grp"):
        h.assert_rollup(name)
    # A restart reads the new layout back.
    h.reopen()
    h.execute("UPDATE t SET note = 'again' WHERE id = 3")
    h.sync()
    h.assert_mirror("t", ["id", "grp", "v", "kind", "price", "ts", "note"])


def test_dropped_column_pauses_the_rollups_that_need_it(h: Harness) -> None:
    h.execute(
        "UPDATE t SET kind = 'w' WHERE id = 1",
        "ALTER TABLE t DROP COLUMN kind",
        "INSERT INTO t VALUES (3, 'a', 3, 9, '2024-01-01 00:00+00')",
        "INSERT INTO other VALUES (1, '2024-01-01 00:00+00')",
    )
    h.sync()
    state, reason = rollup_state(h, "by_kind")
    assert state == "paused"
    assert "kind" in str(reason)
    assert "dropped" in str(reason)
    assert h.engine.paused_rollups().keys() == {"by_kind"}
    # The others continue.
    assert rollup_state(h, "by_grp")[0] == "active"
    h.assert_rollup("by_grp")
    h.assert_rollup("others")
    # The column is kept, NULL from then on.
    assert h.duck("SELECT id, kind FROM mirror.t ORDER BY id") == [(1, "w"), (2, "y"), (3, None)]
    assert versions(h)[-1] == (2, "dropped kind")
    # After the definition changes, a rebuild brings the rollup back, exact.
    fixed = parse_pipeline(
        YAML.replace("column: kind}", "column: v}").replace("DSN", h.db.dsn)
    ).rollup("by_kind")
    h.engine.rebuild("by_kind", fixed)
    h.config = h.config.model_copy(
        update={"rollups": [fixed if r.name == "by_kind" else r for r in h.config.rollups]}
    )
    assert rollup_state(h, "by_kind") == ("active", None)
    h.execute("INSERT INTO t VALUES (4, 'b', 3, 9, '2024-01-01 00:00+00')")
    h.sync()
    h.assert_rollup("by_kind")
    # A restart with the old definition keeps it paused (nothing silently resumes);
    # the new definition is stored.
    definition = json.loads(
        str(h.duck("SELECT definition FROM headrace.rollups WHERE name = 'by_kind'")[0][0])
    )
    assert definition["rollup"]["measures"][0]["column"] == "v"


def test_widened_columns_in_place(h: Harness) -> None:
    h.execute(
        "ALTER TABLE t ALTER COLUMN v TYPE bigint",
        "ALTER TABLE t ALTER COLUMN grp TYPE text",
        "ALTER TABLE t ALTER COLUMN price TYPE numeric(12,2)",
        "INSERT INTO t VALUES (3, 'longer group', 5000000000, 'x', 1234567.89,"
        " '2024-01-01 00:00+00')",
        "UPDATE t SET v = v + 1 WHERE id = 1",
    )
    h.sync()
    types = {
        str(name): str(kind)
        for name, kind in h.duck(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 't'"
            " AND schema_name = 'mirror'"
        )
    }
    assert types["v"] == "BIGINT"
    assert types["price"] == "DECIMAL(12,2)"
    h.assert_mirror("t", ["id", "grp", "v", "kind", "price", "ts"])
    for name in ("by_kind", "by_grp"):
        assert rollup_state(h, name)[0] == "active"
        h.assert_rollup(name)
    changes = [c for _, c in versions(h)]
    assert any("widened v INTEGER -> BIGINT" in c for c in changes), changes
    assert any("price DECIMAL(8,2) -> DECIMAL(12,2)" in c for c in changes), changes
    assert any("retyped grp" in c for c in changes), changes


def test_incompatible_change_goes_to_dead_letters(h: Harness) -> None:
    h.execute(
        "UPDATE t SET v = 5 WHERE id = 1",
        "ALTER TABLE t ALTER COLUMN grp TYPE int USING length(grp)",
        "INSERT INTO t VALUES (3, 7, 3, 'x', 1, '2024-01-01 00:00+00')",
        "DELETE FROM t WHERE id = 2",
        "INSERT INTO other VALUES (1, '2024-01-01 00:00+00')",
    )
    applied = h.sync()
    assert sum(a.dead_letters for a in applied) == 2
    letters = h.duck(
        "SELECT lsn, table_name, reason, payload FROM headrace.dead_letters ORDER BY id"
    )
    assert [json.loads(str(p))["_hr_op"] for _, _, _, p in letters] == ["I", "D"]
    lsn, table, reason, payload = letters[0]
    assert table == "public.t"
    assert "grp changed type" in str(reason)
    assert "LSN" in str(reason)
    inserted = json.loads(str(payload))
    assert inserted["_hr_lsn"] == lsn
    assert inserted["new"] == {
        "id": 3,
        "grp": 7,
        "v": 3,
        "kind": "x",
        "price": 1.0,
        "ts": "2024-01-01 00:00:00+00",
    }
    deleted = json.loads(str(letters[1][3]))
    assert deleted["old"]["id"] == 2
    status = {t.table_name: t for t in h.engine.status().tables}
    assert status["public.t"].state == "dead_letter"
    assert h.engine.status().dead_letters == 2
    # Changes before the incompatible change were applied; the table is frozen after it.
    assert h.duck("SELECT id, v FROM mirror.t ORDER BY id") == [(1, 5), (2, 2)]
    assert rollup_state(h, "by_grp")[0] == "paused"
    h.assert_rollup("others")
    # Later changes of the table keep going to the dead letters (never dropped).
    h.execute("UPDATE t SET v = 6 WHERE id = 1")
    h.sync()
    assert h.engine.status().dead_letters == 3

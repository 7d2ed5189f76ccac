from __future__ import annotations

from pathlib import Path

from tests.conftest import PgDatabase
from tests.engine.harness import make_harness

YAML = """
source:
  dsn: "DSN"
  tables:
    tx:
      event_time: ts
      history: true
rollups:
  - name: vol
    table: tx
    grain: 15m
    coarser: [1h, 1d]
    dimensions: [status]
    measures:
      - {name: n, fn: count}
      - {name: total, fn: sum, column: amount}
      - {name: lo, fn: min, column: amount}
      - {name: hi, fn: max, column: amount}
      - {name: mean, fn: avg, column: amount}
      - {name: declined, fn: count, where: "status = 'declined'"}
      - {name: accts, fn: count_distinct, column: acct}
      - {name: accts_approx, fn: approx_count_distinct, column: acct}
"""


def test_smoke(pg_db: PgDatabase, tmp_path: Path) -> None:
    pg_db.execute(
        "CREATE TABLE tx (id int PRIMARY KEY, acct int, amount numeric(12,2), status text, ts timestamptz)"
    )
    h = make_harness(pg_db, tmp_path, YAML)
    h.execute(
        "INSERT INTO tx VALUES (1, 1, 10, 'ok', '2024-01-01 00:01'), (2, 2, 20, 'ok', '2024-01-01 00:02'),"
        " (3, 1, 30, 'declined', '2024-01-01 01:02')",
        "UPDATE tx SET amount = 5 WHERE id = 1",
        "UPDATE tx SET id = 10, status = 'declined' WHERE id = 2",
        "DELETE FROM tx WHERE id = 3",
    )
    h.sync()
    h.assert_mirror("tx", ["id", "acct", "amount", "status", "ts"])
    h.assert_rollup("vol")
    h.execute("UPDATE tx SET amount = 1000 WHERE id = 10", "DELETE FROM tx WHERE id = 1")
    h.sync()
    h.assert_mirror("tx", ["id", "acct", "amount", "status", "ts"])
    h.assert_rollup("vol")
    print(h.duck("SELECT * FROM rollup.vol_15m"))
    print(h.duck("SELECT * FROM history.tx"))
    h.close()

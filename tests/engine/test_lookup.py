"""Looked-up dimensions: the value at the time of the change, recorded with the row."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness

YAML = """
source:
  dsn: "DSN"
  tables:
    acct: {}
    tx: {event_time: ts}
rollups:
  - name: by_tier
    table: tx
    grain: 1h
    dimensions:
      - name: tier
        lookup: {table: acct, on: acct_id, column: tier}
    measures:
      - {name: n, fn: count}
      - {name: volume, fn: sum, column: amount}
"""


@pytest.fixture
def pipeline(pg_db: PgDatabase, tmp_path: Path) -> Harness:
    pg_db.execute(
        "CREATE TABLE acct (id int PRIMARY KEY, tier text);"
        "CREATE TABLE tx (id int PRIMARY KEY, acct_id int, amount int, ts timestamptz);"
        "INSERT INTO acct VALUES (1, 'silver'), (2, 'gold');"
        "INSERT INTO tx VALUES (10, 1, 5, '2024-01-01 00:10+00');"
    )
    return make_harness(pg_db, tmp_path, YAML)


def tiers(h: Harness) -> dict[object, tuple[object, object]]:
    return {
        row[0]: (row[1], row[2]) for row in h.duck("SELECT tier, n, volume FROM rollup.by_tier_1h")
    }


def test_snapshot_resolves_from_the_snapshot(pipeline: Harness) -> None:
    assert tiers(pipeline) == {"silver": (1, 5)}
    pipeline.close()


def test_value_at_the_time_of_the_change(pipeline: Harness) -> None:
    h = pipeline
    # The account moves to gold: the row already counted stays under silver.
    h.execute("UPDATE acct SET tier = 'gold' WHERE id = 1")
    h.sync()
    assert tiers(h) == {"silver": (1, 5)}
    # A new transaction of that account counts under gold.
    h.execute("INSERT INTO tx VALUES (11, 1, 7, '2024-01-01 00:20+00')")
    h.sync()
    assert tiers(h) == {"silver": (1, 5), "gold": (1, 7)}
    # The old row's next update picks up the tier current at the update; its
    # retraction subtracts exactly what was added (silver), not gold.
    h.execute("UPDATE tx SET amount = 6 WHERE id = 10")
    h.sync()
    assert tiers(h) == {"gold": (2, 13)}
    # Deleting a row retracts the recorded value.
    h.execute("UPDATE acct SET tier = 'platinum' WHERE id = 1", "DELETE FROM tx WHERE id = 11")
    h.sync()
    assert tiers(h) == {"gold": (1, 6)}
    h.close()


def test_order_inside_one_batch(pipeline: Harness) -> None:
    """Changes of the looked-up table earlier in the same batch count, later ones do not."""
    h = pipeline
    h.transaction(
        "UPDATE acct SET tier = 'bronze' WHERE id = 2",
        "INSERT INTO tx VALUES (20, 2, 1, '2024-01-01 00:00+00')",  # sees bronze
        "UPDATE acct SET tier = 'gold' WHERE id = 2",
    )
    h.execute(
        "INSERT INTO tx VALUES (21, 2, 2, '2024-01-01 00:00+00')",  # sees gold
        "UPDATE acct SET id = 3 WHERE id = 2",  # the account's key moves away
        "INSERT INTO tx VALUES (22, 2, 4, '2024-01-01 00:00+00')",  # no account 2 any more
        "INSERT INTO acct VALUES (2, 'new')",
        "INSERT INTO tx VALUES (23, 2, 8, '2024-01-01 00:00+00')",  # the new account 2
        "TRUNCATE acct",
        "INSERT INTO tx VALUES (24, 1, 16, '2024-01-01 00:00+00')",  # after the truncate
    )
    h.sync()  # all in one batch
    assert len(h.applied) == 1
    assert tiers(h) == {
        "silver": (1, 5),
        "bronze": (1, 1),
        "gold": (1, 2),
        None: (2, 20),
        "new": (1, 8),
    }
    h.close()


def test_recorded_value_survives_a_restart(pipeline: Harness) -> None:
    h = pipeline
    h.execute("UPDATE acct SET tier = 'gold' WHERE id = 1")
    h.sync()
    h.reopen()
    h.execute("DELETE FROM tx WHERE id = 10")
    h.sync()
    assert tiers(h) == {}
    h.engine.compact_rollups(force=True)  # appended deltas folded: nothing left
    assert h.duck("SELECT count(*) FROM rollup.by_tier__state")[0][0] == 0
    h.close()

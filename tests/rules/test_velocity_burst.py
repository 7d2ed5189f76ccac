"""Rule 1, velocity burst, through real PostgreSQL changes."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PgDatabase
from tests.rules.bank import only, open_bank


def test_burst_one_alert_per_incident_across_a_restart(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, only("velocity_burst"))
    for n in range(7):
        bank.tx(1, 20, n * 5)  # account 1: 7 in 35 s, under the limit of 8 per minute
        bank.tx(2, 20, n * 30)  # account 2: 7 in 3 minutes
    bank.tx(1, 20, 36, type="transfer_in", channel="transfer")  # money in does not count
    bank.sync()
    assert bank.alerts("velocity_burst") == []

    bank.restart()  # in the middle of the incident: the window survives
    bank.tx(1, 20, 40)
    bank.sync()
    (alert,) = bank.alerts("velocity_burst")
    assert alert["account_id"] == 1
    assert alert["key"] == "velocity_burst:1"
    assert alert["severity"] == "high"
    numbers = alert["payload"]["numbers"]
    assert (numbers["transactions"], numbers["limit"], numbers["window_seconds"]) == (8, 8, 60)
    assert [row["id"] for row in alert["payload"]["evidence"]] == [*range(1000, 1014, 2), 1015]
    assert alert["latency_ms"] >= 0

    for n in range(9, 14):  # the burst goes on: same incident, no new alert
        bank.tx(1, 20, n * 5)
    bank.sync()
    bank.restart()
    bank.tx(1, 20, 70)
    bank.sync()
    assert len(bank.alerts("velocity_burst")) == 1

    for n in range(8):  # 20 minutes later (past the 10-minute re-arm): a new incident
        bank.tx(1, 20, 1300 + n)
    bank.sync()
    alerts = bank.alerts("velocity_burst")
    assert len(alerts) == 2
    assert alerts[1]["payload"]["numbers"]["transactions"] == 8
    bank.close()


def test_five_minute_limit_and_deletes(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, only("velocity_burst"))
    ids = [bank.tx(3, 20, n * 15) for n in range(19)]  # 19 in 4.5 min, 4 per minute at most
    bank.sync()
    assert bank.alerts("velocity_burst") == []
    bank.execute(f"DELETE FROM transactions WHERE id = {ids[0]}")  # a delete leaves the window
    bank.tx(3, 20, 19 * 15)
    bank.sync()
    assert bank.alerts("velocity_burst") == []
    bank.tx(3, 20, 19 * 15 + 1)
    bank.sync()
    (alert,) = bank.alerts("velocity_burst")
    numbers = alert["payload"]["numbers"]
    assert (numbers["transactions"], numbers["limit"], numbers["window_seconds"]) == (20, 20, 300)
    bank.close()


SMALL = """
rules:
  lateness: 2m
  velocity_burst:
    limits: [{window: 1m, count: 3}, {window: 5m, count: 5}]
    rearm_after: 1m
"""


def test_rearm_counts_from_the_incident_last_seen(pg_db: PgDatabase, tmp_path: Path) -> None:
    """An incident last seen at 100 s (re-arm 1 minute): a later batch with late candidates
    (50 s) and then candidates at 130 s extends it. Found by the in-memory lane's equality
    test: a candidate was compared with the batch's previous candidate only (50 s), so
    130 s opened a second alert 30 s after the incident was last seen."""
    bank = open_bank(pg_db, tmp_path, SMALL)
    for n in (80, 90, 100):
        bank.tx(1, 20, n)
    bank.sync()
    assert len(bank.alerts("velocity_burst")) == 1
    for n in (30, 40, 50, 130, 140, 150):
        bank.tx(1, 20, n)
    bank.sync()
    assert len(bank.alerts("velocity_burst")) == 1
    bank.close()

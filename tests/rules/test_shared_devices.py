"""Account takeover and the health score share one devices table (same logins table)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PgDatabase
from tests.rules.bank import Bank, only, open_bank

MINUTE = 60.0
DEVICES = "jobs.account_takeover__devices"


def _new_devices(bank: Bank) -> tuple[int, int]:
    """Customer 1's new devices: in its account's health score; risky-login marks of the
    devices new-1 and tablet (older marks leave the rule's window)."""
    ((score,),) = bank.duck(
        "SELECT max(CAST(json_extract(s.components, '$.new_devices') AS INTEGER)) "
        "FROM headrace.health_scores s JOIN mirror.accounts a ON a.id = s.account_id "
        "WHERE a.customer_id = 1"
    )
    ((marks,),) = bank.duck(
        "SELECT count(*) FROM jobs.account_takeover__marks "
        "WHERE customer = 1 AND reason = 'new_device' AND device IN ('new-1', 'tablet')"
    )
    return int(score), int(marks)


def test_one_devices_table_read_by_both(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, only("account_takeover") + "\nscores:\n  health: {}\n")
    bank.login(1, -120 * MINUTE)  # phone-1: a first sighting
    bank.sync()
    bank.login(1, 0, device="new-1")  # new
    bank.login(1, 10)  # phone-1 again: known
    bank.login(1, 20, device="new-1")  # seen earlier in this batch: known
    bank.sync()
    assert _new_devices(bank) == (2, 1)
    tables = {str(r[0]) for r in bank.duck("SELECT table_name FROM duckdb_tables()")}
    assert "account_takeover__devices" in tables
    assert "health_score__devices" not in tables

    # A store without the table (e.g. written before it was shared) fills it from the
    # logins as they were before the batch.
    bank.duck(f"DROP TABLE {DEVICES}")
    bank.restart()
    bank.login(1, 30, device="new-1")  # known
    bank.login(1, 40, device="tablet")  # new
    bank.sync()
    assert _new_devices(bank) == (3, 2)
    ((pairs,),) = bank.duck(f"SELECT count(*) FROM {DEVICES} WHERE owner = 1")
    assert pairs == 3
    bank.close()

"""Rule 1, velocity burst, through real PostgreSQL changes."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PgDatabase
from tests.rules.bank import open_bank


def test_burst_raises_one_alert(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path)
    for n in range(7):
        bank.tx(1, 20, n * 5)
    bank.tx(2, 20, 1)
    bank.sync()
    assert bank.alerts("velocity_burst") == []
    for n in range(7, 12):
        bank.tx(1, 20, n * 5)
    bank.sync()
    (alert,) = bank.alerts("velocity_burst")
    assert alert["account_id"] == 1
    assert alert["payload"]["numbers"]["transactions"] == 8
    assert alert["payload"]["numbers"]["limit"] == 8
    assert len(alert["payload"]["evidence"]) == 8
    print(alert)
    bank.close()

"""Rule 4, structuring: several amounts just under the reporting threshold within 24 h."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PgDatabase
from tests.rules.bank import only, open_bank

HOUR = 3600.0


def _transfer(bank: object, account: int, amount: float, seconds: float, **kw: object) -> int:
    return bank.tx(account, amount, seconds, channel="transfer", type="transfer_in", **kw)  # type: ignore[attr-defined, no-any-return]


def test_cancelled_and_created_by_updates(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, only("structuring"))
    first = _transfer(bank, 1, 9_500, 0)
    second = _transfer(bank, 1, 9_900, 2 * HOUR, status="pending")
    _transfer(bank, 1, 10_000, 3 * HOUR)  # at the threshold: reported anyway, not counted
    _transfer(bank, 1, 8_999.99, 3 * HOUR)  # under the band
    _transfer(bank, 2, 9_100, 0)
    bank.sync()
    bank.set_status(second, "declined")  # cancels the second one
    third = _transfer(bank, 1, 9_000, 4 * HOUR)  # 2 in the band, not 3
    bank.sync()
    assert bank.alerts("structuring") == []

    fourth = _transfer(bank, 1, 5_000, 5 * HOUR)
    bank.sync()
    assert bank.alerts("structuring") == []
    bank.execute(f"UPDATE transactions SET amount = 9950 WHERE id = {fourth}")  # now in the band
    bank.sync()
    (alert,) = bank.alerts("structuring")
    assert alert["severity"] == "medium"
    assert alert["payload"]["trigger"] == fourth
    assert [e["id"] for e in alert["payload"]["evidence"]] == [first, third, fourth]
    numbers = alert["payload"]["numbers"]
    assert (numbers["transactions"], numbers["total"]) == (3, 28_450)

    _transfer(bank, 2, 9_200, 25 * HOUR)  # more than 24 h after account 2's first one
    _transfer(bank, 2, 9_300, 26 * HOUR)  # only 2 within 24 h
    bank.sync()
    assert len(bank.alerts("structuring")) == 1
    bank.close()


def test_pattern_completed_across_a_restart(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, only("structuring", "{threshold: 1000, min_count: 3}"))
    _transfer(bank, 3, 950, 0)
    _transfer(bank, 3, 960, 60)
    bank.sync()
    bank.restart()
    _transfer(bank, 3, 970, 120)
    bank.sync()
    (alert,) = bank.alerts("structuring")
    assert alert["payload"]["numbers"]["transactions"] == 3
    assert alert["payload"]["numbers"]["band_low"] == 900
    bank.close()

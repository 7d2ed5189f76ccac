"""Rule 5, card testing: small online attempts or declines across merchants in minutes."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PgDatabase
from tests.rules.bank import only, open_bank


def _online(
    bank: object, account: int, amount: float, seconds: float, merchant: int, **kw: object
) -> int:
    return bank.tx(  # type: ignore[attr-defined, no-any-return]
        account, amount, seconds, channel="online", merchant=merchant, device="x-dev", **kw
    )


def test_small_attempts_across_merchants(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, only("card_testing"))
    for n in range(5):
        _online(bank, 1, 0.99, n * 20, merchant=1 + n % 4)  # 5 attempts at 4 merchants
        _online(bank, 2, 0.99, n * 20, merchant=1)  # 5 attempts at one merchant
        _online(bank, 3, 0.99, n * 200, merchant=1 + n)  # 5 merchants over 13 minutes
        bank.tx(4, 0.99, n * 20, merchant=1 + n)  # card present: not online
    bank.sync()
    (alert,) = bank.alerts("card_testing")
    assert alert["account_id"] == 1
    numbers = alert["payload"]["numbers"]
    assert (numbers["attempts"], numbers["merchants"], numbers["small"]) == (5, 4, 5)
    bank.close()


def test_a_later_decline_creates_the_pattern(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, only("card_testing"))
    for n in range(4):
        _online(bank, 5, 1.5, n * 20, merchant=1 + n)
    pending = _online(bank, 5, 49.0, 90, merchant=6, status="pending")  # not small
    bank.sync()
    assert bank.alerts("card_testing") == []
    bank.restart()
    bank.set_status(pending, "declined")  # a decline counts whatever the amount
    bank.sync()
    (alert,) = bank.alerts("card_testing")
    assert alert["payload"]["trigger"] == pending
    numbers = alert["payload"]["numbers"]
    assert (numbers["attempts"], numbers["merchants"], numbers["declined"]) == (5, 5, 1)
    bank.close()

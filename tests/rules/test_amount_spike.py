"""Rule 2, amount spike against the account's own history."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PgDatabase
from tests.rules.bank import only, open_bank


def test_spike_against_own_history(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, only("amount_spike"))
    for n in range(5):
        bank.tx(1, 40, n * 60)  # account 1: mean 40 over 5 settled purchases
    for n in range(4):
        bank.tx(2, 40, n * 60)  # account 2: only 4 settled purchases
    bank.tx(1, 45, 400, status="declined")  # declined ones are not history
    bank.sync()
    bank.tx(2, 900, 500)  # too little history
    bank.tx(1, 300, 500, status="pending")  # 7.5x the mean: below the factor of 10
    bank.tx(1, 450, 501, channel="transfer", type="transfer_out")  # not a purchase
    bank.sync()
    assert bank.alerts("amount_spike") == []

    bank.restart()  # the history survives a restart
    spike = bank.tx(1, 800, 600, status="pending")  # the history mean is still 40: 20x
    bank.sync()
    (alert,) = bank.alerts("amount_spike")
    numbers = alert["payload"]["numbers"]
    assert (alert["account_id"], alert["payload"]["trigger"]) == (1, spike)
    assert (numbers["history"], numbers["mean"], numbers["factor"]) == (5, 40.0, 20.0)
    assert alert["payload"]["evidence"][0]["amount"] == 800
    bank.close()


def test_update_creates_a_spike_and_reversals_leave_the_history(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    bank = open_bank(pg_db, tmp_path, only("amount_spike"))
    history = [bank.tx(3, 50, n * 60) for n in range(6)]
    bank.sync()
    small = bank.tx(3, 60, 400, status="pending")
    bank.sync()
    assert bank.alerts("amount_spike") == []
    bank.execute(f"UPDATE transactions SET amount = 700 WHERE id = {small}")  # 14x the mean
    bank.sync()
    (alert,) = bank.alerts("amount_spike")
    assert alert["payload"]["trigger"] == small
    assert alert["payload"]["numbers"]["mean"] == 50.0

    # Reversals take purchases out of the history: with 4 left (< min_history 5)
    # even a huge amount on account 3 raises nothing new; re-armed or not.
    for tx_id in history[:2]:
        bank.set_status(tx_id, "reversed")
    bank.sync()
    mean = bank.duck("SELECT _rows, total FROM jobs.amount_spike__history WHERE account = 3")
    assert mean == [(4, 200)]
    bank.close()

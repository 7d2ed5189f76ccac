"""Rule 6, account takeover: a large outflow shortly after a risky login."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import pytest

from headrace.engine import batch_changes
from tests.conftest import PgDatabase
from tests.rules.bank import Bank, only, open_bank

MINUTE = 60.0


def _out(bank: Bank, account: int, amount: float, seconds: float, **kw: object) -> int:
    return bank.tx(account, amount, seconds, channel="transfer", type="transfer_out", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("view_from", [batch_changes.VIEW_CHANGES, 1], ids=["tables", "views"])
def test_new_device_and_failed_logins(pg_db: PgDatabase, tmp_path: Path, view_from: int) -> None:
    """``view_from``: the rule also reads a batch's changes as a view (large batches)."""
    with patch.object(batch_changes, "VIEW_CHANGES", view_from):
        _new_device_and_failed_logins(pg_db, tmp_path)


def _new_device_and_failed_logins(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, only("account_takeover"))
    for customer in (1, 2, 3, 4):
        bank.login(customer, -120 * MINUTE)  # phone-1 becomes a known device
    bank.sync()
    bank.login(1, 0)  # known device
    _out(bank, 1, 3_000, 1 * MINUTE)  # 60% of 5,000, but no risky login
    bank.login(2, 0, device="new-2")  # a new device
    _out(bank, 2, 1_000, 1 * MINUTE)  # 20%: normal
    for n in range(3):
        bank.login(3, n * 10, success=False)  # three failures from the known device
    bank.login(4, 0, device="new-4")
    bank.sync()
    assert bank.alerts("account_takeover") == []

    big = _out(bank, 2, 3_000, 2 * MINUTE)
    _out(bank, 3, 4_500, 2 * MINUTE)
    bank.sync()
    alerts = {a["account_id"]: a for a in bank.alerts("account_takeover")}
    assert set(alerts) == {2, 3}
    two = alerts[2]
    assert (two["severity"], two["payload"]["trigger"]) == ("critical", big)
    assert two["payload"]["numbers"]["share"] == 0.6
    assert two["payload"]["numbers"]["reasons"] == ["new_device"]
    assert [login["device"] for login in two["payload"]["logins"]] == ["new-2"]
    three = alerts[3]["payload"]
    assert three["numbers"]["reasons"] == ["failed_logins"]
    assert three["numbers"]["failed_logins"] == 3

    _out(bank, 4, 4_000, 40 * MINUTE)  # 40 minutes after the login: outside the window
    bank.sync()
    assert len(bank.alerts("account_takeover")) == 2
    bank.close()


def test_restart_between_login_and_outflow(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, only("account_takeover"))
    for n in range(4):
        bank.login(5, n * 5, success=False, device="intruder")
    bank.login(5, 30, device="intruder")
    bank.sync()
    bank.restart()
    # The outflow and its settlement in one transaction: the balance checked is the one
    # before the batch (5,000), not the balance after the outflow.
    bank.outflow_and_balance(77, 5, 2600, 2 * MINUTE, balance=2400, device="intruder")
    bank.sync()
    (alert,) = bank.alerts("account_takeover")
    numbers = alert["payload"]["numbers"]
    assert (numbers["balance"], numbers["share"]) == (5000, 0.52)
    assert sorted(numbers["reasons"]) == ["failed_logins", "new_device"]
    bank.close()


MARKS = "jobs.account_takeover__marks"


def test_failures_read_from_the_mirror_and_old_marks_pruned(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    bank = open_bank(pg_db, tmp_path, only("account_takeover"))
    # A store written when the failures had a window table of their own: dropped at open.
    bank.duck("CREATE TABLE jobs.account_takeover__failed (_k0 BIGINT)")
    bank.restart()
    tables = {r[0] for r in bank.duck("SELECT table_name FROM duckdb_tables()")}
    assert "account_takeover__failed" not in tables

    bank.login(6, 0, success=False)
    first = bank.login(6, 10, success=False)
    bank.sync()
    # A failure corrected into a success no longer counts towards a burst.
    bank.execute(f"UPDATE logins SET success = true, failure_reason = NULL WHERE id = {first}")
    bank.login(6, 20, success=False)
    bank.sync()
    assert bank.duck(f"SELECT count(*) FROM {MARKS} WHERE reason = 'failed_logins'") == [(0,)]
    third = bank.login(6, 30, success=False)
    bank.sync()
    assert bank.duck(f"SELECT login, failed FROM {MARKS} WHERE reason = 'failed_logins'") == [
        (third, 3)
    ]
    _out(bank, 6, 3_000, 2 * MINUTE)
    bank.sync()
    (alert,) = bank.alerts("account_takeover")
    assert alert["payload"]["numbers"]["failed_logins"] == 3

    # Two hours later the risky login is out of the window (30 min + 5 min lateness),
    # pruned at the batch after (horizons are measured from the watermark before a batch).
    bank.login(1, 120 * MINUTE)
    bank.sync()
    bank.login(1, 121 * MINUTE)
    bank.sync()
    assert bank.duck(f"SELECT count(*) FROM {MARKS} WHERE customer = 6") == [(0,)]
    bank.close()

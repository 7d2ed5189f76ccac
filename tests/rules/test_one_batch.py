"""Patterns completed inside one batch: every row of the evidence arrives together.

The rules prefilter the batch's triggers with conditions read from their
state as updated for the batch (rows in the window, risky logins, countries
used); these cases check that rows of the same batch count there.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PgDatabase
from tests.rules.bank import open_bank


def test_patterns_within_one_batch(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path)
    for n in range(8):
        bank.tx(1, 20, n * 5)  # account 1: 8 in 35 s, the limit of 8 per minute
    bank.tx(2, 30, 0)  # account 2: card present at home (DE) ...
    abroad = bank.tx(2, 30, 120, country="US", merchant=12)  # ... then in the US
    bank.login(3, 0, device="new-3")  # customer 3's first login ever: a new device
    outflow = bank.tx(3, 3_000, 60, channel="transfer", type="transfer_out")  # 60% of 5,000
    bank.sync()

    (burst,) = bank.alerts("velocity_burst")
    assert (burst["account_id"], burst["payload"]["numbers"]["transactions"]) == (1, 8)
    (travel,) = bank.alerts("impossible_travel")
    assert (travel["account_id"], travel["payload"]["trigger"]) == (2, abroad)
    assert travel["payload"]["numbers"]["impossible_travel"] is True
    (takeover,) = bank.alerts("account_takeover")
    assert (takeover["account_id"], takeover["payload"]["trigger"]) == (3, outflow)
    assert takeover["payload"]["numbers"]["reasons"] == ["new_device"]
    bank.close()

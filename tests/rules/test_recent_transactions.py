"""The window rules share one table of recent transactions (headrace.rules.recent)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PgDatabase
from tests.rules.bank import Bank, at, open_bank

RECENT = "jobs.rules__recent"
CONFIG = """
rules:
  velocity_burst: {}
  structuring: {threshold: 1000, min_count: 3}
"""


def _insert(id: int, account: int, amount: float, seconds: float, *, transfer: bool) -> str:
    channel, type = ("transfer", "transfer_in") if transfer else ("pos", "purchase")
    card = "NULL" if channel == "transfer" else str(account)
    merchant = "NULL" if channel == "transfer" else "1"
    when = f"'{at(seconds).isoformat()}'"
    return (
        "INSERT INTO transactions (id, account_id, card_id, merchant_id, amount, currency, "
        "channel, type, status, country, created_at, updated_at) VALUES "
        f"({id}, {account}, {card}, {merchant}, {amount}, 'EUR', '{channel}', '{type}', "
        f"'settled', 'DE', {when}, {when})"
    )


def _transfer(bank: Bank, account: int, amount: float, seconds: float) -> int:
    return bank.tx(account, amount, seconds, channel="transfer", type="transfer_in")


def _rows(bank: Bank) -> dict[str, int]:
    ((velocity, structuring, total),) = bank.duck(
        f"SELECT count(*) FILTER (WHERE _in_velocity_burst), "
        f"count(*) FILTER (WHERE _in_structuring), count(*) FROM {RECENT}"
    )
    return {"velocity_burst": velocity, "structuring": structuring, "rows": total}


def _tables(bank: Bank) -> set[str]:
    rows = bank.duck("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'jobs'")
    return {str(r[0]) for r in rows}


def test_one_table_from_snapshot_restart_and_old_store(pg_db: PgDatabase, tmp_path: Path) -> None:
    before = tuple(
        [_insert(1 + n, 1, 20, n * 5, transfer=False) for n in range(6)]
        + [_insert(100, 3, 950, 0, transfer=True)]
    )
    bank = open_bank(pg_db, tmp_path, CONFIG, before_snapshot=before)
    # The snapshot rebuild filled the shared table: each rule flags its own rows.
    assert _rows(bank) == {"velocity_burst": 6, "structuring": 1, "rows": 7}
    assert {"velocity_burst__events", "structuring__band"}.isdisjoint(_tables(bank))

    bank.tx(1, 20, 30)
    _transfer(bank, 3, 960, 60)
    bank.sync()
    assert bank.alerts() == []
    assert _rows(bank) == {"velocity_burst": 7, "structuring": 2, "rows": 9}

    # A store written before the table was shared: per-rule tables, no shared one.
    bank.duck(f"DROP TABLE {RECENT}")
    bank.duck("CREATE TABLE jobs.velocity_burst__events (_k0 INTEGER)")
    bank.restart()
    bank.tx(1, 20, 40)  # the 8th within a minute, 6 of them from the snapshot
    _transfer(bank, 3, 970, 120)  # the 3rd in the band
    bank.sync()
    assert "velocity_burst__events" not in _tables(bank)
    (burst,) = bank.alerts("velocity_burst")
    assert burst["payload"]["numbers"]["transactions"] == 8
    assert [e["id"] for e in burst["payload"]["evidence"]][:6] == list(range(1, 7))
    (band,) = bank.alerts("structuring")
    assert [e["id"] for e in band["payload"]["evidence"]] == [100, 1001, 1003]
    assert _rows(bank) == {"velocity_burst": 8, "structuring": 3, "rows": 11}

    # An hour later the burst's rows leave (10 min span), the band's stay (24 h).
    bank.tx(1, 20, 3600)
    bank.sync()
    bank.tx(1, 20, 3601)
    bank.sync()
    assert _rows(bank) == {"velocity_burst": 2, "structuring": 3, "rows": 5}
    bank.close()

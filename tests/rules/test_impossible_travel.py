"""Rule 3, impossible travel / new country for card-present use."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PgDatabase
from tests.rules.bank import open_bank


def test_travel_and_new_country(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path)
    bank.tx(1, 30, 0)  # account 1: card present at home (DE)
    bank.tx(2, 30, 0)
    bank.tx(3, 30, 0)
    bank.sync()
    bank.tx(1, 30, 600)  # home again: nothing
    bank.tx(2, 30, 120, channel="online", country="US", merchant=12)  # online: not card present
    bank.sync()
    assert bank.alerts("impossible_travel") == []

    abroad = bank.tx(1, 30, 720, country="US", merchant=12)  # 2 minutes later in the US
    bank.tx(3, 30, 50_000, country="FR", merchant=11)  # 14 h later in France: a new country
    bank.sync()
    alerts = {a["account_id"]: a for a in bank.alerts("impossible_travel")}
    assert set(alerts) == {1, 3}
    travel = alerts[1]["payload"]
    assert travel["trigger"] == abroad
    assert travel["numbers"]["impossible_travel"] is True
    assert travel["numbers"]["new_country"] is True
    assert 7_500 < travel["numbers"]["km"] < 8_500
    assert travel["numbers"]["seconds"] == 120
    assert [e["country"] for e in travel["evidence"]] == ["DE", "US"]
    new = alerts[3]["payload"]["numbers"]
    assert (new["impossible_travel"], new["new_country"], new["known_countries"]) == (
        False,
        True,
        ["DE"],
    )

    bank.tx(1, 30, 900, country="US", merchant=12)  # same incident: no second alert
    bank.sync()
    assert len(bank.alerts("impossible_travel")) == 2
    bank.close()


def test_first_use_abroad_needs_history_and_restart(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path)
    bank.tx(4, 30, 0, country="FR", merchant=11)  # no card-present history: not "new"
    bank.sync()
    assert bank.alerts("impossible_travel") == []
    bank.restart()
    bank.tx(4, 30, 60, country="US", merchant=12)  # 1 minute later 7,000 km away: impossible
    bank.sync()
    (alert,) = bank.alerts("impossible_travel")
    assert alert["payload"]["numbers"]["impossible_travel"] is True
    assert alert["payload"]["numbers"]["speed_kmh"] > 100_000
    bank.close()

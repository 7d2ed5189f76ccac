"""The rules lane's impossible travel equals the SQL rule on the same change streams.

Every batch the engine applies (real PostgreSQL → pgoutput → batcher) is also given
to :class:`ImpossibleTravelLane` (:mod:`tests.rules.lane_harness`); the lane's alerts
must be the SQL rule's ``impossible_travel`` alerts, payload included: for the rule's own
test cases, and for random sequences of inserts, updates (country, channel, time,
account, status, key), deletes and truncates of a few accounts, cut into batches at
random transaction boundaries, with engine restarts.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
from hypothesis import event, given
from hypothesis import strategies as st

from headrace.rules.lane.duck_numbers import duck_round
from headrace.rules.lane.impossible_travel import ImpossibleTravelLane, epoch
from tests.conftest import PgDatabase
from tests.rules import lane_hypothesis
from tests.rules.bank import T0, at, insert_transaction, new_status, new_time, open_bank
from tests.rules.lane_harness import Both

# ----------------------------------------------------------------- the rule's own cases


def test_travel_and_new_country(pg_db: PgDatabase, tmp_path: Path) -> None:
    """tests/rules/test_impossible_travel.py::test_travel_and_new_country (every rule on)."""
    both = Both(open_bank(pg_db, tmp_path), ImpossibleTravelLane)
    bank = both.bank
    bank.tx(1, 30, 0)  # account 1: card present at home (DE)
    bank.tx(2, 30, 0)
    bank.tx(3, 30, 0)
    both.sync()
    bank.tx(1, 30, 600)  # home again: nothing
    bank.tx(2, 30, 120, channel="online", country="US", merchant=12)  # online: not present
    both.sync()
    assert both.lane() == [] == both.sql()
    abroad = bank.tx(1, 30, 720, country="US", merchant=12)  # 2 minutes later in the US
    bank.tx(3, 30, 50_000, country="FR", merchant=11)  # 14 h later in France: new country
    both.sync()
    alerts = {alert.account: alert for alert in both.lane_alerts}
    assert set(alerts) == {1, 3}
    assert alerts[1].trigger == abroad
    assert alerts[1].numbers["impossible_travel"] is True
    assert alerts[1].numbers["seconds"] == 120
    assert alerts[3].numbers["known_countries"] == ["DE"]
    both.assert_equal()
    bank.tx(1, 30, 900, country="US", merchant=12)  # same incident: no second alert
    both.sync()
    assert len(both.lane()) == 2
    both.assert_equal()
    bank.close()


def test_first_use_abroad_needs_history_and_restart(pg_db: PgDatabase, tmp_path: Path) -> None:
    """tests/rules/test_impossible_travel.py::test_first_use_abroad_needs_history_and_restart."""
    both = Both(open_bank(pg_db, tmp_path), ImpossibleTravelLane)
    bank = both.bank
    bank.tx(4, 30, 0, country="FR", merchant=11)  # no card-present history: not "new"
    both.sync()
    assert both.lane() == [] == both.sql()
    both.restart()
    bank.tx(4, 30, 60, country="US", merchant=12)  # 1 minute later 7,000 km away
    both.sync()
    (alert,) = both.lane_alerts
    assert alert.numbers["impossible_travel"] is True
    speed = alert.numbers["speed_kmh"]
    assert isinstance(speed, float)
    assert speed > 100_000
    both.assert_equal()
    bank.close()


# ----------------------------------------------------------------- more cases


SMALL = """
rules:
  lateness: 5m
  impossible_travel:
    window: 5m
    min_history: MIN_HISTORY
    rearm_after: 20s
    locations: {DE: [51.2, 10.4], FR: [46.6, 2.2], US: [39.8, -98.6]}
"""
"""A short window and re-arm, IT without a location: random streams alert often."""


def small(min_history: int = 1, max_speed: float | None = None, new: bool = True) -> str:
    config = SMALL.replace("MIN_HISTORY", str(min_history))
    if not new:
        config += "    new_country: false\n"
    if max_speed is not None:
        config += f"    max_speed_kmh: {max_speed}\n"
    return config


def test_updates_deletes_and_late_rows(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A country or channel change re-triggers a row; a delete leaves the countries; a
    status change does not matter; a late row counts as a use but does not trigger; a
    country without a location is new but never impossible."""
    both = Both(open_bank(pg_db, tmp_path, small()), ImpossibleTravelLane)
    bank = both.bank
    bank.tx(1, 20, 0)
    online = bank.tx(1, 20, 30, channel="online", country="FR")
    both.sync()
    bank.execute(f"UPDATE transactions SET channel = 'pos' WHERE id = {online}")
    both.sync()  # now card present in France 30 s after Germany: impossible
    assert [alert.account for alert in both.lane_alerts] == [1]
    home = bank.tx(2, 20, 0)
    bank.tx(2, 20, 10, country="IT")  # new, no location: no distance
    both.sync()
    bank.execute(f"DELETE FROM transactions WHERE id = {home}")
    second = bank.tx(2, 20, 20, country="DE")
    both.sync()
    bank.set_status(second, "declined")
    bank.execute(f"UPDATE transactions SET country = 'US' WHERE id = {second}")
    both.sync()
    bank.tx(3, 20, 1000)  # the watermark jumps: rows far behind are late
    both.sync()
    bank.tx(3, 20, 100, country="FR")  # late: no trigger, but a use and a country
    bank.tx(3, 20, 1010, country="US")
    both.sync()
    both.assert_equal()
    assert {alert.account for alert in both.lane_alerts} == {1, 2, 3}
    bank.close()


def test_first_card_present_use_without_history(pg_db: PgDatabase, tmp_path: Path) -> None:
    """``min_history: 0``: an account's very first card-present use is a new country, and
    its alert has a NULL summary (format() of the NULL known countries): the lane too."""
    both = Both(open_bank(pg_db, tmp_path, small(min_history=0)), ImpossibleTravelLane)
    bank = both.bank
    bank.tx(5, 20, 0)
    both.sync()
    (alert,) = both.lane_alerts
    assert alert.summary is None
    assert alert.numbers["known_countries"] is None
    both.assert_equal()
    bank.close()


def test_truncate_then_same_row_again(pg_db: PgDatabase, tmp_path: Path) -> None:
    """After a truncate the start rows are the whole table: a row written again with the
    same key and values in the same batch is no new use (no trigger)."""
    both = Both(open_bank(pg_db, tmp_path, small()), ImpossibleTravelLane)
    bank = both.bank
    bank.tx(1, 20, 0, id=1)
    bank.tx(1, 20, 200, id=2, country="FR")
    both.sync()
    statement = (
        "INSERT INTO transactions (id, account_id, card_id, merchant_id, amount, currency, "
        "channel, type, status, country, created_at, updated_at) VALUES "
        f"(2, 1, 1, 1, 20, 'EUR', 'pos', 'purchase', 'settled', 'FR', '{at(200).isoformat()}', "
        f"'{at(200).isoformat()}')"
    )
    bank.harness.transaction("TRUNCATE transactions CASCADE", statement)
    bank.tx(1, 20, 300, country="US")
    both.sync()
    both.assert_equal()
    bank.close()


def test_restart_from_saved_state(pg_db: PgDatabase, tmp_path: Path) -> None:
    """An evaluator seeded from the mirror and what the previous one saved (watermark,
    incidents) goes on as if it had not stopped: no second alert in the incident."""
    both = Both(open_bank(pg_db, tmp_path, small()), ImpossibleTravelLane)
    bank = both.bank
    bank.tx(1, 20, 0)
    bank.tx(1, 20, 10, country="FR")
    both.sync()
    both.start_lane(from_saved=True)
    bank.tx(1, 20, 20, country="US")  # same incident
    both.sync()
    both.restart()
    both.start_lane(from_saved=True)
    bank.tx(1, 20, 200, country="DE")  # past the re-arm: a new incident
    bank.tx(2, 20, 200, country="IT")  # no history before the batch: neither is new
    bank.tx(2, 20, 210, country="FR")  # (IT has no location: no distance)
    both.sync()
    both.assert_equal()
    assert [(alert.account, alert.event_us) for alert in both.lane_alerts] == [
        (1, int(at(10).timestamp()) * 1_000_000),
        (1, int(at(200).timestamp()) * 1_000_000),
    ]
    bank.close()


def test_duckdb_numbers() -> None:
    """The float helpers copy DuckDB 2 (checked against DuckDB here)."""
    con = duckdb.connect()
    values = [16.65, 49.05, 2.5, 0.05, 1234.45, 7834.5, 28_800_000.25, 1e17]
    for value in values:
        for digits in (0, 1):
            expected = con.execute(f"SELECT round(?::DOUBLE, {digits})", [value]).fetchone()
            assert expected is not None
            assert duck_round(value, digits) == expected[0]
    base = int((T0 - T0.replace(year=1970, month=1, day=1)) / timedelta(microseconds=1))
    for us in (base + 103_017, base + 1, base + 999_999, base + 5_000_123):
        got = con.execute("SELECT epoch(make_timestamptz(?::BIGINT))", [us]).fetchone()
        assert got is not None
        assert epoch(us) == got[0]


# ----------------------------------------------------------------- property


ACCOUNTS = (1, 2, 3)
STEPS = st.sampled_from([5, 5, 10, 10, 20, 30, 60, 400, -30, -200, -700])
"""Seconds from the newest event time so far: mostly forward within the 5-minute window,
sometimes past it, sometimes out of order (within lateness) or late."""
COUNTRIES = st.sampled_from(["DE", "DE", "FR", "US", "IT"])
KINDS = st.sampled_from(["pos", "pos", "atm", "online"])
KIND = {"pos": ("pos", "purchase"), "atm": ("atm", "withdrawal"), "online": ("online", "purchase")}
"""(channel, type) of a row kind (the schema's checks)."""

insert = st.tuples(st.just("insert"), st.sampled_from((1, 1, 2, 3)), STEPS, COUNTRIES, KINDS)
operation = st.one_of(
    insert,
    insert,
    insert,
    lane_hypothesis.change("country", COUNTRIES),
    lane_hypothesis.change("kind", KINDS),
    lane_hypothesis.change("time", STEPS),
    lane_hypothesis.change("account", st.sampled_from(ACCOUNTS)),
    lane_hypothesis.change("status", st.just("declined")),
    *lane_hypothesis.lifecycle(),
)
THEN = st.builds(
    lambda sync, restart, relane: lane_hypothesis.Then(sync, restart, restart and relane),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
"""Sync after the transactions, restart the engine after syncing, and then start a new
evaluator from the store and its saved record. Not from the store alone: that is a
snapshot rebuild's watermark (the mirror's newest time), not the engine's, which a
deleted or moved row may have set higher."""


class Writer(lane_hypothesis.Writer):
    """Transactions: inserts; changes of country, kind, time, account, status and key."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0
        """The newest event time written so far (s after T0)."""

    def when(self, step: int, tx_id: int) -> str:
        """``step`` seconds from the clock (not before T0), plus the row's id in µs: no two
        rows share a time, so no previous use is a tie (the SQL rule's ASOF join picks one
        of equal times by physical order)."""
        seconds = max(0, self.clock + step)
        self.clock = max(self.clock, seconds)
        return f"'{(at(seconds) + timedelta(microseconds=tx_id)).isoformat()}'"

    def statement(self, op: lane_hypothesis.Op) -> str | None:
        if op[0] != "insert":
            return self.write(self.transactions, op)
        _, account, step, country, row_kind = op
        channel, type_ = KIND[row_kind]
        tx_id = self.new_id()
        self.transactions.live[tx_id] = None
        return insert_transaction(
            tx_id,
            account,
            20.5,
            self.when(step, tx_id),
            channel=channel,
            type=type_,
            country=country,
            merchant=1,
            card=account,
            device=f"t-{tx_id}",
        )

    def assignments(self, rows: lane_hypothesis.Rows[Any], key: int, kind: str, value: Any) -> str:
        if kind == "time":
            return new_time(self.when(value, key))
        if kind == "account":
            return f"account_id = {value}"
        if kind == "country":
            return f"country = '{value}'"
        if kind == "kind":
            channel, type_ = KIND[value]
            return f"channel = '{channel}', type = '{type_}'"
        return new_status(value)


@lane_hypothesis.LANE_SETTINGS
@given(
    config=st.tuples(
        st.sampled_from([1, 1, 0, 2]), st.sampled_from([None, None, 50_000.0]), st.booleans()
    ),
    example=lane_hypothesis.examples(insert, operation, initial=(4, 16), then=THEN),
)
def test_lane_equals_sql_rule(
    fresh: tuple[PgDatabase, Path],
    config: tuple[int, float | None, bool],
    example: lane_hypothesis.Example,
) -> None:
    """The configuration (min_history, max_speed_kmh, new_country), then the example."""
    both = lane_hypothesis.run_example(
        fresh, example, lane=ImpossibleTravelLane, config=small(*config), writer=Writer()
    )
    travel = sum(1 for alert in both.lane_alerts if alert.numbers["impossible_travel"])
    event(f"impossible travel alerts: {'some' if travel else 'none'}")

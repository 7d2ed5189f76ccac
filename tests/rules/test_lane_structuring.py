"""The rules lane's structuring equals the SQL rule on the same change streams.

Every batch the engine applies (real PostgreSQL → pgoutput → batcher) is also given
to :class:`StructuringLane` (:mod:`tests.rules.lane_harness`); the lane's alerts must
be the SQL rule's ``structuring`` alerts, payload included: for the rule's own test
cases, and for random sequences of inserts, updates (amount into and out of the band,
status declined / reversed / back, type, time, account, key), deletes and truncates of
a few accounts, cut into batches at random transaction boundaries, with engine
restarts and lane restarts from what it saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from headrace.rules.lane.duck_numbers import duck_round, duck_text
from headrace.rules.lane.structuring import StructuringLane
from tests.conftest import PgDatabase
from tests.rules import lane_hypothesis
from tests.rules.bank import (
    Bank,
    at,
    insert_transaction,
    new_status,
    new_time,
    only,
    open_bank,
    sql_time,
)
from tests.rules.lane_harness import Both

HOUR = 3600.0


def _transfer(bank: Bank, account: int, amount: float, seconds: float, **kw: Any) -> int:
    return bank.tx(account, amount, seconds, channel="transfer", type="transfer_in", **kw)


def test_duckdb_text_and_round() -> None:
    """The summary's numbers print as DuckDB's ``format`` prints them."""
    assert duck_round(900 / 3600, 1) == 0.3  # half away from zero: Python says 0.2
    assert duck_round(86400 / 3600, 1) == 24.0
    assert duck_text(duck_round(600 / 3600, 1)) == "0.2"
    assert [duck_text(v) for v in (3, 24.0)] == ["3", "24.0"]
    assert duck_round(0.15, 1) == 0.1  # DuckDB rounds the double's exact value (0.1499...)


def test_cancelled_and_created_by_updates(pg_db: PgDatabase, tmp_path: Path) -> None:
    """tests/rules/test_structuring.py's first case, through both."""
    both = Both(open_bank(pg_db, tmp_path, only("structuring")), StructuringLane)
    bank = both.bank
    first = _transfer(bank, 1, 9_500, 0)
    second = _transfer(bank, 1, 9_900, 2 * HOUR, status="pending")
    _transfer(bank, 1, 10_000, 3 * HOUR)  # at the threshold: not counted
    _transfer(bank, 1, 8_999.99, 3 * HOUR)  # under the band
    _transfer(bank, 2, 9_100, 0)
    both.sync()
    bank.set_status(second, "declined")  # cancels the second one
    third = _transfer(bank, 1, 9_000, 4 * HOUR)  # 2 in the band, not 3
    both.sync()
    assert both.lane() == [] == both.sql()
    fourth = _transfer(bank, 1, 5_000, 5 * HOUR)
    both.sync()
    bank.execute(f"UPDATE transactions SET amount = 9950 WHERE id = {fourth}")  # into the band
    both.sync()
    ((account, _, _, _, severity, summary, numbers, trigger, evidence),) = both.lane()
    assert (account, severity, trigger) == (1, "medium", fourth)
    assert [dict(row)["id"] for row in evidence] == [first, third, fourth]
    assert summary == (
        "3 transactions of 9000.0 to 9950.0 (total 28450.0) within 24.0 h on account 1"
    )
    assert dict(numbers)["transactions"] == 3
    assert dict(numbers)["total"] == 28_450
    both.assert_equal()
    _transfer(bank, 2, 9_200, 25 * HOUR)  # more than 24 h after account 2's first one
    _transfer(bank, 2, 9_300, 26 * HOUR)  # only 2 within 24 h
    both.sync()
    assert len(both.lane()) == 1
    both.assert_equal()
    bank.close()


def test_pattern_completed_across_a_restart(pg_db: PgDatabase, tmp_path: Path) -> None:
    """tests/rules/test_structuring.py's second case: the engine restarts mid-pattern."""
    config = only("structuring", "{threshold: 1000, min_count: 3}")
    both = Both(open_bank(pg_db, tmp_path, config), StructuringLane)
    bank = both.bank
    _transfer(bank, 3, 950, 0)
    _transfer(bank, 3, 960, 60)
    both.sync()
    both.restart()
    _transfer(bank, 3, 970, 120)
    both.sync()
    ((*_, numbers, _, _),) = both.lane()
    assert dict(numbers)["transactions"] == 3
    assert dict(numbers)["band_low"] == 900
    both.assert_equal()
    bank.close()


def test_restart_from_saved_state(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A lane seeded from the mirror and what the previous one saved (watermark,
    incidents) goes on as if it had not stopped: no second alert in the incident, a new
    one after the re-arm time; the band state is rebuilt from the mirror."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), StructuringLane)
    bank = both.bank
    for n in range(3):
        _transfer(bank, 1, 95, n * 5)
    _transfer(bank, 2, 91, 0)
    _transfer(bank, 2, 92, 5)
    both.sync()
    both.start_lane(from_saved=True)
    _transfer(bank, 1, 96, 20)  # same incident
    _transfer(bank, 2, 93, 10)  # completes account 2's pattern from the seeded band
    both.sync()
    both.restart()
    both.start_lane(from_saved=True)
    for n in range(3):  # past the 1-minute re-arm: a new incident
        _transfer(bank, 1, 97, 200 + n)
    both.sync()
    both.assert_equal()
    assert [(a[0], a[2]) for a in both.lane()] == [(1, at(10)), (1, at(202)), (2, at(10))]
    bank.close()


def test_late_rows_moves_and_fractional_window(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A late row counts but does not trigger; a row moved in time or to another account
    is checked at its new place; a reversal takes a row out; a 15-minute window prints
    as 0.3 h (DuckDB rounds half away from zero)."""
    config = """
rules:
  lateness: 2m
  structuring: {threshold: 100, min_count: 3, window: 15m, rearm_after: 1m}
"""
    both = Both(open_bank(pg_db, tmp_path, config), StructuringLane)
    bank = both.bank
    a = [_transfer(bank, 1, 95, n) for n in (0, 10)]
    far = _transfer(bank, 1, 95, 5000)
    both.sync()
    bank.execute(
        f"UPDATE transactions SET created_at = '{at(20).isoformat()}', "
        f"updated_at = '{at(20).isoformat()}' WHERE id = {far}"
    )
    both.sync()  # moved back: late against the watermark (5000 s), no trigger
    bank.execute(f"UPDATE transactions SET account_id = 2 WHERE id = {a[0]}")
    _transfer(bank, 3, 99.99, 4990)
    _transfer(bank, 3, 90, 4995)
    rev = _transfer(bank, 3, 90.5, 4996)
    both.sync()
    bank.set_status(rev, "reversed")
    _transfer(bank, 3, 91, 4998)
    both.sync()
    both.assert_equal()
    assert [
        (alert[0], alert[5].endswith("within 0.3 h on account 3")) for alert in both.lane()
    ] == [(3, True)]
    bank.close()


def test_evidence_capped_numbers_complete(pg_db: PgDatabase, tmp_path: Path) -> None:
    """More band rows than EVIDENCE_LIMIT: the evidence is the first 50 by time, the
    numbers and the summary cover every row."""
    config = only("structuring", "{threshold: 100, min_count: 51, window: 1h}")
    both = Both(open_bank(pg_db, tmp_path, config), StructuringLane)
    bank = both.bank
    for n in range(53):
        _transfer(bank, 5, 90 + (n % 10), n)
    both.sync()
    ((*_, summary, numbers, _, evidence),) = both.lane()
    assert (dict(numbers)["transactions"], len(evidence)) == (51, 50)
    assert summary.startswith("51 transactions of 90.0 to 99.0 (total 4815.0)")
    both.assert_equal()
    bank.close()


def test_sql_rule_misses_patterns_completed_before_their_newest_row(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    """SQL rule finding, ported as is: a trigger counts only the window *ending* at it,
    so a row that completes a pattern but is not its newest row raises nothing: an
    amount corrected into the band, or a row arriving out of order (well within
    ``rules.lateness``) in a later batch. Three band rows within 2 minutes, no alert
    from either side."""
    config = only("structuring", "{threshold: 1000, min_count: 3}")
    both = Both(open_bank(pg_db, tmp_path, config), StructuringLane)
    bank = both.bank
    _transfer(bank, 4, 950, 0)
    corrected = _transfer(bank, 4, 500, 60)
    _transfer(bank, 4, 960, 120)
    both.sync()
    bank.execute(f"UPDATE transactions SET amount = 970 WHERE id = {corrected}")
    both.sync()  # 950 @0, 970 @60, 960 @120: in the band, within 24 h
    _transfer(bank, 6, 950, 0)
    _transfer(bank, 6, 960, 120)
    both.sync()
    _transfer(bank, 6, 970, 60)  # one minute behind the newest: not late
    both.sync()
    assert both.lane() == [] == both.sql()
    bank.close()


SMALL = """
rules:
  lateness: 5m
  structuring:
    threshold: 100
    min_count: 3
    window: 2m
    rearm_after: 1m
    where: "type IN ('transfer_in', 'purchase')"
"""
"""A small band and window: random streams of a few rows complete patterns often."""


# ----------------------------------------------------------------- property


ACCOUNTS = (1, 2, 3)
TIMES = st.one_of(
    st.integers(0, 24).map(lambda n: n * 5),  # dense: patterns (and ties) happen
    st.integers(0, 24).map(lambda n: n * 5),
    st.integers(0, 40).map(lambda n: n * 10),  # spread: quiet periods, re-arming, late rows
)
AMOUNTS = st.sampled_from(["95", "95", "95", "92.5", "90", "99.99", "89.99", "100", "150"])
"""Mostly in the band [90, 100); its edges; outside."""
TYPES = st.sampled_from(
    ["transfer_in", "transfer_in", "transfer_in", "purchase", "withdrawal", "transfer_out"]
)
CHANNEL = {"purchase": "online", "withdrawal": "atm"}
"""The channel a type needs (the schema's checks); transfers: transfer."""
STATUSES = st.sampled_from(["declined", "reversed", "settled", "pending"])

insert = st.tuples(st.just("insert"), st.sampled_from((1, 1, 2, 3)), TIMES, TYPES, AMOUNTS)
operation = st.one_of(
    insert,
    insert,
    insert,
    lane_hypothesis.change("amount", AMOUNTS),
    lane_hypothesis.change("amount", AMOUNTS),
    lane_hypothesis.change("status", STATUSES),
    lane_hypothesis.change("status", STATUSES),
    lane_hypothesis.change("time", TIMES),
    lane_hypothesis.change("account", st.sampled_from(ACCOUNTS)),
    lane_hypothesis.change("type", TYPES),
    *lane_hypothesis.lifecycle(),
)
THEN = st.sampled_from(
    [
        lane_hypothesis.Then(),
        lane_hypothesis.Then(sync=True),
        lane_hypothesis.Then(sync=True, restart=True),
        lane_hypothesis.Then(sync=True, relane=True),
    ]
)
"""After a step: nothing, a sync, a sync and an engine restart, or a sync and a new lane
started from what the previous one saved."""


class Writer(lane_hypothesis.Writer):
    """Transactions: inserts; changes of amount, status, time, account, type and key."""

    def statement(self, op: lane_hypothesis.Op) -> str | None:
        if op[0] != "insert":
            return self.write(self.transactions, op)
        _, account, seconds, type_, amount = op
        channel = CHANNEL.get(type_, "transfer")
        card = account if channel != "transfer" else None
        tx_id = self.new_id()
        self.transactions.live[tx_id] = None
        return insert_transaction(
            tx_id,
            account,
            amount,
            sql_time(seconds),
            channel=channel,
            type=type_,
            merchant=1,
            card=card,
        )

    def assignments(self, rows: lane_hypothesis.Rows[Any], key: int, kind: str, value: Any) -> str:
        if kind == "amount":
            return f"amount = {value}"
        if kind == "time":
            return new_time(sql_time(value))
        if kind == "account":
            return f"account_id = {value}"
        if kind == "type":
            channel = CHANNEL.get(value, "transfer")
            card = "NULL" if channel == "transfer" else "account_id"
            return f"type = '{value}', channel = '{channel}', card_id = {card}"
        return new_status(value)


@lane_hypothesis.LANE_SETTINGS
@given(example=lane_hypothesis.examples(insert, operation, initial=(6, 24), then=THEN))
def test_lane_equals_sql_rule(
    fresh: tuple[PgDatabase, Path], example: lane_hypothesis.Example
) -> None:
    lane_hypothesis.run_example(fresh, example, lane=StructuringLane, config=SMALL, writer=Writer())

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

import itertools
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from headrace.rules.lane.duck_numbers import duck_round, duck_text
from headrace.rules.lane.structuring import StructuringLane
from tests.conftest import PgDatabase
from tests.rules.bank import Bank, at, only, open_bank
from tests.rules.lane_harness import Both, reset_database

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
update_amount = st.tuples(st.just("amount"), st.integers(0, 1000), AMOUNTS)
update_status = st.tuples(st.just("status"), st.integers(0, 1000), STATUSES)
update_time = st.tuples(st.just("time"), st.integers(0, 1000), TIMES)
update_account = st.tuples(st.just("account"), st.integers(0, 1000), st.sampled_from(ACCOUNTS))
update_type = st.tuples(st.just("type"), st.integers(0, 1000), TYPES)
update_key = st.tuples(st.just("key"), st.integers(0, 1000), st.just(0))
delete = st.tuples(st.just("delete"), st.integers(0, 1000), st.just(0))
truncate = st.tuples(st.just("truncate"), st.integers(0, 9), st.just(0))  # acts on 0 only
operation = st.one_of(
    insert,
    insert,
    insert,
    update_amount,
    update_amount,
    update_status,
    update_status,
    update_time,
    update_account,
    update_type,
    update_key,
    delete,
    truncate,
)
transaction = st.lists(operation, min_size=1, max_size=4)
step = st.tuples(st.lists(transaction, min_size=2, max_size=8), st.sampled_from(range(4)))
"""(transactions, then: 0 nothing, 1 sync, 2 sync and restart the engine, 3 sync and
start a new lane from what the previous one saved)."""


class Writer:
    """Writes the operations to PostgreSQL, tracking the live transaction ids."""

    def __init__(self) -> None:
        self.bank: Bank | None = None
        self.live: list[int] = []
        self.next_id = 5000

    def statement(self, op: tuple[Any, ...]) -> str | None:  # noqa: PLR0911 - one per kind
        kind = op[0]
        if kind == "insert":
            _, account, seconds, type_, amount = op
            channel = CHANNEL.get(type_, "transfer")
            card = account if channel != "transfer" else "NULL"
            tx_id = self.next_id
            self.next_id += 1
            self.live.append(tx_id)
            when = at(seconds).isoformat()
            return (
                "INSERT INTO transactions (id, account_id, card_id, merchant_id, amount, "
                "currency, channel, type, status, country, created_at, updated_at) VALUES "
                f"({tx_id}, {account}, {card}, 1, {amount}, 'EUR', '{channel}', '{type_}', "
                f"'settled', 'DE', '{when}', '{when}')"
            )
        if kind == "truncate":
            if op[1] != 0:
                return None
            self.live.clear()
            return "TRUNCATE transactions CASCADE"
        if not self.live:
            return None
        tx_id = self.live[op[1] % len(self.live)]
        value = op[2]
        if kind == "delete":
            self.live.remove(tx_id)
            return f"DELETE FROM transactions WHERE id = {tx_id}"
        if kind == "key":
            new_id = self.next_id
            self.next_id += 1
            self.live[self.live.index(tx_id)] = new_id
            return f"UPDATE transactions SET id = {new_id} WHERE id = {tx_id}"
        if kind == "amount":
            change = f"amount = {value}"
        elif kind == "time":
            when = at(value).isoformat()
            change = f"created_at = '{when}', updated_at = '{when}'"
        elif kind == "account":
            change = f"account_id = {value}"
        elif kind == "type":
            channel = CHANNEL.get(value, "transfer")
            card = "NULL" if channel == "transfer" else "account_id"
            change = f"type = '{value}', channel = '{channel}', card_id = {card}"
        else:
            reason = "'do_not_honor'" if value == "declined" else "NULL"
            change = f"status = '{value}', decline_reason = {reason}"
        return f"UPDATE transactions SET {change} WHERE id = {tx_id}"

    def statements(self, ops: list[tuple[Any, ...]]) -> list[str]:
        return [s for op in ops if (s := self.statement(op)) is not None]

    def run(self, transactions: list[list[tuple[Any, ...]]]) -> None:
        assert self.bank is not None
        for ops in transactions:
            statements = self.statements(ops)
            if statements:
                self.bank.harness.transaction(*statements)


_examples = itertools.count()


@settings(
    # More for a longer hunt; beyond ~70 examples pass `--timeout 0`: pytest-timeout's
    # 300 s per test otherwise interrupts DuckDB mid-batch ("Query interrupted").
    max_examples=int(os.environ.get("HR_LANE_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    before=st.lists(insert, max_size=8),
    initial=st.lists(insert.map(lambda op: [op]), min_size=6, max_size=24),
    steps=st.lists(step, min_size=1, max_size=6),
    cuts=st.lists(st.booleans(), min_size=1, max_size=20),
)
def test_lane_equals_sql_rule(
    fresh: tuple[PgDatabase, Path],
    before: list[tuple[Any, ...]],
    initial: list[list[tuple[Any, ...]]],
    steps: list[tuple[list[list[tuple[Any, ...]]], int]],
    cuts: list[bool],
) -> None:
    db, tmp_path = fresh
    reset_database(db)
    example = tmp_path / f"ex{next(_examples)}"
    example.mkdir()
    writer = Writer()
    # rows before the snapshot: the SQL rule rebuilds from the mirror, the lane seeds
    before_snapshot = tuple(writer.statements(before))
    both = Both(open_bank(db, example, SMALL, before_snapshot=before_snapshot), StructuringLane)
    writer.bank = both.bank
    cut_points = itertools.cycle(cuts)
    writer.run(initial)  # one insert per transaction: enough rows for patterns
    try:
        for transactions, then in steps:
            writer.run(transactions)
            if then:
                both.sync(lambda: next(cut_points))
                both.assert_equal()
            if then == 2:
                both.restart()
            elif then == 3:
                both.start_lane(from_saved=True)
        both.sync(lambda: next(cut_points))
        both.assert_equal()
        alerts = len(both.lane_alerts)
        event(f"alerts: {min(alerts, 3)}{'+' if alerts > 3 else ''}")
    finally:
        both.bank.close()

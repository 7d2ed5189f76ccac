"""The rules lane's card testing equals the SQL rule on the same change streams.

Every batch the engine applies (real PostgreSQL → pgoutput → batcher) is also given
to :class:`CardTestingLane` (:mod:`tests.rules.lane_harness`); the lane's alerts must
be the SQL rule's ``card_testing`` alerts, payload included: for the rule's own test
cases, and for random sequences of inserts, updates (amount, status, merchant,
channel, time, account, key), deletes, truncates and rows written again with their
old key and values, cut into batches at random transaction boundaries, with engine
restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from headrace.rules.lane.card_testing import CardTestingLane
from tests.conftest import PgDatabase
from tests.rules import lane_hypothesis
from tests.rules.bank import (
    ALL_RULES,
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


def _online(
    bank: Bank, account: int, amount: float, seconds: float, merchant: int, **kw: Any
) -> int:
    return bank.tx(
        account, amount, seconds, channel="online", merchant=merchant, device="x-dev", **kw
    )


# ------------------------------------------------------- the rule's own cases


@pytest.mark.parametrize("config", [only("card_testing"), ALL_RULES], ids=["alone", "all_rules"])
def test_small_attempts_across_merchants(pg_db: PgDatabase, tmp_path: Path, config: str) -> None:
    """(All rules: the recent transactions and triggers shared with the other rules.)"""
    both = Both(open_bank(pg_db, tmp_path, config), CardTestingLane)
    bank = both.bank
    for n in range(5):
        _online(bank, 1, 0.99, n * 20, merchant=1 + n % 4)  # 5 attempts at 4 merchants
        _online(bank, 2, 0.99, n * 20, merchant=1)  # 5 attempts at one merchant
        _online(bank, 3, 0.99, n * 200, merchant=1 + n)  # 5 merchants over 13 minutes
        bank.tx(4, 0.99, n * 20, merchant=1 + n)  # card present: not online
    both.sync()
    ((account, *_, numbers, _, evidence),) = both.lane()
    assert account == 1
    assert (dict(numbers)["attempts"], dict(numbers)["merchants"], dict(numbers)["small"]) == (
        5,
        4,
        5,
    )
    assert len(evidence) == 5
    both.assert_equal()
    bank.close()


def test_a_later_decline_creates_the_pattern(pg_db: PgDatabase, tmp_path: Path) -> None:
    both = Both(open_bank(pg_db, tmp_path, only("card_testing")), CardTestingLane)
    bank = both.bank
    for n in range(4):
        _online(bank, 5, 1.5, n * 20, merchant=1 + n)
    pending = _online(bank, 5, 49.0, 90, merchant=6, status="pending")  # not small
    both.sync()
    assert both.lane() == [] == both.sql()
    both.restart()
    bank.set_status(pending, "declined")  # a decline counts whatever the amount
    both.sync()
    ((*_, numbers, trigger, _),) = both.lane()
    assert trigger == pending
    assert (dict(numbers)["attempts"], dict(numbers)["merchants"], dict(numbers)["declined"]) == (
        5,
        5,
        1,
    )
    both.assert_equal()
    bank.close()


def test_a_pattern_completed_behind_the_newest_attempt_waits(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    """The SQL rule's finding (kept by the lane): an attempt completes a pattern only in
    the window *ending* at it. An attempt arriving late (within ``rules.lateness``), or
    an earlier one declined now, whose pattern lies in the window ending at a later
    attempt raises nothing until the next attempt of the account comes."""
    both = Both(open_bank(pg_db, tmp_path, only("card_testing")), CardTestingLane)
    bank = both.bank
    for n in range(4):
        _online(bank, 6, 0.99, 60 + n * 60, merchant=1 + n)
        _online(bank, 7, 0.99, n * 60, merchant=1 + n)
    pending = _online(bank, 7, 49.0, 30, merchant=5, status="pending")
    both.sync()
    _online(bank, 6, 0.99, 0, merchant=5)  # late: 5 attempts at 5 merchants in 4 minutes
    bank.set_status(pending, "declined")  # 5 attempts at 5 merchants in 3 minutes
    both.sync()
    assert both.lane() == [] == both.sql()
    _online(bank, 6, 0.99, 250, merchant=1)  # the next attempt sees the pattern
    both.sync()
    assert [alert[0] for alert in both.lane()] == [6]
    both.assert_equal()
    bank.close()


# ------------------------------------------------------- more cases


SMALL = """
rules:
  lateness: 2m
  card_testing:
    small_amount: 2
    min_attempts: 3
    min_merchants: 2
    window: 1m
    rearm_after: 1m
"""
"""Small thresholds: random streams of a few rows cross them often."""

NO_DECLINES = """
rules:
  lateness: 2m
  card_testing:
    small_amount: 2.5
    declines: null
    min_attempts: 3
    min_merchants: 1
    window: 1m
    rearm_after: 1m
"""
"""Only small amounts count (declines none); one merchant is enough."""


def test_status_amount_and_merchant_changes(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A small attempt declined does not trigger again (it already was an attempt); an
    amount or merchant change does; a row no longer an attempt leaves the window."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), CardTestingLane)
    bank = both.bank
    a = [_online(bank, 1, 1.0, n * 5, merchant=1) for n in range(3)]  # one merchant only
    big = _online(bank, 2, 30.0, 0, merchant=1)
    _online(bank, 2, 1.0, 5, merchant=2)
    both.sync()
    assert both.lane() == []
    bank.set_status(a[2], "declined")  # no trigger: it was an attempt already
    bank.execute(f"UPDATE transactions SET amount = 1.5 WHERE id = {big}")  # now small
    both.sync()
    bank.execute(f"UPDATE transactions SET merchant_id = 2 WHERE id = {a[2]}")  # re-triggers
    both.sync()
    _online(bank, 3, 1.0, 40, merchant=3)
    _online(bank, 3, 1.0, 41, merchant=4)
    pos = bank.tx(3, 1.0, 42, merchant=5)
    both.sync()
    bank.execute(f"UPDATE transactions SET channel = 'online' WHERE id = {pos}")  # now online
    both.sync()
    both.assert_equal()
    assert {alert[0] for alert in both.lane()} == {1, 3}
    bank.close()


def test_attempts_without_a_merchant(pg_db: PgDatabase, tmp_path: Path) -> None:
    """An attempt without a merchant counts as an attempt, not as a merchant
    (``count(DISTINCT)`` skips NULL); its evidence shows no merchant."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), CardTestingLane)
    bank = both.bank
    for n, merchant in enumerate((None, 1, None)):
        bank.tx(1, 1.0, n * 5, channel="online", merchant=merchant)
    both.sync()
    assert both.lane() == []
    bank.tx(1, 1.0, 15, channel="online", merchant=2)
    both.sync()
    ((*_, numbers, _, evidence),) = both.lane()
    assert (dict(numbers)["attempts"], dict(numbers)["merchants"]) == (4, 2)
    assert [dict(row)["merchant"] for row in evidence] == [None, 1, None, 2]
    both.assert_equal()
    bank.close()


def test_truncate_and_the_same_row_again(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A batch truncating the table and writing a key again with the values it had does
    not trigger on it: the engine's start rows are then the whole table before the batch.
    Account 1's row 102 would complete a pattern (row 101 became small), but it is not a
    trigger; account 2's row 202, written again with a small amount, is."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), CardTestingLane)
    bank = both.bank
    rows = {1: ((0, 1.0), (5, 25.0), (10, 1.0)), 2: ((0, 1.0), (5, 1.0), (6, 25.0))}
    for account, times in rows.items():
        for n, (seconds, amount) in enumerate(times):
            _online(bank, account, amount, seconds, merchant=1 + n, id=account * 100 + n)
    both.sync()
    assert both.lane() == []
    bank.execute("TRUNCATE transactions CASCADE")
    again = {1: ((0, 1.0), (5, 1.0), (10, 1.0)), 2: ((0, 1.0), (5, 1.0), (6, 1.5))}
    for account, times in again.items():
        for n, (seconds, amount) in enumerate(times):
            _online(bank, account, amount, seconds, merchant=1 + n, id=account * 100 + n)
    both.sync()
    assert [(alert[0], alert[7]) for alert in both.lane()] == [(2, 202)]
    both.assert_equal()
    bank.close()


def test_restart_from_saved_state(pg_db: PgDatabase, tmp_path: Path) -> None:
    """An evaluator seeded from the mirror and what the previous one saved (watermark,
    incidents) goes on as if it had not stopped: no second alert in the incident."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), CardTestingLane)
    bank = both.bank
    for n in range(3):
        _online(bank, 1, 1.0, n * 5, merchant=1 + n)
    both.sync()
    both.start_lane(from_saved=True)
    for n in range(3, 6):
        _online(bank, 1, 1.0, n * 5, merchant=1 + n)
    both.sync()
    both.restart()
    both.start_lane(from_saved=True)
    for n in range(3):
        _online(bank, 1, 1.0, 300 + n, merchant=1 + n)  # past the re-arm: a new incident
    both.sync()
    both.assert_equal()
    assert len(both.lane()) == 2
    bank.close()


def test_seeded_from_a_snapshot(pg_db: PgDatabase, tmp_path: Path) -> None:
    """Attempts before the snapshot are in the window the lane seeds (as the SQL rule
    rebuilds it), and the watermark starts at the newest of them."""
    rows = [
        "INSERT INTO transactions (id, account_id, card_id, merchant_id, amount, currency, "
        "channel, type, status, country, created_at, updated_at) VALUES "
        f"({10 + n}, 1, 1, {1 + n}, 1.00, 'EUR', 'online', 'purchase', 'settled', 'DE', "
        f"'{at(n * 5).isoformat()}', '{at(n * 5).isoformat()}')"
        for n in range(2)
    ]
    bank = open_bank(pg_db, tmp_path, SMALL, before_snapshot=tuple(rows))
    both = Both(bank, CardTestingLane)
    _online(bank, 1, 1.0, 12, merchant=3)
    _online(bank, 1, 1.0, -200, merchant=3)  # late: counted, never a trigger
    both.sync()
    assert len(both.lane()) == 1
    both.assert_equal()
    bank.close()


# ----------------------------------------------------------------- property


ACCOUNTS = (1, 2, 3)
TIMES = st.one_of(
    st.integers(-12, 12),  # near the writer's clock: patterns (and ties) happen
    st.integers(-12, 12),
    st.integers(-12, 12),
    st.integers(-240, 40),  # far: late rows (lateness 2 min), quiet periods, re-arming
)
"""Event times as offsets (s) from the writer's clock, which moves 3 s per insert."""
AMOUNTS = st.sampled_from(["0.50", "1.00", "1.99", "2.00", "25.00"])
MERCHANTS = st.sampled_from((1, 2, 3, 4))
CHANNELS = st.sampled_from(("online", "online", "online", "online", "pos"))
STATUSES = st.sampled_from(("settled", "settled", "pending", "declined"))


@dataclass(frozen=True)
class Row:
    """A transaction as the writer last wrote it."""

    account: int
    seconds: int
    amount: str
    merchant: int
    channel: str
    status: str

    def insert(self, tx_id: int) -> str:
        return insert_transaction(
            tx_id,
            self.account,
            self.amount,
            sql_time(self.seconds),
            channel=self.channel,
            type="purchase",
            status=self.status,
            merchant=self.merchant,
            card=self.account,
            device="dev",
        )


insert = st.tuples(
    st.just("insert"),
    st.sampled_from((1, 1, 1, 2, 3)),
    TIMES,
    AMOUNTS,
    MERCHANTS,
    CHANNELS,
    STATUSES,
)
operation = st.one_of(
    insert,
    insert,
    insert,
    insert,
    insert,
    lane_hypothesis.change("amount", AMOUNTS),
    lane_hypothesis.change("status", STATUSES),
    lane_hypothesis.change("merchant", MERCHANTS),
    lane_hypothesis.change("channel", CHANNELS),
    lane_hypothesis.change("time", TIMES),
    lane_hypothesis.change("account", st.sampled_from(ACCOUNTS)),
    *lane_hypothesis.lifecycle(again=True, truncate_one_in=5),
)


class Writer(lane_hypothesis.Writer):
    """Purchases: inserts near a clock; changes of amount, status, merchant, channel,
    time, account and key; deleted and truncated rows written again."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: lane_hypothesis.Rows[Row] = self.transactions
        self.clock = 0
        """Seconds after T0 that the inserts' times are near."""
        self.again_after_truncate = 0
        """Rows truncated and then written again with their key and values."""

    def statement(self, op: lane_hypothesis.Op) -> str | None:
        kind = op[0]
        if kind == "insert":
            _, account, offset, amount, merchant, channel, status = op
            self.clock += 3
            row = Row(account, self.clock + offset, amount, merchant, channel, status)
            tx_id = self.new_id()
            self.rows.live[tx_id] = row
            return row.insert(tx_id)
        return self.write(self.rows, op)

    def insert_again(self, rows: lane_hypothesis.Rows[Any], key: int, row: Row) -> str:
        self.again_after_truncate += key in rows.truncated
        return row.insert(key)

    def assignments(self, rows: lane_hypothesis.Rows[Any], key: int, kind: str, value: Any) -> str:
        if kind == "time":
            value += self.clock
            name, sql = "seconds", new_time(sql_time(value))
        elif kind == "status":
            name, sql = "status", new_status(value)
        else:
            column = {"amount": "amount", "merchant": "merchant_id", "account": "account_id"}
            name = kind
            sql = f"channel = '{value}'" if kind == "channel" else f"{column[kind]} = {value}"
        rows.live[key] = replace(rows.live[key], **{name: value})
        return sql


@lane_hypothesis.LANE_SETTINGS
@given(
    example=lane_hypothesis.examples(insert, operation),
    config=st.sampled_from(("SMALL", "NO_DECLINES")),
)
def test_lane_equals_sql_rule(
    fresh: tuple[PgDatabase, Path], example: lane_hypothesis.Example, config: str
) -> None:
    yaml_text = {"SMALL": SMALL, "NO_DECLINES": NO_DECLINES}[config]
    writer = Writer()
    lane_hypothesis.run_example(
        fresh, example, lane=CardTestingLane, config=yaml_text, writer=writer
    )
    event(f"config: {config}")
    again = writer.again_after_truncate
    event(f"rows written again after a truncate: {min(again, 2)}{'+' if again > 2 else ''}")

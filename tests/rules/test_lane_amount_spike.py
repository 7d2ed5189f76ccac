"""The rules lane's amount spike equals the SQL rule on the same change streams.

Every batch the engine applies (real PostgreSQL → pgoutput → batcher) is also given
to :class:`AmountSpikeLane` (:mod:`tests.rules.lane_harness`); the lane's alerts must
be the SQL rule's ``amount_spike`` alerts, payload and summary included: for the rule's
own test cases, for moves, late rows and truncates, and for random sequences of
inserts, updates (amount, status, type, time, account, key), deletes, truncates and
re-inserts of old keys on a few accounts, cut into batches at random transaction
boundaries, with engine restarts.
"""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from headrace.rules.lane.amount_spike import AmountSpikeLane, _kept, _same
from headrace.rules.lane.duck_numbers import duck_round, duck_text
from tests.conftest import PgDatabase
from tests.rules import lane_hypothesis
from tests.rules.bank import (
    ALL_RULES,
    at,
    insert_transaction,
    new_status,
    new_time,
    only,
    open_bank,
    sql_time,
)
from tests.rules.lane_harness import Both

# ----------------------------------------------------------------- the SQL rule's cases


@pytest.mark.parametrize("config", [only("amount_spike"), ALL_RULES], ids=["alone", "all"])
def test_spike_against_own_history(pg_db: PgDatabase, tmp_path: Path, config: str) -> None:
    """``test_amount_spike.test_spike_against_own_history`` through both (and with every
    rule running: they share the batch's trigger table)."""
    both = Both(open_bank(pg_db, tmp_path, config), AmountSpikeLane)
    bank = both.bank
    for n in range(5):
        bank.tx(1, 40, n * 60)
    for n in range(4):
        bank.tx(2, 40, n * 60)
    bank.tx(1, 45, 400, status="declined")
    both.sync()
    bank.tx(2, 900, 500)  # too little history
    bank.tx(1, 300, 500, status="pending")  # 7.5x the mean: below the factor of 10
    bank.tx(1, 450, 501, channel="transfer", type="transfer_out")  # not a purchase
    both.sync()
    assert both.lane() == [] == both.sql()
    both.restart()
    spike = bank.tx(1, 800, 600, status="pending")
    both.sync()
    ((account, _, _, _, _, summary, numbers, trigger, evidence),) = both.lane()
    assert (account, trigger) == (1, spike)
    assert summary == "amount 800.0 is 20.0x the mean 40.0 of 5 earlier transactions of account 1"
    assert dict(numbers)["history"] == 5
    assert dict(evidence[0])["amount"] == 800
    both.assert_equal()
    bank.close()


def test_update_creates_a_spike_and_reversals_leave_the_history(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    """``test_amount_spike.test_update_creates_a_spike_...`` through both."""
    both = Both(open_bank(pg_db, tmp_path, only("amount_spike")), AmountSpikeLane)
    bank = both.bank
    history = [bank.tx(3, 50, n * 60) for n in range(6)]
    both.sync()
    small = bank.tx(3, 60, 400, status="pending")
    both.sync()
    assert both.lane() == []
    bank.execute(f"UPDATE transactions SET amount = 700 WHERE id = {small}")  # 14x the mean
    both.sync()
    ((*_, trigger, _),) = both.lane()
    assert trigger == small
    both.assert_equal()
    for tx_id in history[:2]:
        bank.set_status(tx_id, "reversed")
    both.sync()
    assert both.evaluator.history[3] == (4, 200 * 10_000)  # type: ignore[attr-defined]
    assert bank.duck("SELECT _rows, total FROM jobs.amount_spike__history WHERE account = 3") == [
        (4, 200)
    ]
    bank.tx(3, 5000, 500)  # 4 left: below min_history
    both.sync()
    both.assert_equal()
    assert len(both.lane()) == 1
    bank.close()


# ----------------------------------------------------------------- more of the semantics


def test_moves_late_rows_and_rounding(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A row moved in time alone is not checked again; moved to another account, given
    another amount or becoming a purchase, it is; a settlement only feeds the history; a
    row dated more than a day plus lateness behind the watermark is not checked; the
    summary rounds as DuckDB does."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), AmountSpikeLane)
    bank = both.bank
    for n, amount in enumerate((10.01, 10.02, 10.04)):
        bank.tx(1, amount, n)
        bank.tx(2, 20, n)
    pending = bank.tx(1, 25, 10, status="pending")  # 2.49x the mean, below min_amount
    both.sync()
    assert both.lane() == []
    when = at(20).isoformat()
    bank.execute(
        f"UPDATE transactions SET created_at = '{when}', updated_at = '{when}' WHERE id = {pending}"
    )
    bank.set_status(pending, "settled")  # joins the history: mean 13.77
    both.sync()
    assert both.lane() == []
    bank.execute(f"UPDATE transactions SET account_id = 2 WHERE id = {pending}")  # 25 < 50
    withdrawal = bank.tx(2, 77.7, 30, channel="atm", type="withdrawal")
    both.sync()
    bank.execute(
        f"UPDATE transactions SET type = 'purchase', channel = 'pos' WHERE id = {withdrawal}"
    )
    both.sync()  # 77.7 against the mean 21.25 of account 2 (20, 20, 20, 25)
    assert [alert[0] for alert in both.lane()] == [2]
    for n in range(3):
        bank.tx(3, 20, 40 + n)
    bank.tx(4, 10, 3 * 86_400)  # the watermark jumps three days
    both.sync()
    bank.tx(3, 500, 50)  # late: not checked
    both.sync()
    assert [alert[0] for alert in both.lane()] == [2]
    both.assert_equal()
    bank.close()


def test_truncate_compares_with_the_rows_before_it(pg_db: PgDatabase, tmp_path: Path) -> None:
    """The SQL rule's quirk (module docstring of the lane): in a batch that truncates,
    a row re-inserted under its old key with its old account and amount does not trigger,
    a new key does; both are compared with the history as of before the batch."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), AmountSpikeLane)
    bank = both.bank
    for account in (1, 2):
        for n in range(3):
            bank.tx(account, 20, n)
    old = bank.tx(1, 100, 10, status="pending")  # in the same batch: no history yet
    both.sync()
    assert both.lane() == []
    (again,) = _insert(old, 1, 100, 500)
    (new,) = _insert(9000, 2, 100, 500)
    bank.harness.transaction("TRUNCATE transactions CASCADE", again, new)
    both.sync()
    assert [alert[0] for alert in both.lane()] == [2]  # the re-inserted row is not checked
    both.assert_equal()
    bank.close()


def test_an_edited_history_row_counts_in_its_own_history(pg_db: PgDatabase, tmp_path: Path) -> None:
    """The SQL rule compares an edited settled purchase with the history as of before the
    batch, which holds the row itself with its old amount: 5 settled purchases of 40, one
    edited to 800, is "20x the mean 40 of 5 earlier transactions" although only 4 others
    exist (below ``min_history`` 5). The lane does the same (see its report). Then two
    spikes of one account in one transaction, at the same time: a tie both break the same
    way (the trigger first as text opens the incident)."""
    both = Both(open_bank(pg_db, tmp_path, only("amount_spike")), AmountSpikeLane)
    bank = both.bank
    history = [bank.tx(1, 40, n * 60) for n in range(5)]
    both.sync()
    bank.execute(f"UPDATE transactions SET amount = 800 WHERE id = {history[-1]}")
    both.sync()
    ((*_, summary, _, trigger, _),) = both.lane()
    assert trigger == history[-1]
    assert summary == "amount 800.0 is 20.0x the mean 40.0 of 5 earlier transactions of account 1"
    both.assert_equal()
    for n in range(5):
        bank.tx(2, 40, n * 60)
    both.sync()
    first, second = _insert(9000, 2, 900, 600) + _insert(9001, 2, 950, 600)
    bank.harness.transaction(first, second)
    both.sync()
    assert len(both.lane()) == 2
    assert both.lane_alerts[-1].tied  # 9000 and 9001: the same time and commit
    assert both.lane()[-1][-2] == 9000  # "9000" < "9001"
    both.assert_equal()
    bank.close()


def test_restart_from_saved_state(pg_db: PgDatabase, tmp_path: Path) -> None:
    """An evaluator seeded from the mirror and what the previous one saved (watermark,
    incidents) goes on as if it had not stopped: no second alert in the incident."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), AmountSpikeLane)
    bank = both.bank
    for n in range(3):
        bank.tx(1, 20, n)
    bank.tx(1, 60, 10, status="pending")
    both.sync()
    both.start_lane(from_saved=True)
    bank.tx(1, 70, 20, status="pending")  # same incident (re-arm 1 min)
    both.sync()
    both.restart()
    both.start_lane(from_saved=True)
    bank.tx(1, 80, 200, status="pending")  # a new incident
    both.sync()
    both.assert_equal()
    assert len(both.lane()) == 2
    both.restart()
    both.start_lane()  # from the store alone: its incidents and watermark
    bank.tx(1, 90, 230, status="pending")
    both.sync()
    both.assert_equal()
    assert len(both.lane()) == 2
    bank.close()


def test_duckdb_round_and_format() -> None:
    """:func:`duck_round` and :func:`duck_text` are DuckDB's ``round`` and ``format``."""
    generator = random.Random(7)  # noqa: S311 - test values, not secrets
    values = [generator.randint(1, 10**7) / generator.randint(1, 10**5) for _ in range(2000)]
    values += [82.125, 1902.25, 1215.935, 2.675, 0.145, 1e16 / 3, 2.0**52 / 10 + 0.5]
    con = duckdb.connect()
    con.execute("CREATE TABLE v (x DOUBLE)")
    con.executemany("INSERT INTO v VALUES (?)", [[v] for v in values])
    rows = con.execute("SELECT x, round(x, 1), round(x, 2), format('{}', x) FROM v").fetchall()
    for x, one, two, text in rows:
        assert (duck_round(x, 1), duck_round(x, 2), duck_text(x)) == (one, two, text), x
    con.close()


def test_amounts_compare_exactly() -> None:
    """Start and end amounts compare as DECIMALs do (``IS DISTINCT FROM``), though kept as
    the history's 1/10,000ths."""
    kept = _kept
    assert _same(kept(1, Decimal("700.00"), True), kept(1, Decimal("700.0"), False))
    assert not _same(kept(1, Decimal("1.00005"), True), kept(1, Decimal("1.0001"), True))
    assert not _same(kept(1, Decimal("1.00005"), True), kept(1, Decimal("1.00004"), True))
    assert not _same(kept(1, None, True), kept(1, Decimal(0), True))
    assert not _same(kept(1, Decimal(5), True), kept(2, Decimal(5), True))


SMALL = """
rules:
  lateness: 2m
  amount_spike:
    factor: 2.5
    min_amount: 50
    min_history: 3
    rearm_after: 1m
"""
"""Small thresholds for the cases above."""

RANDOM = """
rules:
  lateness: 2m
  amount_spike:
    factor: 2
    min_amount: 40
    min_history: 2
    rearm_after: 1m
"""
"""Smaller still: random streams of a few rows cross them often."""


def _insert(
    tx_id: int, account: int, amount: float, seconds: int, kind: str = "purchase"
) -> list[str]:
    status = "settled" if kind == "purchase" else "pending"
    return [
        insert_transaction(
            tx_id,
            account,
            amount,
            sql_time(seconds),
            channel=CHANNEL[kind],
            type=kind,
            status=status,
            merchant=1,
            card=account,
        )
    ]


# ----------------------------------------------------------------- property


ACCOUNTS = (1, 2, 3)
MINUTES = st.integers(0, 40).map(lambda n: n * 15)
"""Within minutes: re-arming, ties."""
TIMES = st.one_of(
    *[MINUTES] * 9,
    st.integers(1, 4).map(lambda n: n * 43_200 + 30),  # half days: late rows
)
SMALL_AMOUNTS = st.sampled_from([10, 20, 20, 25, 30, 33.33])
"""The rows of the initial history: low means."""
AMOUNTS = st.sampled_from([100, 10, 20, 25, 33.33, 50, 62.5, 75, 100, 123.45, 250, 1000])
TYPES = st.sampled_from(["purchase", "purchase", "purchase", "withdrawal", "transfer_out"])
STATUSES = st.sampled_from(["settled", "settled", "pending", "declined", "reversed"])
CHANNEL = {"purchase": "pos", "withdrawal": "atm", "transfer_out": "transfer"}
"""The channel a type needs (the schema's checks)."""

insert = st.tuples(st.just("insert"), st.sampled_from((1, 1, 2, 3)), TIMES, AMOUNTS, TYPES)
history = st.tuples(st.just("insert"), st.sampled_from(ACCOUNTS), MINUTES, SMALL_AMOUNTS, TYPES)
operation = st.one_of(
    insert,
    insert,
    insert,
    lane_hypothesis.change("amount", AMOUNTS),
    lane_hypothesis.change("status", STATUSES),
    lane_hypothesis.change("status", STATUSES),
    lane_hypothesis.change("type", TYPES),
    lane_hypothesis.change("time", TIMES),
    lane_hypothesis.change("account", st.sampled_from(ACCOUNTS)),
    *lane_hypothesis.lifecycle(again=True),
)


class Writer(lane_hypothesis.Writer):
    """Transactions: inserts; changes of amount, status, type, time, account and key;
    deleted and truncated rows written again under their old key and values."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: lane_hypothesis.Rows[tuple[int, float, int, str]] = self.transactions
        """Of each row: (account, amount, seconds, type)."""

    def statement(self, op: lane_hypothesis.Op) -> str | None:
        kind = op[0]
        if kind == "insert":
            _, account, seconds, amount, type_ = op
            tx_id = self.new_id()
            self.rows.live[tx_id] = (account, amount, seconds, type_)
            return _insert(tx_id, account, amount, seconds, type_)[0]
        return self.write(self.rows, op)

    def insert_again(self, rows: lane_hypothesis.Rows[Any], key: int, row: Any) -> str:
        return _insert(key, *row)[0]

    def assignments(self, rows: lane_hypothesis.Rows[Any], key: int, kind: str, value: Any) -> str:
        account, amount, seconds, type_ = rows.live[key]
        if kind == "status":
            return new_status(value)
        if kind == "amount":
            rows.live[key] = (account, value, seconds, type_)
            return f"amount = {value}"
        if kind == "type":
            rows.live[key] = (account, amount, seconds, value)
            return f"type = '{value}', channel = '{CHANNEL[value]}'"
        if kind == "time":
            rows.live[key] = (account, amount, value, type_)
            return new_time(sql_time(value))
        rows.live[key] = (value, amount, seconds, type_)
        return f"account_id = {value}, card_id = {value}"


# pytest-timeout's 300 s stops a longer hunt (as "Query interrupted" inside DuckDB):
# examples take up to ~7 s on a busy machine.
@pytest.mark.timeout(max(300, lane_hypothesis.EXAMPLES * 10))
@lane_hypothesis.LANE_SETTINGS
@given(example=lane_hypothesis.examples(history, operation))
def test_lane_equals_sql_rule(
    fresh: tuple[PgDatabase, Path], example: lane_hypothesis.Example
) -> None:
    """(After the initial transactions, a sync: the steps then find some history.)"""
    lane_hypothesis.run_example(
        fresh, example, lane=AmountSpikeLane, config=RANDOM, writer=Writer(), sync_initial=True
    )

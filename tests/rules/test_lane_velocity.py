"""The rules lane's velocity burst equals the SQL rule on the same change streams.

Every batch the engine applies (real PostgreSQL → pgoutput → batcher) is also given
to :class:`VelocityBurstLane` (:mod:`tests.rules.lane_harness`); the lane's alerts must
be the SQL rule's ``velocity_burst`` alerts, payload included: for the rule's own test
cases, and for random sequences of inserts, updates (status, type, time, account, key),
deletes and truncates of a few accounts, cut into batches at random transaction
boundaries, with engine restarts.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from headrace.rules.lane.velocity import VelocityBurstLane
from tests.conftest import PgDatabase
from tests.rules.bank import Bank, at, only, open_bank
from tests.rules.lane_harness import Both, reset_database


def test_burst_one_alert_per_incident_across_a_restart(pg_db: PgDatabase, tmp_path: Path) -> None:
    both = Both(open_bank(pg_db, tmp_path, only("velocity_burst")), VelocityBurstLane)
    bank = both.bank
    for n in range(7):
        bank.tx(1, 20, n * 5)
        bank.tx(2, 20, n * 30)
    bank.tx(1, 20, 36, type="transfer_in", channel="transfer")
    both.sync()
    assert both.lane() == [] == both.sql()
    both.restart()
    bank.tx(1, 20, 40)
    both.sync()
    ((account, _, event_at, *_, numbers, trigger, _),) = both.lane()
    assert (account, trigger, event_at) == (1, 1015, at(40))
    assert dict(numbers) == {"transactions": 8, "limit": 8, "window_seconds": 60, "amount": 160}
    both.assert_equal()
    for n in range(9, 14):
        bank.tx(1, 20, n * 5)
    both.sync()
    both.restart()
    bank.tx(1, 20, 70)
    both.sync()
    both.assert_equal()
    for n in range(8):  # past the 10-minute re-arm: a new incident
        bank.tx(1, 20, 1300 + n)
    both.sync()
    assert len(both.lane()) == 2
    both.assert_equal()
    bank.close()


def test_five_minute_limit_and_deletes(pg_db: PgDatabase, tmp_path: Path) -> None:
    both = Both(open_bank(pg_db, tmp_path, only("velocity_burst")), VelocityBurstLane)
    bank = both.bank
    ids = [bank.tx(3, 20, n * 15) for n in range(19)]
    both.sync()
    bank.execute(f"DELETE FROM transactions WHERE id = {ids[0]}")
    bank.tx(3, 20, 19 * 15)
    both.sync()
    assert both.lane() == []
    bank.tx(3, 20, 19 * 15 + 1)
    both.sync()
    ((*_, numbers, _, _),) = both.lane()
    assert dict(numbers)["transactions"] == 20
    assert dict(numbers)["window_seconds"] == 300
    both.assert_equal()
    bank.close()


def test_moves_and_late_rows(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A transaction moved in time or to another account is checked at its new place; a
    late one counts but does not trigger; a type change makes a row count."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), VelocityBurstLane)
    bank = both.bank
    a = [bank.tx(1, 20, n) for n in (0, 10)]
    far = bank.tx(1, 20, 100)
    both.sync()
    bank.execute(f"UPDATE transactions SET created_at = '{at(20).isoformat()}' WHERE id = {far}")
    both.sync()  # moved into the window: 3 in 60 s
    bank.tx(2, 20, 5)
    b = [bank.tx(2, 20, n, type="transfer_in", channel="transfer") for n in (10, 15)]
    both.sync()
    bank.execute(f"UPDATE transactions SET type = 'transfer_out' WHERE id IN ({b[0]}, {b[1]})")
    both.sync()  # they count now: account 2 crosses
    assert {alert[0] for alert in both.lane()} == {1, 2}
    bank.tx(3, 20, 2000)  # the watermark jumps: rows far behind are late
    both.sync()
    for n in range(3):
        bank.tx(3, 20, 100 + n)
    bank.execute(f"UPDATE transactions SET account_id = 3 WHERE id = {a[0]}")
    both.sync()
    both.assert_equal()
    assert {alert[0] for alert in both.lane()} == {1, 2}
    bank.close()


def test_rearm_counts_from_the_incident_last_seen(pg_db: PgDatabase, tmp_path: Path) -> None:
    """Re-arming: a candidate opens a new incident only ``rearm_after`` past both the
    previous candidate of the batch and the incident's stored last-seen time (here: seen
    at 100 s, re-arm 60 s; one batch brings a late candidate at 50 s and one at 130 s:
    no second alert)."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), VelocityBurstLane)
    bank = both.bank
    for n in (80, 90, 100):
        bank.tx(1, 20, n)
    both.sync()  # incident at 100 s
    for n in (30, 40, 50, 130, 140, 150):
        bank.tx(1, 20, n)
    both.sync()
    assert [alert[2] for alert in both.lane()] == [at(100)]
    both.assert_equal()
    for n in (220, 230, 240):  # 70 s after the last candidate: a new incident
        bank.tx(1, 20, n)
    both.sync()
    assert [alert[2] for alert in both.lane()] == [at(100), at(220)]
    both.assert_equal()
    bank.close()


def test_restart_from_saved_state(pg_db: PgDatabase, tmp_path: Path) -> None:
    """An evaluator seeded from the mirror and what the previous one saved (watermark,
    incidents) goes on as if it had not stopped: no second alert in the incident."""
    both = Both(open_bank(pg_db, tmp_path, only("velocity_burst")), VelocityBurstLane)
    bank = both.bank
    for n in range(8):
        bank.tx(1, 20, n * 5)
    both.sync()
    both.start_lane(from_saved=True)
    for n in range(8, 14):
        bank.tx(1, 20, n * 5)
    both.sync()
    both.restart()
    both.start_lane(from_saved=True)
    for n in range(8):
        bank.tx(1, 20, 1300 + n)
    both.sync()
    both.assert_equal()
    assert len(both.lane()) == 2
    bank.close()


def test_truncate_then_the_same_rows(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A batch that truncates and writes rows again: triggers compare with the table as it
    was before the batch (the engine's start rows), so unchanged rows do not trigger."""
    both = Both(open_bank(pg_db, tmp_path, SMALL), VelocityBurstLane)
    bank = both.bank
    bank.tx(1, 20, 0, id=100, type="transfer_in", channel="transfer")
    bank.tx(1, 20, 5, id=101)
    bank.tx(1, 20, 10, id=102)
    both.sync()
    bank.execute("TRUNCATE transactions CASCADE")
    bank.tx(1, 20, 0, id=100)
    bank.tx(1, 20, 5, id=101)
    bank.tx(1, 20, 10, id=102)
    both.sync()
    both.assert_equal()
    bank.close()


SMALL = """
rules:
  lateness: 2m
  velocity_burst:
    limits: [{window: 1m, count: 3}, {window: 5m, count: 5}]
    rearm_after: 1m
"""
"""Small limits: random streams of a few rows cross them often."""


# ----------------------------------------------------------------- property


ACCOUNTS = (1, 2, 3)
TIMES = st.one_of(
    st.integers(0, 30).map(lambda n: n * 5),  # dense: bursts (and ties) happen
    st.integers(0, 30).map(lambda n: n * 5),
    st.integers(0, 30).map(lambda n: n * 5),
    st.integers(0, 40).map(lambda n: n * 10),  # spread: quiet periods, re-arming, late rows
)
TYPES = st.sampled_from(["purchase", "purchase", "withdrawal", "transfer_in", "transfer_out"])
CHANNEL = {"purchase": "online", "withdrawal": "atm", "transfer_in": "transfer"}
"""The channel a type needs (the schema's checks); transfer_out: transfer too."""

insert = st.tuples(st.just("insert"), st.sampled_from((1, 1, 2, 3)), TIMES, TYPES)
update_time = st.tuples(st.just("time"), st.integers(0, 1000), TIMES)
update_account = st.tuples(st.just("account"), st.integers(0, 1000), st.sampled_from(ACCOUNTS))
update_type = st.tuples(st.just("type"), st.integers(0, 1000), TYPES)
update_status = st.tuples(st.just("status"), st.integers(0, 1000), st.just("declined"))
update_key = st.tuples(st.just("key"), st.integers(0, 1000), st.just(0))
delete = st.tuples(st.just("delete"), st.integers(0, 1000), st.just(0))
truncate = st.tuples(st.just("truncate"), st.integers(0, 9), st.just(0))  # acts on 0 only
operation = st.one_of(
    insert,
    insert,
    insert,
    update_time,
    update_account,
    update_type,
    update_status,
    update_key,
    delete,
    truncate,
)
transaction = st.lists(operation, min_size=1, max_size=4)
step = st.tuples(st.lists(transaction, min_size=2, max_size=8), st.booleans(), st.booleans())
"""(transactions, sync after them, restart the engine after syncing)."""


class Writer:
    """Writes the operations to PostgreSQL, tracking the live transaction ids."""

    def __init__(self) -> None:
        self.bank: Bank | None = None
        self.live: list[int] = []
        self.next_id = 5000

    def statement(self, op: tuple[Any, ...]) -> str | None:  # noqa: PLR0911 - one per kind
        kind = op[0]
        if kind == "insert":
            _, account, seconds, type_ = op
            channel = CHANNEL.get(type_, "transfer")
            tx_id = self.next_id
            self.next_id += 1
            self.live.append(tx_id)
            when = at(seconds).isoformat()
            return (
                "INSERT INTO transactions (id, account_id, card_id, merchant_id, amount, "
                "currency, channel, type, status, country, created_at, updated_at) VALUES "
                f"({tx_id}, {account}, {account}, 1, 20, 'EUR', '{channel}', '{type_}', "
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
        if kind == "time":
            when = at(value).isoformat()
            change = f"created_at = '{when}', updated_at = '{when}'"
        elif kind == "account":
            change = f"account_id = {value}"
        elif kind == "type":
            change = f"type = '{value}', channel = '{CHANNEL.get(value, 'transfer')}'"
        else:
            change = "status = 'declined', decline_reason = 'do_not_honor'"
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
    max_examples=int(os.environ.get("HR_LANE_EXAMPLES", "25")),  # more for a longer hunt
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    before=st.lists(insert, max_size=8),
    initial=st.lists(insert.map(lambda op: [op]), min_size=4, max_size=20),
    steps=st.lists(step, min_size=1, max_size=6),
    cuts=st.lists(st.booleans(), min_size=1, max_size=20),
)
def test_lane_equals_sql_rule(
    fresh: tuple[PgDatabase, Path],
    before: list[tuple[Any, ...]],
    initial: list[list[tuple[Any, ...]]],
    steps: list[tuple[list[list[tuple[Any, ...]]], bool, bool]],
    cuts: list[bool],
) -> None:
    db, tmp_path = fresh
    reset_database(db)
    example = tmp_path / f"ex{next(_examples)}"
    example.mkdir()
    writer = Writer()
    # rows before the snapshot: the SQL rule rebuilds from the mirror, the lane seeds
    before_snapshot = tuple(writer.statements(before))
    both = Both(open_bank(db, example, SMALL, before_snapshot=before_snapshot), VelocityBurstLane)
    writer.bank = both.bank
    cut_points = itertools.cycle(cuts)
    writer.run(initial)  # one insert per transaction: enough rows for bursts
    try:
        for transactions, sync, restart in steps:
            writer.run(transactions)
            if sync:
                both.sync(lambda: next(cut_points))
                both.assert_equal()
            if restart:
                both.sync(lambda: next(cut_points))
                both.restart()
        both.sync(lambda: next(cut_points))
        both.assert_equal()
        event(f"alerts: {min(len(both.lane_alerts), 3)}{'+' if len(both.lane_alerts) > 3 else ''}")
    finally:
        both.bank.close()

"""The rules lane's velocity burst equals the SQL rule on the same change streams.

Every batch the engine applies (real PostgreSQL → pgoutput → batcher) is also given
to :class:`VelocityBurstLane` (:mod:`tests.rules.lane_harness`); the lane's alerts must
be the SQL rule's ``velocity_burst`` alerts, payload included: for the rule's own test
cases, and for random sequences of inserts, updates (status, type, time, account, key),
deletes and truncates of a few accounts, cut into batches at random transaction
boundaries, with engine restarts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from headrace.rules.lane.velocity import VelocityBurstLane
from tests.conftest import PgDatabase
from tests.rules import lane_hypothesis
from tests.rules.bank import at, insert_transaction, new_status, new_time, only, open_bank, sql_time
from tests.rules.lane_harness import Both


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
operation = st.one_of(
    insert,
    insert,
    insert,
    lane_hypothesis.change("time", TIMES),
    lane_hypothesis.change("account", st.sampled_from(ACCOUNTS)),
    lane_hypothesis.change("type", TYPES),
    lane_hypothesis.change("status", st.just("declined")),
    *lane_hypothesis.lifecycle(),
)


class Writer(lane_hypothesis.Writer):
    """Transactions of 20 EUR: inserts; changes of time, account, type, status and key."""

    def statement(self, op: lane_hypothesis.Op) -> str | None:
        if op[0] != "insert":
            return self.write(self.transactions, op)
        _, account, seconds, type_ = op
        tx_id = self.new_id()
        self.transactions.live[tx_id] = None
        channel = CHANNEL.get(type_, "transfer")
        return insert_transaction(
            tx_id,
            account,
            20,
            sql_time(seconds),
            channel=channel,
            type=type_,
            merchant=1,
            card=account,
        )

    def assignments(self, rows: lane_hypothesis.Rows[Any], key: int, kind: str, value: Any) -> str:
        if kind == "time":
            return new_time(sql_time(value))
        if kind == "account":
            return f"account_id = {value}"
        if kind == "type":
            return f"type = '{value}', channel = '{CHANNEL.get(value, 'transfer')}'"
        return new_status(value)


@lane_hypothesis.LANE_SETTINGS
@given(example=lane_hypothesis.examples(insert, operation))
def test_lane_equals_sql_rule(
    fresh: tuple[PgDatabase, Path], example: lane_hypothesis.Example
) -> None:
    lane_hypothesis.run_example(
        fresh, example, lane=VelocityBurstLane, config=SMALL, writer=Writer()
    )

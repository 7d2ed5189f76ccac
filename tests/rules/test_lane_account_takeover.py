"""The rules lane's account takeover equals the SQL rule on the same change streams.

Every batch the engine applies (real PostgreSQL → pgoutput → batcher) is also given
to :class:`AccountTakeoverLane` (:mod:`tests.rules.lane_harness`); the lane's alerts
must be the SQL rule's ``account_takeover`` alerts, payload included (the harness
compares numbers, trigger and evidence; :func:`assert_same` also the risky logins):
for the rule's own test cases, and for random sequences of logins (new devices,
failures, corrections, key changes, deletes, truncates), outflows (amount, account,
type, time and key changes, deletes, truncates) and balance changes, cut into batches
at random transaction boundaries, with engine restarts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from headrace.rules.lane.account_takeover import AccountTakeoverAlert, AccountTakeoverLane
from headrace.rules.lane.alert import to_us
from tests.conftest import PgDatabase
from tests.rules import lane_hypothesis
from tests.rules.bank import (
    Bank,
    at,
    insert_login,
    insert_transaction,
    login_result,
    new_status,
    only,
    open_bank,
)
from tests.rules.lane_harness import Both, number, time_value

MINUTE = 60.0
RULE = "account_takeover"


def _out(bank: Bank, account: int, amount: float, seconds: float, **kw: object) -> int:
    return bank.tx(account, amount, seconds, channel="transfer", type="transfer_out", **kw)  # type: ignore[arg-type]


def _logins(rows: list[dict[str, Any]]) -> list[tuple[tuple[str, Any], ...]]:
    return [
        tuple(sorted((k, time_value(v) if k == "at" else number(v)) for k, v in row.items()))
        for row in rows
    ]


def assert_same(both: Both) -> None:
    """:meth:`Both.assert_equal`, and the payloads' risky logins are the same too."""
    both.assert_equal()
    sql = {(a["key"], a["event_at"]): a["payload"]["logins"] for a in both.bank.alerts(RULE)}
    lane = {}
    for alert in both.lane_alerts:
        assert isinstance(alert, AccountTakeoverAlert)
        lane[(alert.key, alert.event_us)] = alert.payload()["logins"]
    assert len(sql) == len(lane)
    for (key, event_at), logins in sql.items():
        assert _logins(logins) == _logins(lane[(key, to_us(event_at))])


# ------------------------------------------------------------ the rule's own cases


def test_new_device_and_failed_logins(pg_db: PgDatabase, tmp_path: Path) -> None:
    both = Both(open_bank(pg_db, tmp_path, only(RULE)), AccountTakeoverLane)
    bank = both.bank
    for customer in (1, 2, 3, 4):
        bank.login(customer, -120 * MINUTE)  # phone-1 becomes a known device
    both.sync()
    bank.login(1, 0)  # known device
    _out(bank, 1, 3_000, 1 * MINUTE)  # 60% of 5,000, but no risky login
    bank.login(2, 0, device="new-2")  # a new device
    _out(bank, 2, 1_000, 1 * MINUTE)  # 20%: normal
    for n in range(3):
        bank.login(3, n * 10, success=False)  # three failures from the known device
    bank.login(4, 0, device="new-4")
    both.sync()
    assert both.lane() == [] == both.sql()

    big = _out(bank, 2, 3_000, 2 * MINUTE)
    _out(bank, 3, 4_500, 2 * MINUTE)
    both.sync()
    alerts = {alert.account: alert for alert in both.lane_alerts}
    assert set(alerts) == {2, 3}
    assert alerts[2].trigger == big
    assert alerts[2].numbers["share"] == 0.6
    assert alerts[3].numbers["failed_logins"] == 3
    assert_same(both)

    _out(bank, 4, 4_000, 40 * MINUTE)  # 40 minutes after the login: outside the window
    both.sync()
    assert len(both.lane()) == 2
    assert_same(both)
    bank.close()


def test_restart_between_login_and_outflow(pg_db: PgDatabase, tmp_path: Path) -> None:
    both = Both(open_bank(pg_db, tmp_path, only(RULE)), AccountTakeoverLane)
    bank = both.bank
    for n in range(4):
        bank.login(5, n * 5, success=False, device="intruder")
    bank.login(5, 30, device="intruder")
    both.sync()
    both.restart()
    # The outflow and its settlement in one transaction: the balance checked is the one
    # before the batch (5,000), not the balance after the outflow.
    bank.outflow_and_balance(77, 5, 2600, 2 * MINUTE, balance=2400, device="intruder")
    both.sync()
    (alert,) = both.lane_alerts
    assert (alert.numbers["balance"], alert.numbers["share"]) == (5000, 0.52)
    assert alert.numbers["reasons"] == ["failed_logins", "new_device"]
    assert_same(both)
    bank.close()


def test_failures_read_from_the_mirror_and_old_marks_pruned(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    both = Both(open_bank(pg_db, tmp_path, only(RULE)), AccountTakeoverLane)
    bank = both.bank
    bank.duck("CREATE TABLE jobs.account_takeover__failed (_k0 BIGINT)")
    both.restart()
    bank.login(6, 0, success=False)
    first = bank.login(6, 10, success=False)
    both.sync()
    # A failure corrected into a success no longer counts towards a burst.
    bank.execute(f"UPDATE logins SET success = true, failure_reason = NULL WHERE id = {first}")
    bank.login(6, 20, success=False)
    both.sync()
    bank.login(6, 30, success=False)
    both.sync()
    _out(bank, 6, 3_000, 2 * MINUTE)
    both.sync()
    (alert,) = both.lane_alerts
    assert alert.numbers["failed_logins"] == 3
    assert_same(both)
    bank.login(1, 120 * MINUTE)
    both.sync()
    bank.login(1, 121 * MINUTE)
    both.sync()
    _out(bank, 6, 3_000, 121 * MINUTE)  # the marks are gone
    both.sync()
    assert_same(both)
    assert len(both.lane()) == 1
    bank.close()


# ------------------------------------------------------------ more cases


def test_balance_versions_and_changed_outflows(pg_db: PgDatabase, tmp_path: Path) -> None:
    """The balance an outflow is priced at (versions of the batch before its first
    change), amount and account changes re-triggering, a time change alone not."""
    both = Both(open_bank(pg_db, tmp_path, only(RULE, "{rearm_after: 1m}")), AccountTakeoverLane)
    bank = both.bank
    for customer in (1, 2, 3):
        bank.login(customer, 0, device="new")
    both.sync()

    def insert(tx_id: int, account: int, amount: int, seconds: int) -> str:
        return (
            "INSERT INTO transactions (id, account_id, amount, currency, channel, type, "
            f"status, country, created_at, updated_at) VALUES ({tx_id}, {account}, {amount}, "
            f"'EUR', 'transfer', 'transfer_out', 'settled', 'DE', '{at(seconds).isoformat()}', "
            f"'{at(seconds).isoformat()}')"
        )

    bank.harness.transaction(  # priced at 1,000: the version before the outflow
        "UPDATE accounts SET balance = 1000 WHERE id = 1",
        insert(901, 1, 800, 60),
        "UPDATE accounts SET balance = 9000 WHERE id = 1",
    )
    bank.harness.transaction(  # priced at 9,000: no alert
        "UPDATE accounts SET balance = 1000 WHERE id = 2",
        "UPDATE accounts SET balance = 9000 WHERE id = 2",
        insert(902, 2, 800, 60),
    )
    bank.harness.transaction(insert(903, 3, 100, 70))
    both.sync()
    assert {alert.account for alert in both.lane_alerts} == {1}
    bank.execute("UPDATE transactions SET amount = 4600 WHERE id = 902")  # 51% of 9,000
    bank.execute("UPDATE transactions SET amount = 4000 WHERE id = 903")
    both.sync()
    later = at(200).isoformat()
    bank.execute(
        f"UPDATE transactions SET created_at = '{later}', updated_at = '{later}' WHERE id = 901"
    )
    both.sync()  # a time change alone does not re-trigger
    bank.execute("UPDATE transactions SET account_id = 3 WHERE id = 902")
    both.sync()  # another account does (3's incident goes on: re-arm 1 minute not passed)
    assert {alert.account for alert in both.lane_alerts} == {1, 2, 3}
    assert_same(both)
    bank.close()


def test_restart_from_saved_state(pg_db: PgDatabase, tmp_path: Path) -> None:
    """An evaluator seeded from the mirrors and what the previous one saved goes on as if
    it had not stopped: the marks of logins deleted since count, no second alert."""
    both = Both(open_bank(pg_db, tmp_path, only(RULE, "{rearm_after: 5m}")), AccountTakeoverLane)
    bank = both.bank
    intruder = bank.login(1, 0, device="intruder")
    bank.login(2, 0, device="intruder")
    both.sync()
    bank.execute(f"DELETE FROM logins WHERE id = {intruder}")
    _out(bank, 1, 3_000, 60)
    both.sync()
    both.start_lane(from_saved=True)
    _out(bank, 1, 3_000, 90)  # the same incident
    _out(bank, 2, 3_000, 100)
    both.sync()
    both.restart()
    both.start_lane(from_saved=True)
    _out(bank, 1, 3_000, 600)  # past the re-arm: a new incident
    both.sync()
    assert [alert[0] for alert in both.lane()] == [1, 1, 2]
    both.assert_equal()
    bank.close()


def test_seed_rebuilds_marks_from_the_mirror(pg_db: PgDatabase, tmp_path: Path) -> None:
    """Logins before the snapshot: the SQL rule rebuilds its marks, the lane seeds them."""
    before = tuple(
        "INSERT INTO logins (id, customer_id, success, failure_reason, device, ip, country, "
        f"at) VALUES ({n}, {c}, {s}, {r}, '{d}', '10.0.0.1', 'DE', "
        f"'2026-03-02 12:00:{n:02d}+00')"
        for n, c, s, r, d in (
            (1, 1, "true", "NULL", "a"),
            (2, 1, "true", "NULL", "b"),
            (3, 2, "false", "'bad'", "a"),
            (4, 2, "false", "'bad'", "a"),
            (5, 2, "false", "'bad'", "a"),
        )
    )
    both = Both(open_bank(pg_db, tmp_path, only(RULE), before_snapshot=before), AccountTakeoverLane)
    bank = both.bank
    _out(bank, 1, 3_000, 60)
    _out(bank, 2, 3_000, 60)
    both.sync()
    assert {alert.account for alert in both.lane_alerts} == {1, 2}
    assert_same(both)
    bank.close()


def test_account_opened_in_the_batch_of_its_outflow(pg_db: PgDatabase, tmp_path: Path) -> None:
    """SQL rule finding (the lane follows it): an outflow of an account inserted in the same
    batch is never checked (the account's customer and balance are read from the accounts
    *before* the batch), so the same changes alert or not depending on the batch cut."""
    both = Both(open_bank(pg_db, tmp_path, only(RULE)), AccountTakeoverLane)
    bank = both.bank
    bank.login(1, 0, device="intruder")
    both.sync()
    opened = "'2026-01-01 00:00:00+00'"
    for account, split in ((9, False), (10, True)):
        bank.execute(
            "INSERT INTO accounts VALUES "
            f"({account}, 1, 'plus', 'active', 5000, 'EUR', {opened}, {opened})"
        )
        if split:
            both.sync()
        _out(bank, account, 3_000, 60)
        both.sync()
    assert [alert.account for alert in both.lane_alerts] == [10]
    assert_same(both)
    bank.close()


# ----------------------------------------------------------------- property

SMALL = """
rules:
  lateness: 2m
  account_takeover:
    window: 4m
    failed_window: 1m
    failed_logins: 2
    outflow_share: 0.5
    rearm_after: 1m
"""
"""Small windows and thresholds: random streams of a few rows alert often."""

CUSTOMERS = (1, 2, 3)
TIMES = st.one_of(
    st.integers(-6, 2).map(lambda n: n * 5),  # near the writer's clock: ties happen
    st.integers(-30, 6).map(lambda n: n * 10),  # spread: late rows, pruned marks, re-arming
)
"""Offsets from the writer's clock (it moves 7 s a statement, so most rows are on time)."""
DEVICES = st.sampled_from(["phone", "phone", "laptop", "new-1", "fresh"])
"""``fresh``: a device never seen (the writer names it after the login)."""
AMOUNTS = st.sampled_from([100, 1000, 2500, 3000, 3000, 6000])
BALANCES = st.sampled_from([0, 1000, 4000, 5000, 10000])
TYPES = st.sampled_from(["transfer_out", "transfer_out", "transfer_in"])

login = st.tuples(st.just("login"), st.sampled_from(CUSTOMERS), TIMES, st.booleans(), DEVICES)
outflow = st.tuples(st.just("out"), st.sampled_from(CUSTOMERS), TIMES, AMOUNTS, TYPES)
balance = st.tuples(st.just("balance"), st.sampled_from(CUSTOMERS), BALANCES)
operation = st.one_of(
    login,
    login,
    login,
    outflow,
    outflow,
    outflow,
    balance,
    lane_hypothesis.change("login_success", st.booleans()),
    lane_hypothesis.change("login_device", DEVICES),
    lane_hypothesis.change("login_time", TIMES),
    *lane_hypothesis.lifecycle("login_", truncate_one_in=20),
    lane_hypothesis.change("tx_amount", AMOUNTS),
    lane_hypothesis.change("tx_account", st.sampled_from(CUSTOMERS)),
    lane_hypothesis.change("tx_type", TYPES),
    lane_hypothesis.change("tx_time", TIMES),
    lane_hypothesis.change("tx_status", st.just("declined")),
    *lane_hypothesis.lifecycle("tx_", truncate_one_in=20),
)


class Writer(lane_hypothesis.Writer):
    """Logins, outflows and balances: inserts near a clock; changes of the logins'
    success, device, time and key, of the transactions' amount, account, type, time,
    status and key (``login_<change>``, ``tx_<change>``)."""

    def __init__(self) -> None:
        super().__init__()
        self.logins: lane_hypothesis.Rows[None] = lane_hypothesis.Rows("logins", "TRUNCATE logins")
        self.clock = 600

    def _when(self, offset: int) -> str:
        seconds = max(0, self.clock + offset)
        return f"'2026-03-02 12:00:00+00'::timestamptz + interval '{seconds} seconds'"

    def statement(self, op: lane_hypothesis.Op) -> str | None:
        kind = op[0]
        self.clock += 7
        if kind == "login":
            _, customer, seconds, success, device = op
            login_id = self.new_id()
            self.logins.live[login_id] = None
            device = f"dev-{login_id}" if device == "fresh" else device
            return insert_login(login_id, customer, self._when(seconds), success, device)
        if kind == "out":
            _, account, seconds, amount, type_ = op
            tx_id = self.new_id()
            self.transactions.live[tx_id] = None
            when = self._when(seconds)
            return insert_transaction(
                tx_id,
                account,
                amount,
                when,
                channel="transfer",
                type=type_,
                device="d",
                updated=f"{when} + interval '1 hour'",
            )
        if kind == "balance":
            return f"UPDATE accounts SET balance = {op[2]} WHERE id = {op[1]}"
        table, _, change_kind = kind.partition("_")
        rows = self.logins if table == "login" else self.transactions
        return self.write(rows, (change_kind, *op[1:]))

    def assignments(self, rows: lane_hypothesis.Rows[Any], key: int, kind: str, value: Any) -> str:
        if rows is self.logins:
            return self._login_assignments(kind, value)
        if kind == "time":
            when = self._when(value)
            return f"created_at = {when}, updated_at = {when} + interval '1 hour'"
        if kind == "status":
            return new_status(value)
        column = {"amount": "amount", "account": "account_id", "type": "type"}[kind]
        return f"{column} = {value if isinstance(value, int) else repr(value)}"

    def _login_assignments(self, kind: str, value: Any) -> str:
        if kind == "success":
            return f"success = {str(value).lower()}, failure_reason = {login_result(value)}"
        if kind == "time":
            return f"at = {self._when(value)}"
        device = f"dev-{self.new_id()}" if value == "fresh" else value
        return f"device = '{device}'"


@lane_hypothesis.LANE_SETTINGS
@given(example=lane_hypothesis.examples(st.one_of(login, outflow), operation, initial=(4, 16)))
def test_lane_equals_sql_rule(
    fresh: tuple[PgDatabase, Path], example: lane_hypothesis.Example
) -> None:
    lane_hypothesis.run_example(
        fresh, example, lane=AccountTakeoverLane, config=SMALL, writer=Writer(), check=assert_same
    )

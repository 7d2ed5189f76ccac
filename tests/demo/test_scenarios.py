"""Each fraud family writes its pattern and its ground-truth row; injection rotates families."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any, cast

import pytest

from headrace.demo.config import FraudFamily, ScenarioShapes
from headrace.demo.generator import Workload
from headrace.demo.history import load_history
from headrace.demo.scenarios import distance_km
from tests.conftest import PgDatabase
from tests.demo.conftest import ANCHOR, history_settings, ledger_mismatches, workload_settings

SHAPES = ScenarioShapes()


@pytest.fixture
def with_history(pg_db: PgDatabase) -> PgDatabase:
    """A database holding a month of history (so accounts have a purchase record)."""
    load_history(history_settings(pg_db.dsn, transactions_per_account_month=20.0))
    return pg_db


def _inject(pg_db: PgDatabase, family: FraudFamily) -> dict[str, Any]:
    settings = workload_settings(pg_db.dsn, rate=5.0, anchor=ANCHOR + timedelta(hours=1))
    with Workload(settings) as workload:
        workload.step()
        scenario_id = workload.inject(family)
        assert scenario_id is not None, "an eligible account was found"
        workload.drain()
    assert ledger_mismatches(pg_db.dsn) == []
    rows = pg_db.fetchall(
        "SELECT scenario_id, family, expected_rule, account_id, customer_id, card_id, "
        "started_at, ended_at, detail FROM fraud_ground_truth"
    )
    assert len(rows) == 1
    names = ("scenario_id", "family", "rule", "account", "customer", "card", "start", "end")
    truth = dict(zip((*names, "detail"), rows[0], strict=True))
    assert truth["scenario_id"] == scenario_id
    assert truth["family"] == truth["rule"] == family.value
    assert truth["start"] <= truth["end"]  # type: ignore[operator]
    return truth


def _rows(pg_db: PgDatabase, sql: str, truth: dict[str, Any]) -> list[tuple[Any, ...]]:
    return cast(
        list[tuple[Any, ...]],
        pg_db.fetchall(sql, (truth["account"], truth["start"], truth["end"])),
    )


_DURING = "account_id = %s AND created_at BETWEEN %s AND %s"


def test_velocity_burst(with_history: PgDatabase) -> None:
    truth = _inject(with_history, FraudFamily.VELOCITY_BURST)
    rows = _rows(with_history, f"SELECT card_id, channel FROM transactions WHERE {_DURING}", truth)
    low, high = SHAPES.velocity_count
    assert low <= len(rows) <= high + 2  # the account's own traffic may add one or two
    assert truth["end"] - truth["start"] <= timedelta(seconds=SHAPES.velocity_seconds[1])
    assert {card for card, _ in rows} >= {truth["card"]}
    assert truth["detail"]["transactions"] >= low


def test_amount_spike(with_history: PgDatabase) -> None:
    truth = _inject(with_history, FraudFamily.AMOUNT_SPIKE)
    ((amount, mean, count),) = with_history.fetchall(
        """
        SELECT s.amount, avg(h.amount), count(h.*)
        FROM transactions s
        JOIN transactions h ON h.account_id = s.account_id AND h.type = 'purchase'
             AND h.status = 'settled' AND h.created_at < s.created_at
        WHERE s.account_id = %s AND s.created_at = %s AND s.type = 'purchase'
        GROUP BY s.amount
        """,
        (truth["account"], truth["end"]),
    )
    assert isinstance(amount, Decimal)
    assert isinstance(mean, Decimal)
    assert int(str(count)) >= SHAPES.spike_history
    assert amount >= Decimal(SHAPES.spike_factor[0] * 0.99) * mean
    assert amount >= Decimal(SHAPES.spike_min_cents) / 100


def test_impossible_travel(with_history: PgDatabase) -> None:
    truth = _inject(with_history, FraudFamily.IMPOSSIBLE_TRAVEL)
    rows = with_history.fetchall(
        "SELECT t.country, t.created_at, c.country FROM transactions t "
        "JOIN customers c ON c.id = %s "
        "WHERE t.card_id = %s AND t.channel IN ('pos', 'atm') AND t.created_at BETWEEN %s AND %s "
        "ORDER BY t.created_at",
        (truth["customer"], truth["card"], truth["start"], truth["end"]),
    )
    (home, first_at, customer_home), (abroad, second_at, _) = rows[0], rows[-1]
    assert home == customer_home != abroad
    assert distance_km(str(home), str(abroad)) >= SHAPES.travel_min_km
    assert second_at - first_at <= timedelta(seconds=SHAPES.travel_gap_seconds[1])  # type: ignore[operator]
    # never before was this card (or any card of this customer) used there in person
    earlier = with_history.fetchall(
        "SELECT count(*) FROM transactions t JOIN accounts a ON a.id = t.account_id "
        "WHERE a.customer_id = %s AND t.channel IN ('pos', 'atm') AND t.country = %s "
        "AND t.created_at < %s",
        (truth["customer"], abroad, second_at),
    )
    assert earlier == [(0,)]


def test_structuring(with_history: PgDatabase) -> None:
    truth = _inject(with_history, FraudFamily.STRUCTURING)
    low = Decimal(SHAPES.structuring_low_cents) / 100
    high = Decimal(SHAPES.structuring_threshold_cents) / 100
    rows = _rows(
        with_history,
        f"SELECT amount FROM transactions WHERE {_DURING} AND type = 'transfer_in' "
        "AND status = 'settled'",
        truth,
    )
    just_under = [a for (a,) in rows if low <= a < high]
    assert len(just_under) >= SHAPES.structuring_count[0]
    assert truth["end"] - truth["start"] < timedelta(hours=24)


def test_card_testing(with_history: PgDatabase) -> None:
    truth = _inject(with_history, FraudFamily.CARD_TESTING)
    ((attempts, merchants, declined, largest, devices),) = with_history.fetchall(
        "SELECT count(*), count(DISTINCT merchant_id), count(*) FILTER (WHERE status = "
        "'declined'), max(amount), count(DISTINCT device) FROM transactions "
        "WHERE card_id = %s AND channel = 'online' AND created_at BETWEEN %s AND %s "
        "AND amount < 2",
        (truth["card"], truth["start"], truth["end"]),
    )
    assert cast(int, attempts) >= SHAPES.testing_count[0]
    assert merchants == attempts
    assert cast(int, declined) >= cast(int, attempts) // 2
    assert largest is not None
    assert devices == 1
    assert truth["end"] - truth["start"] <= timedelta(minutes=10)


def test_account_takeover(with_history: PgDatabase) -> None:
    truth = _inject(with_history, FraudFamily.ACCOUNT_TAKEOVER)
    device = truth["detail"]["device"]
    logins = with_history.fetchall(
        "SELECT success FROM logins WHERE customer_id = %s AND device = %s ORDER BY at, id",
        (truth["customer"], device),
    )
    assert logins[-1] == (True,)
    assert len(logins) - 1 == truth["detail"]["failed_logins"]
    assert with_history.fetchall(
        "SELECT count(*) FROM logins WHERE customer_id = %s AND device = %s AND at < %s",
        (truth["customer"], device, truth["start"]),
    ) == [(0,)], "the device is new to the customer"
    ((amount, after),) = with_history.fetchall(
        "SELECT t.amount, l.balance_after FROM transactions t "
        "JOIN ledger_entries l ON l.transaction_id = t.id AND l.kind = 'settlement' "
        "WHERE t.account_id = %s AND t.created_at = %s AND t.type = 'transfer_out' "
        "AND t.device = %s",
        (truth["account"], truth["end"], device),
    )
    assert isinstance(amount, Decimal)
    assert isinstance(after, Decimal)
    assert amount >= Decimal("0.55") * (amount + after), "most of the balance went out"


def test_families_rotate(pg_db: PgDatabase) -> None:
    load_history(history_settings(pg_db.dsn, transactions_per_account_month=20.0))
    settings = workload_settings(
        pg_db.dsn, rate=200.0, fraud_every=25, anchor=ANCHOR + timedelta(hours=1)
    )
    with Workload(settings) as workload:
        for _ in range(20):
            workload.step()
        workload.drain()
        injected = workload.stats.scenarios
    assert sum(injected.values()) >= 6
    assert set(injected) == set(FraudFamily), "every family within the first round"
    rows = pg_db.fetchall("SELECT family, count(*) FROM fraud_ground_truth GROUP BY 1")
    assert {str(family): count for family, count in rows} == {
        str(k): v for k, v in injected.items()
    }
    assert ledger_mismatches(pg_db.dsn) == []

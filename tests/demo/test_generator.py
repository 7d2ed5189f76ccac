"""The live workload: deterministic, consistent money, status transitions, pacing, envelope."""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta

import psycopg
import pytest

from headrace.demo.clock import to_us
from headrace.demo.config import NORMAL_ENVELOPE, PopulationSettings
from headrace.demo.generator import Workload
from headrace.demo.state import Account
from headrace.demo.traffic import AccountSampler, diurnal_factor
from headrace.errors import ConfigError
from tests.conftest import PgDatabase
from tests.demo.conftest import ANCHOR, dump_tables, ledger_mismatches, workload_settings


def _second_database(pg_db: PgDatabase) -> PgDatabase:
    other = PgDatabase(pg_db.cluster, f"{pg_db.name}_twin")
    with psycopg.connect(pg_db.cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{other.name}"'.encode())
    return other


def _drop(database: PgDatabase) -> None:
    with psycopg.connect(database.cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)'.encode())


def _run_ticks(dsn: str, ticks: int, **overrides: object) -> Workload:
    with Workload(workload_settings(dsn, **overrides)) as workload:
        for _ in range(ticks):
            workload.step()
        workload.drain()
    return workload


def test_same_seed_same_rows(pg_db: PgDatabase) -> None:
    twin = _second_database(pg_db)
    try:
        _run_ticks(pg_db.dsn, 60, fraud_every=40)
        _run_ticks(twin.dsn, 60, fraud_every=40)
        first, second = dump_tables(pg_db.dsn), dump_tables(twin.dsn)
        assert first == second
        assert len(first["transactions"]) > 500
        assert first["fraud_ground_truth"], "scenarios were injected"
    finally:
        _drop(twin)


def test_another_seed_other_rows(pg_db: PgDatabase) -> None:
    twin = _second_database(pg_db)
    try:
        _run_ticks(pg_db.dsn, 10)
        _run_ticks(twin.dsn, 10, seed=8)
        assert dump_tables(pg_db.dsn)["transactions"] != dump_tables(twin.dsn)["transactions"]
    finally:
        _drop(twin)


def test_money_and_statuses_stay_consistent(pg_db: PgDatabase) -> None:
    # Long enough for settled purchases to be refunded (11 refunds in 240 ticks; 120 gave
    # 0 or 1, depending on the seed's draws).
    workload = _run_ticks(pg_db.dsn, 240, fraud_every=30, new_account_ratio=0.01)
    assert workload.stats.transactions > 1_000
    assert ledger_mismatches(pg_db.dsn) == []
    rows = pg_db.fetchall("SELECT status, count(*) FROM transactions GROUP BY 1 ORDER BY 1")
    statuses = {str(status): count for status, count in rows}
    assert "pending" not in statuses, "drain resolves every pending transaction"
    assert {"settled", "declined", "reversed"} <= set(statuses)
    # settled (or reversed after settling) <=> one settlement entry; reversal only when reversed
    (broken,) = pg_db.fetchall(
        """
        SELECT count(*) FROM transactions t
        LEFT JOIN ledger_entries s ON s.transaction_id = t.id AND s.kind = 'settlement'
        LEFT JOIN ledger_entries r ON r.transaction_id = t.id AND r.kind = 'reversal'
        WHERE (t.status = 'settled' AND (s.id IS NULL OR r.id IS NOT NULL))
           OR (t.status = 'declined' AND (s.id IS NOT NULL OR r.id IS NOT NULL))
           OR (r.id IS NOT NULL AND (t.status <> 'reversed' OR s.id IS NULL))
           OR (s.id IS NOT NULL
               AND s.delta <> CASE WHEN t.type IN ('refund', 'transfer_in') THEN t.amount
                                   ELSE -t.amount END)
        """
    )
    assert broken == (0,)
    # updates moved statuses forward in time, and refunds never exceed their purchase
    (bad_times,) = pg_db.fetchall(
        "SELECT count(*) FROM transactions WHERE status <> 'pending' AND updated_at <= created_at "
        "AND type <> 'fee'"
    )
    assert bad_times == (0,)
    (bad_refunds,) = pg_db.fetchall(
        "SELECT count(*) FROM transactions r JOIN transactions p ON p.id = r.parent_id "
        "WHERE r.type = 'refund' AND (r.amount > p.amount OR p.type <> 'purchase' "
        "OR r.account_id <> p.account_id)"
    )
    assert bad_refunds == (0,)
    types = {t for (t,) in pg_db.fetchall("SELECT DISTINCT type FROM transactions")}
    assert types == {"purchase", "refund", "withdrawal", "transfer_in", "transfer_out", "fee"}
    assert pg_db.fetchall("SELECT count(DISTINCT currency) >= 4 FROM transactions") == [(True,)]
    opened = pg_db.fetchall("SELECT count(*) > 0 FROM accounts WHERE opened_at >= %s", (ANCHOR,))
    assert opened == [(True,)], "new customers open accounts while the generator runs"


def test_restart_settles_what_was_left_pending(pg_db: PgDatabase) -> None:
    with Workload(workload_settings(pg_db.dsn)) as workload:
        for _ in range(10):
            workload.step()
    assert pg_db.fetchall("SELECT count(*) > 0 FROM transactions WHERE status = 'pending'") == [
        (True,)
    ]
    later = ANCHOR + timedelta(minutes=5)
    with Workload(workload_settings(pg_db.dsn, anchor=later, rate=0.0)) as workload:
        workload.step()
    (pending,) = pg_db.fetchall("SELECT count(*) FROM transactions WHERE status = 'pending'")
    assert pending == (0,)
    assert ledger_mismatches(pg_db.dsn) == []
    # and the identity sequences were moved past the generated ids
    pg_db.execute(
        "INSERT INTO merchants (name, mcc, category, country, card_present, online) "
        "VALUES ('x', '5411', 'grocery', 'DE', true, false)"
    )


def test_normal_traffic_stays_inside_the_envelope(pg_db: PgDatabase) -> None:
    # 10 transactions/s over ~3,600 accounts for 30 simulated seconds: the
    # per-account cap is never forced
    population = PopulationSettings(customers=3_000, merchants=300)
    with Workload(workload_settings(pg_db.dsn, rate=10.0, population=population)) as workload:
        for _ in range(600):
            workload.step()
        workload.drain()
        assert workload.stats.envelope_breaches == 0
    envelope = NORMAL_ENVELOPE
    checks = {
        "card-present abroad": """
            SELECT count(*) FROM transactions t JOIN accounts a ON a.id = t.account_id
            JOIN customers c ON c.id = a.customer_id
            WHERE t.channel IN ('pos', 'atm') AND t.country <> c.country""",
        "in the structuring band": f"""
            SELECT count(*) FROM transactions
            WHERE amount >= {envelope.structuring_band_low_cents / 100}
              AND amount < {envelope.structuring_band_high_cents / 100}""",
        "card purchase below the floor": f"""
            SELECT count(*) FROM transactions
            WHERE type = 'purchase' AND amount < {envelope.min_card_amount_cents / 100}""",
        "faster than the per-account cap": f"""
            SELECT count(*) FROM (
                SELECT created_at - lag(created_at) OVER w AS gap FROM transactions
                WHERE type <> 'fee'  -- fees ride along with their withdrawal
                WINDOW w AS (PARTITION BY account_id ORDER BY created_at)
            ) x WHERE gap < interval '{envelope.min_gap_s} seconds'""",
        "failed bursts too long": f"""
            SELECT count(*) FROM (
                SELECT customer_id, count(*) FILTER (WHERE NOT success) OVER w AS failures
                FROM logins
                WINDOW w AS (PARTITION BY customer_id ORDER BY at
                             RANGE BETWEEN interval '10 minutes' PRECEDING AND CURRENT ROW)
            ) x WHERE failures > {envelope.max_failed_logins}""",
    }
    for name, query in checks.items():
        assert pg_db.fetchall(query) == [(0,)], name


def _accounts(count: int) -> list[Account]:
    return [
        Account(id=i, customer_id=i, country="DE", tier="basic", currency="EUR", active=True,
                balance=0, scale=1000.0)
        for i in range(1, count + 1)
    ]  # fmt: skip


def test_sampler_is_skewed() -> None:
    sampler = AccountSampler(_accounts(1_000), seed=3, exponent=1.0, envelope=NORMAL_ENVELOPE)
    rng = random.Random(1)  # noqa: S311
    counts: dict[int, int] = {}
    for _ in range(20_000):
        account = sampler.pick(rng, 0, capped=False)
        counts[account.id] = counts.get(account.id, 0) + 1
    busiest = sorted(counts.values(), reverse=True)
    assert sum(busiest[:10]) > 0.25 * 20_000, "the ten busiest accounts carry over a quarter"
    assert len(counts) > 500, "and the long tail is active too"
    assert max(counts, key=lambda k: counts[k]) != 1, "the busy ones are spread over the ids"


def test_sampler_caps_accounts_when_the_hot_ones_are_all_busy() -> None:
    """Steep skew: the activity draws keep hitting a few capped accounts; the uniform
    draws then find a free one, so no account exceeds its cap (no breach)."""
    rng = random.Random(7)  # noqa: S311
    sampler = AccountSampler(_accounts(1_000), seed=3, exponent=3.0, envelope=NORMAL_ENVELOPE)
    picked = [sampler.pick(rng, 0).id for _ in range(300)]  # all at the same instant
    assert len(set(picked)) == 300
    assert sampler.breaches == 0
    small = AccountSampler(_accounts(10), seed=3, exponent=1.0, envelope=NORMAL_ENVELOPE)
    for _ in range(12):
        small.pick(rng, 0)
    assert small.breaches == 2, "a population too small for the rate is still reported"


def test_daily_rhythm() -> None:
    night = to_us(ANCHOR.replace(hour=4, minute=0))
    noon = to_us(ANCHOR.replace(hour=12, minute=30))
    assert diurnal_factor(noon, 0.5) == pytest.approx(1.0, abs=0.01)
    assert diurnal_factor(night, 0.5) == pytest.approx(0.5, abs=0.02)
    assert diurnal_factor(night, 0.0) == 1.0


def test_rate_follows_the_hour(pg_db: PgDatabase) -> None:
    night = ANCHOR.replace(hour=4, minute=0)
    with Workload(workload_settings(pg_db.dsn, anchor=night, diurnal_amplitude=0.5)) as quiet:
        for _ in range(20):
            quiet.step()
    busy_rate = 200.0 * 20 * 0.05
    assert quiet.stats.transactions < 0.7 * busy_rate


def test_run_paces_and_stops(pg_db: PgDatabase) -> None:
    with Workload(workload_settings(pg_db.dsn, rate=100.0)) as workload:
        began = time.monotonic()
        stats = workload.run(duration=1.0)
        elapsed = time.monotonic() - began
        assert 0.8 < elapsed < 5.0
        assert 60 <= stats.transactions <= 140
        assert workload.simulated_seconds == pytest.approx(1.0, abs=0.06)
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        began = time.monotonic()
        workload.run(stop)
        assert time.monotonic() - began < 3.0
    count = pg_db.fetchall("SELECT count(*) FROM transactions")
    assert count == [(workload.stats.transactions,)], "every built tick was committed"


def test_refuses_bad_settings(pg_db: PgDatabase) -> None:
    with pytest.raises(ConfigError):
        Workload(workload_settings(pg_db.dsn, tick_ms=0))
    with pytest.raises(ConfigError, match="not open"):
        Workload(workload_settings(pg_db.dsn)).step()


def test_a_failed_write_surfaces_and_nothing_hangs(pg_db: PgDatabase) -> None:
    with Workload(workload_settings(pg_db.dsn, rate=200.0)) as workload:
        pg_db.execute(
            "ALTER TABLE transactions ADD CONSTRAINT refuse_all CHECK (amount < 0) NOT VALID"
        )
        began = time.monotonic()
        with pytest.raises(psycopg.errors.CheckViolation):
            workload.run(duration=5.0)
        assert time.monotonic() - began < 4.0, "the failure stopped the run early"
    assert pg_db.fetchall("SELECT count(*) FROM transactions") == [(0,)]

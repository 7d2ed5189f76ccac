"""The history loader: row counts, a complete ledger, determinism, and the generator on top."""

from __future__ import annotations

from datetime import timedelta

import pytest

from headrace.demo.config import PopulationSettings
from headrace.demo.generator import Workload
from headrace.demo.history import HistoryReport, load_history
from headrace.demo.schema import ALL_TABLES
from headrace.errors import ConfigError
from tests.conftest import PgDatabase
from tests.demo.conftest import (
    ANCHOR,
    dump_tables,
    history_settings,
    ledger_mismatches,
    workload_settings,
)


class _Recorder:
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.units = 0

    def stage(self, name: str, total: int) -> None:
        self.stages.append(name)

    def advance(self, units: int) -> None:
        self.units += units


def _counts(pg_db: PgDatabase) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table in ALL_TABLES:
        ((count,),) = pg_db.fetchall(f"SELECT count(*) FROM {table}")
        counts[table] = int(str(count))
    return counts


def test_loads_a_consistent_history(pg_db: PgDatabase) -> None:
    progress = _Recorder()
    report = load_history(history_settings(pg_db.dsn), progress)
    counts = _counts(pg_db)
    assert report.rows == {t: n for t, n in counts.items() if t != "fraud_ground_truth"}
    assert counts["customers"] == 300
    assert 300 < counts["accounts"] < 420
    assert counts["transactions"] > 2_000
    assert counts["ledger_entries"] > counts["accounts"]
    assert counts["logins"] > 1_000
    assert counts["fraud_ground_truth"] == 0
    assert "writing (COPY)" in progress.stages
    assert progress.units >= sum(report.rows.values())
    assert ledger_mismatches(pg_db.dsn) == []
    checks = {
        "a negative balance": "SELECT count(*) FROM ledger_entries WHERE balance_after < 0",
        "still pending": "SELECT count(*) FROM transactions WHERE status = 'pending'",
        "after the anchor": f"""
            SELECT count(*) FROM transactions
            WHERE updated_at >= '{ANCHOR.isoformat()}' OR created_at < '{
            (ANCHOR - timedelta(days=30)).isoformat()
        }'""",
        "settled without a ledger entry": """
            SELECT count(*) FROM transactions t WHERE t.status = 'settled' AND NOT EXISTS (
                SELECT 1 FROM ledger_entries l WHERE l.transaction_id = t.id)""",
        "used before the account opened": """
            SELECT count(*) FROM transactions t JOIN accounts a ON a.id = t.account_id
            WHERE t.created_at < a.opened_at""",
        "card-present abroad": """
            SELECT count(*) FROM transactions t JOIN accounts a ON a.id = t.account_id
            JOIN customers c ON c.id = a.customer_id
            WHERE t.channel IN ('pos', 'atm') AND t.country <> c.country""",
        "in the structuring band": """
            SELECT count(*) FROM transactions WHERE amount >= 8500 AND amount < 10000""",
        "an unknown device at login": """
            SELECT count(*) FROM logins WHERE device !~ '^d[0-9a-f]+-[0-2]$'""",
    }
    for name, query in checks.items():
        assert pg_db.fetchall(query) == [(0,)], name
    # the keys and indexes dropped for the load are back
    ((foreign_keys,),) = pg_db.fetchall(
        "SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
        "AND connamespace = 'public'::regnamespace"
    )
    assert foreign_keys == 12
    # and hand-written inserts continue after the loaded ids
    pg_db.execute(
        "INSERT INTO customers (full_name, email, country, created_at) "
        "VALUES ('New One', 'n@example.com', 'DE', now())"
    )


def test_same_seed_same_history(pg_db: PgDatabase) -> None:
    settings = history_settings(pg_db.dsn, population=PopulationSettings(customers=120))
    load_history(settings)
    first = dump_tables(pg_db.dsn)
    load_history(history_settings(pg_db.dsn, population=settings.population, replace=True))
    assert dump_tables(pg_db.dsn) == first


def test_refuses_a_database_with_data(pg_db: PgDatabase) -> None:
    settings = history_settings(pg_db.dsn, population=PopulationSettings(customers=50))
    load_history(settings)
    with pytest.raises(ConfigError, match="already hold data"):
        load_history(settings)
    with pytest.raises(ConfigError, match="months"):
        load_history(history_settings(pg_db.dsn, months=0))


def test_generator_continues_on_the_history(pg_db: PgDatabase) -> None:
    report: HistoryReport = load_history(history_settings(pg_db.dsn))
    settings = workload_settings(pg_db.dsn, fraud_every=50, anchor=ANCHOR + timedelta(minutes=1))
    with Workload(settings) as workload:
        assert len(workload.population.accounts) == report.rows["accounts"]
        for _ in range(20):
            workload.step()
        workload.drain()
    counts = _counts(pg_db)
    assert counts["transactions"] > report.rows["transactions"]
    assert counts["customers"] == report.rows["customers"]  # reused, not recreated
    assert ledger_mismatches(pg_db.dsn) == []

"""A stream job whose definition changed between runs is rebuilt from the mirrors.

Its state was built for the old definition (a shorter window keeps fewer rows, a
rule that was absent kept nothing); carrying on with it would be silently wrong
until the window had passed. The engine records what each job's state was built
for (``headrace.job_definitions``) and rebuilds a changed job when it opens the
store, as it rebuilds a changed rollup.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from headrace.pipeline.load import parse_pipeline
from headrace.scores.config import HealthScoreConfig
from tests.conftest import PgDatabase
from tests.engine.harness import make_harness
from tests.rules.bank import TABLES, Bank, only, open_bank
from tests.rules.test_health_score import check_scores


def _reconfigure(bank: Bank, pg_db: PgDatabase, jobs_yaml: str) -> None:
    """Restart the pipeline with another jobs section (same source, same store)."""
    bank.harness.config = parse_pipeline((TABLES + jobs_yaml).replace("DSN", pg_db.dsn))
    bank.restart()


def _definitions(bank: Bank) -> dict[str, Any]:
    return {
        str(job): built
        for job, built in bank.duck("SELECT job, built_at FROM headrace.job_definitions")
    }


def _job_state(duck: Any) -> dict[str, list[tuple[Any, ...]]]:
    tables = [
        str(r[0])
        for r in duck(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'jobs' ORDER BY 1"
        )
    ]
    return {t: sorted(duck(f'SELECT * FROM jobs."{t}"'), key=repr) for t in tables}


def test_a_longer_score_window_is_rebuilt_on_restart(pg_db: PgDatabase, tmp_path: Path) -> None:
    before = (  # 27 h before T0: outside a 24 h window, inside a 48 h one
        "INSERT INTO transactions (id, account_id, card_id, merchant_id, amount, currency, "
        "channel, type, status, decline_reason, country, created_at, updated_at) VALUES "
        "(1, 2, 2, 1, 700, 'EUR', 'pos', 'purchase', 'declined', 'x', 'DE', "
        "'2026-03-01 09:00+00', '2026-03-01 09:00+00')",
    )
    bank = open_bank(pg_db, tmp_path, "\nscores:\n  health: {}\n", before_snapshot=before)
    try:
        bank.tx(1, 50, 60)
        bank.sync()
        day = check_scores(bank, pg_db)
        assert day[2] == 100.0  # the old decline is outside the day
        built = _definitions(bank)
        assert set(built) == {"health_score"}

        bank.restart()  # same definition: nothing is rebuilt
        assert _definitions(bank) == built

        _reconfigure(bank, pg_db, "\nscores:\n  health: {window: 48h}\n")
        two_days = check_scores(bank, pg_db, HealthScoreConfig(window=timedelta(hours=48)))
        assert two_days[2] < 100.0  # the decline counts again: the state was rebuilt
        assert _definitions(bank)["health_score"] > built["health_score"]

        bank.tx(2, 30, 120)  # and it carries on incrementally from the rebuilt state
        bank.sync()
        check_scores(bank, pg_db, HealthScoreConfig(window=timedelta(hours=48)))
    finally:
        bank.close()


def test_changed_rules_hold_the_state_a_fresh_snapshot_builds(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    bank = open_bank(pg_db, tmp_path, only("velocity_burst"))
    try:
        for n in range(30):  # three hours of activity on two accounts
            bank.tx(1 + n % 2, 20 + n, n * 360, channel="online", merchant=1 + n % 10)
        bank.sync()

        rules = "\nrules:\n  structuring: {}\n  card_testing: {}\n  amount_spike: {}\n"
        _reconfigure(bank, pg_db, rules)
        assert set(_definitions(bank)) == {"rules"}
        rebuilt = _job_state(bank.duck)

        (tmp_path / "fresh").mkdir()
        fresh = make_harness(pg_db, tmp_path / "fresh", TABLES + rules, publication="fresh")
        try:
            assert rebuilt == _job_state(fresh.duck)
        finally:
            fresh.close()
    finally:
        bank.close()

"""The reference deployment's rules against the workload generator's labelled scenarios.

History (snapshot) → live workload with injected fraud → pgoutput → engine →
rules. Every injected incident must raise its rule's alert on its account,
and no alert may come from normal traffic or from another family's incident.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from headrace.demo.config import COUNTRIES, FraudFamily, PopulationSettings
from headrace.demo.deployment import template_text
from headrace.demo.generator import Workload
from headrace.demo.history import load_history
from headrace.jobs.runtime import StreamJobs
from headrace.pipeline.load import parse_pipeline
from tests.conftest import PgDatabase
from tests.demo.conftest import ANCHOR, history_settings, workload_settings
from tests.engine.harness import make_harness
from tests.rules.bank import TABLES

FINTECH = resources.files("headrace.demo").joinpath("rules.yaml").read_text()
SIMULATED_MINUTES = 10


def test_the_deployment_builds_its_jobs() -> None:
    """headrace.yaml and rules.yaml together: every job finds its tables, rollups, measures."""
    config = parse_pipeline(
        template_text().replace("@DSN@", "postgresql://x").replace("@STORE@", "headrace.duckdb")
    )
    jobs = StreamJobs.from_config(config)
    # every fraud rule runs in memory (rules.in_memory): no SQL rules job
    assert [job.name for job in jobs.jobs] == ["health_score", "metric_alerts"]


def test_the_fintech_thresholds_parse_and_cover_every_country() -> None:
    config = parse_pipeline(TABLES.replace("DSN", "postgresql://x") + FINTECH)
    assert config.rules is not None
    assert config.rules.impossible_travel is not None
    locations = config.rules.impossible_travel.locations
    assert locations == {c.code: (c.lat, c.lon) for c in COUNTRIES}


def test_every_scenario_and_nothing_else(pg_db: PgDatabase, tmp_path: Path) -> None:
    population = PopulationSettings(customers=2000, merchants=300)
    load_history(
        history_settings(pg_db.dsn, transactions_per_account_month=10.0, population=population)
    )
    sections = yaml.safe_load(FINTECH)
    del sections["metric_alerts"]  # they watch the deployment's rollups, not needed here
    harness = make_harness(pg_db, tmp_path, TABLES + yaml.safe_dump(sections))
    assert sections["rules"]["in_memory"]  # the deployment runs some rules in memory
    harness.start_lane()  # as the deployment runs them
    settings = workload_settings(
        pg_db.dsn,
        rate=10.0,
        tick_ms=1000,
        fraud_every=50,
        login_ratio=0.3,
        anchor=ANCHOR + timedelta(minutes=1),
        population=population,
    )
    started = time.monotonic()
    with Workload(settings) as workload:
        for tick in range(SIMULATED_MINUTES * 60):
            workload.step()
            if tick % 30 == 29:
                harness.sync()
        workload.drain()
        assert workload.stats.envelope_breaches == 0  # normal traffic stayed normal
    harness.sync()
    harness.stop_lane()
    truth = harness.pg("SELECT family, account_id, started_at, ended_at FROM fraud_ground_truth")
    alerts = harness.duck("SELECT rule, account_id, event_at, summary FROM headrace.alerts")
    seconds = time.monotonic() - started
    found: Counter[str] = Counter()
    missed: list[Any] = []
    for family, account, start, end in truth:
        hits = [
            a
            for a in alerts
            if a[0] == family
            and a[1] == account
            and start - timedelta(minutes=1) <= a[2] <= end + timedelta(minutes=1)  # type: ignore[operator]
        ]
        if hits:
            found[str(family)] += 1
        else:
            missed.append((family, account, start, end))
    expected = {(str(f), a) for f, a, _, _ in truth}
    false = [a for a in alerts if (a[0], a[1]) not in expected]
    per_family = Counter(str(f) for f, _, _, _ in truth)
    print(f"{len(truth)} scenarios, {len(alerts)} alerts in {seconds:.1f} s: {dict(per_family)}")
    assert set(per_family) == {f.value for f in FraudFamily}
    assert missed == []
    assert false == []
    assert len(alerts) == len(truth)  # one alert per incident
    assert found == per_family
    harness.close()

"""The deployment's metrics equal their SQL definitions run on PostgreSQL at the same LSN.

History (through the snapshot path) plus a live workload with status
transitions, reversals, refunds, new accounts, logins and fraud scenarios,
read from the real replication stream by ``headrace run``'s loop into
DuckDB; once the workload is drained and the store has caught up, every
rollup view of the reference deployment, at 5m, 1h and 1d, equals
:func:`headrace.demo.metrics.reference_sql` on PostgreSQL.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from headrace.demo.deployment import Deployment, render_deployment
from headrace.demo.generator import Workload
from headrace.demo.history import load_history
from headrace.demo.metrics import (
    FRAUD_ALERTS,
    HEALTH,
    METRICS,
    SOURCE_METRICS,
    SOURCES,
    metrics_of,
    reference_sql,
    view_columns,
    view_sql,
)
from headrace.run.runner import Runner
from headrace.run.settings import RunSettings
from tests.conftest import PgDatabase
from tests.demo.conftest import history_settings, workload_settings

GRAINS: tuple[tuple[str, int], ...] = (("5m", 300), ("1h", 3600), ("1d", 86400))
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def _deployment(pg_db: PgDatabase, tmp_path: Path) -> Deployment:
    deployment = render_deployment(pg_db.dsn, tmp_path / "store.duckdb", tmp_path / "headrace.yaml")
    # Slots are per cluster: a name of this test's own.
    source = deployment.pipeline.source.model_copy(
        update={"slot": f"metrics_{pg_db.name}", "publication": f"metrics_{pg_db.name}"}
    )
    pipeline = deployment.pipeline.model_copy(update={"source": source})
    return Deployment(deployment.path, pipeline, deployment.sections)


def _wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class _Running:
    """``headrace run``'s loop on a thread."""

    def __init__(self, deployment: Deployment) -> None:
        self.runner = Runner(
            deployment.pipeline,
            settings=RunSettings(status_interval_s=0.2, heartbeat_interval_s=0.3),
        )
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="test-metrics-run")

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:  # re-raised by the test
            self.errors.append(exc)

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> _Running:
        self.thread.start()
        _wait(lambda: self.runner.state.phase == "streaming" or self.errors, 120, "streaming")
        self.check()
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the run loop did not stop"
        self.check()


def _current_lsn(pg_db: PgDatabase) -> int:
    ((text,),) = pg_db.fetchall("SELECT pg_current_wal_lsn()::text")
    high, _, low = str(text).partition("/")
    return (int(high, 16) << 32) + int(low, 16)


@pytest.fixture
def caught_up_store(pg_db: PgDatabase, tmp_path: Path) -> Path:
    """History + live workload, replicated into the store and caught up; PostgreSQL idle."""
    load_history(history_settings(pg_db.dsn))
    deployment = _deployment(pg_db, tmp_path)
    settings = workload_settings(
        pg_db.dsn,
        rate=4.0,
        tick_ms=2_000,  # 10 simulated minutes in 300 ticks: several 5-minute buckets
        fraud_every=60,
        new_account_ratio=0.02,
        login_ratio=0.5,
    )
    with _Running(deployment) as running:
        with Workload(settings) as workload:
            for _ in range(300):
                workload.step()
                if workload.stats.ticks % 50 == 0:
                    running.check()
            workload.drain()
            stats = workload.stats
        assert stats.transactions > 1_000
        assert stats.status_changes > 500
        assert stats.customers > 10
        assert sum(stats.scenarios.values()) >= 6
        lsn = _current_lsn(pg_db)
        _wait(
            lambda: (running.runner.state.position or 0) >= lsn or running.errors,
            120,
            f"the store to reach {lsn}",
        )
        running.check()
    return Path(deployment.pipeline.store.path)


def _norm(value: object) -> object:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, Decimal):
        return value.normalize()
    if isinstance(value, str):
        return value.rstrip()  # char(n)
    return value


def _groups(
    rows: Sequence[Sequence[object]], keys: int
) -> dict[tuple[object, ...], tuple[object, ...]]:
    """Rows by group (bucket and dimension values) → the metric values."""
    out: dict[tuple[object, ...], tuple[object, ...]] = {}
    for row in rows:
        values = tuple(_norm(v) for v in row)
        out[values[:keys]] = values[keys:]
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, float | Decimal) or isinstance(b, float | Decimal):
        if a is None or b is None:
            return a is b
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-9)  # type: ignore[arg-type]
    return a == b


def test_every_metric_equals_its_sql_on_postgres(caught_up_store: Path, pg_db: PgDatabase) -> None:
    store = duckdb.connect(str(caught_up_store), read_only=True)
    compared: dict[str, int] = {}
    try:
        for source in SOURCES:
            for label, seconds in GRAINS:
                keys = 1 + len(source.dimensions)
                expected = _groups(pg_db.fetchall(reference_sql(source, seconds)), keys)
                got = _groups(store.execute(view_sql(source, label)).fetchall(), keys)
                view = f"rollup.{source.rollup}_{label}"
                missing = sorted(set(expected) - set(got), key=str)
                extra = sorted(set(got) - set(expected), key=str)
                assert (missing, extra) == ([], []), (
                    f"{view}: {len(got)} groups, PostgreSQL {len(expected)}; "
                    f"missing {[(k, expected[k]) for k in missing[:3]]}, "
                    f"extra {[(k, got[k]) for k in extra[:3]]}"
                )
                names = view_columns(source)[keys:]
                for key, want in expected.items():
                    have = got[key]
                    for name, a, b in zip(names, want, have, strict=True):
                        assert _same(a, b), f"{view} {key} {name}: store {b} != PostgreSQL {a}"
                compared[view] = len(got)
        derived = _derived_metrics(store)
    finally:
        store.close()
    assert derived["fraud_alerts"] > 0, "the injected scenarios raised no fraud alert"
    assert 0 <= derived["avg_health_score_min"] <= derived["avg_health_score_max"] <= 100
    assert len(compared) == len(SOURCES) * len(GRAINS)
    assert all(n > 0 for n in compared.values()), compared
    assert sum(len(metrics_of(s)) for s in SOURCES) == len(SOURCE_METRICS) == 22


def _derived_metrics(store: duckdb.DuckDBPyConnection) -> dict[str, float]:
    """The two metrics over what headrace derives: they evaluate, at every grain, and add up."""
    alerts = store.execute("SELECT count(*) FROM headrace.alerts WHERE kind = 'fraud'").fetchall()
    out: dict[str, float] = {}
    for label, seconds in GRAINS:
        rows = store.execute(reference_sql(FRAUD_ALERTS, seconds)).fetchall()
        assert sum(int(r[-1]) for r in rows) == alerts[0][0], label
        out["fraud_alerts"] = alerts[0][0]
        scores = [float(r[-1]) for r in store.execute(reference_sql(HEALTH, seconds)).fetchall()]
        assert scores, f"no health score recorded ({label})"
        out["avg_health_score_min"] = min(scores)
        out["avg_health_score_max"] = max(scores)
    return out


def test_metric_catalog_matches_deployment_and_docs(tmp_path: Path) -> None:
    deployment = render_deployment("dbname=x", tmp_path / "s.duckdb", tmp_path / "h.yaml")
    by_rollup = {r.name: r for r in deployment.pipeline.rollups}
    for source in SOURCES:
        rollup = by_rollup[source.rollup]
        assert [m.name for m in rollup.measures] == [m.name for m in metrics_of(source)]
        assert {d.name for d in rollup.dimensions} == set(source.dimensions)
        assert [g.total_seconds() for g in rollup.grains] == [s for _, s in GRAINS]
    assert set(by_rollup) == {s.rollup for s in SOURCES}
    text = DOCS.read_text()
    for metric in METRICS:
        assert f"`{metric.name}`" in text, f"{metric.name} is not documented in {DOCS}"

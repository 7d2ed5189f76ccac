"""The run loop in-process against a real PostgreSQL and a real DuckDB file."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest

from headrace.errors import SourceError
from headrace.run.runner import Runner
from headrace.run.settings import RunSettings
from headrace.serve.settings import AuthSettings, ServeSettings
from tests.conftest import PgDatabase
from tests.run.pipeline import make_pipeline, running, wait_caught_up, wait_until


@pytest.mark.parametrize("merge", [200_000, 0], ids=["merged", "unmerged"])
def test_snapshot_stream_resume_equal_postgres(
    pg_db: PgDatabase, tmp_path: Path, merge: int
) -> None:
    pipeline = make_pipeline(pg_db, tmp_path)
    settings = RunSettings(
        status_interval_s=0.2,
        heartbeat_interval_s=0.5,
        merge_max_changes=merge,
        batch_max_changes=500,
        batch_max_wait_s=0.02,
    )
    with running(pipeline, settings) as (runner, _):
        end = pipeline.write(rate=3000, seconds=2.0)
        wait_caught_up(runner, end)
    pipeline.assert_equal_to_postgres()
    # A second run resumes from the stored position.
    with running(pipeline, settings) as (runner, _):
        assert runner.state.snapshot is None
        end = pipeline.write(rate=3000, seconds=1.0, seed=2)
        wait_caught_up(runner, end)
    pipeline.assert_equal_to_postgres()


def test_heartbeats_advance_an_idle_pipeline(pg_db: PgDatabase, tmp_path: Path) -> None:
    pipeline = make_pipeline(pg_db, tmp_path, base_rows=100)
    before = sys.getswitchinterval()
    with running(pipeline) as (runner, _):
        # The writer takes the GIL back quickly after each statement (RunSettings).
        assert sys.getswitchinterval() == pytest.approx(RunSettings().switch_interval_s)
        start = runner.state.position or 0
        wait_until(
            lambda: (runner.state.position or 0) > start and runner.state.empty_batches > 0,
            30,
            "a heartbeat to move the stored position",
        )
        assert runner.state.changes == 0
    assert sys.getswitchinterval() == pytest.approx(before)
    moved = runner.state.position
    with pg_db.connect() as conn:
        row = conn.execute(
            b"SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::int8 "
            b"FROM pg_replication_slots WHERE slot_name = 's_run'"
        ).fetchone()
    assert row is not None
    assert row[0] == moved  # the slot followed the store


def test_serve_shows_the_live_store(pg_db: PgDatabase, tmp_path: Path) -> None:
    pipeline = make_pipeline(pg_db, tmp_path, base_rows=100)
    serve = ServeSettings(
        store=Path(pipeline.config.store.path), port=0, auth=AuthSettings(enabled=False)
    )
    with running(pipeline, serve=serve) as (runner, _):
        assert runner.server_url is not None
        with httpx.Client(base_url=runner.server_url, timeout=10) as client:
            before = client.get("/health").json()["version"]
            end = pipeline.write(rate=2000, seconds=0.5)
            wait_caught_up(runner, end)
            wait_until(lambda: client.get("/health").json()["version"] > before, 10, "a version")
            page = client.get("/", follow_redirects=True)
            assert page.status_code == 200
            answer = client.post(
                "/api/sql", json={"sql": "SELECT count(*) AS n FROM mirror.transactions"}
            )
            assert answer.status_code == 200, answer.text
            with pg_db.connect() as conn:
                row = conn.execute(b"SELECT count(*) FROM transactions").fetchone()
            assert row is not None
            assert answer.json()["rows"] == [[row[0]]]
            # The pipeline's own figures, beside the serving layer's.
            metrics = client.get("/metrics").text
            transactions = 'headrace_pipeline_changes_total{table="public.transactions"}'
            changes = _sample(metrics, transactions)
            assert changes == runner.state.table_changes["public.transactions"] > 0
            applies = _sample(metrics, "headrace_pipeline_batch_apply_seconds_count")
            assert applies >= 1
            assert _sample(metrics, 'headrace_pipeline_freshness_seconds_bucket{le="+Inf"}') > 0
            assert "headrace_serve_viewers" in metrics
    # Gone with the run: the next run of this process registers its own.
    assert "headrace_pipeline_changes_total" not in generate_latest(REGISTRY).decode()


def _sample(text: str, name: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_an_unknown_slot_is_dropped_only_when_asked(pg_db: PgDatabase, tmp_path: Path) -> None:
    pipeline = make_pipeline(pg_db, tmp_path, base_rows=100)
    pg_db.execute("SELECT pg_create_logical_replication_slot('s_run', 'pgoutput')")
    with pytest.raises(SourceError, match="--replace-slot"):
        Runner(pipeline.config, config_path=pipeline.path).run()
    with running(pipeline, replace_slot=True) as (runner, _):
        assert runner.state.snapshot is not None
        end = pipeline.write(rate=2000, seconds=0.3)
        wait_caught_up(runner, end)
    pipeline.assert_equal_to_postgres()

"""The run loop in-process against a real PostgreSQL and a real DuckDB file."""

from __future__ import annotations

from pathlib import Path

import pytest

from headrace.run.settings import RunSettings
from tests.conftest import PgDatabase
from tests.run.pipeline import make_pipeline, running, wait_caught_up


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

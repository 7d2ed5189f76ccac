"""``headrace bench serve`` end to end, small: PostgreSQL, ``headrace run --serve``, viewers.

A smoke run (a few viewers, a few seconds, a small bank) that checks the
benchmark's machinery, not the figures: every part starts, the viewers get
updates whose commit-to-viewer latency is measured, the pipeline's ingest is
counted, and the last line printed is the JSON result.
"""

from __future__ import annotations

import json

import pytest

from headrace.bench.serve import ServeBenchSettings, run


def test_bench_serve_measures_viewers_fed_by_the_pipeline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = ServeBenchSettings(
        viewers=3, rate=300, sql_rate=2, seconds=6, customers=300, warmup_s=3
    )
    result = run(settings)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))
    assert result["viewers_held"] == 3
    assert result["viewer_errors"] == 0
    assert set(result["cpu_waits"]) == {"headrace_run", "write_load", "postgres"}
    assert all(wait >= 0 for wait in result["cpu_waits"].values())
    assert result["changes_written_per_s"] > 0
    assert result["changes_applied_per_s"] > 0
    assert result["updates_measured"] > 0
    assert result["commit_to_viewer_p99_ms"] >= result["commit_to_viewer_p50_ms"] > 0
    assert result["dashboard_loads"] > 0
    assert result["dashboard_load_errors"] == 0
    assert result["sql_queries"] > 0
    assert result["sql_errors"] == 0
    assert result["server_rss_mb"] > 0
    assert result["store_queries_per_s"] > 0
    assert result["tiles"] > 0

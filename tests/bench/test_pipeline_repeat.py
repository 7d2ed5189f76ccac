"""``bench pipeline --repeat``: every run whole, then the medians and every run's figures."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from headrace.bench.pipeline import PipelineBenchResult
from headrace.bench.pipeline_repeat import describe, summarize
from headrace.cli.main import app


def _result(p99: float, *, kept_up: bool, headrace_us: float) -> PipelineBenchResult:
    result = PipelineBenchResult(rate_target=10_000, seconds=20, base_rows=1_000)
    result.freshness_p50_ms, result.freshness_p99_ms = p99 / 2, p99
    result.kept_up = result.meets_target = kept_up
    result.applied_rate_under_load = 10_000 if kept_up else 9_000
    result.cpu_us_per_change = {"postgres": 30.0, "headrace": headrace_us}
    return result


def test_the_summary_holds_the_medians_and_counts_of_the_runs() -> None:
    results = [
        _result(250.0, kept_up=True, headrace_us=80.0),
        _result(420.0, kept_up=False, headrace_us=95.0),
        _result(280.0, kept_up=True, headrace_us=85.0),
    ]
    summary = summarize(results)
    assert summary.repeat == 3
    assert summary.runs_kept_up == summary.runs_meeting_target == 2
    assert summary.median["freshness_p99_ms"] == 280.0
    assert summary.median["headrace_cpu_us_per_change"] == 85.0
    assert summary.median["backlog_changes_per_s"] is None  # a live run has no drain
    assert [run["freshness_p99_ms"] for run in summary.runs] == [250.0, 420.0, 280.0]
    assert describe(summary, results) == (
        "3 runs at 10,000 changes/s: freshness p99 250.0 ms, 420.0 ms, 280.0 ms; median p99 "
        "280.0 ms, p50 140.0 ms, applied under load 10,000/s; kept up in 2 of 3, target met "
        "in 2; 0 mismatches"
    )


def test_repeat_runs_the_benchmark_each_time_and_prints_the_summary_last() -> None:
    args = ["bench", "pipeline", "--rate", "1000", "--seconds", "2", "--base-rows", "2000"]
    result = CliRunner().invoke(app, [*args, "--writers", "1", "--repeat", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["repeat"] == 2
    assert summary["mode"] == "live"
    assert summary["mismatches"] == 0
    assert len(summary["runs"]) == 2
    assert all(run["written_changes"] > 0 for run in summary["runs"])
    # Each run printed its own JSON line before the summary.
    assert sum(line.startswith('{"rate_target"') for line in lines) == 2
    assert "run 2 of 2" in result.output
    assert "2 runs at 1,000 changes/s: freshness p99 " in " ".join(lines[-4:-1])


def test_a_recording_cannot_span_several_runs() -> None:
    result = CliRunner().invoke(
        app, ["bench", "pipeline", "--repeat", "2", "--record", "/nonexistent/recording"]
    )
    assert result.exit_code == 2
    words = " ".join(result.output.replace("│", " ").split())  # unwrap rich's error box
    assert "a recording holds one run: record with --repeat 1" in words

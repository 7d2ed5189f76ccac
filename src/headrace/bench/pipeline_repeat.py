"""``headrace bench pipeline --repeat N``: the same run N times, summarized by medians.

One live run says little on a shared machine: its p99 moves by a factor of two
from one run to the next, with the machine's speed and whatever else runs.
Each run here is a whole :func:`~headrace.bench.pipeline.run` (its own
throwaway cluster, its lines and its JSON line), one after the other; then one
line summarizes them (the medians, how many runs kept up and met the target)
and the last line is one JSON object with the summary and every run's figures.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

from headrace.bench.pipeline import PipelineBenchResult


@dataclass
class RepeatedPipelineResult:
    """The last JSON line of ``bench pipeline --repeat N``."""

    repeat: int
    mode: str
    rate_target: float
    runs_kept_up: int = 0
    """Runs whose freshness stayed under the rate's target after the load's midpoint."""
    runs_meeting_target: int = 0
    """Runs that met the target at their rate (live mode)."""
    mismatches: int = 0
    """Mismatches over all runs (must be 0)."""
    median: dict[str, float | None] = field(default_factory=dict)
    """Medians over the runs of the figures quoted from this benchmark (freshness p50/p99,
    rates, headrace's cores and CPU per change, the machine's speed); None where a mode
    has no such figure."""
    runs: list[dict[str, Any]] = field(default_factory=list)
    """Every run's own JSON object, in order."""


_MEDIANS: dict[str, Callable[[PipelineBenchResult], float | None]] = {
    "freshness_p50_ms": lambda r: r.freshness_p50_ms,
    "freshness_p99_ms": lambda r: r.freshness_p99_ms,
    "applied_rate_under_load": lambda r: r.applied_rate_under_load,
    "sustained_changes_per_s": lambda r: r.sustained_changes_per_s,
    "written_rate": lambda r: r.written_rate,
    "headrace_cpu_cores": lambda r: r.headrace_cpu_cores,
    "headrace_cpu_us_per_change": lambda r: r.cpu_us_per_change.get("headrace"),
    "backlog_changes_per_s": lambda r: r.backlog.changes_per_s if r.backlog else None,
    "python_loop_s": lambda r: r.python_loop_s,
}


def summarize(results: list[PipelineBenchResult]) -> RepeatedPipelineResult:
    """The summary of ``results`` (one or more runs of the same options)."""
    first = results[0]
    summary = RepeatedPipelineResult(
        repeat=len(results), mode=first.mode, rate_target=first.rate_target
    )
    summary.runs_kept_up = sum(r.kept_up for r in results)
    summary.runs_meeting_target = sum(bool(r.meets_target) for r in results)
    summary.mismatches = sum(r.mismatches for r in results)
    for name, figure in _MEDIANS.items():
        values = [v for r in results if (v := figure(r)) is not None]
        summary.median[name] = round(statistics.median(values), 3) if values else None
    summary.runs = [asdict(r) for r in results]
    return summary


def describe(summary: RepeatedPipelineResult, results: list[PipelineBenchResult]) -> str:
    """One line: each run's headline figure, then the medians and the counts."""
    if summary.mode == "backlog":
        each = ", ".join(f"{r.backlog.changes_per_s:,.0f}" for r in results if r.backlog)
        drained = summary.median["backlog_changes_per_s"] or 0.0
        return (
            f"{summary.repeat} runs: drained {each} changes/s; median {drained:,.0f}/s, "
            f"headrace {summary.median['headrace_cpu_us_per_change']} µs of CPU per change; "
            f"{summary.mismatches} mismatches"
        )
    each = ", ".join(f"{r.freshness_p99_ms} ms" for r in results)
    applied = summary.median["applied_rate_under_load"] or 0.0
    return (
        f"{summary.repeat} runs at {summary.rate_target:,.0f} changes/s: freshness p99 {each}; "
        f"median p99 {summary.median['freshness_p99_ms']} ms, p50 "
        f"{summary.median['freshness_p50_ms']} ms, applied under load "
        f"{applied:,.0f}/s; kept up in "
        f"{summary.runs_kept_up} of {summary.repeat}, target met in "
        f"{summary.runs_meeting_target}; {summary.mismatches} mismatches"
    )


def run_repeated(
    repeat: int, run_once: Callable[[], PipelineBenchResult], console: Console | None = None
) -> RepeatedPipelineResult:
    """Call ``run_once`` ``repeat`` times (each prints its own lines), then print the
    summary line and its JSON line, last."""
    out = console or Console(highlight=False)
    results: list[PipelineBenchResult] = []
    for number in range(1, repeat + 1):
        out.print(f"[bold]run {number} of {repeat}[/bold]")
        results.append(run_once())
    summary = summarize(results)
    out.print(describe(summary, results))
    out.print(json.dumps(asdict(summary)), markup=False, soft_wrap=True)
    return summary

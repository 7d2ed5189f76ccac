"""`bench pipeline`'s verdict: what "sustained" means, from freshness histograms."""

from __future__ import annotations

from typing import Any

import numpy as np

from headrace.bench.pipeline import (
    TARGET_HIGH_RATE,
    PipelineBenchResult,
    _freshness,
    _judge,
    kept_up,
    target_p99_ms,
)
from headrace.bench.run_process import MidpointStatus
from headrace.run.metrics import FreshnessHistogram


def _histogram(*delays_ms: tuple[float, int]) -> FreshnessHistogram:
    histogram = FreshnessHistogram()
    for delay, count in delays_ms:
        histogram.add_ms(np.full(count, delay))
    return histogram


def _midpoint(histogram: FreshnessHistogram) -> MidpointStatus:
    document: dict[str, Any] = {"freshness_histogram": histogram.counts.tolist()}
    midpoint = MidpointStatus(lambda: document, at=0.0)
    midpoint.tick()
    return midpoint


def _result(written_rate: float = 100_010, to_last_visible: float = 95_000) -> PipelineBenchResult:
    result = PipelineBenchResult(rate_target=100_000, seconds=20, base_rows=1000)
    result.written_rate = written_rate
    result.changes_per_s_to_last_visible = to_last_visible
    return result


def test_a_pipeline_keeping_up_sustains_the_written_rate() -> None:
    result = _result()
    early = _histogram((400, 1_000_000))
    _freshness(result, FreshnessHistogram(), early.since(FreshnessHistogram()), _midpoint(early))
    # Nothing after the midpoint: no late figure, so no claim either.
    assert not result.kept_up
    done = _histogram((400, 1_000_000), (500, 990_000), (900, 10_000))
    _freshness(result, FreshnessHistogram(), done, _midpoint(early))
    assert result.kept_up
    assert result.freshness_p99_late_ms is not None
    assert result.freshness_p99_late_ms < 1000
    assert result.sustained_changes_per_s == 100_010
    _judge(result)
    assert result.meets_target


def test_a_growing_lag_is_not_sustained_even_under_the_overall_p99() -> None:
    result = _result()
    early = _histogram((300, 1_000_000))
    # The second half's tail is over the target: the lag grew through the run.
    done = _histogram((300, 1_000_000), (600, 985_000), (1_500, 15_000))
    _freshness(result, FreshnessHistogram(), done, _midpoint(early))
    assert result.freshness_p99_ms is not None
    assert result.freshness_p99_ms < 1000
    assert not result.kept_up
    assert result.sustained_changes_per_s == 95_000
    _judge(result)
    assert result.meets_target is False


def test_the_generator_short_of_its_rate_by_more_than_its_tolerance_misses() -> None:
    result = _result(written_rate=0.98 * TARGET_HIGH_RATE)
    early = _histogram((300, 1_000_000))
    done = _histogram((300, 2_000_000))
    _freshness(result, FreshnessHistogram(), done, _midpoint(early))
    assert result.kept_up
    _judge(result)
    assert result.meets_target is False


def test_mismatches_fail_whatever_the_speed() -> None:
    result = _result()
    early = _histogram((300, 1_000_000))
    _freshness(result, FreshnessHistogram(), _histogram((300, 2_000_000)), _midpoint(early))
    result.mismatches = 1
    _judge(result)
    assert result.meets_target is False


def test_each_rate_is_held_to_its_own_freshness_target() -> None:
    assert target_p99_ms(100_000) == 1000
    assert target_p99_ms(0) == 1000
    assert target_p99_ms(10_000) == 300
    assert target_p99_ms(2_000) == 1000
    slow = PipelineBenchResult(rate_target=10_000, seconds=20, base_rows=1000)
    slow.freshness_p99_late_ms = 450.0
    assert not kept_up(slow)


def test_the_midpoint_is_the_first_status_at_or_after_it() -> None:
    documents = iter([{}, {"freshness_histogram": [1, 2]}, {"freshness_histogram": [5, 5]}])
    midpoint = MidpointStatus(lambda: next(documents), at=0.0)
    assert not midpoint.seen
    midpoint.tick()  # an empty document (no status yet) does not count
    assert not midpoint.seen
    midpoint.tick()
    midpoint.tick()
    assert midpoint.histogram() == [1, 2]

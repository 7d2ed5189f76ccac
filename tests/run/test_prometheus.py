"""The pipeline's Prometheus metrics from the run's counters: names, values, and the
freshness histogram summed from the run's fine buckets."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from headrace.run.metrics import FreshnessHistogram
from headrace.run.prometheus import Registered, freshness_buckets
from headrace.run.state import RunState
from headrace.source.postgres.convert_issues import conversions_not_counted, note_issue


def test_freshness_buckets_are_cumulative_and_exact_at_their_bounds() -> None:
    histogram = FreshnessHistogram()
    histogram.add_ms(np.array([10.0, 40.0, 90.0, 400.0, 2_000.0, 3_600_000.0]))
    buckets = dict(freshness_buckets(histogram.counts))
    assert buckets["0.025"] == 1  # 10 ms
    assert buckets["0.05"] == 2  # and 40 ms
    assert buckets["0.1"] == 3
    assert buckets["0.5"] == 4
    assert buckets["2.5"] == 5
    assert buckets["300.0"] == 5  # an hour is beyond every bound...
    assert buckets["+Inf"] == 6  # ...but counted


def test_the_run_counters_as_metrics_while_registered() -> None:
    state = RunState()
    state.table_changes = {"public.transactions": 1_500, "public.accounts": 20}
    state.applies, state.apply_seconds = 12, 3.25
    state.transactions, state.dead_letters, state.position = 340, 2, 0x16B3748
    state.freshness.add_ms(np.array([30.0, 60.0]))
    registry = CollectorRegistry()
    with Registered(state, registry):
        text = generate_latest(registry).decode()
        # A second run of the same process is refused quietly, not with an error.
        with Registered(RunState(), registry) as second:
            assert second is not None
    for line in (
        'headrace_pipeline_changes_total{table="public.transactions"} 1500.0',
        'headrace_pipeline_changes_total{table="public.accounts"} 20.0',
        "headrace_pipeline_store_transactions_total 12.0",
        "headrace_pipeline_source_transactions_total 340.0",
        "headrace_pipeline_batch_apply_seconds_count 12.0",
        "headrace_pipeline_batch_apply_seconds_sum 3.25",
        'headrace_pipeline_freshness_seconds_bucket{le="0.05"} 1.0',
        'headrace_pipeline_freshness_seconds_bucket{le="+Inf"} 2.0',
        "headrace_pipeline_dead_letters_total 2.0",
    ):
        assert line in text, line
    position = next(x for x in text.splitlines() if x.startswith("headrace_pipeline_position "))
    assert float(position.split()[1]) == 0x16B3748
    assert generate_latest(registry) == b""  # unregistered with the run


def test_lossy_values_counted_by_type_and_issue_unless_decoded_again() -> None:
    registry = CollectorRegistry()

    def count() -> float:
        text = generate_latest(registry).decode()
        name = 'headrace_pipeline_lossy_values_total{issue="test: lossy",type="numeric"}'
        line = next((x for x in text.splitlines() if x.startswith(name)), f"{name} 0")
        return float(line.split()[-1])

    with Registered(RunState(), registry):
        before = count()
        note_issue("numeric", "test: lossy", 3)
        assert count() == before + 3
        with conversions_not_counted():  # a second decoding of the same values
            note_issue("numeric", "test: lossy", 5)
        assert count() == before + 3

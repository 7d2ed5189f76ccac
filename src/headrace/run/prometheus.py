"""The pipeline's own Prometheus metrics: ``/metrics`` of ``headrace run --serve``.

The serving layer renders its registry and then prometheus-client's process-wide
one (:mod:`headrace.serve.metrics`); while a run streams, this collector sits in the
latter and reads the run's counters (:class:`~headrace.run.state.RunState`) at scrape
time, so nothing is added to the writer's path:

``headrace_pipeline_changes_total{table}``
    row changes applied to the store (``rate()``: changes/s);
``headrace_pipeline_store_transactions_total``, ``headrace_pipeline_source_transactions_total``
    store transactions committed (one or more source batches each) and source
    transactions applied;
``headrace_pipeline_batch_apply_seconds``
    a summary of the time to apply and commit a store transaction: ``_sum / _count`` is
    the mean, and ``rate(_sum)`` the writer's busy share (``writer_busy`` of ``headrace
    status``; near 1 the pipeline is at its capacity);
``headrace_pipeline_freshness_seconds``
    a histogram of every change's commit -> visible in the store (the run's own
    histogram, whose 2%-wide buckets are summed into these: a change counts in ``le``
    once its fine bucket's upper edge is within it);
``headrace_pipeline_dead_letters_total``, ``headrace_pipeline_position``
    changes sent to the dead-letter table, and the stored source position (LSN);
``headrace_pipeline_lossy_values_total{type,issue}``
    source values this process could not keep as PostgreSQL had them (stored as NULL,
    or an array flattened), by PostgreSQL type and issue; each pair is also logged
    once as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from headrace.run.metrics import EDGES_MS
from headrace.run.state import RunState
from headrace.source.postgres.convert_issues import conversion_issue_counts

FRESHNESS_BUCKETS_S: tuple[float, ...] = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
"""Upper bounds of the freshness histogram's buckets (seconds), ``+Inf`` besides."""

log = logging.getLogger("headrace.run")

_FINE_EDGES_S = np.array(EDGES_MS, dtype=np.float64) / 1000.0


class PipelineCollector(Collector):
    """The run's counters as Prometheus metrics (module docstring)."""

    def __init__(self, state: RunState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        with state.lock:
            tables = dict(state.table_changes)
            applies, apply_seconds = state.applies, state.apply_seconds
            transactions, dead_letters = state.transactions, state.dead_letters
            position = state.position
            fine = state.freshness.counts.copy()
        changes = CounterMetricFamily(
            "headrace_pipeline_changes",
            "Row changes applied to the store, per source table.",
            labels=["table"],
        )
        for table, count in sorted(tables.items()):
            changes.add_metric([table], float(count))
        yield changes
        yield CounterMetricFamily(
            "headrace_pipeline_store_transactions",
            "Store transactions committed (each one or more source batches and the position).",
            value=float(applies),
        )
        yield CounterMetricFamily(
            "headrace_pipeline_source_transactions",
            "Source transactions applied to the store.",
            value=float(transactions),
        )
        yield SummaryMetricFamily(
            "headrace_pipeline_batch_apply_seconds",
            "Time to apply and commit one store transaction; rate(_sum) is the writer's "
            "busy share.",
            count_value=applies,
            sum_value=apply_seconds,
        )
        yield HistogramMetricFamily(
            "headrace_pipeline_freshness_seconds",
            "Every change's source commit -> visible in the store.",
            buckets=freshness_buckets(fine),
        )
        yield CounterMetricFamily(
            "headrace_pipeline_dead_letters",
            "Changes the engine could not apply, recorded in the dead-letter table.",
            value=float(dead_letters),
        )
        lossy = CounterMetricFamily(
            "headrace_pipeline_lossy_values",
            "Source values not kept as PostgreSQL had them (NULL or reshaped), by type and issue.",
            labels=["type", "issue"],
        )
        for (type_name, issue), count in sorted(conversion_issue_counts().items()):
            lossy.add_metric([type_name, issue], float(count))
        yield lossy
        if position is not None:
            yield GaugeMetricFamily(
                "headrace_pipeline_position",
                "The stored source position (LSN as a number).",
                value=float(position),
            )


def freshness_buckets(fine_counts: np.ndarray) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from the run's fine freshness buckets (counts per
    bucket; bucket ``i`` ends at ``EDGES_MS[i]``, the last one is open-ended)."""
    closed = fine_counts[: len(_FINE_EDGES_S)]
    cumulative = np.cumsum(closed)
    buckets: list[tuple[str, float]] = []
    for bound in FRESHNESS_BUCKETS_S:
        within = int(np.searchsorted(_FINE_EDGES_S, bound, side="right"))
        buckets.append((repr(bound), float(cumulative[within - 1]) if within else 0.0))
    buckets.append(("+Inf", float(fine_counts.sum())))
    return buckets


class Registered:
    """:class:`PipelineCollector` in a registry (the process-wide one by default) while
    the ``with`` block runs: a process may run several pipelines one after another."""

    def __init__(self, state: RunState, registry: CollectorRegistry = REGISTRY) -> None:
        self.collector = PipelineCollector(state)
        self.registry = registry
        self.registered = False

    def __enter__(self) -> PipelineCollector:
        try:
            self.registry.register(self.collector)
            self.registered = True
        except ValueError:  # another run of this process has the names: it keeps them
            log.warning("another pipeline of this process exports its metrics; not this one")
        return self.collector

    def __exit__(self, *exc: object) -> None:
        if self.registered:
            self.registry.unregister(self.collector)
            self.registered = False

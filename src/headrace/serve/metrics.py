"""Prometheus metrics of the serving layer (one registry per app) plus the process-wide ones.

``/metrics`` renders this app's registry and then prometheus-client's default
registry, where a running pipeline registers its own (changes, batch apply time,
freshness: :mod:`headrace.run.prometheus`).
Per-table freshness is read from ``headrace.tables`` at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import duckdb
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class _FreshnessCollector(Collector):
    """headrace_table_freshness_seconds{table} = now - last_commit_ts, at scrape time."""

    def __init__(self, cursor_factory: Callable[[], duckdb.DuckDBPyConnection]) -> None:
        self._cursor_factory = cursor_factory

    def collect(self) -> Iterator[Metric]:
        freshness = GaugeMetricFamily(
            "headrace_table_freshness_seconds",
            "Seconds since the newest source commit applied to each table.",
            labels=["table"],
        )
        rows_gauge = GaugeMetricFamily(
            "headrace_table_rows", "Rows in each mirrored table.", labels=["table"]
        )
        cur = self._cursor_factory()
        try:
            rows = cur.execute(
                "SELECT table_name, rows, last_commit_ts FROM headrace.tables"
            ).fetchall()
        except duckdb.Error:
            rows = []
        finally:
            cur.close()
        now = datetime.now(UTC)
        for table, count, last in rows:
            if last is not None:
                freshness.add_metric([str(table)], max(0.0, (now - last).total_seconds()))
            if count is not None:
                rows_gauge.add_metric([str(table)], float(count))
        yield freshness
        yield rows_gauge


class ServeMetrics:
    """Counters and gauges the serving layer updates."""

    def __init__(self, cursor_factory: Callable[[], duckdb.DuckDBPyConnection]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.viewers = Gauge("headrace_serve_viewers", "Open live (SSE) connections.", registry=r)
        self.views = Gauge(
            "headrace_serve_live_views",
            "Distinct live views (dashboard, range, filters).",
            registry=r,
        )
        self.store_version = Gauge(
            "headrace_store_version", "Store version (committed batches seen).", registry=r
        )
        self.commits = Counter(
            "headrace_store_commits_seen", "Store version bumps seen by the server.", registry=r
        )
        self.requests = Counter(
            "headrace_serve_requests", "HTTP requests.", ["route", "status"], registry=r
        )
        self.errors = Counter(
            "headrace_serve_errors",
            "Requests answered 5xx, and tile failures.",
            ["kind"],
            registry=r,
        )
        self.sql_queries = Counter(
            "headrace_serve_sql_queries",
            "SQL endpoint queries by outcome.",
            ["outcome"],
            registry=r,
        )
        self.sql_seconds = Histogram(
            "headrace_serve_sql_seconds", "SQL endpoint query time.", registry=r
        )
        self.tile_queries = Counter(
            "headrace_serve_tile_queries",
            "Tile and API read queries run against the store.",
            registry=r,
        )
        self.store_queries = Counter(
            "headrace_serve_store_queries",
            "Statements the read threads ran against the store, by kind: tile (a dashboard "
            "tile), read (an API read), position (a view's 'as of'), catalog (relations and "
            "columns, read once per store version), describe (a tile query's columns, once per "
            "query).",
            ["kind"],
            registry=r,
        )
        self.tile_reuses = Counter(
            "headrace_serve_tile_reuses",
            "Tile results taken from another view's computation of the same store snapshot "
            "(same query, parameters and masks) instead of running the query again.",
            registry=r,
        )
        self.tile_retries = Counter(
            "headrace_serve_tile_retries",
            "Tiles read a second time at once because the rendering query made from their "
            "cached columns failed (the store's schema changed since they were described).",
            registry=r,
        )
        self.compute_cpu = Counter(
            "headrace_serve_compute_cpu_seconds",
            "CPU seconds of the read threads: DuckDB planning and execution on the calling "
            "thread, and turning results into JSON.",
            registry=r,
        )
        self.view_computations = Counter(
            "headrace_serve_view_computations", "Live view computations.", registry=r
        )
        self.view_seconds = Histogram(
            "headrace_serve_view_compute_seconds",
            "Time to compute all tiles of one live view.",
            registry=r,
        )
        self.update_lag = Histogram(
            "headrace_serve_update_lag_seconds",
            "From the newest source commit to the tile update being sent.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        r.register(_FreshnessCollector(cursor_factory))

    def render(self) -> bytes:
        """Text exposition: this app's metrics, then the process-wide registry."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)

"""``bench pipeline``'s checks after the load: exactness against PostgreSQL, and the old
way (``REFRESH MATERIALIZED VIEW``) timed on the same data."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import psycopg
from rich.console import Console

from headrace.pipeline.model import PipelineConfig
from headrace.run.verify import compare_store, reference_sql
from headrace.store.duckdb.connect import open_store

if TYPE_CHECKING:
    from headrace.bench.pipeline import PipelineBenchResult


def verify_exactness(
    result: PipelineBenchResult, config: PipelineConfig, dsn: str, out: Console
) -> None:
    """Every rollup view against the same GROUP BY on PostgreSQL (the source is quiet)."""
    with psycopg.connect(dsn, autocommit=True) as pg:
        duck = open_store(config.store.path, read_only=True)
        try:
            comparison = compare_store(config, pg, duck, mirrors=False)
            pg_rows = pg.execute(b"SELECT count(*) FROM transactions").fetchone()
            duck_rows = duck.execute("SELECT count(*) FROM mirror.transactions").fetchone()
            indexed = duck.execute(
                "SELECT count(*) FROM duckdb_indexes() WHERE schema_name = 'mirror' "
                "AND table_name = 'transactions'"
            ).fetchone()
        finally:
            duck.close()
    result.checked_views = len(comparison.checked)
    result.mirror_rows_end = int(duck_rows[0]) if duck_rows else 0
    result.mirror_key_indexed_end = bool(indexed and indexed[0])
    result.mismatches = len(comparison.mismatches) + (0 if pg_rows == duck_rows else 1)
    result.mismatch_detail = comparison.describe()[:500]
    out.print(
        f"exactness: {result.checked_views} rollup views vs PostgreSQL GROUP BY, "
        f"mirror {duck_rows[0] if duck_rows else '?':,} rows"
        f"{' (key indexed)' if result.mirror_key_indexed_end else ''}: "
        f"{result.mismatches} mismatches"
    )


def time_old_way(
    result: PipelineBenchResult, config: PipelineConfig, dsn: str, out: Console
) -> None:
    """REFRESH MATERIALIZED VIEW of the same aggregates on PostgreSQL, on the same data."""
    with psycopg.connect(dsn, autocommit=True) as pg:
        for rollup in config.rollups:
            sql, _ = reference_sql(config, rollup, int(rollup.grain.total_seconds()), pg)
            view = f"mv_{rollup.name}"
            pg.execute(f"CREATE MATERIALIZED VIEW {view} AS {sql} WITH NO DATA".encode())
            started = time.perf_counter()
            pg.execute(f"REFRESH MATERIALIZED VIEW {view}".encode())
            result.refresh_seconds[rollup.name] = round(time.perf_counter() - started, 3)
    result.refresh_total_s = round(sum(result.refresh_seconds.values()), 3)
    p99 = result.freshness_p99_ms
    compared = "no freshness was measured"
    if p99:
        ratio = result.refresh_total_s * 1000 / p99
        result.ratio_time_to_fresh = round(ratio, 1)
        if ratio >= 1:
            compared = f"headrace's p99 time to a fresh result is {ratio:.1f}x shorter"
        elif ratio > 0:
            compared = f"headrace's p99 time to a fresh result is {1 / ratio:.1f}x longer"
    out.print(
        f"old way: REFRESH MATERIALIZED VIEW of the {len(result.refresh_seconds)} rollups takes "
        f"{result.refresh_total_s:.2f} s on PostgreSQL ({result.refresh_seconds}); "
        f"{compared}"
    )

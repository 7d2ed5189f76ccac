"""``headrace bench snapshot``: the initial snapshot into Arrow, against a raw COPY.

A throwaway cluster gets N rows in a typical table (int8 key, numeric(18,2),
text, timestamptz, bool). Then, on the same data, over the same connection
kind (TCP loopback unless ``--unix``):

1. raw binary COPY to a null sink, one connection (psycopg 3 raw copy
   blocks: ``for block in cursor.copy(...)``, bytes dropped);
2. the same raw binary COPY, split into the same CTID ranges and run by the
   same number of threads as the snapshot;
3. headrace's snapshot: slot with exported snapshot, parallel CSV COPY,
   parsed and converted into Arrow (every value decoded).

The headline ratio is (3) against (2), same parallelism; (3) against (1) is
printed too. The last line is one JSON object. Target: >= 1M rows/s.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psycopg
from rich.console import Console

from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.source.changes import TableRef
from headrace.source.postgres.snapshot import SnapshotSettings, Snapshotter, drop_slot
from headrace.source.postgres.snapshot_catalog import (
    CopyRange,
    TablePlan,
    copy_statement,
    read_table_plans,
)
from headrace.source.postgres.types import TypeRegistry

TARGET_ROWS_PER_S = 1_000_000
TABLE = TableRef("public", "bench_snapshot")
SLOT = "headrace_bench_snapshot"

_CREATE = """
CREATE TABLE bench_snapshot (
    id         int8 PRIMARY KEY,
    amount     numeric(18,2) NOT NULL,
    note       text,
    created_at timestamptz NOT NULL,
    settled    bool NOT NULL
)
"""
_LOAD = """
INSERT INTO bench_snapshot
SELECT g, round((random() * 100000)::numeric, 2), 'payment #' || g || ' to merchant ' || (g %% 977),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '37 seconds', g %% 3 = 0
FROM generate_series(1, %s) AS g
"""


@dataclass(frozen=True)
class SnapshotBenchResult:
    """Timings of one ``bench snapshot`` run."""

    rows: int
    workers: int
    connection: str
    snapshot_s: float
    snapshot_rows_per_s: float
    raw_copy_one_s: float
    raw_copy_one_rows_per_s: float
    raw_copy_parallel_s: float
    raw_copy_parallel_rows_per_s: float
    ratio_vs_raw_parallel: float
    ratio_vs_raw_one: float
    target_rows_per_s: int
    meets_target: bool


def run(
    rows: int = 1_000_000, workers: int = 4, *, unix: bool = False, console: Console | None = None
) -> SnapshotBenchResult:
    """Run the benchmark on a fresh throwaway cluster and print its lines."""
    out = console or Console(highlight=False)
    with ThrowawayPostgres() as cluster:
        dsn = cluster.dsn("postgres", unix=unix)
        out.print(f"loading {rows:,} rows into {TABLE} ...")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(_CREATE.encode())
            conn.execute(_LOAD.encode(), (rows,))
            # Set hint bits and the visibility map now, so no timed run pays for it.
            conn.execute(b"VACUUM (FREEZE, ANALYZE) bench_snapshot")
        settings = SnapshotSettings(dsn=dsn, tables=(TABLE,), slot=SLOT, workers=workers)
        ranges = _ranges(dsn, settings)
        _raw_copy(dsn, ranges[:1])  # warm the cache
        raw_one = _timed(lambda: _raw_copy(dsn, [_whole(ranges)]))
        out.print(_line("raw binary COPY, 1 connection", rows, raw_one))
        raw_parallel = _timed(lambda: _raw_copy_parallel(dsn, ranges, workers))
        out.print(_line(f"raw binary COPY, {workers} threads", rows, raw_parallel))
        snapshot = _timed(lambda: _snapshot(settings))
        out.print(_line(f"headrace snapshot into Arrow, {workers} workers", rows, snapshot))
        drop_slot(dsn, SLOT)
    rate = rows / snapshot
    result = SnapshotBenchResult(
        rows=rows,
        workers=workers,
        connection="unix" if unix else "tcp",
        snapshot_s=round(snapshot, 3),
        snapshot_rows_per_s=round(rate),
        raw_copy_one_s=round(raw_one, 3),
        raw_copy_one_rows_per_s=round(rows / raw_one),
        raw_copy_parallel_s=round(raw_parallel, 3),
        raw_copy_parallel_rows_per_s=round(rows / raw_parallel),
        ratio_vs_raw_parallel=round(raw_parallel / snapshot, 3),
        ratio_vs_raw_one=round(raw_one / snapshot, 3),
        target_rows_per_s=TARGET_ROWS_PER_S,
        meets_target=rate >= TARGET_ROWS_PER_S,
    )
    out.print(
        f"snapshot vs raw COPY: {result.ratio_vs_raw_parallel:.2f}x (same parallelism), "
        f"{result.ratio_vs_raw_one:.2f}x (one connection); target {TARGET_ROWS_PER_S:,} rows/s "
        + ("met" if result.meets_target else "NOT met")
    )
    out.print(json.dumps(asdict(result)), markup=False, soft_wrap=True)
    return result


def _ranges(dsn: str, settings: SnapshotSettings) -> list[tuple[TablePlan, CopyRange]]:
    """The snapshot's own plan of the table (same CTID ranges for the raw copy)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        registry = TypeRegistry.load(conn)
        (plan,) = read_table_plans(
            conn,
            settings.tables,
            registry=registry,
            publication=None,
            range_pages=settings.range_pages,
        )
    return [(plan, r) for r in plan.ranges]


def _whole(ranges: list[tuple[TablePlan, CopyRange]]) -> tuple[TablePlan, CopyRange]:
    plan = ranges[0][0]
    return plan, CopyRange(plan.schema.table, None, None, plan.pages, 0)


def _raw_copy(dsn: str, ranges: list[tuple[TablePlan, CopyRange]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cursor:
        for plan, copy_range in ranges:
            with cursor.copy(copy_statement(plan, copy_range, copy_format="binary")) as copy:
                for _block in copy:
                    pass


def _raw_copy_parallel(dsn: str, ranges: list[tuple[TablePlan, CopyRange]], workers: int) -> None:
    pending = list(ranges)
    lock = threading.Lock()

    def work() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cursor:
            while True:
                with lock:
                    if not pending:
                        return
                    plan, copy_range = pending.pop()
                with cursor.copy(copy_statement(plan, copy_range, copy_format="binary")) as copy:
                    for _block in copy:
                        pass

    threads = [threading.Thread(target=work) for _ in range(min(workers, len(ranges)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _snapshot(settings: SnapshotSettings) -> None:
    snapshotter = Snapshotter(settings)
    copied = sum(chunk.rows.num_rows for chunk in snapshotter.chunks())
    if copied != snapshotter.result.total_rows:  # pragma: no cover - a bug, loudly
        raise AssertionError(f"copied {copied} rows, result says {snapshotter.result.total_rows}")


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _line(what: str, rows: int, seconds: float) -> str:
    return f"{what:<48} {seconds:7.3f} s  {rows / seconds:>12,.0f} rows/s"

"""Computing dashboard views: every tile of one (dashboard, range, filters, masks) at once.

Runs on a small pool of threads, each with its own DuckDB cursor. All tiles of
a view are read in one transaction, so they show the same store snapshot and
share one "as of" (the newest source commit in ``headrace.position``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from headrace.serve.catalog import Catalog, MaskPolicy, load_catalog
from headrace.serve.metrics import ServeMetrics
from headrace.serve.results import rows_to_json
from headrace.serve.settings import LiveSettings
from headrace.serve.shared_tiles import SharedTiles, SnapshotKey, TileKey, TileResult
from headrace.serve.sql import SqlRejectedError, mask_trusted_sql
from headrace.serve.store import ServedStore, read_position
from headrace.serve.tiles import Dashboard, TimeRange, render_tile_query
from headrace.serve.watchdog import Watchdog

T = TypeVar("T")


@dataclass(frozen=True)
class ViewSpec:
    """What a live view shows: one dashboard, one range, one filter set, one mask policy."""

    dashboard: Dashboard
    range: TimeRange
    filters: tuple[tuple[str, str], ...]
    policy: MaskPolicy

    @property
    def key(self) -> tuple[str, str, tuple[tuple[str, str], ...], str]:
        """Viewers with equal keys share every computation."""
        return (self.dashboard.name, self.range.key, self.filters, self.policy.key)


class ReadError(Exception):
    """A server-built read query failed; the message is for the user."""


class StoreReader:
    """Thread pool of read cursors over a served store, with a catalog cache."""

    def __init__(self, store: ServedStore, settings: LiveSettings, metrics: ServeMetrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(settings.compute_workers, thread_name_prefix="hr-read")
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self._catalog: tuple[int, float, Catalog] | None = None
        self._watchdog = Watchdog("hr-read-watchdog")
        # Masked SQL by (sql, policy key, catalog generation); a catalog whose relations
        # or columns changed starts a new generation (and empties this).
        self._masked_sql: dict[tuple[str, str, int], str] = {}
        self._catalog_generation = 0
        self.shared = SharedTiles(keep_s=max(settings.view_grace_s, 60.0))

    # threads and cursors ---------------------------------------------------

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self.store.cursor()
            self._local.cursor = cur
            with self._lock:
                self._cursors.append(cur)
        return cur

    async def call(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``fn(cursor)`` on a read thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._measured, fn)

    def _measured(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        started = time.thread_time()
        try:
            return fn(self._cursor())
        finally:
            self.metrics.compute_cpu.inc(time.thread_time() - started)

    def close(self) -> None:
        """Stop the threads and close their cursors."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._watchdog.close()
        with self._lock:
            for cur in self._cursors:
                cur.close()
            self._cursors.clear()

    # catalog ---------------------------------------------------------------

    def catalog(self, cur: duckdb.DuckDBPyConnection) -> Catalog:
        """Visible relations, reloaded at most once a second when the version moved."""
        cached = self._catalog
        version = self.store.version
        now = time.monotonic()
        if cached is not None and (cached[0] == version or now - cached[1] < 1.0):
            return cached[2]
        catalog = load_catalog(cur)
        self.metrics.store_queries.labels("catalog").inc(2)
        if cached is not None and cached[2] == catalog:
            catalog = cached[2]  # unchanged: keep the object (and what was masked with it)
        else:
            with self._lock:
                self._catalog_generation += 1
                self._masked_sql.clear()
        self._catalog = (version, now, catalog)
        return catalog

    # reads -----------------------------------------------------------------

    def read(
        self,
        cur: duckdb.DuckDBPyConnection,
        sql: str,
        params: dict[str, Any] | list[Any] | None,
        policy: MaskPolicy,
        kind: str = "read",
    ) -> pa.Table:
        """Run a trusted query with masks applied and a timeout; result fully read.

        ``kind`` labels the statement in the ``store_queries`` metric.
        """
        # The relation runs when it is read: inside the guard.
        return self._guarded(
            cur,
            sql,
            policy,
            kind,
            lambda masked: cur.sql(masked, params=params or None).to_arrow_table(),
        )

    def read_rows(
        self,
        cur: duckdb.DuckDBPyConnection,
        sql: str,
        params: dict[str, Any] | None,
        policy: MaskPolicy,
    ) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]]]:
        """A tile query's ``(name, DuckDB type)`` columns and rows, masked, with a timeout.

        Tiles are turned into JSON rows anyway, so this skips Arrow: DuckDB's
        ``execute().fetchall()`` also plans the statement once, where ``sql()`` binds
        it for the relation's schema and then again to run it (~1 ms of ~3 ms CPU
        for a small tile query).
        """

        def fetch(masked: str) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]]]:
            rows = cur.execute(masked, params or None).fetchall()
            return [(str(d[0]), str(d[1])) for d in cur.description or ()], rows

        return self._guarded(cur, sql, policy, "tile", fetch)

    def _guarded(
        self,
        cur: duckdb.DuckDBPyConnection,
        sql: str,
        policy: MaskPolicy,
        kind: str,
        run: Callable[[str], T],
    ) -> T:
        """``run(masked sql)`` under the tile timeout, counted in the metrics."""
        masked = self._masked(cur, sql, policy)
        self.metrics.tile_queries.inc()
        self.metrics.store_queries.labels(kind).inc()
        try:
            with self._watchdog.guard(cur, self.settings.tile_timeout_s):
                return run(masked)
        except duckdb.InterruptException:
            raise ReadError(
                f"query took longer than {self.settings.tile_timeout_s:g} s and was cancelled"
            ) from None

    def _masked(self, cur: duckdb.DuckDBPyConnection, sql: str, policy: MaskPolicy) -> str:
        """``sql`` with ``policy``'s masks applied, the rewrite kept per catalog."""
        if not policy.patterns:
            return sql  # the catalog is only needed to find masked columns
        generation = self._catalog_generation
        catalog = self.catalog(cur)
        key = (sql, policy.key, generation)
        masked = self._masked_sql.get(key)
        if masked is None:
            masked = mask_trusted_sql(sql, catalog, policy)
            with self._lock:
                # Only while that catalog is still the current one.
                if generation == self._catalog_generation and len(self._masked_sql) < 4096:
                    self._masked_sql[key] = masked
        return masked

    def compute_view(
        self,
        cur: duckdb.DuckDBPyConnection,
        spec: ViewSpec,
        seq: int,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Every tile of ``spec`` in one read transaction (blocking; on a read thread).

        ``now`` places relative time ranges (default: the clock). Tile results are
        shared with other views computed on the same snapshot (see shared_tiles).
        """
        started = time.perf_counter()
        version = self.store.version
        lo, hi = spec.range.bounds(now)
        filters = dict(spec.filters)
        tiles: list[dict[str, Any]] = []
        cur.execute("BEGIN TRANSACTION")
        in_tx = True
        try:
            position = read_position(cur)
            self.metrics.store_queries.labels("position").inc()
            # Share only when no commit was published while the transaction began.
            snapshot: SnapshotKey | None = (
                (version, position.lsn, position.commit_ts)
                if self.store.version == version
                else None
            )
            for tile in spec.dashboard.tiles:
                tile_started = time.perf_counter()
                sql, params, ignored = render_tile_query(spec.dashboard, tile, filters, (lo, hi))
                entry: dict[str, Any] = {
                    "name": tile.name,
                    "chart": tile.chart.value,
                    "ignored_filters": ignored,
                }
                if not in_tx:
                    # A failed tile rolled the transaction back: the next ones read a
                    # newer snapshot, which they must not share under the old name.
                    cur.execute("BEGIN TRANSACTION")
                    in_tx = True
                    snapshot = None
                result, error = self._tile_result(cur, sql, params, spec.policy, snapshot)
                if error is None:
                    entry.update(result)
                else:
                    self.metrics.errors.labels("tile").inc()
                    entry["error"] = _tile_error(error)
                    entry["columns"], entry["rows"] = [], []
                    cur.execute("ROLLBACK")
                    in_tx = False
                entry["elapsed_ms"] = round((time.perf_counter() - tile_started) * 1000, 1)
                tiles.append(entry)
        finally:
            if in_tx:
                cur.execute("COMMIT")
        elapsed = time.perf_counter() - started
        self.metrics.view_computations.inc()
        self.metrics.view_seconds.observe(elapsed)
        return {
            "dashboard": spec.dashboard.name,
            "version": version,
            "seq": seq,
            "as_of": position.commit_ts.isoformat() if position.commit_ts else None,
            "computed_at": datetime.now(UTC).isoformat(),
            "range": {"spec": spec.range.spec, "from": lo.isoformat(), "to": hi.isoformat()},
            "filters": filters,
            "elapsed_ms": round(elapsed * 1000, 1),
            "tiles": tiles,
        }

    def _tile_result(
        self,
        cur: duckdb.DuckDBPyConnection,
        sql: str,
        params: dict[str, Any],
        policy: MaskPolicy,
        snapshot: SnapshotKey | None,
    ) -> tuple[TileResult, BaseException | None]:
        """One tile's rows: shared when another view ran the same query on ``snapshot``,
        else run here (and shared). Failures are returned, not raised or shared."""
        key: TileKey = (sql, tuple(sorted(params.items())), policy.key)
        claimed = False
        if snapshot is not None:
            shared, claimed = self.shared.take(key, snapshot, self.settings.tile_timeout_s)
            if shared is not None:
                self.metrics.tile_reuses.inc()
                return {**shared, "shared": True}, None
        result: TileResult | None = None
        try:
            columns, rows = self.read_rows(cur, sql, params, policy)
            limit = self.settings.tile_row_limit
            result = {"truncated": len(rows) > limit, **rows_to_json(columns, rows[:limit])}
            return result, None
        except (duckdb.Error, ReadError, SqlRejectedError) as exc:
            return {}, exc
        finally:
            if claimed and snapshot is not None:
                self.shared.finish(key, snapshot, result)


def _tile_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, duckdb.CatalogException) and "does not exist" in text:
        return f"not in the store yet: {text}"
    return text

"""Computing dashboard views: every tile of one (dashboard, range, filters, masks) at once.

Runs on a small pool of threads, each with its own DuckDB cursor. All tiles of
a view are read in one transaction, so they show the same store snapshot and
share one "as of" (the newest source commit in ``headrace.position``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import re
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
from headrace.serve.http import dumps
from headrace.serve.metrics import ServeMetrics
from headrace.serve.results import rows_to_json
from headrace.serve.settings import LiveSettings
from headrace.serve.shared_tiles import SharedTiles, SnapshotKey, TileKey, TileResult
from headrace.serve.sql import SqlRejectedError, mask_trusted_sql
from headrace.serve.store import POSITION_RELATION, Position, ServedStore, read_position
from headrace.serve.tile_json import (
    TileShape,
    describe_sql,
    render_sql,
    rows_json,
    shape_from_description,
)
from headrace.serve.tiles import Dashboard, Tile, TimeRange, render_tile_query
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


@dataclass(frozen=True)
class ViewResult:
    """A computed view: what the live hub needs, and the view as JSON."""

    version: int
    """Store version seen before the read transaction began."""
    seq: int
    as_of: datetime | None
    """Newest source commit visible in the snapshot the tiles were read from."""
    payload: bytes
    """The view as JSON (``dashboard``, ``version``, ``seq``, ``as_of``, ``range``,
    ``filters``, ``tiles``, ...), encoded once on the read thread for every viewer."""


class ReadError(Exception):
    """A server-built read query failed; the message is for the user."""


class RenderingFailedError(Exception):
    """A tile's rendering query, made from its cached shape, failed: the columns may
    have changed since the shape was described (the error is ``args[0]``)."""


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
        self._catalog: tuple[int, Catalog] | None = None  # (store version, catalog)
        self._watchdog = Watchdog("hr-read-watchdog")
        # Masked SQL by (sql, policy key, catalog generation); a catalog whose relations
        # or columns changed starts a new generation (and empties this).
        self._masked_sql: dict[tuple[str, str, int], str] = {}
        self._catalog_generation = 0
        # Tile query shapes (columns, JSON rendering) by (configured query, mask
        # policy, catalog generation), and rendering queries by masked SQL; see
        # tile_json. Emptied with the masked SQL when the catalog changes.
        self._shapes: dict[tuple[str, str, int], TileShape] = {}
        self._renders: dict[str, str] = {}
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
        """Visible relations, read again once per store version.

        Schema changes come with a committed batch (a column added to a mirror, a
        rollup view re-created), so the tile shapes kept per catalog follow them at
        the next version. Reading the catalog costs ~3 ms when nothing changed (one
        statement; ~5 ms and two when something did), once per version for all
        views. A change committed between this read and a view's read transaction
        is caught by the rendering query failing (see :meth:`compute_view`), or at
        the next version.
        """
        cached = self._catalog
        version = self.store.version
        if cached is not None and cached[0] == version:
            return cached[1]
        previous = cached[1] if cached is not None else None
        catalog = load_catalog(cur, previous)
        self.metrics.store_queries.labels("catalog").inc(1 if catalog is previous else 2)
        if previous is not None and previous == catalog:
            catalog = previous  # unchanged: keep the object (and what was masked with it)
        else:
            with self._lock:
                self._catalog_generation += 1
                self._masked_sql.clear()
                self._shapes.clear()
                self._renders.clear()
        self._catalog = (version, catalog)
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
            self._masked(cur, sql, policy),
            kind,
            lambda masked: cur.sql(masked, params=params or None).to_arrow_table(),
        )

    def read_tile(self, cur: duckdb.DuckDBPyConnection, query: _TileQuery) -> TileResult:
        """A tile's ``"columns":[...],"rows":[...],"truncated":...`` JSON members, with a
        timeout.

        With a rendering query (see tile_json) the GIL is held for one string per
        row; otherwise the rows come as Python objects, converted here.
        """
        limit = self.settings.tile_row_limit
        masked, params, shape = query.masked or "", query.params, query.shape
        rendering = self._rendering(masked, shape)
        if shape is not None and rendering is not None:
            columns_json = shape.columns_json

            def render(_: str) -> TileResult:
                rows, truncated = rows_json(
                    cur.execute(rendering, params or None).fetchall(), limit
                )
                return (
                    f'"columns":{columns_json},"rows":{rows},'
                    f'"truncated":{"true" if truncated else "false"}'
                )

            try:
                return self._guarded(cur, masked, "tile", render)
            except duckdb.Error as exc:
                # Perhaps the columns changed: describe again next time, and let the
                # caller read this tile again without the shape.
                with self._lock:
                    self._shapes.pop(query.shape_key, None)
                    self._renders.pop(masked, None)
                raise RenderingFailedError(exc) from exc

        def fetch(_: str) -> TileResult:
            rows = cur.execute(masked, params or None).fetchall()
            columns = [(str(d[0]), str(d[1])) for d in cur.description or ()]
            table = rows_to_json(columns, rows[:limit])
            return (
                f'"columns":{dumps(table["columns"]).decode()},'
                f'"rows":{dumps(table["rows"]).decode()},'
                f'"truncated":{"true" if len(rows) > limit else "false"}'
            )

        return self._guarded(cur, masked, "tile", fetch)

    def _rendering(self, masked: str, shape: TileShape | None) -> str | None:
        """The rendering query of ``masked`` (made once per SQL text)."""
        if shape is None or shape.cells is None:
            return None
        rendering = self._renders.get(masked)
        if rendering is None:
            rendering = render_sql(shape, masked, self.settings.tile_row_limit)
            if rendering is not None:
                with self._lock:
                    _remember(self._renders, masked, rendering)
        return rendering

    def tile_shape(
        self,
        cur: duckdb.DuckDBPyConnection,
        key: tuple[str, str, int],
        masked: str,
        params: dict[str, Any],
    ) -> TileShape | None:
        """The shape of a tile query, described once per ``key`` (configured query,
        mask policy, catalog generation: filters do not change a tile's columns);
        None when it cannot be described now (the tile then takes the Python path,
        which reports its error).

        Runs outside the view's read transaction: a failure here must not end it.
        """
        shape = self._shapes.get(key)
        if shape is not None:
            return shape
        try:
            with self._watchdog.guard(cur, self.settings.tile_timeout_s):
                cur.execute(describe_sql(masked), params or None).fetchall()
            description = cur.description or ()
        except duckdb.Error:
            return None
        finally:
            self.metrics.store_queries.labels("describe").inc()
        shape = shape_from_description([(str(d[0]), str(d[1])) for d in description])
        with self._lock:
            if key[2] == self._catalog_generation:  # only while that catalog is current
                _remember(self._shapes, key, shape)
        return shape

    def _guarded(
        self,
        cur: duckdb.DuckDBPyConnection,
        masked: str,
        kind: str,
        run: Callable[[str], T],
    ) -> T:
        """``run(masked sql)`` under the tile timeout, counted in the metrics."""
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
                if generation == self._catalog_generation:  # only while that catalog is current
                    _remember(self._masked_sql, key, masked)
        return masked

    def compute_view(
        self,
        cur: duckdb.DuckDBPyConnection,
        spec: ViewSpec,
        seq: int,
        now: datetime | None = None,
    ) -> ViewResult:
        """Every tile of ``spec`` in one read transaction (blocking; on a read thread).

        ``now`` places relative time ranges (default: the clock). Tile results are
        shared with other views computed on the same snapshot (see shared_tiles).
        The view is encoded to JSON here, from tile results that are JSON already.
        """
        started = time.perf_counter()
        version = self.store.version
        # A store may have no headrace.position (a DuckDB file the pipeline never
        # wrote to): "as of" is unknown then, and reading the missing table must not
        # end the transaction the tiles use (a failed statement ends it).
        has_position = self.catalog(cur).has(POSITION_RELATION)
        lo, hi = spec.range.bounds(now)
        filters = dict(spec.filters)
        # Queries rendered, masked and described before the transaction: a failure
        # there must not end it (each tile reports its own error).
        prepared = [
            self._prepare(cur, spec, tile, filters, (lo, hi)) for tile in spec.dashboard.tiles
        ]
        entries: list[str] = []
        cur.execute("BEGIN TRANSACTION")
        in_tx = True
        try:
            position = Position(None, None)
            if has_position:
                position = read_position(cur)
                self.metrics.store_queries.labels("position").inc()
            # Share only when no commit was published while the transaction began.
            snapshot: SnapshotKey | None = (
                (version, position.lsn, position.commit_ts)
                if self.store.version == version
                else None
            )
            for tile, query in zip(spec.dashboard.tiles, prepared, strict=True):
                tile_started = time.perf_counter()
                head = _tile_head(tile.name, tile.chart.value, tuple(query.ignored))
                if not in_tx:
                    # A failed tile rolled the transaction back: the next ones read a
                    # newer snapshot, which they must not share under the old name.
                    cur.execute("BEGIN TRANSACTION")
                    in_tx = True
                    snapshot = None
                body, error = self._tile_result(cur, query, spec.policy, snapshot)
                if isinstance(error, RenderingFailedError):
                    # Read it again at once: the failed statement ended the transaction,
                    # so the rest of the view reads a newer snapshot (not shared under
                    # the old name).
                    cur.execute("ROLLBACK")
                    cur.execute("BEGIN TRANSACTION")
                    snapshot = None
                    self.metrics.tile_retries.inc()
                    retry = self._retry_query(cur, query, spec.policy)
                    body, error = self._tile_result(cur, retry, spec.policy, snapshot)
                if error is not None:
                    self.metrics.errors.labels("tile").inc()
                    body = f'"error":{_text(_tile_error(error))},"columns":[],"rows":[]'
                    cur.execute("ROLLBACK")
                    in_tx = False
                elapsed_ms = round((time.perf_counter() - tile_started) * 1000, 1)
                entries.append(f'{head}{body},"elapsed_ms":{elapsed_ms}}}')
        finally:
            if in_tx:
                cur.execute("COMMIT")
        elapsed = time.perf_counter() - started
        self.metrics.view_computations.inc()
        self.metrics.view_seconds.observe(elapsed)
        view = dumps(
            {
                "dashboard": spec.dashboard.name,
                "version": version,
                "seq": seq,
                "as_of": position.commit_ts.isoformat() if position.commit_ts else None,
                "computed_at": datetime.now(UTC).isoformat(),
                "range": {"spec": spec.range.spec, "from": lo.isoformat(), "to": hi.isoformat()},
                "filters": filters,
                "elapsed_ms": round(elapsed * 1000, 1),
            }
        )
        payload = b"".join((view[:-1], b',"tiles":[', ",".join(entries).encode(), b"]}"))
        return ViewResult(version, seq, position.commit_ts, payload)

    def _prepare(
        self,
        cur: duckdb.DuckDBPyConnection,
        spec: ViewSpec,
        tile: Tile,
        filters: dict[str, str],
        bounds: tuple[datetime, datetime],
    ) -> _TileQuery:
        sql, params, ignored = render_tile_query(spec.dashboard, tile, filters, bounds)
        # The catalog (reloaded at most once a second) tells when columns changed.
        self.catalog(cur)
        shape_key = (tile.query, spec.policy.key, self._catalog_generation)
        try:
            masked = self._masked(cur, sql, spec.policy)
        except (duckdb.Error, SqlRejectedError) as exc:
            return _TileQuery(sql, params, ignored, None, None, shape_key, exc)
        shape = self.tile_shape(cur, shape_key, masked, params)
        return _TileQuery(sql, params, ignored, masked, shape, shape_key, None)

    def _retry_query(
        self, cur: duckdb.DuckDBPyConnection, query: _TileQuery, policy: MaskPolicy
    ) -> _TileQuery:
        """``query`` to read again after its rendering failed: masked with the catalog
        read again (masks list a relation's columns), without a shape (the columns
        are taken from the result)."""
        cached = self._catalog
        if cached is not None:
            self._catalog = (-1, cached[1])  # read again; a new generation if it changed
        try:
            masked = self._masked(cur, query.sql, policy)
        except (duckdb.Error, SqlRejectedError) as exc:
            return dataclasses.replace(query, masked=None, shape=None, error=exc)
        return dataclasses.replace(query, masked=masked, shape=None)

    def _tile_result(
        self,
        cur: duckdb.DuckDBPyConnection,
        query: _TileQuery,
        policy: MaskPolicy,
        snapshot: SnapshotKey | None,
    ) -> tuple[TileResult, BaseException | None]:
        """One tile's JSON members: shared when another view ran the same query on
        ``snapshot``, else run here (and shared). Failures are returned, not raised or
        shared."""
        if query.masked is None:
            return "", query.error
        key: TileKey = (query.sql, tuple(sorted(query.params.items())), policy.key)
        claimed = False
        if snapshot is not None:
            shared, claimed = self.shared.take(key, snapshot, self.settings.tile_timeout_s)
            if shared is not None:
                self.metrics.tile_reuses.inc()
                return shared + ',"shared":true', None
        result: TileResult | None = None
        try:
            result = self.read_tile(cur, query)
            return result, None
        except (duckdb.Error, ReadError, SqlRejectedError, RenderingFailedError) as exc:
            return "", exc
        finally:
            if claimed and snapshot is not None:
                self.shared.finish(key, snapshot, result)


@dataclass(frozen=True)
class _TileQuery:
    """A tile's query for one view: rendered, masked (None: masking failed) and described."""

    sql: str
    params: dict[str, Any]
    ignored: list[str]
    masked: str | None
    shape: TileShape | None
    shape_key: tuple[str, str, int]
    error: BaseException | None


def _text(value: Any) -> str:
    return dumps(value).decode()


_CACHE_ENTRIES = 4096
"""Entries a per-catalog cache of the reader keeps before it starts over (bounds memory
when filter sets or ad-hoc queries keep coming)."""

K = TypeVar("K")


def _remember(cache: dict[K, T], key: K, value: T) -> None:
    """Keep ``value`` under ``key``, emptying ``cache`` first when it is full (caller
    holds the reader's lock)."""
    if len(cache) >= _CACHE_ENTRIES:
        cache.clear()
    cache[key] = value


@functools.lru_cache(maxsize=4096)
def _tile_head(name: str, chart: str, ignored: tuple[str, ...]) -> str:
    """A tile entry's first members (the same for every computation of the tile)."""
    return (
        f'{{"name":{_text(name)},"chart":{_text(chart)},"ignored_filters":{_text(list(ignored))},'
    )


def _tile_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, duckdb.CatalogException) and "does not exist" in text:
        return f"not in the store yet: {_missing_relation(str(exc)) or text}"
    return text


_CARETS = re.compile(r"\^+")


def _missing_relation(message: str) -> str | None:
    """The relation a DuckDB catalog error points at, as the query wrote it.

    DuckDB names only the last part (``Table with name t does not exist!``) but
    underlines the whole reference (``mirror.t``) below the query's line.
    """
    lines = message.splitlines()
    for above, below in itertools.pairwise(lines):
        carets = _CARETS.search(below)
        if above.startswith("LINE ") and carets is not None:
            return above[carets.start() : carets.end()].strip() or None
    return None

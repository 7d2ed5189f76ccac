"""Running checked SQL: a few slots, a fresh cursor per query, a timeout that interrupts it."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from headrace.errors import first_line
from headrace.serve.settings import SqlSettings
from headrace.serve.sql import PreparedSql


class QueryError(Exception):
    """The query ran and DuckDB refused or failed it; the message is for the user."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class QueryResult:
    """A finished query."""

    query_id: str
    table: pa.Table
    truncated: bool
    elapsed_s: float


class SqlRunner:
    """Runs prepared SQL on its own threads, bounded in count, time and rows."""

    def __init__(
        self, cursor_factory: Callable[[], duckdb.DuckDBPyConnection], settings: SqlSettings
    ):
        self._cursor_factory = cursor_factory
        self._settings = settings
        self._executor = ThreadPoolExecutor(settings.max_concurrent, thread_name_prefix="hr-sql")
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._running: dict[str, duckdb.DuckDBPyConnection] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def cancel(self, query_id: str) -> bool:
        """Interrupt a running query; True when it was running."""
        with self._lock:
            cur = self._running.get(query_id)
            if cur is not None:
                self._cancelled.add(query_id)
        if cur is None:
            return False
        cur.interrupt()
        return True

    @property
    def running(self) -> int:
        """Queries running now."""
        return len(self._running)

    async def run(self, prepared: PreparedSql, query_id: str | None = None) -> QueryResult:
        """Run ``prepared``; raise QueryError with a user-facing reason on any failure."""
        query_id = query_id or secrets.token_hex(8)
        try:
            await asyncio.wait_for(self._slots.acquire(), self._settings.queue_timeout_s)
        except TimeoutError:
            raise QueryError(
                f"all {self._settings.max_concurrent} query slots are busy; retry shortly",
                status=503,
            ) from None
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor, self._run_blocking, prepared, query_id
            )
        finally:
            self._slots.release()

    def _run_blocking(self, prepared: PreparedSql, query_id: str) -> QueryResult:
        cur = self._cursor_factory()
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            cur.interrupt()

        timer = threading.Timer(self._settings.timeout_s, expire)
        with self._lock:
            self._running[query_id] = cur
        started = time.perf_counter()
        timer.start()
        try:
            table = self._read_bounded(cur, prepared)
        except duckdb.InterruptException:
            if timed_out.is_set():
                raise QueryError(
                    f"the query ran longer than {self._settings.timeout_s:g} s and was "
                    "cancelled: narrow it (time range, LIMIT, fewer joins)",
                    status=408,
                ) from None
            raise QueryError("the query was cancelled", status=409) from None
        except duckdb.OutOfMemoryException as exc:
            raise QueryError(
                f"the query needs more memory than allowed: {first_line(exc)}"
            ) from None
        except duckdb.PermissionException as exc:
            raise QueryError(f"not allowed: {first_line(exc)}", status=403) from None
        except duckdb.Error as exc:
            raise QueryError(f"{type(exc).__name__}: {first_line(exc)}") from None
        finally:
            timer.cancel()
            with self._lock:
                self._running.pop(query_id, None)
                self._cancelled.discard(query_id)
            cur.close()
        truncated = False
        if prepared.row_limit is not None and table.num_rows > prepared.row_limit:
            table = table.slice(0, prepared.row_limit)
            truncated = True
        return QueryResult(query_id, table, truncated, time.perf_counter() - started)

    def _read_bounded(self, cur: duckdb.DuckDBPyConnection, prepared: PreparedSql) -> pa.Table:
        # Small batches, so that a result too large for memory is stopped early; the
        # cursor is closed right after, which ends the unfinished result.
        reader = cur.sql(prepared.sql).to_arrow_reader(2048)
        batches: list[pa.RecordBatch] = []
        size = 0
        try:
            for batch in reader:
                size += batch.nbytes
                if size > self._settings.max_result_bytes:
                    raise QueryError(
                        f"the result is larger than {self._settings.max_result_bytes // 2**20} MiB:"
                        " select fewer or narrower columns, aggregate, or add a LIMIT",
                        status=413,
                    )
                batches.append(batch)
        finally:
            reader.close()
        return pa.Table.from_batches(batches, schema=reader.schema)

    def close(self) -> None:
        """Interrupt running queries and stop the threads."""
        with self._lock:
            running = list(self._running.values())
        for cur in running:
            cur.interrupt()
        self._executor.shutdown(wait=True, cancel_futures=True)


def describe(result: QueryResult) -> dict[str, Any]:
    """Metadata of a result for the JSON response."""
    return {
        "query_id": result.query_id,
        "rows": result.table.num_rows,
        "truncated": result.truncated,
        "elapsed_ms": round(result.elapsed_s * 1000, 1),
    }

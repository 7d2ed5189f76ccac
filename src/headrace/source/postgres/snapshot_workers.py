"""Parallel copy workers feeding one consumer through a bounded queue.

Each worker thread owns one connection that imported the snapshot, takes
CTID ranges from a shared list (largest first, so the tail is short), copies
each range in blocks and converts each block into Arrow: in binary when
every column's type allows it (:mod:`.snapshot_binary`), else as CSV
(:mod:`.snapshot_copy`). Parsing and
converting run in pyarrow without the GIL, so a worker converting overlaps
with another receiving. The output queue is bounded: when the consumer is
slow, workers wait, and memory stays bounded.

The consumer (the thread iterating :meth:`CopyWorkers.run`) sees each
chunk of rows and, after a range's last chunk, a :class:`RangeCopied`. When
it stops early or a worker fails, every worker is told to stop, and each
closes its connection, which ends its COPY on the server.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import psycopg
import pyarrow as pa

from headrace.errors import SourceError
from headrace.source.postgres.snapshot_binary import (
    BinaryBlock,
    binary_block_to_arrow,
    binary_copyable,
    text_cast_columns,
)
from headrace.source.postgres.snapshot_catalog import CopyRange, TablePlan, copy_statement
from headrace.source.postgres.snapshot_copy import (
    CopyCancelled,
    CsvBlock,
    csv_block_to_arrow,
    open_snapshot_connection,
    read_binary_copy_blocks,
    read_copy_blocks,
)
from headrace.source.postgres.types import TypeRegistry

# How often a worker waiting on a full queue checks whether to stop.
_PUT_POLL_SECONDS = 0.2
# How long to wait for workers to exit after a stop before giving up on them
# (they are daemon threads; their connections die with the process).
_JOIN_SECONDS = 10.0


@dataclass(frozen=True)
class TableRows:
    """Converted rows of one table (part of one range)."""

    plan: TablePlan
    rows: pa.Table


@dataclass(frozen=True)
class RangeCopied:
    """Every row of ``copy_range`` was handed over."""

    plan: TablePlan
    copy_range: CopyRange


@dataclass(frozen=True)
class _WorkerFailed:
    error: BaseException


@dataclass(frozen=True)
class _WorkerDone:
    pass


_Event = TableRows | RangeCopied | _WorkerFailed | _WorkerDone


class CopyWorkers:
    """Copies every range of ``plans`` with ``workers`` threads."""

    def __init__(
        self,
        *,
        dsn: str,
        snapshot_name: str,
        plans: list[TablePlan],
        registry: TypeRegistry,
        workers: int,
        chunk_rows: int,
        chunk_bytes: int,
        queue_chunks: int,
    ) -> None:
        self._dsn = dsn
        self._snapshot_name = snapshot_name
        self._registry = registry
        self._chunk_rows = chunk_rows
        self._chunk_bytes = chunk_bytes
        work = [(plan, r) for plan in plans for r in plan.ranges]
        # Largest ranges first: the last ones to finish are then the short ones.
        work.sort(key=lambda item: item[1].pages, reverse=True)
        self._work: queue.SimpleQueue[tuple[TablePlan, CopyRange]] = queue.SimpleQueue()
        for item in work:
            self._work.put(item)
        self._workers = max(1, min(workers, len(work)))
        self._events: queue.Queue[_Event] = queue.Queue(maxsize=queue_chunks)
        self._stop = threading.Event()

    def run(self) -> Generator[TableRows | RangeCopied, None, None]:
        """Start the workers and yield their output until every range is copied."""
        threads = [
            threading.Thread(target=self._worker, name=f"headrace-snapshot-{i}", daemon=True)
            for i in range(self._workers)
        ]
        for thread in threads:
            thread.start()
        running = len(threads)
        try:
            while running:
                event = self._events.get()
                if isinstance(event, _WorkerDone):
                    running -= 1
                elif isinstance(event, _WorkerFailed):
                    raise event.error
                else:
                    yield event
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(_JOIN_SECONDS)

    def _worker(self) -> None:
        conn: psycopg.Connection[tuple[object, ...]] | None = None
        try:
            conn = open_snapshot_connection(self._dsn, self._snapshot_name)
            while not self._stop.is_set():
                try:
                    plan, copy_range = self._work.get_nowait()
                except queue.Empty:
                    break
                self._copy(conn, plan, copy_range)
        except CopyCancelled:
            pass
        except psycopg.Error as exc:
            error = SourceError(
                f"snapshot copy failed: {str(exc).strip()}",
                "check the server; then run the snapshot again (if_slot_exists='replace')",
            )
            error.__cause__ = exc
            self._put(_WorkerFailed(error))
        except BaseException as exc:  # handed to the consumer, who raises it
            self._put(_WorkerFailed(exc))
        finally:
            if conn is not None:
                conn.close()
            self._put(_WorkerDone())

    def _copy(
        self, conn: psycopg.Connection[tuple[object, ...]], plan: TablePlan, copy_range: CopyRange
    ) -> None:
        schema = plan.schema
        blocks: Iterator[CsvBlock | BinaryBlock]
        if binary_copyable(schema):
            statement = copy_statement(plan, copy_range, "binary", text_cast_columns(schema))
            blocks = read_binary_copy_blocks(
                conn,
                statement,
                block_rows=self._chunk_rows,
                block_bytes=self._chunk_bytes,
                stop=self._stop,
            )
        else:
            blocks = read_copy_blocks(
                conn,
                copy_statement(plan, copy_range),
                block_rows=self._chunk_rows,
                block_bytes=self._chunk_bytes,
                stop=self._stop,
            )
        for block in blocks:
            if isinstance(block, BinaryBlock):
                rows = binary_block_to_arrow(block, schema, self._registry)
            else:
                rows = csv_block_to_arrow(block, schema, self._registry)
            if not self._put(TableRows(plan, rows)):
                raise CopyCancelled
        self._put(RangeCopied(plan, copy_range))

    def _put(self, event: _Event) -> bool:
        """Queue ``event``, waiting while the queue is full; False once stopped."""
        while not self._stop.is_set():
            try:
                self._events.put(event, timeout=_PUT_POLL_SECONDS)
            except queue.Full:
                continue
            return True
        return False

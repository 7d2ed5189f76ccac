"""Commits the generator's tick batches on a thread of its own."""

from __future__ import annotations

import queue
import threading

import psycopg

from headrace.demo.batch import TickBatch


class BatchWriter:
    """Commits tick batches in order on a thread of its own.

    Building the next tick overlaps the database round trip of the last
    one; the bounded queue pushes back when the database is the slower side.
    """

    def __init__(self, conn: psycopg.Connection[tuple[object, ...]], depth: int = 4) -> None:
        self._conn = conn
        self._queue: queue.Queue[TickBatch | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="headrace-demo-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain after a failure; submit() reports it
            try:
                batch.write(self._conn)
            except BaseException as exc:  # handed to the submitting thread
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, batch: TickBatch) -> None:
        """Queue a batch (blocks while the queue is full); re-raises a write failure."""
        self._raise()
        self._queue.put(batch)

    def close(self) -> None:
        """Wait until every queued batch is committed; re-raise a write failure."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

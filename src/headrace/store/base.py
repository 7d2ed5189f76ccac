"""The store contract: what every analytical store (DuckDB, later ClickHouse) offers.

A store holds, in one database:

- ``mirror.<table>``: the current rows of each mirrored source table;
- ``history.<table>``: every change, append-only;
- ``rollup.<name>_<grain>``: one view per grain of each rollup;
- ``headrace.*``: the source position, per-table freshness, schema versions,
  dead letters and rollup states.

The engine writes a batch's effects and the new source position in one
transaction (:meth:`Store.transaction` on the concrete store); readers
(serving, status) use :meth:`Store.query` and subscribe to committed batches
with :meth:`Store.subscribe`. The layout is described in ``docs/store.md``
(``docs`` of the project) and versioned by :attr:`Store.format_version`.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

import pyarrow as pa

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredPosition:
    """The durable source position: resume from here after a restart."""

    source: str
    lsn: int
    commit_ts: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class CommitEvent:
    """Published to listeners after each committed batch (or snapshot, or rebuild)."""

    version: int
    position: int
    commit_ts: datetime | None
    tables: tuple[str, ...]
    changes: int
    kind: str = "batch"


@dataclass(frozen=True)
class TableStatus:
    """Per-table freshness and size (``headrace.tables``)."""

    table_name: str
    mirror_table: str | None
    rows: int
    last_commit_ts: datetime | None
    last_lsn: int | None
    applied_at: datetime | None
    schema_version: int
    state: str
    reason: str | None
    key_indexed: bool = False
    """The mirror has an index on its key (``store.mirror_key_index``)."""


@dataclass(frozen=True)
class RollupStatus:
    """A rollup's state (``headrace.rollups``): active, paused (with the reason) or rebuilding."""

    name: str
    table_name: str
    state: str
    reason: str | None
    updated_at: datetime | None
    retained_from: datetime | None
    views: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class DeadLetter:
    """A change the engine could not apply, kept with its LSN and the reason."""

    id: int
    lsn: int
    table_name: str
    reason: str
    payload: str
    at: datetime


CommitListener = Callable[[CommitEvent], None]


class Store(ABC):
    """An analytical store. One writer (the engine's thread); readers call :meth:`query`."""

    format_version: ClassVar[int] = 1
    """Version of the on-disk layout; a store written by another version is refused."""

    def __init__(self) -> None:
        self._listeners: list[CommitListener] = []
        self._listeners_lock = threading.Lock()
        self._version = 0

    @property
    def version(self) -> int:
        """Increases by one with every committed batch, snapshot or rebuild in this process."""
        return self._version

    def subscribe(self, listener: CommitListener) -> Callable[[], None]:
        """Call ``listener`` (in the writer thread) after every commit; returns an unsubscribe.

        Listeners must be quick (hand the event to another thread or loop);
        an exception in one is logged and does not affect the others.
        """
        with self._listeners_lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._listeners_lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def publish(
        self,
        position: int,
        commit_ts: datetime | None,
        tables: Sequence[str],
        changes: int,
        kind: str = "batch",
    ) -> CommitEvent:
        """Bump :attr:`version` and tell the listeners; the writer calls it after a commit."""
        self._version += 1
        event = CommitEvent(self._version, position, commit_ts, tuple(tables), changes, kind)
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("a store commit listener failed")
        return event

    @abstractmethod
    def read_position(self, source: str) -> StoredPosition | None:
        """The durable position of ``source``, or ``None`` before the first snapshot."""

    @abstractmethod
    def table_status(self) -> list[TableStatus]:
        """Every captured table's size and freshness."""

    @abstractmethod
    def rollup_status(self) -> list[RollupStatus]:
        """Every rollup's state."""

    @abstractmethod
    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""

    @abstractmethod
    def dead_letter_count(self) -> int:
        """How many dead letters the store holds (every run's)."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[object] | None = None) -> pa.Table:
        """Run a read-only query on a reader connection and return the whole result."""

    @abstractmethod
    def checkpoint(self) -> None:
        """Flush the write-ahead log into the database file."""

    @abstractmethod
    def close(self) -> None:
        """Checkpoint and close; the store is unusable afterwards."""

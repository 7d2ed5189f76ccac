"""Alert ids when two connections write alerts: the engine's writer and the rules lane.

A single writer numbers new alerts after ``max(id)`` of the alerts table, in the same
statement. With the rules lane (:mod:`headrace.rules.lane`) committing alerts on a
connection of its own while the engine's transaction is open, both would read the
same maximum and the second commit would break the primary key. So each connection
that writes alerts beside another is *registered* with one :class:`AlertIds` of the
store, and :func:`~headrace.alerts.store.insert_alerts` takes its ids from it: blocks
reserved under a lock, after the table's maximum read once. A transaction that rolls
back leaves a gap in the ids, nothing else.
"""

from __future__ import annotations

import threading

import duckdb

_registered: dict[int, AlertIds] = {}
_lock = threading.Lock()


class AlertIds:
    """Hands out alert ids to the connections registered with it (module docstring)."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._next: int | None = None
        self._lock = threading.Lock()

    def reserve(self, con: duckdb.DuckDBPyConnection, count: int) -> int:
        """The first of ``count`` new ids (read the table's maximum the first time)."""
        with self._lock:
            if self._next is None:
                rows = con.execute(f"SELECT coalesce(max(id), 0) FROM {self.table}").fetchall()
                self._next = int(rows[0][0]) + 1
            first = self._next
            self._next += count
            return first

    def register(self, con: duckdb.DuckDBPyConnection) -> None:
        """Alerts written through ``con`` take their ids from here (until :meth:`forget`)."""
        with _lock:
            _registered[id(con)] = self

    def forget(self, con: duckdb.DuckDBPyConnection) -> None:
        with _lock:
            if _registered.get(id(con)) is self:
                del _registered[id(con)]


def registered(con: duckdb.DuckDBPyConnection) -> AlertIds | None:
    """The allocator of ``con`` (None: number after the table's maximum, one writer)."""
    with _lock:
        return _registered.get(id(con))

"""The store as the serving layer sees it: cursors, a version, and commit notifications.

Two ways to get one:

- :class:`ReadOnlyStore` (``headrace serve``): opens a store file read-only,
  hardened (no file/network/extension access, locked configuration), and polls
  ``headrace.position`` for a new version.
- :class:`EmbeddedStore` (``headrace run --serve``): wraps the DuckDB
  connection the engine writes through; the engine calls
  :meth:`EmbeddedStore.committed` after each batch commit (or wire its own
  listener API to it), which wakes the live broadcaster.

Either way, readers take their own ``cursor()`` per thread and always consume
results fully (DuckDB 2.0 streams them, and an open result owns its cursor).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import duckdb

from headrace.errors import StoreError

Listener = Callable[[int], None]


class ServedStore(Protocol):
    """What the serving layer needs from a store."""

    @property
    def version(self) -> int:
        """Monotonic counter, bumped once per committed batch (or detected change)."""
        ...

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor for one reader thread."""
        ...

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(version)`` (from any thread) after each new version; returns unsubscribe."""
        ...


@dataclass(frozen=True)
class Position:
    """The newest source position visible in the store."""

    lsn: int | None
    commit_ts: datetime | None


def read_position(cur: duckdb.DuckDBPyConnection) -> Position:
    """Newest source position; (None, None) for a store without ``headrace.position``."""
    try:
        rows = cur.execute("SELECT max(lsn), max(commit_ts) FROM headrace.position").fetchall()
    except duckdb.CatalogException:
        return Position(None, None)
    return Position(rows[0][0], rows[0][1])


def hardening_statements(memory_limit: str | None, threads: int | None) -> list[str]:
    """SET statements that close a DuckDB instance to files, network and extensions, then lock it."""
    statements = [
        "SET enable_external_access = false",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET allow_community_extensions = false",
    ]
    if memory_limit:
        statements.append(f"SET memory_limit = '{memory_limit.replace(chr(39), '')}'")
    if threads:
        statements.append(f"SET threads = {int(threads)}")
    statements.append("SET lock_configuration = true")
    return statements


def harden(con: duckdb.DuckDBPyConnection, memory_limit: str | None, threads: int | None) -> None:
    """Harden a (shared) DuckDB instance; idempotent once locked.

    DuckDB settings are per instance, so in embedded mode this also applies to
    the engine: it must feed Arrow data through ``con.register()`` (replacement
    scans of Python variables count as external access) and set its own
    options before serving starts.
    """
    locked = con.execute("SELECT current_setting('lock_configuration')").fetchall()
    if locked and bool(locked[0][0]):
        return
    for statement in hardening_statements(memory_limit, threads):
        con.execute(statement)


class _Listeners:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    def add(self, listener: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def fire(self, version: int) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(version)


class EmbeddedStore:
    """A live store written in this process; the writer calls :meth:`committed`."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, version: int = 0) -> None:
        self._con = connection
        self._version = version
        self._listeners = _Listeners()
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        """Count of committed batches seen."""
        return self._version

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The underlying instance's connection (hardened by the app)."""
        return self._con

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor on the shared instance."""
        return self._con.cursor()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Be told of every new version."""
        return self._listeners.add(listener)

    def committed(self, version: int | None = None) -> int:
        """Record that a batch committed (call after COMMIT returns); wakes listeners."""
        with self._lock:
            self._version = self._version + 1 if version is None else max(version, self._version)
            current = self._version
        self._listeners.fire(current)
        return current


class ReadOnlyStore:
    """A store file opened read-only and hardened; polls for a new position."""

    def __init__(
        self,
        path: Path,
        *,
        memory_limit: str | None = None,
        threads: int | None = None,
        poll_s: float = 0.5,
    ) -> None:
        if not path.exists():
            raise StoreError(
                f"store file {path} does not exist",
                "pass the DuckDB file written by 'headrace run' with --store",
            )
        config: dict[str, str | bool | int] = {
            "enable_external_access": False,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "lock_configuration": True,
        }
        if memory_limit:
            config["memory_limit"] = memory_limit
        if threads:
            config["threads"] = threads
        try:
            self._con = duckdb.connect(str(path), read_only=True, config=config)
        except duckdb.Error as exc:
            raise StoreError(
                f"cannot open store {path} read-only: {exc}",
                "another process may hold it for writing (DuckDB allows one writing process); "
                "serve it from that process with 'headrace run --serve'",
            ) from exc
        self._poll_s = poll_s
        self._version = 0
        self._listeners = _Listeners()
        self._stop = threading.Event()
        self._last = read_position(self._con.cursor())
        self._thread = threading.Thread(target=self._poll, name="headrace-store-poll", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        """Bumped whenever the polled position changes."""
        return self._version

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The read-only instance's connection."""
        return self._con

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor on the read-only instance."""
        return self._con.cursor()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Be told of every detected change."""
        return self._listeners.add(listener)

    def _poll(self) -> None:
        cur = self._con.cursor()
        try:
            while not self._stop.wait(self._poll_s):
                position = read_position(cur)
                if position != self._last:
                    self._last = position
                    self._version += 1
                    self._listeners.fire(self._version)
        finally:
            cur.close()

    def close(self) -> None:
        """Stop polling and close the file."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._con.close()

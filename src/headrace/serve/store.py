"""The store as the serving layer sees it: cursors, a version, and commit notifications.

Two ways to get one:

- :class:`ReadOnlyStore` (``headrace serve``): opens a store file read-only,
  hardened (no file/network/extension access, locked configuration), and polls
  ``headrace.position`` for a new version.
- :class:`headrace.store.duckdb.store.DuckDBStore` (``headrace run --serve``):
  the engine's live store; its ``subscribe`` fires after every committed batch
  (a :class:`~headrace.store.base.CommitEvent`), which wakes the live broadcaster.

Either way, readers take their own ``cursor()`` per thread and always consume
results fully (DuckDB 2.0 streams them, and an open result owns its cursor).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb

from headrace.errors import StoreError
from headrace.store.duckdb.connect import open_store, store_cursor

# Called with the new version (ReadOnlyStore) or a CommitEvent (DuckDBStore): the
# serving layer only needs to know that something was committed.
Listener = Callable[[Any], None]


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
        """Call ``listener`` (from any thread) after each new version; returns unsubscribe."""
        ...


@dataclass(frozen=True)
class Position:
    """The newest source position visible in the store."""

    lsn: int | None
    commit_ts: datetime | None


POSITION_RELATION = "headrace.position"
"""The table holding the newest source position a store has committed (absent in a
store the pipeline never wrote to)."""

NO_POSITION_TABLE = (
    "the store has no headrace.position table (a DuckDB file 'headrace run' never "
    "wrote to): tiles show 'as of' unknown"
)
NO_COMMIT_YET = "no source commit in the store yet: tiles show 'as of' unknown"


def read_position(cur: duckdb.DuckDBPyConnection) -> Position:
    """Newest source position; (None, None) for a store without ``headrace.position``.

    Outside a transaction only: the failed read of a missing table would end it.
    """
    return _position_or_none(cur) or Position(None, None)


def position_status(cur: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """The newest source position as the status endpoints report it: ``lsn`` and
    ``as_of`` (null when unknown), and a ``note`` saying why when there is none."""
    position = _position_or_none(cur)
    note = _missing_position_note(position)
    if position is None or note is not None:
        return {"lsn": None, "as_of": None, "note": note}
    as_of = position.commit_ts.isoformat() if position.commit_ts else None
    return {"lsn": position.lsn, "as_of": as_of}


def _missing_position_note(position: Position | None) -> str | None:
    """Why a store has no source position (:func:`_position_or_none`'s result), or None."""
    if position is None:
        return NO_POSITION_TABLE
    return NO_COMMIT_YET if position.lsn is None else None


def _position_or_none(cur: duckdb.DuckDBPyConnection) -> Position | None:
    """The newest source position, or None when the store has no position table."""
    try:
        rows = cur.execute("SELECT max(lsn), max(commit_ts) FROM headrace.position").fetchall()
    except duckdb.CatalogException:
        return None
    return Position(rows[0][0], rows[0][1])


def hardening_statements(
    memory_limit: str | None, threads: int | None, *, lock: bool = True
) -> list[str]:
    """SET statements closing a DuckDB instance to files, network and extensions (and locking)."""
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
    if lock:
        statements.append("SET lock_configuration = true")
    return statements


def harden(
    con: duckdb.DuckDBPyConnection,
    memory_limit: str | None,
    threads: int | None,
    *,
    lock: bool = True,
) -> None:
    """Harden a (shared) DuckDB instance; a no-op once its configuration is locked.

    DuckDB settings are per instance, so in embedded mode this also applies to
    the engine: it must feed Arrow data through ``con.register()`` or a relation's
    ``query`` (:mod:`headrace.store.duckdb.arrow_scan`); replacement scans of Python
    variables count as external access. ``lock=False`` leaves
    the configuration unlocked for stores whose cursors still SET session
    options (DuckDBStore sets TimeZone per cursor); the SQL policy refuses SET
    statements anyway, the lock is a second wall.
    """
    locked = con.execute("SELECT current_setting('lock_configuration')").fetchall()
    if locked and bool(locked[0][0]):
        return
    for statement in hardening_statements(memory_limit, threads, lock=lock):
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
        config: dict[str, str | bool | int | float | list[str]] = {
            "enable_external_access": False,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
        }
        if memory_limit:
            config["memory_limit"] = memory_limit
        if threads:
            config["threads"] = threads
        try:
            self._con = open_store(path, read_only=True, config=config)
            # Timestamps render in UTC in every cursor, as with the engine's store; then
            # nothing may change the configuration any more.
            self._con.execute("SET GLOBAL TimeZone = 'UTC'")
            self._con.execute("SET lock_configuration = true")
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
        cur = store_cursor(self._con)
        try:
            position = _position_or_none(cur)
        finally:
            cur.close()
        self._last = position or Position(None, None)
        self.position_note = _missing_position_note(position)
        """Why the store has no source position at start (None when it has one)."""
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
        return store_cursor(self._con)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Be told of every detected change."""
        return self._listeners.add(listener)

    def _poll(self) -> None:
        cur = store_cursor(self._con)
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

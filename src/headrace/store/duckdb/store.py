"""The DuckDB store: one database file, one writer connection, cursors for readers.

DuckDB rules this class follows (see NOTES.md): one read-write process per
file; the writer thread owns :attr:`DuckDBStore.writer`; every other thread
reads through its own :meth:`DuckDBStore.cursor`; every result is consumed
(``.to_arrow_table()`` / ``.fetchall()``); CHECKPOINT runs periodically and
as soon as the write-ahead log grows past a limit, so a long reader cannot
let it grow without bound unnoticed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

import duckdb
import pyarrow as pa

from headrace.errors import StoreError
from headrace.source.changes import TableRef
from headrace.store.base import DeadLetter, RollupStatus, Store, StoredPosition, TableStatus
from headrace.store.duckdb.connect import open_store, store_cursor
from headrace.store.duckdb.schema import (
    FORMAT_VERSION,
    KEY_INDEX_SUFFIX,
    META,
    METADATA_DDL,
    MIRROR,
    table_label,
)

log = logging.getLogger(__name__)


@dataclass
class CheckpointFigures:
    """What the store's checkpoints cost: each stops the writer (no batch applies
    meanwhile), so their longest is a floor under the worst freshness."""

    count: int = 0
    seconds: float = 0.0
    """All of them together."""
    longest_s: float = 0.0
    wal_bytes: int = 0
    """WAL folded into the database file, all of them together."""

    def add(self, wal_bytes: int, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.longest_s = max(self.longest_s, seconds)
        self.wal_bytes += wal_bytes

    def document(self) -> dict[str, float | int]:
        """For the status file."""
        return {
            "count": self.count,
            "seconds": round(self.seconds, 3),
            "longest_s": round(self.longest_s, 3),
            "wal_bytes": self.wal_bytes,
        }


DEFAULT_ROW_GROUP_SIZE = 16_384
"""Rows per row group the writer appends: the default of ``store.row_group_size`` (whose
description says why; measured in docs/latency.md, "Eighteenth session")."""


class DuckDBStore(Store):
    """A headrace store in one DuckDB file.

    ``read_only`` opens an existing store for serving only (no other process
    may have it open for writing).
    """

    format_version = FORMAT_VERSION

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        checkpoint_interval: timedelta = timedelta(seconds=60),
        checkpoint_wal_bytes: int = 64 * 1024 * 1024,
        memory_limit: str | None = None,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.read_only = read_only
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_wal_bytes = checkpoint_wal_bytes
        self._lock = threading.Lock()
        self._last_checkpoint = time.monotonic()
        self.checkpoints = CheckpointFigures()
        """The checkpoints this store object ran (they stop the writer meanwhile)."""
        self.failed_transactions = 0
        """Writer transactions that did not commit (rolled back, or COMMIT failed): a
        listener holding what a transaction wrote for its commit (alert delivery) drops
        it when this moved."""
        self._in_transaction = False
        self._threads: int | None = None  # as set by set_threads (None: DuckDB's default)
        if read_only and not self.path.exists():
            raise StoreError(
                f"there is no store at {self.path}",
                "check the path, or create the store by running the pipeline "
                "(`headrace run --config FILE`) once",
            )
        if not read_only:
            # A new store in a new directory, as a database server creates its data directory.
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = open_store(self.path, read_only=read_only, row_group_size=row_group_size)
        except duckdb.Error as exc:
            raise StoreError(
                f"cannot open the DuckDB store {self.path}: {exc}",
                "only one process may write a store: stop the other headrace process, "
                "or check the path and its permissions",
            ) from exc
        self._con.execute("SET TimeZone = 'UTC'")
        if memory_limit is not None:
            self._set_memory_limit(memory_limit)
        if not read_only:
            # DuckDB checkpoints inside COMMIT once the WAL passes checkpoint_threshold
            # (16 MB): a 300 ms stall on a batch now and then. Checkpoints are ours
            # (maybe_checkpoint, after the commit); DuckDB's own only as a backstop.
            backstop = max(2 * checkpoint_wal_bytes, 256 * 1024 * 1024)
            self._con.execute(f"SET checkpoint_threshold = '{backstop}B'")
            self._create_layout()
        self._check_format()

    # ------------------------------------------------------------------ setup

    def _create_layout(self) -> None:
        with self.transaction() as con:
            for statement in METADATA_DDL:
                con.execute(statement)
            con.execute(
                f"INSERT INTO {META}.store_info VALUES ('format_version', ?) "
                "ON CONFLICT DO NOTHING",
                [str(FORMAT_VERSION)],
            )
            con.execute(
                f"INSERT INTO {META}.store_info VALUES ('created_at', ?) ON CONFLICT DO NOTHING",
                [datetime.now().astimezone().isoformat()],
            )

    def _check_format(self) -> None:
        try:
            rows = self._con.sql(
                f"SELECT value FROM {META}.store_info WHERE key = 'format_version'"
            ).fetchall()
        except duckdb.CatalogException as exc:
            raise StoreError(
                f"{self.path} is not a headrace store (no {META}.store_info table)",
                "point --store at a file written by `headrace run`, or at a new path",
            ) from exc
        found = int(rows[0][0]) if rows else None
        if found != FORMAT_VERSION:
            raise StoreError(
                f"{self.path} has store format version {found}, this headrace writes "
                f"{FORMAT_VERSION}",
                "use the headrace version that wrote it, or start a new store and re-snapshot",
            )

    # ------------------------------------------------------------- connections

    @property
    def writer(self) -> duckdb.DuckDBPyConnection:
        """The writer connection: only the engine's thread uses it."""
        return self._con

    def _set_memory_limit(self, limit: str) -> None:
        try:
            self._con.execute(f"SET memory_limit = '{limit.replace(chr(39), '')}'")
        except duckdb.Error as exc:
            self._con.close()
            raise StoreError(
                f"DuckDB refused the store's memory_limit {limit!r}: {exc}",
                "write a size such as '2GB' or '512MB' (store.memory_limit)",
            ) from exc

    def set_threads(self, threads: int) -> None:
        """Run DuckDB on ``threads`` threads from now on (0: its default, one per core).

        The setting belongs to the database, so it holds for the readers' cursors too.
        """
        count = threads if threads > 0 else os.cpu_count() or 1
        if count == self._threads:
            return  # set per batch by the engine: a statement only when it changes
        self._con.execute(f"SET threads = {int(count)}")
        self._threads = count

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new reader connection (cursor) for another thread; close it when done."""
        cursor = store_cursor(self._con)
        cursor.execute("SET TimeZone = 'UTC'")
        return cursor

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """BEGIN … COMMIT on the writer; ROLLBACK (and re-raise) on any exception."""
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only", "open it without read_only to write")
        con = self._con
        con.execute("BEGIN TRANSACTION")
        self._in_transaction = True
        try:
            yield con
        except BaseException:
            self._in_transaction = False
            self.failed_transactions += 1
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                log.exception("ROLLBACK failed")
            raise
        else:
            self._in_transaction = False
            try:
                con.execute("COMMIT")
            except BaseException:
                self.failed_transactions += 1
                raise

    # ---------------------------------------------------------------- position

    @staticmethod
    def write_position(
        con: duckdb.DuckDBPyConnection, source: str, lsn: int, commit_ts: datetime | None
    ) -> None:
        """Record the source position (inside the batch's transaction)."""
        updated = con.execute(
            f"""UPDATE {META}.position SET lsn = ?, commit_ts = coalesce(?, commit_ts),
                updated_at = now() WHERE source = ?""",
            [lsn, commit_ts, source],
        ).fetchall()
        if not updated or not updated[0][0]:
            con.execute(
                f"INSERT INTO {META}.position VALUES (?, ?, ?, now())", [source, lsn, commit_ts]
            )

    def read_position(self, source: str) -> StoredPosition | None:
        rows = self._reader_rows(
            f"SELECT source, lsn, commit_ts, updated_at FROM {META}.position WHERE source = ?",
            [source],
        )
        if not rows:
            return None
        src, lsn, commit_ts, updated_at = rows[0]
        return StoredPosition(
            str(src),
            int(cast(int, lsn)),
            cast(datetime | None, commit_ts),
            cast(datetime, updated_at),
        )

    # ------------------------------------------------------------------ status

    def table_status(self) -> list[TableStatus]:
        rows = self._reader_rows(
            f"""SELECT table_name, mirror_table, rows, last_commit_ts, last_lsn, applied_at,
                       schema_version, state, reason
                FROM {META}.tables ORDER BY table_name"""
        )
        indexed = {
            str(r[0])
            for r in self._reader_rows(
                "SELECT table_name FROM duckdb_indexes() WHERE schema_name = ? "
                "AND index_name = table_name || ?",
                [MIRROR, KEY_INDEX_SUFFIX],
            )
        }
        return [
            TableStatus(
                table_name=str(r[0]),
                mirror_table=None if r[1] is None else str(r[1]),
                rows=int(r[2]),  # type: ignore[call-overload]
                last_commit_ts=r[3],  # type: ignore[arg-type]
                last_lsn=None if r[4] is None else int(r[4]),  # type: ignore[call-overload]
                applied_at=r[5],  # type: ignore[arg-type]
                schema_version=int(r[6]),  # type: ignore[call-overload]
                state=str(r[7]),
                reason=None if r[8] is None else str(r[8]),
                key_indexed=table_label(TableRef.parse(str(r[0]))) in indexed,
            )
            for r in rows
        ]

    def rollup_status(self) -> list[RollupStatus]:
        rows = self._reader_rows(
            f"""SELECT name, table_name, state, reason, updated_at, retained_from, views
                FROM {META}.rollups ORDER BY name"""
        )
        return [
            RollupStatus(
                name=str(r[0]),
                table_name=str(r[1]),
                state=str(r[2]),
                reason=None if r[3] is None else str(r[3]),
                updated_at=r[4],  # type: ignore[arg-type]
                retained_from=r[5],  # type: ignore[arg-type]
                views=tuple(json.loads(str(r[6]))) if r[6] is not None else (),
            )
            for r in rows
        ]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._reader_rows(
            f"""SELECT id, lsn, table_name, reason, payload, "at" FROM {META}.dead_letters
                ORDER BY id DESC LIMIT ?""",
            [limit],
        )
        return [
            DeadLetter(
                id=int(r[0]),  # type: ignore[call-overload]
                lsn=int(r[1]) if r[1] is not None else 0,  # type: ignore[call-overload]
                table_name=str(r[2]),
                reason=str(r[3]),
                payload=str(r[4]),
                at=r[5],  # type: ignore[arg-type]
            )
            for r in rows
        ]

    def dead_letter_count(self) -> int:
        rows = self._reader_rows(f"SELECT count(*) FROM {META}.dead_letters", [])
        return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]

    def query(self, sql: str, params: Sequence[object] | None = None) -> pa.Table:
        cursor = self.cursor()
        try:
            return cursor.sql(
                sql, params=list(params) if params is not None else None
            ).to_arrow_table()
        finally:
            cursor.close()

    def _reader_rows(
        self, sql: str, params: Sequence[object] | None = None
    ) -> list[tuple[object, ...]]:
        cursor = self.cursor()
        try:
            return cursor.execute(sql, list(params) if params is not None else None).fetchall()
        finally:
            cursor.close()

    # -------------------------------------------------------------- checkpoint

    def wal_bytes(self) -> int:
        """Current size of the write-ahead log file (0 when there is none)."""
        try:
            return os.path.getsize(f"{self.path}.wal")
        except OSError:
            return 0

    def maybe_checkpoint(self) -> bool:
        """CHECKPOINT when the interval passed or the WAL is too big; True if it ran."""
        due = time.monotonic() - self._last_checkpoint >= self.checkpoint_interval.total_seconds()
        if due or self.wal_bytes() >= self.checkpoint_wal_bytes:
            self.checkpoint()
            return True
        return False

    def checkpoint(self) -> None:
        if self.read_only:
            return
        started = time.monotonic()
        wal = self.wal_bytes()
        try:
            self._con.execute("CHECKPOINT")
        except duckdb.Error as exc:
            # A checkpoint can be refused while another transaction holds
            # changes; it is retried at the next opportunity.
            log.warning("CHECKPOINT deferred: %s", exc)
            return
        self._last_checkpoint = time.monotonic()
        seconds = self._last_checkpoint - started
        self.checkpoints.add(wal, seconds)
        log.debug("CHECKPOINT of %d WAL bytes took %.3f s", wal, seconds)

    def close(self) -> None:
        with self._lock:
            try:
                if not self.read_only:
                    self.checkpoint()
            finally:
                self._con.close()

"""Real pgoutput bytes without a replication connection, for decoder tests.

A logical slot read with ``pg_logical_slot_get_binary_changes`` yields the
same (LSN, payload) pairs a walsender would send in its XLogData messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import psycopg

from headrace.errors import parse_lsn
from headrace.source.changes import ChangeBatch, TableChanges
from headrace.source.postgres.batcher import Batcher
from headrace.source.postgres.types import TypeRegistry
from tests.conftest import PgDatabase


@dataclass
class LogicalSlot:
    """A publication plus a pgoutput slot in a test database."""

    db: PgDatabase
    slot: str = "s"
    publication: str = "p"

    def create(self, publication_target: str = "ALL TABLES") -> LogicalSlot:
        """Create the publication and the slot."""
        self.db.execute(f"CREATE PUBLICATION {self.publication} FOR {publication_target}")
        return self.create_slot()

    def create_slot(self) -> LogicalSlot:
        """Create only the slot (its publication exists already)."""
        self.db.execute(f"SELECT pg_create_logical_replication_slot('{self.slot}', 'pgoutput')")
        return self

    def changes(
        self,
        *,
        proto: int = 2,
        streaming: bool = True,
        binary: bool = False,
        work_mem: str | None = None,
    ) -> list[tuple[int, bytes]]:
        """Consume everything the slot has: (LSN, pgoutput payload) pairs."""
        options = [
            "proto_version",
            str(proto),
            "publication_names",
            self.publication,
            "messages",
            "true",
        ]
        if streaming:
            options += ["streaming", "true"]
        if binary:
            options += ["binary", "true"]
        with self.db.connect() as conn:
            if work_mem is not None:
                conn.execute(f"SET logical_decoding_work_mem = '{work_mem}'".encode())
            placeholders = ", ".join(["%s"] * len(options))
            rows = conn.execute(
                "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes("
                f"%s, NULL, NULL, {placeholders})",
                (self.slot, *options),
            ).fetchall()
        return [(parse_lsn(str(lsn)), bytes(cast(bytes, data))) for lsn, data in rows]

    def registry(self) -> TypeRegistry:
        with self.db.connect() as conn:
            return TypeRegistry.load(conn, catalog_dsn=self.db.dsn)

    def batch(
        self,
        batcher: Batcher | None = None,
        *,
        proto: int = 2,
        streaming: bool = True,
        binary: bool = False,
        work_mem: str | None = None,
    ) -> ChangeBatch:
        """Feed all pending changes to a batcher and take one batch."""
        changes = self.changes(proto=proto, streaming=streaming, binary=binary, work_mem=work_mem)
        return self.batch_from(changes, batcher)

    def batch_from(
        self, changes: list[tuple[int, bytes]], batcher: Batcher | None = None
    ) -> ChangeBatch:
        """Feed ``changes`` (read from this slot) to a batcher and take one batch."""
        batcher = batcher if batcher is not None else Batcher(self.registry())
        for lsn, payload in changes:
            batcher.feed(lsn, payload)
        batch = batcher.take()
        assert batch is not None, "the slot had nothing to decode"
        return batch


def acct_slot(db: PgDatabase) -> LogicalSlot:
    """The batcher tests' slot, over one table of several types: ``acct``."""
    db.execute(
        "CREATE TABLE acct (id int8 PRIMARY KEY, owner text, balance numeric(18,2), "
        "opened timestamptz, active bool)"
    )
    return LogicalSlot(db).create()


def op_kinds(changes: list[tuple[int, bytes]]) -> set[int]:
    """The message types (first bytes) among ``changes``."""
    return {payload[0] for _, payload in changes}


def table_changes(batch: ChangeBatch, name: str) -> list[TableChanges]:
    """The batch's TableChanges of table ``name`` (any schema version)."""
    return [t for t in batch.tables if t.table.name == name]


def rows_of(batch: ChangeBatch, name: str) -> list[dict[str, Any]]:
    """All changes of table ``name`` as dicts, in batch order."""
    rows: list[dict[str, Any]] = []
    for part in table_changes(batch, name):
        rows.extend(part.data.to_pylist())
    rows.sort(key=lambda row: int(row["_hr_seq"]))
    return rows


def select(db: PgDatabase, query: str) -> list[tuple[object, ...]]:
    """Rows of a query on a session with the source's settings."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        return conn.execute(query.encode()).fetchall()

"""The change model: what a source hands to the engine.

A :class:`ChangeBatch` holds whole transactions (it never ends inside one),
grouped per table and schema version into :class:`TableChanges`, each an
Arrow table with one row per change. Columns of a ``TableChanges.data``:

========================  ==================================================
``_hr_seq``               int64, order of the change in the batch (global
                          across tables, so cross-table order is kept)
``_hr_op``                string, ``I`` insert, ``U`` update, ``D`` delete,
                          ``T`` truncate (one row per truncated table)
``_hr_lsn``               uint64, commit LSN of the change's transaction
``_hr_commit_ts``         timestamp[us, UTC], commit time of the transaction
``_hr_xid``               int64, transaction id
``<column>``              the new value of each table column (NULL for D/T)
``_hr_oldkind``           string, ``K`` old key only, ``O`` whole old row,
                          NULL when the publication sent no old values
``_hr_old_<column>``      the old value, when ``_hr_oldkind`` is set
``_hr_toast``             list<string>, names of columns whose new value is
                          an unchanged TOAST value PostgreSQL did not send
                          (their new-value cell is NULL and must be filled
                          from the mirror); NULL when there are none
========================  ==================================================

A transaction too large to decode at once comes in *pieces*: the batch's
``tables`` are its first piece and :meth:`ChangeBatch.pieces` decodes the
others one at a time, in order (``_hr_seq`` continues across them). A
consumer applies every piece before it treats the batch as done: the engine
applies them all in one store transaction, so memory holds one piece, not the
transaction, and the source transaction stays atomic in the store.

Positions: ``ChangeBatch.position`` is the end LSN of the last transaction
(or heartbeat) in the batch. It is the resume point: after storing it, a
restart skips every transaction whose commit LSN is below it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

import numpy as np
import numpy.typing as npt
import pyarrow as pa

SEQ = "_hr_seq"
OP = "_hr_op"
LSN = "_hr_lsn"
COMMIT_TS = "_hr_commit_ts"
XID = "_hr_xid"
OLD_KIND = "_hr_oldkind"  # not under OLD_PREFIX: a column named "kind" must not clash
OLD_PREFIX = "_hr_old_"
TOAST = "_hr_toast"

META_FIELDS: tuple[pa.Field, ...] = (
    pa.field(SEQ, pa.int64(), nullable=False),
    pa.field(OP, pa.string(), nullable=False),
    pa.field(LSN, pa.uint64(), nullable=False),
    pa.field(COMMIT_TS, pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field(XID, pa.int64(), nullable=False),
)


class Op(StrEnum):
    INSERT = "I"
    UPDATE = "U"
    DELETE = "D"
    TRUNCATE = "T"


class OldKind(StrEnum):
    KEY = "K"
    ROW = "O"


def old_name(column: str) -> str:
    """Name of the column holding ``column``'s old value."""
    return OLD_PREFIX + column


def commit_micros(column: pa.ChunkedArray) -> npt.NDArray[np.int64]:
    """A change table's commit times (:data:`COMMIT_TS`: ``timestamp[us, UTC]``, never
    null) as µs since the epoch, by viewing its buffers (a ``cast`` costs ~0.1 ms of
    Python per call, and callers make one per table and batch)."""
    chunks = [chunk.view(pa.int64()).to_numpy() for chunk in column.chunks]
    if not chunks:
        return np.empty(0, dtype=np.int64)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


@dataclass(frozen=True)
class TableRef:
    """A source table, schema-qualified."""

    schema: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @classmethod
    def parse(cls, text: str) -> TableRef:
        """``"public.t"`` or ``"t"`` (schema ``public``)."""
        schema, _, name = text.rpartition(".")
        return cls(schema or "public", name)

    def __str__(self) -> str:
        return self.qualified


@dataclass(frozen=True)
class Column:
    """One column of a source table as the source knows it."""

    name: str
    type_oid: int
    type_modifier: int
    type_name: str
    arrow_type: pa.DataType
    is_key: bool = False


@dataclass(frozen=True)
class TableSchema:
    """A table's columns at one schema version."""

    table: TableRef
    version: int
    columns: tuple[Column, ...]
    relation_oid: int = 0

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.is_key)

    def arrow_schema(self) -> pa.Schema:
        """Schema of the table's rows alone (no change metadata)."""
        return pa.schema([pa.field(c.name, c.arrow_type) for c in self.columns])

    def change_schema(self) -> pa.Schema:
        """Schema of :attr:`TableChanges.data` for this table version."""
        fields = list(META_FIELDS)
        fields.extend(pa.field(c.name, c.arrow_type) for c in self.columns)
        fields.append(pa.field(OLD_KIND, pa.string()))
        fields.extend(pa.field(old_name(c.name), c.arrow_type) for c in self.columns)
        fields.append(pa.field(TOAST, pa.list_(pa.string())))
        return pa.schema(fields)


@dataclass(frozen=True)
class TableChanges:
    """Changes of one table at one schema version, in commit order."""

    schema: TableSchema
    data: pa.Table

    @property
    def table(self) -> TableRef:
        return self.schema.table

    @property
    def num_rows(self) -> int:
        return int(self.data.num_rows)


@dataclass(frozen=True)
class LogicalMessage:
    """A ``pg_logical_emit_message`` seen in the stream (heartbeats among them)."""

    lsn: int
    prefix: str
    content: bytes
    transactional: bool


@dataclass(frozen=True)
class ChangeBatch:
    """Whole transactions' changes, and the position they bring the source to."""

    tables: tuple[TableChanges, ...]
    position: int
    transactions: int = 0
    first_commit_lsn: int | None = None
    last_commit_ts: datetime | None = None
    messages: tuple[LogicalMessage, ...] = field(default=())
    rest: Callable[[bool], Iterator[tuple[TableChanges, ...]]] | None = field(
        default=None, compare=False
    )
    """The pieces after ``tables`` of a batch too large to decode at once: each call
    decodes them again, one at a time (see :meth:`pieces`; the argument says whether
    values converted lossily are counted). None for most batches."""
    rest_changes: int = 0
    """Changes in :attr:`rest` (known without decoding them)."""
    rest_commits: tuple[tuple[int, int], ...] = ()
    """(commit time in µs since the epoch, changes) of :attr:`rest`, in order: what the
    freshness figures need without decoding it."""

    @property
    def num_changes(self) -> int:
        return sum(t.num_rows for t in self.tables) + self.rest_changes

    @property
    def is_empty(self) -> bool:
        return not self.tables and self.rest is None

    @property
    def in_pieces(self) -> bool:
        """Whether the batch has more changes than :attr:`tables` (see :meth:`pieces`)."""
        return self.rest is not None

    def pieces(self, *, again: bool = False) -> Iterator[tuple[TableChanges, ...]]:
        """Every change of the batch, a piece at a time: ``tables``, then :attr:`rest`.
        ``again``: another consumer decodes the pieces too (the rules lane, a recorder),
        so values converted lossily are not counted twice."""
        yield self.tables
        if self.rest is not None:
            yield from self.rest(not again)

    def decoded_changes(self) -> int:
        """Decode every piece (a benchmark's consumer) and count the changes."""
        return sum(t.num_rows for tables in self.pieces() for t in tables)

    def piece_batches(self, *, again: bool = False) -> Iterator[ChangeBatch]:
        """:meth:`pieces` as batches with this batch's position and metadata: a consumer
        must treat the batch as done only after the last one."""
        if self.rest is None:
            yield self
            return
        for tables in self.pieces(again=again):
            yield replace(self, tables=tables, rest=None, rest_changes=0, rest_commits=())


@dataclass(frozen=True)
class SnapshotChunk:
    """A slice of a table's rows copied under the exported snapshot."""

    schema: TableSchema
    rows: pa.Table
    consistent_point: int

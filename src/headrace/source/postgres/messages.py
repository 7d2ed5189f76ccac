"""The pgoutput protocol's messages, as :mod:`headrace.source.postgres.protocol`
decodes them: one frozen dataclass per message type, plus the byte values that
name message types and tuple column kinds.

Timestamps are microseconds since the Unix epoch (UTC); LSNs are integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Final

# PostgreSQL timestamps count microseconds from 2000-01-01 00:00:00 UTC.
PG_EPOCH_OFFSET_US: Final = 946_684_800_000_000
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def pg_micros_to_datetime(unix_micros: int) -> datetime:
    """A Unix-epoch microsecond count as an aware UTC datetime."""
    return _UNIX_EPOCH + timedelta(microseconds=unix_micros)


class Unchanged(Enum):
    """Marker type of :data:`UNCHANGED`."""

    TOAST = "u"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged.TOAST
"""An unchanged TOAST value: PostgreSQL did not send it (tuple kind ``u``)."""

RawValue = bytes | None | Unchanged

# Tuple column kinds.
KIND_NULL: Final = ord("n")
KIND_UNCHANGED: Final = ord("u")
KIND_TEXT: Final = ord("t")
KIND_BINARY: Final = ord("b")

# Message type bytes.
MSG_BEGIN: Final = ord("B")
MSG_COMMIT: Final = ord("C")
MSG_ORIGIN: Final = ord("O")
MSG_RELATION: Final = ord("R")
MSG_TYPE: Final = ord("Y")
MSG_INSERT: Final = ord("I")
MSG_UPDATE: Final = ord("U")
MSG_DELETE: Final = ord("D")
MSG_TRUNCATE: Final = ord("T")
MSG_MESSAGE: Final = ord("M")
MSG_STREAM_START: Final = ord("S")
MSG_STREAM_STOP: Final = ord("E")
MSG_STREAM_COMMIT: Final = ord("c")
MSG_STREAM_ABORT: Final = ord("A")
MSG_BEGIN_PREPARE: Final = ord("b")
MSG_PREPARE: Final = ord("P")
MSG_COMMIT_PREPARED: Final = ord("K")
MSG_ROLLBACK_PREPARED: Final = ord("r")
MSG_STREAM_PREPARE: Final = ord("p")

# Messages that carry a transaction id prefix inside a streamed transaction.
STREAMABLE: Final = frozenset(
    {MSG_RELATION, MSG_TYPE, MSG_INSERT, MSG_UPDATE, MSG_DELETE, MSG_TRUNCATE, MSG_MESSAGE}
)

TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


@dataclass(frozen=True, slots=True)
class TupleData:
    """The columns of one row as sent: ``kinds`` has one kind byte per column
    (``n``, ``u``, ``t`` or ``b``) and ``values`` the raw values."""

    kinds: bytes
    values: tuple[RawValue, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    """Start of a transaction. ``final_lsn`` is the LSN of its commit record."""

    final_lsn: int
    commit_ts: int  # microseconds since the Unix epoch, UTC
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """End of a transaction: ``end_lsn`` is where a restart may resume."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: int  # microseconds since the Unix epoch, UTC


@dataclass(frozen=True, slots=True)
class Origin:
    """The replication origin a transaction was replayed from."""

    origin_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    """One column of a :class:`Relation`."""

    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """Part of the table's REPLICA IDENTITY key."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's description, sent before its first change in a session and
    after every change of its definition."""

    xid: int | None
    oid: int
    namespace: str
    name: str
    replica_identity: str  # d default, n nothing, f full, i index
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class Type:
    """A user-defined type's name (sent before a Relation that uses it)."""

    xid: int | None
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """A new row."""

    xid: int | None
    relation_oid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """A changed row. ``old_kind`` is ``K`` (old key columns only; the other
    columns are NULL), ``O`` (the whole old row, REPLICA IDENTITY FULL) or
    ``None`` (the publication sent no old values)."""

    xid: int | None
    relation_oid: int
    old_kind: str | None
    old: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    """A removed row, identified by its old key (``K``) or old row (``O``)."""

    xid: int | None
    relation_oid: int
    old_kind: str
    old: TupleData


@dataclass(frozen=True, slots=True)
class Truncate:
    """``TRUNCATE`` of one or more tables."""

    xid: int | None
    options: int  # TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY
    relation_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """A logical decoding message (``pg_logical_emit_message``)."""

    xid: int | None
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Start of a chunk of an in-progress (streamed) transaction."""

    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    """End of a chunk of a streamed transaction."""


@dataclass(frozen=True, slots=True)
class StreamCommit:
    """Commit of a streamed transaction."""

    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: int  # microseconds since the Unix epoch, UTC


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """Abort of a streamed transaction (``subxid == xid``) or of one of its
    subtransactions. Protocol 4 (parallel apply) adds the abort LSN and time."""

    xid: int
    subxid: int
    abort_lsn: int | None = None
    abort_ts: int | None = None


@dataclass(frozen=True, slots=True)
class BeginPrepare:
    """Start of a transaction prepared for two-phase commit (protocol >= 3)."""

    prepare_lsn: int
    end_lsn: int
    prepare_ts: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class Prepare:
    """``PREPARE TRANSACTION`` of the transaction begun by BeginPrepare."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_ts: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class CommitPrepared:
    """``COMMIT PREPARED`` of an earlier prepared transaction."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class RollbackPrepared:
    """``ROLLBACK PREPARED`` of an earlier prepared transaction."""

    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_ts: int
    rollback_ts: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class StreamPrepare:
    """``PREPARE TRANSACTION`` of a streamed transaction."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_ts: int
    xid: int
    gid: str


PgOutputMessage = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | Message
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | BeginPrepare
    | Prepare
    | CommitPrepared
    | RollbackPrepared
    | StreamPrepare
)

"""Decoder of PostgreSQL's ``pgoutput`` logical replication protocol, versions 1-4.

One call decodes one pgoutput message (the payload of an ``XLogData`` ``w``
message, or the ``data`` column of ``pg_logical_slot_get_binary_changes``)
into a frozen dataclass. Column values stay raw here (``bytes`` for text or
binary values, ``None`` for NULL, :data:`UNCHANGED` for an unchanged TOAST
value PostgreSQL did not send): converting them is columnar work done later
(:mod:`headrace.source.postgres.types`).

Inside a streamed transaction (protocol >= 2, between Stream Start and Stream
Stop) the data messages carry the transaction id as a prefix; the
:class:`PgOutputDecoder` tracks that state, :func:`decode_message` takes it as
an argument.

Anything the decoder does not understand raises
:class:`~headrace.errors.ProtocolError` naming the message's LSN and the byte
offset inside the message: never a silent skip.

The bulk of a change stream (Insert / Update / Delete) takes the columnar path
in :mod:`headrace.source.postgres.tuples` instead; this module is the
reference decoder for every message and the one used for everything that is
not a row.
"""

from __future__ import annotations

import struct

from headrace.errors import ProtocolError
from headrace.source.postgres.messages import (
    KIND_BINARY,
    KIND_NULL,
    KIND_TEXT,
    KIND_UNCHANGED,
    MSG_BEGIN,
    MSG_BEGIN_PREPARE,
    MSG_COMMIT,
    MSG_COMMIT_PREPARED,
    MSG_DELETE,
    MSG_INSERT,
    MSG_MESSAGE,
    MSG_ORIGIN,
    MSG_PREPARE,
    MSG_RELATION,
    MSG_ROLLBACK_PREPARED,
    MSG_STREAM_ABORT,
    MSG_STREAM_COMMIT,
    MSG_STREAM_PREPARE,
    MSG_STREAM_START,
    MSG_STREAM_STOP,
    MSG_TRUNCATE,
    MSG_TYPE,
    MSG_UPDATE,
    PG_EPOCH_OFFSET_US,
    STREAMABLE,
    TRUNCATE_CASCADE,
    TRUNCATE_RESTART_IDENTITY,
    UNCHANGED,
    Begin,
    BeginPrepare,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Prepare,
    RawValue,
    Relation,
    RelationColumn,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Unchanged,
    Update,
    pg_micros_to_datetime,
)

__all__ = [
    "KIND_BINARY",
    "KIND_NULL",
    "KIND_TEXT",
    "KIND_UNCHANGED",
    "MSG_BEGIN",
    "MSG_BEGIN_PREPARE",
    "MSG_COMMIT",
    "MSG_COMMIT_PREPARED",
    "MSG_DELETE",
    "MSG_INSERT",
    "MSG_MESSAGE",
    "MSG_ORIGIN",
    "MSG_PREPARE",
    "MSG_RELATION",
    "MSG_ROLLBACK_PREPARED",
    "MSG_STREAM_ABORT",
    "MSG_STREAM_COMMIT",
    "MSG_STREAM_PREPARE",
    "MSG_STREAM_START",
    "MSG_STREAM_STOP",
    "MSG_TRUNCATE",
    "MSG_TYPE",
    "MSG_UPDATE",
    "PG_EPOCH_OFFSET_US",
    "STREAMABLE",
    "TRUNCATE_CASCADE",
    "TRUNCATE_RESTART_IDENTITY",
    "UNCHANGED",
    "Begin",
    "BeginPrepare",
    "Commit",
    "CommitPrepared",
    "Delete",
    "Insert",
    "Message",
    "Origin",
    "PgOutputDecoder",
    "PgOutputMessage",
    "Prepare",
    "RawValue",
    "Relation",
    "RelationColumn",
    "RollbackPrepared",
    "StreamAbort",
    "StreamCommit",
    "StreamPrepare",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "TupleData",
    "Type",
    "Unchanged",
    "Update",
    "decode_message",
    "decode_tuple",
    "pg_micros_to_datetime",
]

_U8 = struct.Struct("!B")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_I64 = struct.Struct("!q")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_STREAM_ABORT = struct.Struct("!II")
_STREAM_ABORT_PARALLEL = struct.Struct("!IIQq")
_PREPARE_HEAD = struct.Struct("!BQQqI")
_BEGIN_PREPARE_HEAD = struct.Struct("!QQqI")
_ROLLBACK_PREPARED_HEAD = struct.Struct("!BQQqqI")


class _MalformedError(Exception):
    """Internal: a decoding step failed at ``offset``."""

    def __init__(self, what: str, offset: int) -> None:
        super().__init__(what)
        self.what = what
        self.offset = offset


def _string(data: bytes, pos: int) -> tuple[str, int]:
    end = data.find(b"\0", pos)
    if end < 0:
        raise _MalformedError("string without its terminating NUL byte", pos)
    try:
        return data[pos:end].decode("utf-8"), end + 1
    except UnicodeDecodeError as exc:
        raise _MalformedError(f"string is not UTF-8 ({exc.reason})", pos + exc.start) from None


def _need(data: bytes, pos: int, size: int, what: str) -> None:
    if pos + size > len(data):
        raise _MalformedError(
            f"message ends inside {what} ({len(data) - pos} of {size} bytes)", pos
        )


def decode_tuple(data: bytes, pos: int) -> tuple[TupleData, int]:
    """Decode a TupleData structure at ``pos``; return it and the offset after it."""
    _need(data, pos, 2, "the column count")
    (count,) = _I16.unpack_from(data, pos)
    if count < 0:
        raise _MalformedError(f"negative column count {count}", pos)
    pos += 2
    kinds = bytearray(count)
    values: list[RawValue] = []
    append = values.append
    size = len(data)
    for index in range(count):
        if pos >= size:
            raise _MalformedError(f"message ends before column {index + 1} of {count}", pos)
        kind = data[pos]
        kinds[index] = kind
        if kind in (KIND_TEXT, KIND_BINARY):
            if pos + 5 > size:
                raise _MalformedError(
                    f"message ends inside the length of column {index + 1}", pos + 1
                )
            (length,) = _I32.unpack_from(data, pos + 1)
            start = pos + 5
            pos = start + length
            if length < 0 or pos > size:
                raise _MalformedError(
                    f"column {index + 1} claims {length} bytes, {size - start} remain", start - 4
                )
            append(data[start:pos])
        elif kind == KIND_NULL:
            append(None)
            pos += 1
        elif kind == KIND_UNCHANGED:
            append(UNCHANGED)
            pos += 1
        else:
            raise _MalformedError(f"unknown tuple column kind {_byte_repr(kind)}", pos)
    return TupleData(bytes(kinds), tuple(values)), pos


def _byte_repr(value: int) -> str:
    return repr(chr(value)) if 32 <= value < 127 else f"0x{value:02x}"


def _xid_prefix(data: bytes, pos: int, in_stream: bool) -> tuple[int | None, int]:
    if not in_stream:
        return None, pos
    _need(data, pos, 4, "the transaction id")
    return _U32.unpack_from(data, pos)[0], pos + 4


def _decode_begin(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    _need(data, pos, _BEGIN.size, "Begin")
    final_lsn, ts, xid = _BEGIN.unpack_from(data, pos)
    return Begin(final_lsn, ts + PG_EPOCH_OFFSET_US, xid), pos + _BEGIN.size


def _decode_commit(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    _need(data, pos, _COMMIT.size, "Commit")
    flags, lsn, end, ts = _COMMIT.unpack_from(data, pos)
    return Commit(flags, lsn, end, ts + PG_EPOCH_OFFSET_US), pos + _COMMIT.size


def _decode_origin(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    _need(data, pos, 8, "Origin")
    (lsn,) = _U64.unpack_from(data, pos)
    name, pos = _string(data, pos + 8)
    return Origin(lsn, name), pos


def _decode_relation(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    xid, pos = _xid_prefix(data, pos, in_stream)
    _need(data, pos, 4, "the relation OID")
    (oid,) = _U32.unpack_from(data, pos)
    namespace, pos = _string(data, pos + 4)
    name, pos = _string(data, pos)
    _need(data, pos, 3, "the replica identity and column count")
    identity = chr(data[pos])
    (count,) = _I16.unpack_from(data, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        _need(data, pos, 1, "column flags")
        flags = data[pos]
        column_name, pos = _string(data, pos + 1)
        _need(data, pos, 8, "column type")
        type_oid, modifier = struct.unpack_from("!Ii", data, pos)
        pos += 8
        columns.append(RelationColumn(flags, column_name, type_oid, modifier))
    return Relation(xid, oid, namespace, name, identity, tuple(columns)), pos


def _decode_type(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    xid, pos = _xid_prefix(data, pos, in_stream)
    _need(data, pos, 4, "the type OID")
    (oid,) = _U32.unpack_from(data, pos)
    namespace, pos = _string(data, pos + 4)
    name, pos = _string(data, pos)
    return Type(xid, oid, namespace, name), pos


def _expect(data: bytes, pos: int, allowed: bytes, what: str) -> int:
    if pos >= len(data):
        raise _MalformedError(f"message ends before {what}", pos)
    marker = data[pos]
    if marker not in allowed:
        raise _MalformedError(
            f"expected {what} ({allowed.decode()}), got {_byte_repr(marker)}", pos
        )
    return marker


def _decode_insert(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    xid, pos = _xid_prefix(data, pos, in_stream)
    _need(data, pos, 4, "the relation OID")
    (oid,) = _U32.unpack_from(data, pos)
    _expect(data, pos + 4, b"N", "the new tuple marker")
    new, pos = decode_tuple(data, pos + 5)
    return Insert(xid, oid, new), pos


def _decode_update(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    xid, pos = _xid_prefix(data, pos, in_stream)
    _need(data, pos, 4, "the relation OID")
    (oid,) = _U32.unpack_from(data, pos)
    pos += 4
    marker = _expect(data, pos, b"KON", "a tuple marker")
    old_kind: str | None = None
    old: TupleData | None = None
    if marker != ord("N"):
        old_kind = chr(marker)
        old, pos = decode_tuple(data, pos + 1)
        _expect(data, pos, b"N", "the new tuple marker")
    new, pos = decode_tuple(data, pos + 1)
    return Update(xid, oid, old_kind, old, new), pos


def _decode_delete(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    xid, pos = _xid_prefix(data, pos, in_stream)
    _need(data, pos, 4, "the relation OID")
    (oid,) = _U32.unpack_from(data, pos)
    marker = _expect(data, pos + 4, b"KO", "the old tuple marker")
    old, pos = decode_tuple(data, pos + 5)
    return Delete(xid, oid, chr(marker), old), pos


def _decode_truncate(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    xid, pos = _xid_prefix(data, pos, in_stream)
    _need(data, pos, 5, "the relation count and options")
    (count,) = _I32.unpack_from(data, pos)
    options = data[pos + 4]
    pos += 5
    if count < 0:
        raise _MalformedError(f"negative relation count {count}", pos - 5)
    _need(data, pos, 4 * count, "the relation OIDs")
    oids = struct.unpack_from(f"!{count}I", data, pos)
    return Truncate(xid, options, oids), pos + 4 * count


def _decode_message(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    xid, pos = _xid_prefix(data, pos, in_stream)
    _need(data, pos, 9, "the message flags and LSN")
    flags = data[pos]
    (lsn,) = _U64.unpack_from(data, pos + 1)
    prefix, pos = _string(data, pos + 9)
    _need(data, pos, 4, "the message length")
    (length,) = _I32.unpack_from(data, pos)
    pos += 4
    if length < 0:
        raise _MalformedError(f"negative message length {length}", pos - 4)
    _need(data, pos, length, "the message content")
    return Message(xid, bool(flags & 1), lsn, prefix, data[pos : pos + length]), pos + length


def _decode_stream_start(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    _need(data, pos, 5, "Stream Start")
    (xid,) = _U32.unpack_from(data, pos)
    return StreamStart(xid, data[pos + 4] == 1), pos + 5


def _decode_stream_stop(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    return StreamStop(), pos


def _decode_stream_commit(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    _need(data, pos, 4 + _COMMIT.size, "Stream Commit")
    (xid,) = _U32.unpack_from(data, pos)
    flags, lsn, end, ts = _COMMIT.unpack_from(data, pos + 4)
    commit = StreamCommit(xid, flags, lsn, end, ts + PG_EPOCH_OFFSET_US)
    return commit, pos + 4 + _COMMIT.size


def _decode_stream_abort(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    # Protocol 4 with parallel apply appends the abort LSN and time; the
    # length tells which form this is.
    if len(data) - pos >= _STREAM_ABORT_PARALLEL.size:
        xid, subxid, lsn, ts = _STREAM_ABORT_PARALLEL.unpack_from(data, pos)
        abort = StreamAbort(xid, subxid, lsn, ts + PG_EPOCH_OFFSET_US)
        return abort, pos + _STREAM_ABORT_PARALLEL.size
    _need(data, pos, _STREAM_ABORT.size, "Stream Abort")
    xid, subxid = _STREAM_ABORT.unpack_from(data, pos)
    return StreamAbort(xid, subxid), pos + _STREAM_ABORT.size


def _decode_begin_prepare(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    _need(data, pos, _BEGIN_PREPARE_HEAD.size, "Begin Prepare")
    lsn, end, ts, xid = _BEGIN_PREPARE_HEAD.unpack_from(data, pos)
    gid, pos = _string(data, pos + _BEGIN_PREPARE_HEAD.size)
    return BeginPrepare(lsn, end, ts + PG_EPOCH_OFFSET_US, xid, gid), pos


def _decode_prepare_like(
    data: bytes, pos: int, kind: type[Prepare | CommitPrepared | StreamPrepare]
) -> tuple[PgOutputMessage, int]:
    _need(data, pos, _PREPARE_HEAD.size, kind.__name__)
    flags, lsn, end, ts, xid = _PREPARE_HEAD.unpack_from(data, pos)
    gid, pos = _string(data, pos + _PREPARE_HEAD.size)
    return kind(flags, lsn, end, ts + PG_EPOCH_OFFSET_US, xid, gid), pos


def _decode_prepare(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    return _decode_prepare_like(data, pos, Prepare)


def _decode_commit_prepared(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    return _decode_prepare_like(data, pos, CommitPrepared)


def _decode_stream_prepare(data: bytes, pos: int, in_stream: bool) -> tuple[PgOutputMessage, int]:
    return _decode_prepare_like(data, pos, StreamPrepare)


def _decode_rollback_prepared(
    data: bytes, pos: int, in_stream: bool
) -> tuple[PgOutputMessage, int]:
    _need(data, pos, _ROLLBACK_PREPARED_HEAD.size, "Rollback Prepared")
    flags, prepare_end, rollback_end, prepare_ts, rollback_ts, xid = (
        _ROLLBACK_PREPARED_HEAD.unpack_from(data, pos)
    )
    gid, pos = _string(data, pos + _ROLLBACK_PREPARED_HEAD.size)
    message = RollbackPrepared(
        flags,
        prepare_end,
        rollback_end,
        prepare_ts + PG_EPOCH_OFFSET_US,
        rollback_ts + PG_EPOCH_OFFSET_US,
        xid,
        gid,
    )
    return message, pos


_DECODERS = {
    MSG_BEGIN: _decode_begin,
    MSG_COMMIT: _decode_commit,
    MSG_ORIGIN: _decode_origin,
    MSG_RELATION: _decode_relation,
    MSG_TYPE: _decode_type,
    MSG_INSERT: _decode_insert,
    MSG_UPDATE: _decode_update,
    MSG_DELETE: _decode_delete,
    MSG_TRUNCATE: _decode_truncate,
    MSG_MESSAGE: _decode_message,
    MSG_STREAM_START: _decode_stream_start,
    MSG_STREAM_STOP: _decode_stream_stop,
    MSG_STREAM_COMMIT: _decode_stream_commit,
    MSG_STREAM_ABORT: _decode_stream_abort,
    MSG_BEGIN_PREPARE: _decode_begin_prepare,
    MSG_PREPARE: _decode_prepare,
    MSG_COMMIT_PREPARED: _decode_commit_prepared,
    MSG_ROLLBACK_PREPARED: _decode_rollback_prepared,
    MSG_STREAM_PREPARE: _decode_stream_prepare,
}


def decode_message(payload: bytes, lsn: int = 0, *, in_stream: bool = False) -> PgOutputMessage:
    """Decode one pgoutput message.

    ``lsn`` is the WAL position the message came with (only used in errors).
    ``in_stream`` says whether the message is inside a Stream Start / Stream
    Stop chunk, where data messages carry a transaction id prefix.
    Raises :class:`ProtocolError` for unknown, truncated or trailing bytes.
    """
    if not payload:
        raise ProtocolError("empty message", lsn=lsn, offset=0)
    decoder = _DECODERS.get(payload[0])
    if decoder is None:
        raise ProtocolError(f"unknown message type {_byte_repr(payload[0])}", lsn=lsn, offset=0)
    try:
        message, end = decoder(payload, 1, in_stream)
    except _MalformedError as exc:
        raise ProtocolError(
            f"{chr(payload[0])!r} message: {exc.what}", lsn=lsn, offset=exc.offset
        ) from None
    except struct.error as exc:  # pragma: no cover - every read is length-checked first
        raise ProtocolError(f"{chr(payload[0])!r} message: {exc}", lsn=lsn) from None
    if end != len(payload):
        raise ProtocolError(
            f"{chr(payload[0])!r} message has {len(payload) - end} unexpected trailing bytes",
            lsn=lsn,
            offset=end,
        )
    return message


class PgOutputDecoder:
    """Decodes a sequence of pgoutput messages, tracking whether they are
    inside a streamed-transaction chunk (which changes the data messages'
    layout)."""

    def __init__(self) -> None:
        self.in_stream = False
        self.stream_xid: int | None = None

    def decode(self, payload: bytes, lsn: int = 0) -> PgOutputMessage:
        """Decode the next message of the stream."""
        message = decode_message(payload, lsn, in_stream=self.in_stream)
        if isinstance(message, StreamStart):
            if self.in_stream:
                raise ProtocolError("Stream Start inside an open stream chunk", lsn=lsn, offset=0)
            self.in_stream = True
            self.stream_xid = message.xid
        elif isinstance(message, StreamStop):
            if not self.in_stream:
                raise ProtocolError("Stream Stop without a Stream Start", lsn=lsn, offset=0)
            self.in_stream = False
            self.stream_xid = None
        return message

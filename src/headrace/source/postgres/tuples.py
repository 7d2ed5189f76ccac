"""Columnar decoding of many pgoutput Insert / Update / Delete messages at once.

Row messages are the bulk of a change stream. Instead of walking each
message's columns in Python, a batch of them is concatenated into one buffer
and parsed with NumPy, one column position at a time across all rows: the
per-row Python cost is an ``append``. Each column's values then become an
Arrow binary array that points into the buffer, ready for the columnar type
conversion of :mod:`headrace.source.postgres.convert`.

The layout parsed here is the same as :func:`headrace.source.postgres.protocol.decode_tuple`
(which the tests compare this against): ``Int16`` column count, then per
column a kind byte ``n`` / ``u`` / ``t`` / ``b`` and, for ``t`` / ``b``, an
``Int32`` length and the bytes. Every read is bounds-checked; a malformed
message raises :class:`~headrace.errors.ProtocolError` with its LSN and the
byte offset inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from headrace.errors import ProtocolError
from headrace.source.postgres.protocol import (
    KIND_BINARY,
    KIND_NULL,
    KIND_TEXT,
    KIND_UNCHANGED,
    MSG_DELETE,
    MSG_INSERT,
    MSG_UPDATE,
)

Int64Array = npt.NDArray[np.int64]
UInt8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]

_N: Final = ord("N")
_K: Final = ord("K")
_O: Final = ord("O")
_INT32_LIMIT: Final = 2**31 - 1
_PADDING: Final = bytes(8)


@dataclass
class MessageBlock:
    """Row messages concatenated into one buffer.

    ``starts``/``ends`` delimit each message in ``data``; ``header`` is the
    number of bytes before the relation OID (1 for the type byte, 5 inside a
    streamed transaction where a transaction id follows it); ``lsns`` are the
    messages' WAL positions, for error messages.
    """

    data: UInt8Array
    buffer: pa.Buffer
    starts: Int64Array
    ends: Int64Array
    header: Int64Array
    lsns: Int64Array

    @classmethod
    def build(
        cls, payloads: list[bytes | memoryview], lsns: list[int], headers: Int64Array
    ) -> MessageBlock:
        """Concatenate ``payloads`` (one ``header`` entry per payload)."""
        lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads))
        # Padding lets the vectorized reads look a few bytes past the last
        # message without an index error; every value read is checked
        # against its message's end before it is used.
        joined = b"".join(payloads) + _PADDING
        ends = np.cumsum(lengths)
        return cls(
            data=np.frombuffer(joined, dtype=np.uint8),
            buffer=pa.py_buffer(joined),
            starts=ends - lengths,
            ends=ends,
            header=headers,
            lsns=np.fromiter(lsns, dtype=np.int64, count=len(lsns)),
        )

    def fail(self, row: int, position: int, what: str) -> ProtocolError:
        """The error for message ``row`` going wrong at absolute ``position``."""
        start = int(self.starts[row])
        kind = chr(self.data[start]) if start < len(self.data) else "?"
        return ProtocolError(
            f"{kind!r} message: {what}", lsn=int(self.lsns[row]), offset=position - start
        )

    def u8(self, positions: Int64Array) -> Int64Array:
        return self.data[positions].astype(np.int64)

    def be16(self, positions: Int64Array) -> Int64Array:
        """Big-endian signed 16-bit integers at ``positions``."""
        return self._be16[positions].astype(np.int64)

    def be32(self, positions: Int64Array) -> Int64Array:
        """Big-endian signed 32-bit integers at ``positions``."""
        return self._be32[positions].astype(np.int64)

    @property
    def be32_view(self) -> npt.NDArray[np.signedinteger[Any]]:
        """Element ``i`` is the big-endian signed 32-bit integer at byte ``i``."""
        return self._be32

    # The views are made once per block: a batch reads lengths once per column.
    @cached_property
    def _be16(self) -> npt.NDArray[np.signedinteger[Any]]:
        return _unaligned(self.data, ">i2")

    @cached_property
    def _be32(self) -> npt.NDArray[np.signedinteger[Any]]:
        return _unaligned(self.data, ">i4")


def _unaligned(data: UInt8Array, dtype: str) -> npt.NDArray[np.signedinteger[Any]]:
    """A view of ``data`` as ``dtype`` starting at every byte: element ``i`` is
    the value stored at bytes ``i .. i+size-1`` (one gather reads many)."""
    size = np.dtype(dtype).itemsize
    base = np.frombuffer(data, dtype=dtype, count=len(data) // size)
    return np.lib.stride_tricks.as_strided(base, shape=(len(data) - size + 1,), strides=(1,))


@dataclass
class MessageHeads:
    """What every message of a block starts with."""

    kinds: Int64Array  # message type byte: I, U or D
    relation_oids: Int64Array
    markers: Int64Array  # byte after the OID: N, K or O
    marker_positions: Int64Array


def read_heads(block: MessageBlock) -> MessageHeads:
    """Read type, relation OID and first tuple marker of every message."""
    kinds = block.u8(block.starts)
    oid_at = block.starts + block.header
    marker_at = oid_at + 4
    short = marker_at >= block.ends
    if short.any():
        row = int(np.argmax(short))
        raise block.fail(row, int(oid_at[row]), "message ends before its first tuple")
    unknown = (kinds != MSG_INSERT) & (kinds != MSG_UPDATE) & (kinds != MSG_DELETE)
    if unknown.any():  # the batcher only puts row messages here
        row = int(np.argmax(unknown))
        raise block.fail(row, int(block.starts[row]), "not a row message")
    markers = block.u8(marker_at)
    allowed = np.where(
        kinds == MSG_INSERT,
        markers == _N,
        np.where(
            kinds == MSG_DELETE,
            (markers == _K) | (markers == _O),
            (markers == _N) | (markers == _K) | (markers == _O),
        ),
    )
    if not allowed.all():
        row = int(np.argmin(allowed))
        raise block.fail(row, int(marker_at[row]), f"unexpected tuple marker {chr(markers[row])!r}")
    return MessageHeads(kinds, block.be32(oid_at), markers, marker_at)


@dataclass
class TupleColumns:
    """The columns of one tuple per row: kind byte, value start and length."""

    # rows x columns (often transposed views of column-major arrays: ``.T``
    # gives each column's values contiguous)
    kinds: npt.NDArray[np.uint8]
    starts: Int64Array  # absolute offsets into the block
    lengths: Int64Array
    ends: Int64Array  # per row: offset after the tuple


def read_tuples(
    block: MessageBlock, rows: Int64Array, positions: Int64Array, column_count: int
) -> TupleColumns:
    """Parse the tuple starting at ``positions`` of each message ``rows``."""
    try:
        parsed = _read_well_formed(block, rows, positions, column_count)
    except IndexError:  # a length pointed past the block: malformed
        parsed = None
    if parsed is not None:
        return parsed
    return _read_checked(block, rows, positions, column_count)


_KNOWN_KINDS: Final = np.zeros(256, dtype=bool)
_KNOWN_KINDS[[KIND_TEXT, KIND_BINARY, KIND_NULL, KIND_UNCHANGED]] = True


def _read_well_formed(
    block: MessageBlock, rows: Int64Array, positions: Int64Array, column_count: int
) -> TupleColumns | None:
    """:func:`read_tuples` for well-formed messages, None for any other.

    The common case, made cheap: a column costs a few NumPy calls, with the
    checks done once at the end: every length is >= 0 (so reads only move
    forward), every kind is known, and every tuple ends within its message
    (so no read went past it). :func:`_read_checked` then says what is wrong.
    """
    count = len(rows)
    ends = block.ends[rows]
    if (positions + 2 > ends).any() or (block.be16(positions) != column_count).any():
        return None
    data = block.data
    be32 = block.be32_view
    # Column-major: each column's values are contiguous for the conversion.
    kinds = np.empty((column_count, count), dtype=np.uint8)
    starts = np.empty((column_count, count), dtype=np.int64)
    lengths = np.zeros((column_count, count), dtype=np.int64)
    position = positions + 2
    for column in range(column_count):
        kind = data[position]
        kinds[column] = kind
        if (kind == KIND_TEXT).all():
            length = be32[position + 1]
            value_start = position + 5
        else:
            valued = (kind == KIND_TEXT) | (kind == KIND_BINARY)
            length = np.where(valued, be32[position + 1], 0)
            value_start = np.where(valued, position + 5, position + 1)
        starts[column] = value_start
        lengths[column] = length
        position = value_start + length
    if not (position <= ends).all() or (lengths < 0).any() or not _KNOWN_KINDS[kinds].all():
        return None
    return TupleColumns(kinds.T, starts.T, lengths.T, position)


def _read_checked(
    block: MessageBlock, rows: Int64Array, positions: Int64Array, column_count: int
) -> TupleColumns:
    """:func:`read_tuples` checking every read: raises what is wrong first."""
    count = len(rows)
    ends = block.ends[rows]
    too_short = positions + 2 > ends
    if too_short.any():
        index = int(np.argmax(too_short))
        raise block.fail(int(rows[index]), int(positions[index]), "message ends before a tuple")
    counts = block.be16(positions)
    wrong = counts != column_count
    if wrong.any():
        index = int(np.argmax(wrong))
        raise block.fail(
            int(rows[index]),
            int(positions[index]),
            f"tuple has {counts[index]} columns, its Relation message {column_count}",
        )
    kinds = np.empty((count, column_count), dtype=np.uint8)
    starts = np.empty((count, column_count), dtype=np.int64)
    lengths = np.zeros((count, column_count), dtype=np.int64)
    position = positions + 2
    for column in range(column_count):
        short = position >= ends
        if short.any():
            index = int(np.argmax(short))
            raise block.fail(
                int(rows[index]),
                int(position[index]),
                f"message ends before column {column + 1} of {column_count}",
            )
        kind = block.data[position]
        kinds[:, column] = kind
        value_start, length = _read_values(
            block, rows=rows, position=position, ends=ends, kind=kind, column=column
        )
        starts[:, column] = value_start
        lengths[:, column] = length
        position = value_start + length
    return TupleColumns(kinds, starts, lengths, position)


def _read_values(
    block: MessageBlock,
    *,
    rows: Int64Array,
    position: Int64Array,
    ends: Int64Array,
    kind: npt.NDArray[np.uint8],
    column: int,
) -> tuple[Int64Array, Int64Array]:
    """Start and length of one column's value in every row (length 0 without one)."""
    if (kind == KIND_TEXT).all():
        # The common case: every row has a text value here.
        length = block.be32(position + 1)
        value_start = position + 5
        valued: BoolArray | None = None
    else:
        valued = (kind == KIND_TEXT) | (kind == KIND_BINARY)
        known = valued | (kind == KIND_NULL) | (kind == KIND_UNCHANGED)
        if not known.all():
            index = int(np.argmin(known))
            raise block.fail(
                int(rows[index]),
                int(position[index]),
                f"unknown tuple column kind {_byte_repr(int(kind[index]))}",
            )
        if not valued.any():
            return position + 1, np.zeros(len(position), dtype=np.int64)
        length = np.where(valued, block.be32(position + 1), 0)
        value_start = np.where(valued, position + 5, position + 1)
    overrun = (value_start + length > ends) | (length < 0)
    if valued is not None:
        overrun &= valued
    if overrun.any():
        index = int(np.argmax(overrun))
        raise _overrun(
            block=block,
            row=int(rows[index]),
            position=int(position[index]),
            value_start=int(value_start[index]),
            length=int(length[index]),
            end=int(ends[index]),
            column=column,
        )
    return value_start, length


def _overrun(
    *,
    block: MessageBlock,
    row: int,
    position: int,
    value_start: int,
    length: int,
    end: int,
    column: int,
) -> ProtocolError:
    if value_start > end:
        what = f"message ends inside the length of column {column + 1}"
    else:
        what = f"column {column + 1} claims {length} bytes, {end - value_start} remain"
    return block.fail(row, position + 1, what)


def _byte_repr(value: int) -> str:
    return repr(chr(value)) if 32 <= value < 127 else f"0x{value:02x}"


@dataclass(frozen=True)
class ColumnBlock:
    """Where the values of some columns of the same rows lie in a block.

    ``starts``/``lengths``/``valid`` are columns x rows; ``starts`` and
    ``lengths`` are absolute offsets into the block, read only where
    ``valid``. In each column the valid values increase with the row.
    """

    starts: Int64Array
    lengths: Int64Array
    valid: BoolArray


def cut_columns(
    block: MessageBlock,
    columns: Sequence[ColumnBlock],
    groups: Sequence[Sequence[tuple[int, int]]],
) -> list[pa.Array]:
    """Each group of columns (``(index into columns, column index)`` pairs) as
    one binary array: the group's columns one after the other, NULL where a
    value is not valid. When the block holds 2 GiB or more the arrays are
    ``large_binary`` (a group may not fit a binary array; a column must).

    One Arrow ``take`` whatever the number of tables and columns (the groups
    are slices of its result): a batch's cost must not grow with them, which
    is what made small batches expensive. The valid values of all columns are
    described by one binary array over the block's buffer (sorted by
    position, with the gaps between values interleaved, so its offsets only
    grow); the take picks them out of it in the groups' order.
    """
    starts = np.concatenate([c.starts.ravel() for c in columns])
    lengths = np.concatenate([c.lengths.ravel() for c in columns])
    present = np.flatnonzero(np.concatenate([c.valid.ravel() for c in columns]))
    # Each column is a run that increases: a stable sort merges them cheaply.
    order = present[np.argsort(starts[present], kind="stable")]
    rank = np.full(len(starts), -1, dtype=np.int64)
    rank[order] = np.arange(0, 2 * len(order), 2, dtype=np.int64)
    interleaved = _interleaved(block, starts[order], lengths[order])
    first = np.cumsum([0] + [c.starts.size for c in columns]).tolist()
    parts = []
    sizes = []
    for group in groups:
        size = 0
        for index, column in group:
            rows = columns[index].starts.shape[1]
            at = first[index] + column * rows
            parts.append(rank[at : at + rows])
            size += rows
        sizes.append(size)
    # One take for all groups, sliced per group.
    taken = np.concatenate(parts)
    nulls = taken < 0
    values = interleaved.take(pa.array(taken, mask=nulls if nulls.any() else None))
    out = []
    offset = 0
    for size in sizes:
        out.append(values.slice(offset, size))
        offset += size
    return out


def _interleaved(block: MessageBlock, starts: Int64Array, lengths: Int64Array) -> pa.Array:
    """A binary array over the block's buffer whose even elements are the
    values at ``starts``/``lengths`` (increasing), the odd ones the gaps."""
    count = len(starts)
    if count == 0:
        return pa.array([], pa.binary())
    offsets = np.empty(2 * count + 1, dtype=np.int64)
    offsets[0 : 2 * count : 2] = starts
    offsets[1 : 2 * count : 2] = starts + lengths
    offsets[2 * count] = offsets[2 * count - 1]
    large = bool(offsets[-1] > _INT32_LIMIT)
    return pa.Array.from_buffers(
        pa.large_binary() if large else pa.binary(),
        2 * count,
        [None, pa.py_buffer(offsets.astype(np.int64 if large else np.int32)), block.buffer],
    )

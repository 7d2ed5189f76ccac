"""Binary COPY rows into Arrow with vectorized code (numpy gathers, Arrow takes).

Why binary: for the usual column types (integers, floats, bool, date,
timestamps, text) PostgreSQL sends binary forms for a fraction of the
CPU its text output functions cost (``timestamptz_out`` above all), and the
client needs no CSV tokenizing: every field is length-prefixed. Measured on
1M rows of int8, numeric(18,2), text, timestamptz, bool: server 0.55-0.63
CPU-s instead of 0.85-1.0 for CSV; client decoding ~0.1 s instead of ~0.65
(CSV parse 0.47 + conversion 0.18).

Only built-in types whose binary form is simple and whose values come out
exactly as the stream's text conversion gives them are decoded from binary
(:data:`BINARY_TYPE_OIDS`); ``numeric`` is selected as ``col::text`` (an
I/O conversion, i.e. ``numeric_out``, the text the stream sees) and goes
through the text converter. A table with any other column type (domains
included) is copied as CSV (:mod:`.snapshot_copy`).

How a block is decoded: the receive loop records where each row (one
CopyData message) starts. For each column in turn, the field lengths of all
rows are gathered at once (int32 big-endian at the current positions), and
the positions move past the fields. Fixed-width values are gathered the same
way; strings become one Arrow binary array whose values alternate between
the wanted strings and the bytes between them, from which every other value
is taken (C++, no per-row Python).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from headrace.errors import SourceError
from headrace.source.changes import Column, TableSchema
from headrace.source.postgres.convert_issues import note_issue
from headrace.source.postgres.pgtypes import DATE_INFINITY, TIMESTAMP_INFINITY
from headrace.source.postgres.types import TypeRegistry, text_column_to_arrow

# The 11-byte signature, then flags (int32) and the header extension length (int32).
BINARY_SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00"
_HEADER_FIXED: Final = len(BINARY_SIGNATURE) + 8
# The trailer message: a field count of -1.
BINARY_TRAILER: Final = b"\xff\xff"

_DAYS_1970_TO_2000: Final = 10957
_PG_EPOCH_US: Final = 946_684_800_000_000
_INT64_MAX: Final = np.iinfo(np.int64).max
_INT64_MIN: Final = np.iinfo(np.int64).min
_INT32_MAX: Final = np.iinfo(np.int32).max
_INT32_MIN: Final = np.iinfo(np.int32).min

_BOOL, _INT2, _INT4, _INT8 = 16, 21, 23, 20
_FLOAT4, _FLOAT8 = 700, 701
_DATE, _TIMESTAMP, _TIMESTAMPTZ = 1082, 1114, 1184
_TEXT, _VARCHAR, _BPCHAR = 25, 1043, 1042
NUMERIC_OID: Final = 1700

# Binary form -> numpy dtype of the value as sent (big-endian).
_FIXED: Final[dict[int, np.dtype[Any]]] = {
    _BOOL: np.dtype("u1"),
    _INT2: np.dtype(">i2"),
    _INT4: np.dtype(">i4"),
    _INT8: np.dtype(">i8"),
    _FLOAT4: np.dtype(">f4"),
    _FLOAT8: np.dtype(">f8"),
    _DATE: np.dtype(">i4"),
    _TIMESTAMP: np.dtype(">i8"),
    _TIMESTAMPTZ: np.dtype(">i8"),
}
_STRINGS: Final = frozenset({_TEXT, _VARCHAR, _BPCHAR})
BINARY_TYPE_OIDS: Final = frozenset(_FIXED) | _STRINGS
"""Built-in types decoded from their binary form (domains are not: their
text form may differ by their base type's rules, so they go through CSV)."""

_OUTSIDE: Final = "value outside the Arrow type's range"

# Padding after the data, so gathering a fixed-width value at a NULL field's
# position (whose bytes belong to the next field) never reads past the end.
PADDING: Final = 16


@dataclass(frozen=True)
class BinaryBlock:
    """Whole rows of a binary COPY (no header, no trailer), each row's start offset,
    and :data:`PADDING` zero bytes after the last row (not part of ``size``)."""

    data: bytearray
    size: int
    starts: npt.NDArray[np.int64]

    @property
    def rows(self) -> int:
        return len(self.starts)


def binary_copyable(schema: TableSchema) -> bool:
    """Whether every column can be copied in binary (else the table is copied as CSV)."""
    return bool(schema.columns) and all(
        c.type_oid in BINARY_TYPE_OIDS or c.type_oid == NUMERIC_OID for c in schema.columns
    )


def text_cast_columns(schema: TableSchema) -> frozenset[str]:
    """Columns selected as ``col::text`` in a binary COPY (their text form is decoded)."""
    return frozenset(c.name for c in schema.columns if c.type_oid not in BINARY_TYPE_OIDS)


def header_length(first_message: bytes) -> int:
    """Bytes of the binary COPY header at the start of the first message."""
    if (
        len(first_message) < _HEADER_FIXED
        or first_message[: len(BINARY_SIGNATURE)] != BINARY_SIGNATURE
    ):
        raise SourceError(
            "the binary COPY output does not start with its signature",
            "this is a bug in headrace; report it with the server version",
        )
    extension = int.from_bytes(first_message[_HEADER_FIXED - 4 : _HEADER_FIXED], "big")
    return _HEADER_FIXED + extension


def binary_block_to_arrow(
    block: BinaryBlock, schema: TableSchema, registry: TypeRegistry
) -> pa.Table:
    """Decode a block of binary COPY rows into a table of ``schema.arrow_schema()``."""
    buffer = np.frombuffer(block.data, dtype=np.uint8)
    starts = block.starts
    ends = np.append(starts[1:], block.size)
    n = len(starts)
    counts = _gather(buffer, starts, np.dtype(">i2"))
    if n and not np.all(counts == len(schema.columns)):
        raise _malformed(schema, "a row has another number of fields than the table has columns")
    data = pa.py_buffer(block.data)
    position = starts + 2
    arrays: list[pa.Array] = []
    for column in schema.columns:
        lengths = _gather(buffer, position, np.dtype(">i4")).astype(np.int64)
        values_at = position + 4
        valid = lengths >= 0
        sizes = np.where(valid, lengths, 0)
        position = values_at + sizes
        if np.any(position > ends):
            raise _malformed(schema, f"a value of column {column.name} runs past its row")
        arrays.append(
            _column(
                buffer,
                data,
                column,
                values_at=values_at,
                sizes=sizes,
                valid=valid,
                registry=registry,
                schema=schema,
            )
        )
    if n and not np.array_equal(position, ends):
        raise _malformed(schema, "a row holds more bytes than its fields")
    return pa.Table.from_arrays(arrays, schema=schema.arrow_schema())


def _column(
    buffer: npt.NDArray[np.uint8],
    data: pa.Buffer,
    column: Column,
    *,
    values_at: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    valid: npt.NDArray[np.bool_],
    registry: TypeRegistry,
    schema: TableSchema,
) -> pa.Array:
    """One column: the fields at ``values_at``, ``sizes`` bytes each, NULL where not ``valid``."""
    mask = None if valid.all() else ~valid
    dtype = _FIXED.get(column.type_oid)
    if dtype is None:
        strings = _strings(data, values_at, sizes, mask)
        if column.type_oid in _STRINGS:
            return strings
        # numeric, selected as text: the stream's own text conversion.
        return text_column_to_arrow(strings, column.arrow_type, registry=registry, column=column)
    if np.any(sizes[valid] != dtype.itemsize):
        raise _malformed(schema, f"a value of column {column.name} has the wrong width")
    values = _gather(buffer, values_at, dtype)
    oid = column.type_oid
    if oid == _BOOL:
        return pa.array(values != 0, type=pa.bool_(), mask=mask)
    if oid in (_TIMESTAMP, _TIMESTAMPTZ):
        stamps, outside = _shift(values.astype(np.int64), _PG_EPOCH_US, TIMESTAMP_INFINITY)
        if outside is not None:
            # As the text conversion does: NULL, counted and logged once.
            count = int(outside.sum())
            type_name = registry.lookup(column.type_oid).name
            note_issue(type_name, _OUTSIDE, count)
            mask = outside if mask is None else mask | outside
        return pa.array(stamps, type=pa.int64(), mask=mask).view(column.arrow_type)
    if oid == _DATE:
        days, _ = _shift(values.astype(np.int64), _DAYS_1970_TO_2000, DATE_INFINITY)
        return pa.array(days.astype(np.int32), type=pa.int32(), mask=mask).view(column.arrow_type)
    native = values.astype(dtype.newbyteorder("="))
    return pa.array(native, type=column.arrow_type, mask=mask)


def _gather(
    buffer: npt.NDArray[np.uint8], at: npt.NDArray[np.int64], dtype: np.dtype[Any]
) -> npt.NDArray[Any]:
    """The ``dtype`` value starting at each offset of ``at`` (as sent, big-endian).

    Through an overlapping view whose element ``i`` is the value starting at
    byte ``i`` (stride 1): one gather of ``len(at)`` elements.
    """
    every_offset: npt.NDArray[Any] = np.ndarray(
        shape=(len(buffer) - dtype.itemsize + 1,), dtype=dtype, buffer=buffer, strides=(1,)
    )
    return every_offset[at]


def _strings(
    data: pa.Buffer,
    values_at: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    mask: npt.NDArray[np.bool_] | None,
) -> pa.Array:
    """A string array of each row's value bytes (NULL where ``mask``).

    The offsets alternate value start, value end, next value start...: an
    array over the whole buffer whose even values are the wanted ones and odd
    values the bytes between them; the even ones are taken out. The bytes are
    not checked for UTF-8 here: the server sends text in the connection's
    client encoding, UTF-8, having checked it on input.
    """
    n = len(values_at)
    if n == 0:
        return pa.array([], type=pa.string())
    bounds = np.empty(2 * n, dtype=np.int64)
    bounds[0::2] = values_at
    bounds[1::2] = values_at + sizes
    wide = bool(bounds[-1] >= _INT32_MAX)
    offsets = bounds if wide else bounds.astype(np.int32)
    spans = pa.Array.from_buffers(
        pa.large_string() if wide else pa.string(),
        2 * n - 1,
        [None, pa.py_buffer(offsets), data],
    )
    taken = spans.take(pa.array(np.arange(0, 2 * n, 2, dtype=np.int64)))
    if wide:
        taken = taken.cast(pa.string())
    if mask is None:
        return taken
    validity = pa.array(~mask, type=pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), n, [validity, *taken.buffers()[1:]])


def _shift(
    values: npt.NDArray[np.int64], shift: int, infinity: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_] | None]:
    """PostgreSQL-epoch values moved to the Unix epoch, infinities kept as
    ``±infinity``; plus which values fall outside int64 once moved (NULL, as
    the text conversion makes them), None when none does."""
    sent_max, sent_min = (
        (_INT64_MAX, _INT64_MIN) if infinity == TIMESTAMP_INFINITY else (_INT32_MAX, _INT32_MIN)
    )
    positive = values == sent_max
    negative = values == sent_min
    outside = ~positive & (values > _INT64_MAX - shift)
    shifted = np.where(positive | negative | outside, 0, values) + shift
    shifted[positive] = infinity
    shifted[negative] = -infinity
    return shifted, (outside if outside.any() else None)


def _malformed(schema: TableSchema, what: str) -> SourceError:
    return SourceError(
        f"binary COPY of {schema.table}: {what}",
        "this is a bug in headrace; report it with the table's definition and server version",
    )

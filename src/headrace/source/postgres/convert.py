"""Columnar conversion of PostgreSQL values (text or binary form) into Arrow.

Used by both the change stream (pgoutput tuple values) and the snapshot
(COPY text), so both give identical values. A whole column is converted at
once with Arrow compute casts wherever they are exact; Python runs only where
Arrow cannot parse PostgreSQL's text (intervals, arrays, BC or far-future
dates, infinities, unusual zone offsets).

The text forms must be those of a session with these settings (the source's
connections set them): ``DateStyle=ISO``, ``TimeZone=UTC`` (other zones are
still converted correctly, only slower), ``IntervalStyle=postgres``,
``bytea_output=hex`` (``escape`` works, slower), ``extra_float_digits>=1``
(PostgreSQL >= 12 then prints floats exactly), ``client_encoding=UTF8``.

Representations (:func:`headrace.source.postgres.types.arrow_type_for` gives
the Arrow types):

- ``±infinity`` dates and timestamps become the DuckDB sentinels: date32
  ``±2147483647`` days, timestamp ``±9223372036854775807`` microseconds (DuckDB
  reads them back as ``infinity``). Their ``to_pylist()`` raises, as psycopg does.
- ``24:00:00`` (a valid ``time``) is kept as 86400000000 microseconds.
- A numeric column with a declared precision holding ``NaN`` (or a value that
  does not fit, which PostgreSQL prevents) becomes NULL; each such value is
  counted in :data:`conversion_issues` and logged once per type and issue.
  Unconstrained ``numeric`` keeps the exact text (``NaN``, ``Infinity`` too).
- A value that does not parse at all (which a correctly configured session
  never sends) becomes NULL, counted and logged the same way: one bad value
  must not stop the stream.
- Multi-dimensional arrays are flattened in row-major order into the
  ``list<element>`` (counted and logged); explicit lower bounds are dropped.

The parts apart: counting lossy conversions in :mod:`.convert_issues`, the
per-value text parsers in :mod:`.convert_text`, ``bytea`` in
:mod:`.convert_bytea` and binary send forms in :mod:`.convert_binary`.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

from headrace.source.postgres.arrays import ArraySyntaxError, parse_array
from headrace.source.postgres.convert_binary import binary_column_to_arrow
from headrace.source.postgres.convert_bytea import bytea_column
from headrace.source.postgres.convert_issues import note_issue, note_kept
from headrace.source.postgres.convert_text import (
    TIME_RE,
    parse_date,
    parse_interval,
    parse_number,
    parse_timestamp,
    texts,
    time_micros,
    utf8,
)
from headrace.source.postgres.pgtypes import DATE_INFINITY, TIMESTAMP_INFINITY, PgType, TypeKind

__all__ = [
    "DATE_INFINITY",
    "TIMESTAMP_INFINITY",
    "convert_column",
]

_NANOS_LIMIT: Final = 2**63 - 1

_STRING_KINDS: Final = frozenset(
    {
        TypeKind.TEXT,
        TypeKind.UUID,
        TypeKind.JSON,
        TypeKind.ENUM,
        TypeKind.TEXTUAL,
        TypeKind.COMPOSITE,
        TypeKind.UNKNOWN,
    }
)


def convert_column(
    values: pa.Array, arrow_type: pa.DataType, pg_type: PgType, *, binary: bool = False
) -> pa.Array:
    """Convert one column of raw PostgreSQL values into ``arrow_type``.

    ``values`` is a string or binary Arrow array holding each value's text form
    (or, with ``binary=True``, its binary send form), NULL for SQL NULL. A
    ``ChunkedArray`` is converted chunk by chunk.
    """
    if isinstance(values, pa.ChunkedArray):
        chunks = [convert_column(c, arrow_type, pg_type, binary=binary) for c in values.chunks]
        return pa.chunked_array(chunks, type=arrow_type)
    if values.type not in (pa.string(), pa.binary()):
        values = values.cast(pa.binary())
    if binary:
        return binary_column_to_arrow(values, arrow_type, pg_type)
    kind = pg_type.kind
    if kind in _STRING_KINDS or (kind is TypeKind.NUMERIC and pa.types.is_string(arrow_type)):
        return utf8(values, pg_type)
    return _TEXT_CONVERTERS[kind](values, arrow_type, pg_type)


def _numbers(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    return _vectorized_or_per_value(values, arrow_type, pg_type, parse_number)


# Made once: building even a tiny array or scalar from Python objects costs
# pyarrow a failed module lookup (~0.15 ms), more than converting a column.
_TRUE_TEXT: Final = pa.scalar(b"t")
_NUMERIC_SPECIALS: Final = pa.array([b"NaN", b"Infinity", b"-Infinity"])


def _bools(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    return pc.equal(values.view(pa.binary()), _TRUE_TEXT)


def _dates(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    return _vectorized_or_per_value(values, arrow_type, pg_type, parse_date)


def _timestamps(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    return _vectorized_or_per_value(values, arrow_type, pg_type, parse_timestamp)


def _vectorized_or_per_value(
    values: pa.Array,
    arrow_type: pa.DataType,
    pg_type: PgType,
    parse: Callable[[str, PgType], int | float | None],
) -> pa.Array:
    """Arrow's cast when it parses every value; else per value in Python."""
    try:
        return values.view(pa.string()).cast(arrow_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    storage = _storage_type(arrow_type)
    limit = _STORAGE_LIMITS.get(storage)
    parsed: list[int | float | None] = []
    bad = outside = 0
    for text in texts(values):
        if text is None:
            parsed.append(None)
            continue
        value = parse(text, pg_type)
        if value is None:
            bad += 1
        elif limit is not None and not -limit <= value <= limit:
            # PostgreSQL's latest timestamps (year 294276) lie past what
            # int64 microseconds since 1970 can hold.
            outside += 1
            value = None
        parsed.append(value)
    if bad:
        note_issue(pg_type.name, "value that does not parse", bad)
    if outside:
        note_issue(pg_type.name, "value outside the Arrow type's range", outside)
    return pa.array(parsed, type=storage).view(arrow_type)


_STORAGE_LIMITS: Final = {pa.int32(): 2**31 - 1, pa.int64(): 2**63 - 1}


def _storage_type(arrow_type: pa.DataType) -> pa.DataType:
    if pa.types.is_date32(arrow_type):
        return pa.int32()
    if pa.types.is_timestamp(arrow_type) or pa.types.is_time64(arrow_type):
        return pa.int64()
    return arrow_type


# ---------------------------------------------------------------- numeric


def _decimal(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    # The common case first: one cast (it fails on NaN and Infinity too).
    try:
        return values.view(pa.string()).cast(arrow_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    text = values.view(pa.binary())
    special = pc.is_in(text, _NUMERIC_SPECIALS)
    special_count = pc.sum(special).as_py() or 0
    if special_count:
        issue = "NaN or Infinity in a numeric column with a declared precision"
        note_issue(pg_type.name, issue, special_count)
        text = pc.if_else(special, pa.scalar(None, pa.binary()), text)
    try:
        return text.view(pa.string()).cast(arrow_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Some value does not fit (a domain or typmod we misread): per value.
    quantum = Decimal(1).scaleb(-arrow_type.scale)
    limit = Decimal(10) ** (arrow_type.precision - arrow_type.scale)
    parsed: list[Decimal | None] = []
    bad = 0
    for item in texts(text):
        if item is None:
            parsed.append(None)
            continue
        try:
            number = Decimal(item).quantize(quantum)
        except InvalidOperation:
            number = None
        if number is None or abs(number) >= limit:
            bad += 1
            parsed.append(None)
        else:
            parsed.append(number)
    if bad:
        note_issue(pg_type.name, "value outside the declared precision", bad)
    return pa.array(parsed, type=arrow_type)


# ---------------------------------------------------------------- dates and times


def _time(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    text = values.view(pa.binary())
    try:
        stamps = pc.binary_join_element_wise(pa.scalar(b"1970-01-01 "), text, b"")
        micros = stamps.view(pa.string()).cast(pa.timestamp("us")).view(pa.int64())
        return micros.view(pa.time64("us"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass

    def parse(item: str, pg_type: PgType) -> int | None:
        match = TIME_RE.fullmatch(item)
        return None if match is None else time_micros(match)

    return _vectorized_or_per_value(values, arrow_type, pg_type, parse)


def _interval(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    parsed: list[tuple[int, int, int] | None] = []
    bad = outside = 0
    for text in texts(values):
        if text is None:
            parsed.append(None)
            continue
        value = parse_interval(text)
        if value is None:
            bad += 1
        elif not -_NANOS_LIMIT <= value[2] <= _NANOS_LIMIT:
            # PostgreSQL keeps microseconds in an int64: past about 2.5
            # million hours they do not fit Arrow's int64 nanoseconds.
            outside += 1
            value = None
        parsed.append(value)
    if outside:
        note_issue(pg_type.name, "value outside the Arrow type's range", outside)
    if bad:
        note_issue(pg_type.name, "interval text not in IntervalStyle postgres", bad)
    return pa.array(parsed, type=pa.month_day_nano_interval())


# ---------------------------------------------------------------- arrays


def _array(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    element = pg_type.element
    if element is None:  # pragma: no cover - the registry always sets it
        raise TypeError(f"array type {pg_type.name} without an element type")
    element_type = arrow_type.value_type
    flat: list[str | None] = []
    offsets = [0]
    valid: list[bool] = []
    bad = 0
    nested = 0
    for text in texts(values):
        if text is None:
            valid.append(False)
            offsets.append(len(flat))
            continue
        try:
            parsed = parse_array(text, pg_type.delimiter)
        except ArraySyntaxError:
            bad += 1
            valid.append(False)
            offsets.append(len(flat))
            continue
        if parsed.dimensions > 1 or parsed.has_bounds:
            nested += 1
        flat.extend(parsed.elements)
        offsets.append(len(flat))
        valid.append(True)
    if bad:
        note_issue(pg_type.name, "array text that does not parse", bad)
    if nested:
        issue = "multi-dimensional or lower-bounded array flattened to a list"
        note_kept(pg_type.name, issue, nested)
    elements = convert_column(pa.array(flat, pa.string()), element_type, element)
    mask = None if all(valid) else pa.array([not v for v in valid], pa.bool_())
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), elements, type=arrow_type, mask=mask
    )


_TEXT_CONVERTERS: Final[dict[TypeKind, Callable[[pa.Array, pa.DataType, PgType], pa.Array]]] = {
    TypeKind.INT2: _numbers,
    TypeKind.INT4: _numbers,
    TypeKind.INT8: _numbers,
    TypeKind.FLOAT4: _numbers,
    TypeKind.FLOAT8: _numbers,
    TypeKind.NUMERIC: _decimal,
    TypeKind.BOOL: _bools,
    TypeKind.DATE: _dates,
    TypeKind.TIMESTAMP: _timestamps,
    TypeKind.TIMESTAMPTZ: _timestamps,
    TypeKind.TIME: _time,
    TypeKind.INTERVAL: _interval,
    TypeKind.BYTEA: bytea_column,
    TypeKind.ARRAY: _array,
}

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
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from headrace.errors import SourceError
from headrace.source.postgres.arrays import ArraySyntaxError, parse_array
from headrace.source.postgres.convert_binary import binary_column_to_arrow
from headrace.source.postgres.pgtypes import DATE_INFINITY, TIMESTAMP_INFINITY, PgType, TypeKind

__all__ = [
    "DATE_INFINITY",
    "TIMESTAMP_INFINITY",
    "conversion_issues",
    "convert_column",
    "note_issue",
    "parse_bytea",
    "parse_interval",
]

log = logging.getLogger(__name__)

conversion_issues: Counter[tuple[str, str]] = Counter()
"""Values converted lossily, by (type name, issue). Exported as a metric."""

_logged_issues: set[tuple[str, str]] = set()

_US_PER_DAY: Final = 86_400_000_000
_NANOS_LIMIT: Final = 2**63 - 1

_INTEGER_TYPES: Final = {
    TypeKind.INT2: pa.int16(),
    TypeKind.INT4: pa.int32(),
    TypeKind.INT8: pa.int64(),
}
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


_issues_lock = threading.Lock()
_not_counting = threading.local()


@contextlib.contextmanager
def conversions_not_counted() -> Iterator[None]:
    """Decode without counting lossy conversions (on this thread): for a consumer that
    decodes a batch's pieces again (the rules lane, the recorder), whose values the
    writer's decoding already counted."""
    _not_counting.on = True
    try:
        yield
    finally:
        _not_counting.on = False


def note_issue(type_name: str, issue: str, count: int = 1) -> None:
    """Count lossy conversions and log each (type, issue) pair once."""
    if getattr(_not_counting, "on", False):
        return
    key = (type_name, issue)
    with _issues_lock:  # the decoding runs on the source thread and the writer's
        conversion_issues[key] += count
        first = key not in _logged_issues
        _logged_issues.add(key)
    if first:
        log.warning("type %s: %s (stored as NULL; counted in conversion_issues)", *key)


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
        return _utf8(values, pg_type)
    return _TEXT_CONVERTERS[kind](values, arrow_type, pg_type)


def _numbers(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    return _vectorized_or_per_value(values, arrow_type, pg_type, _parse_number)


# Made once: building even a tiny array or scalar from Python objects costs
# pyarrow a failed module lookup (~0.15 ms), more than converting a column.
_TRUE_TEXT: Final = pa.scalar(b"t")
_NUMERIC_SPECIALS: Final = pa.array([b"NaN", b"Infinity", b"-Infinity"])


def _bools(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    return pc.equal(values.view(pa.binary()), _TRUE_TEXT)


def _dates(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    return _vectorized_or_per_value(values, arrow_type, pg_type, _parse_date)


def _timestamps(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    return _vectorized_or_per_value(values, arrow_type, pg_type, _parse_timestamp)


def _utf8(values: pa.Array, pg_type: PgType) -> pa.Array:
    if values.type == pa.string():
        return values
    try:
        # A view checked in full (which checks UTF-8) costs a fraction of a cast.
        text = values.view(pa.string())
        text.validate(full=True)
        return text
    except pa.ArrowInvalid as exc:
        raise SourceError(
            f"a {pg_type.name} value is not valid UTF-8: {exc}",
            "connect with client_encoding=UTF8 (headrace's connections do)",
        ) from exc


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
    for text in _texts(values):
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
        note_issue(pg_type.name, "value that does not parse")
        conversion_issues[(pg_type.name, "value that does not parse")] += bad - 1
    if outside:
        note_issue(pg_type.name, "value outside the Arrow type's range")
        conversion_issues[(pg_type.name, "value outside the Arrow type's range")] += outside - 1
    return pa.array(parsed, type=storage).view(arrow_type)


_STORAGE_LIMITS: Final = {pa.int32(): 2**31 - 1, pa.int64(): 2**63 - 1}


def _storage_type(arrow_type: pa.DataType) -> pa.DataType:
    if pa.types.is_date32(arrow_type):
        return pa.int32()
    if pa.types.is_timestamp(arrow_type) or pa.types.is_time64(arrow_type):
        return pa.int64()
    return arrow_type


def _texts(values: pa.Array) -> list[str | None]:
    return _utf8(values, PgType(0, "text", TypeKind.TEXT)).to_pylist()  # type: ignore[no-any-return]


_INT_LIMITS: Final = {
    TypeKind.INT2: 2**15,
    TypeKind.INT4: 2**31,
    TypeKind.INT8: 2**63,
}


def _parse_number(text: str, pg_type: PgType) -> int | float | None:
    try:
        if pg_type.kind in (TypeKind.FLOAT4, TypeKind.FLOAT8):
            return float(text)
        value = int(text)
    except ValueError:
        return None
    limit = _INT_LIMITS.get(pg_type.kind, 2**63)
    return value if -limit <= value < limit else None


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
        note_issue(pg_type.name, "NaN or Infinity in a numeric column with a declared precision")
        conversion_issues[
            (pg_type.name, "NaN or Infinity in a numeric column with a declared precision")
        ] += special_count - 1
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
    for item in _texts(text):
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
        note_issue(pg_type.name, "value outside the declared precision")
        conversion_issues[(pg_type.name, "value outside the declared precision")] += bad - 1
    return pa.array(parsed, type=arrow_type)


# ---------------------------------------------------------------- dates and times


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


_DATE_RE: Final = re.compile(r"(\d{4,})-(\d\d)-(\d\d)")
_TIME_RE: Final = re.compile(r"(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?")
_ZONE_RE: Final = re.compile(r"([+-])(\d\d)(?::?(\d\d))?(?::?(\d\d))?")


def _parse_date(text: str, pg_type: PgType) -> int | None:
    if text == "infinity":
        return DATE_INFINITY
    if text == "-infinity":
        return -DATE_INFINITY
    bc = text.endswith(" BC")
    body = text[:-3] if bc else text
    match = _DATE_RE.fullmatch(body)
    if match is None:
        return None
    year = int(match[1])
    return _days_from_civil(1 - year if bc else year, int(match[2]), int(match[3]))


def _time_micros(match: re.Match[str]) -> int:
    fraction = (match[4] or "").ljust(6, "0")
    seconds = int(match[1]) * 3600 + int(match[2]) * 60 + int(match[3])
    return seconds * 1_000_000 + int(fraction or 0)


def _parse_timestamp(text: str, pg_type: PgType) -> int | None:
    if text == "infinity":
        return TIMESTAMP_INFINITY
    if text == "-infinity":
        return -TIMESTAMP_INFINITY
    bc = text.endswith(" BC")
    body = text[:-3] if bc else text
    date_part, _, rest = body.partition(" ")
    day = _parse_date(date_part + (" BC" if bc else ""), pg_type)
    time_match = _TIME_RE.match(rest)
    if day is None or time_match is None:
        return None
    micros = day * _US_PER_DAY + _time_micros(time_match)
    zone_text = rest[time_match.end() :]
    if zone_text:
        zone = _ZONE_RE.fullmatch(zone_text)
        if zone is None:
            return None
        offset = int(zone[2]) * 3600 + int(zone[3] or 0) * 60 + int(zone[4] or 0)
        micros -= (offset if zone[1] == "+" else -offset) * 1_000_000
    return micros


def _time(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    text = values.view(pa.binary())
    try:
        stamps = pc.binary_join_element_wise(pa.scalar(b"1970-01-01 "), text, b"")
        micros = stamps.view(pa.string()).cast(pa.timestamp("us")).view(pa.int64())
        return micros.view(pa.time64("us"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass

    def parse(item: str, pg_type: PgType) -> int | None:
        match = _TIME_RE.fullmatch(item)
        return None if match is None else _time_micros(match)

    return _vectorized_or_per_value(values, arrow_type, pg_type, parse)


_INTERVAL_RE: Final = re.compile(
    r"(?:([+-]?\d+) years? ?)?(?:([+-]?\d+) mons? ?)?(?:([+-]?\d+) days? ?)?"
    r"(?:([+-])?(\d+):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?"
)


def parse_interval(text: str) -> tuple[int, int, int] | None:
    """``IntervalStyle=postgres`` text as (months, days, nanoseconds)."""
    match = _INTERVAL_RE.fullmatch(text)
    if match is None or not text:
        return None
    years, months, days, sign, hours, minutes, seconds, fraction = match.groups()
    total_months = int(years or 0) * 12 + int(months or 0)
    nanos = 0
    if hours is not None:
        micros = (int(hours) * 3600 + int(minutes) * 60 + int(seconds)) * 1_000_000
        micros += int((fraction or "").ljust(6, "0"))
        nanos = micros * 1000 * (-1 if sign == "-" else 1)
    return total_months, int(days or 0), nanos


def _interval(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    parsed: list[tuple[int, int, int] | None] = []
    bad = outside = 0
    for text in _texts(values):
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
        note_issue(pg_type.name, "value outside the Arrow type's range")
        conversion_issues[(pg_type.name, "value outside the Arrow type's range")] += outside - 1
    if bad:
        note_issue(pg_type.name, "interval text not in IntervalStyle postgres")
        conversion_issues[(pg_type.name, "interval text not in IntervalStyle postgres")] += bad - 1
    return pa.array(parsed, type=pa.month_day_nano_interval())


# ---------------------------------------------------------------- bytea

_HEX_VALUES: Final = np.full(256, 255, dtype=np.uint8)
for _digit, _char in enumerate(b"0123456789abcdef"):
    _HEX_VALUES[_char] = _digit
for _digit, _char in enumerate(b"ABCDEF", start=10):
    _HEX_VALUES[_char] = _digit


def _bytea(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    """``\\x0a1b`` hex text to bytes, vectorized over the whole column."""
    binary = values.view(pa.binary())
    count = len(binary)
    if count == 0:
        return pa.array([], pa.binary())
    offsets = np.frombuffer(binary.buffers()[1], dtype=np.int32)[
        binary.offset : binary.offset + count + 1
    ].astype(np.int64)
    data_buffer = binary.buffers()[2]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, np.uint8)
    )
    starts, ends = offsets[:-1], offsets[1:]
    lengths = ends - starts
    present = lengths > 0
    hex_form = bool(np.all(lengths[present] >= 2)) and bool(np.all(lengths[present] % 2 == 0))
    if hex_form and present.any():
        firsts = starts[present]
        hex_form = bool(np.all(data[firsts] == ord("\\")) and np.all(data[firsts + 1] == ord("x")))
    if not hex_form:
        return _bytea_per_value(values, pg_type)
    keep = np.ones(int(offsets[-1] - offsets[0]), dtype=bool)
    keep[starts[present] - offsets[0]] = False
    keep[starts[present] - offsets[0] + 1] = False
    digits = _HEX_VALUES[data[offsets[0] : offsets[-1]][keep]]
    if digits.size and digits.max() == 255:
        return _bytea_per_value(values, pg_type)
    decoded = (digits[0::2] << 4) | digits[1::2]
    new_lengths = np.where(present, (lengths - 2) // 2, 0)
    new_offsets = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(new_lengths, out=new_offsets[1:])
    validity = binary.buffers()[0]
    if binary.offset and validity is not None:
        validity = _validity_bitmap(binary)
    return pa.Array.from_buffers(
        pa.binary(),
        count,
        [validity, pa.py_buffer(new_offsets), pa.py_buffer(decoded.astype(np.uint8))],
        null_count=binary.null_count,
    )


def _validity_bitmap(array: pa.Array) -> pa.Buffer:
    valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def _bytea_per_value(values: pa.Array, pg_type: PgType) -> pa.Array:
    out: list[bytes | None] = []
    bad = 0
    for text in _texts(values):
        if text is None:
            out.append(None)
            continue
        value = parse_bytea(text)
        if value is None:
            bad += 1
        out.append(value)
    if bad:
        note_issue(pg_type.name, "bytea text that does not parse")
        conversion_issues[(pg_type.name, "bytea text that does not parse")] += bad - 1
    return pa.array(out, type=pa.binary())


def parse_bytea(text: str) -> bytes | None:
    """One bytea value in ``hex`` or ``escape`` output form."""
    if text.startswith("\\x"):
        try:
            return bytes.fromhex(text[2:])
        except ValueError:
            return None
    out = bytearray()
    position = 0
    while position < len(text):
        char = text[position]
        if char != "\\":
            out.extend(char.encode("latin-1", errors="strict"))
            position += 1
        elif text[position + 1 : position + 2] == "\\":
            out.append(0x5C)
            position += 2
        else:
            octal = text[position + 1 : position + 4]
            if len(octal) != 3 or not all(c in "01234567" for c in octal):
                return None
            out.append(int(octal, 8))
            position += 4
    return bytes(out)


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
    for text in _texts(values):
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
        note_issue(pg_type.name, "array text that does not parse")
        conversion_issues[(pg_type.name, "array text that does not parse")] += bad - 1
    if nested:
        issue = "multi-dimensional or lower-bounded array flattened to a list"
        _note_kept(pg_type.name, issue, nested)
    elements = convert_column(pa.array(flat, pa.string()), element_type, element)
    mask = None if all(valid) else pa.array([not v for v in valid], pa.bool_())
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), elements, type=arrow_type, mask=mask
    )


def _note_kept(type_name: str, issue: str, count: int) -> None:
    key = (type_name, issue)
    conversion_issues[key] += count
    if key not in _logged_issues:
        _logged_issues.add(key)
        log.warning("type %s: %s", *key)


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
    TypeKind.BYTEA: _bytea,
    TypeKind.ARRAY: _array,
}

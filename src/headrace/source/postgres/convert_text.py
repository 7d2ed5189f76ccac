"""PostgreSQL text forms read in Python, for what Arrow's casts cannot parse.

A column's values as Python strings (checked to be UTF-8), and the per-value
parsers of numbers, dates, timestamps, times and intervals that
:mod:`.convert` falls back on when a whole-column cast fails (BC or
far-future dates, infinities, unusual zone offsets, intervals). Apart from
:mod:`.convert` because they are plain text parsing, with no Arrow in them
beyond reading the column.
"""

from __future__ import annotations

import re
from typing import Final

import pyarrow as pa

from headrace.errors import SourceError
from headrace.source.postgres.pgtypes import DATE_INFINITY, TIMESTAMP_INFINITY, PgType, TypeKind

_US_PER_DAY: Final = 86_400_000_000


def utf8(values: pa.Array, pg_type: PgType) -> pa.Array:
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


def texts(values: pa.Array) -> list[str | None]:
    return utf8(values, PgType(0, "text", TypeKind.TEXT)).to_pylist()  # type: ignore[no-any-return]


_INT_LIMITS: Final = {
    TypeKind.INT2: 2**15,
    TypeKind.INT4: 2**31,
    TypeKind.INT8: 2**63,
}


def parse_number(text: str, pg_type: PgType) -> int | float | None:
    try:
        if pg_type.kind in (TypeKind.FLOAT4, TypeKind.FLOAT8):
            return float(text)
        value = int(text)
    except ValueError:
        return None
    limit = _INT_LIMITS.get(pg_type.kind, 2**63)
    return value if -limit <= value < limit else None


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


_DATE_RE: Final = re.compile(r"(\d{4,})-(\d\d)-(\d\d)")
TIME_RE: Final = re.compile(r"(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?")
_ZONE_RE: Final = re.compile(r"([+-])(\d\d)(?::?(\d\d))?(?::?(\d\d))?")


def parse_date(text: str, pg_type: PgType) -> int | None:
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


def time_micros(match: re.Match[str]) -> int:
    fraction = (match[4] or "").ljust(6, "0")
    seconds = int(match[1]) * 3600 + int(match[2]) * 60 + int(match[3])
    return seconds * 1_000_000 + int(fraction or 0)


def parse_timestamp(text: str, pg_type: PgType) -> int | None:
    if text == "infinity":
        return TIMESTAMP_INFINITY
    if text == "-infinity":
        return -TIMESTAMP_INFINITY
    bc = text.endswith(" BC")
    body = text[:-3] if bc else text
    date_part, _, rest = body.partition(" ")
    day = parse_date(date_part + (" BC" if bc else ""), pg_type)
    time_match = TIME_RE.match(rest)
    if day is None or time_match is None:
        return None
    micros = day * _US_PER_DAY + time_micros(time_match)
    zone_text = rest[time_match.end() :]
    if zone_text:
        zone = _ZONE_RE.fullmatch(zone_text)
        if zone is None:
            return None
        offset = int(zone[2]) * 3600 + int(zone[3] or 0) * 60 + int(zone[4] or 0)
        micros -= (offset if zone[1] == "+" else -offset) * 1_000_000
    return micros


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

"""The generator's time unit: integer microseconds since the Unix epoch (UTC).

Integers keep simulated time exact and cheap; rows get real timestamps only
when they are written.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SECOND_US = 1_000_000
DAY_US = 86_400 * SECOND_US


def to_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch."""
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * SECOND_US + delta.microseconds


def from_us(micros: int) -> datetime:
    """The inverse of :func:`to_us` (a UTC datetime)."""
    return EPOCH + timedelta(microseconds=micros)


def timestamp_array(micros: object) -> pa.Array:
    """Microsecond integers (a list or numpy array) as an Arrow ``timestamp[us, UTC]`` column."""
    return pa.array(micros, pa.int64()).cast(pa.timestamp("us", tz="UTC"))

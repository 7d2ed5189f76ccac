"""Durations as users write them in ``headrace.yaml``: ``30s``, ``5m``, ``1h``, ``1d``, ``2w``."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PATTERN = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
ALLOWED = "a whole number followed by a unit: s, m, h, d or w (e.g. 30s, 5m, 1h, 1d, 2w)"


def parse_duration(value: object) -> timedelta:
    """Parse ``"5m"`` (or a :class:`timedelta`) into a timedelta; a bare number has no unit.

    >>> parse_duration("5m")
    datetime.timedelta(seconds=300)
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            return timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])
    raise ValueError(f"not a duration: {value!r}; write {ALLOWED}")


def format_duration(value: timedelta) -> str:
    """The shortest spelling of ``value`` in the largest unit that divides it.

    >>> format_duration(timedelta(hours=2))
    '2h'
    >>> format_duration(timedelta(minutes=90))
    '90m'
    """
    seconds = int(value.total_seconds())
    for unit in ("d", "h", "m"):
        if seconds and seconds % UNITS[unit] == 0:
            return f"{seconds // UNITS[unit]}{unit}"
    return f"{seconds}s"


def whole_seconds(value: timedelta) -> int:
    """``value`` in seconds; callers check it is whole."""
    return int(value.total_seconds())


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^\d+[smhdw]$"}),
]
"""A pydantic field type: accepts ``"5m"``, dumps back to ``"5m"``."""

"""DuckDB's number semantics the SQL rules' alerts show, in Python, for the lane's alerts.

The lane must write the same numbers and summary text as the SQL rules, and three of
DuckDB's behaviours differ from Python's (measured against DuckDB 2.0.1 on ~10^5 values,
tests/rules/test_lane_amount_spike.py and the other lane tests):

- ``round(DOUBLE, n)`` rounds the double's exact binary value half away from zero
  (``round(0.15, 1)`` is 0.1: 0.15 is 0.1499...), not ``std::round(x * 10^n) / 10^n``
  (0.2) nor Python's half-to-even ``round``;
- ``format('{}', x)`` prints a DECIMAL or a DOUBLE through a DOUBLE, shortest round trip
  (``800.00`` prints ``800.0``), integers as they are;
- a config float pasted into SQL (``{value}``) is a DECIMAL literal unless written with
  an exponent (then a DOUBLE): comparisons with it are exact decimal ones.
"""

from __future__ import annotations

import decimal
import math
from decimal import Decimal

_ROUNDING = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_UP)
"""Enough digits for the exact decimal value of any double below 2^53; ties away from 0."""


def duck_round(value: float, places: int = 0) -> float:
    """DuckDB's ``round(DOUBLE, places)`` for ``places >= 0`` (module docstring): from
    ``|value * 10^places| >= 2^52`` on, ``(value * 10^places) / 10^places`` (every double
    there is an integer: the rounding step does nothing)."""
    if not math.isfinite(value):
        return value
    modifier = 10.0**places
    scaled = value * modifier
    if abs(scaled) >= 2.0**52:
        rounded = scaled / modifier
        return rounded if math.isfinite(rounded) else value
    return float(Decimal(value).quantize(Decimal(1).scaleb(-places), context=_ROUNDING))


def duck_text(value: object) -> str:
    """``format('{}', value)`` of a number (module docstring)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal | float):
        return repr(float(value))
    return str(value)


def sql_literal(value: float) -> Decimal | float:
    """A config float as DuckDB reads it pasted into the SQL rule: a DECIMAL, or a DOUBLE
    when its text has an exponent (or is not finite)."""
    text = str(value)
    return float(text) if "e" in text or "n" in text else Decimal(text)

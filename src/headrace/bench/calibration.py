"""How fast this machine runs today, as one figure printed beside a benchmark's own.

The development machine is a shared virtual machine whose speed varies by day and by
hour (up to a factor 2); a live figure from one day compares with another day's only
when the machines ran at the same speed. A fixed piece of pure-Python work, timed
before the load starts, says which it was.
"""

from __future__ import annotations

import time

LOOP_ADDITIONS = 10_000_000


def python_loop_seconds(additions: int = LOOP_ADDITIONS) -> float:
    """Seconds one core takes for ``additions`` integer additions in a Python loop."""
    started = time.perf_counter()
    total = 0
    for number in range(additions):
        total += number
    return round(time.perf_counter() - started, 3)

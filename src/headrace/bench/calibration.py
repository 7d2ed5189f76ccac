"""How fast this machine runs today, and how its kernel shares the cores, printed beside a
benchmark's own figures.

The development machine is a shared virtual machine whose speed varies by day and by
hour (up to a factor 2); a live figure from one day compares with another day's only
when the machines ran at the same speed. A fixed piece of pure-Python work, timed
before the load starts, says which it was.

How the kernel shares the cores between PostgreSQL and headrace matters as much
(docs/latency.md, thirty-third session): with autogroup scheduling on, each
PostgreSQL backend is a scheduling group of its own (the postmaster starts them with
``setsid``) while all of headrace's threads share one, and headrace gets about a
third of two cores at 100,000 changes/s; with it off, about 0.4 of them.
"""

from __future__ import annotations

import time
from pathlib import Path

LOOP_ADDITIONS = 10_000_000
AUTOGROUP_SETTING = Path("/proc/sys/kernel/sched_autogroup_enabled")


def python_loop_seconds(additions: int = LOOP_ADDITIONS) -> float:
    """Seconds one core takes for ``additions`` integer additions in a Python loop."""
    started = time.perf_counter()
    total = 0
    for number in range(additions):
        total += number
    return round(time.perf_counter() - started, 3)


def autogroup_enabled(setting: Path = AUTOGROUP_SETTING) -> bool | None:
    """Whether the kernel shares the cores between sessions first (autogroup), or None
    where it cannot tell (not Linux, or a kernel built without it)."""
    try:
        return setting.read_text().strip() != "0"
    except OSError:
        return None


def describe_scheduling(autogroup: bool | None) -> str:
    """One line on how the kernel shares the cores, for the benchmark's output."""
    if autogroup is None:
        return "scheduling: the kernel's autogroup setting is not readable here"
    if not autogroup:
        return "scheduling: autogroup off (the kernel shares the cores between threads)"
    return (
        "scheduling: autogroup on: each PostgreSQL backend is a scheduling group of its "
        "own, all of headrace's threads share one"
    )

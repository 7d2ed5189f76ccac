"""Test-only fault hooks: kill the run loop at an exact point, as ``kill -9`` would.

**For crash tests only.** Set ``HEADRACE_FAULT`` to ``POINT:N`` (several
separated by commas) and the process sends itself SIGKILL the N-th time it
reaches POINT (counted from 1 in that process). ``POINT:N:hold`` instead holds
the process there until it is asked to stop (SIGINT/SIGTERM) or
:data:`HOLD_LIMIT_S` pass, so a test can signal it at that exact point; only
points reached with the stop event (``snapshot_chunk``) can hold. Points:

``snapshot_chunk``
    a snapshot chunk was handed to the store, inside the snapshot's
    still-open transaction (mid-snapshot);
``after_snapshot``
    the snapshot is committed, streaming has not started;
``before_apply``
    a batch was received, nothing of it stored;
``during_apply``
    a few milliseconds into applying a batch (inside its store transaction);
``between_pieces``
    a piece of a batch in pieces (a huge transaction) was applied (the last
    one too), inside the batch's still-open store transaction;
``after_commit``
    a batch is committed in the store, the slot is not yet confirmed;
``after_confirm``
    the slot was just confirmed.

Unset (the normal case), every hook is a no-op costing one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading

from headrace.errors import ConfigError

ENVIRONMENT_VARIABLE = "HEADRACE_FAULT"
POINTS = frozenset(
    {
        "snapshot_chunk",
        "after_snapshot",
        "before_apply",
        "during_apply",
        "between_pieces",
        "after_commit",
        "after_confirm",
    }
)
DURING_APPLY_DELAY_S = 0.003
HOLD_LIMIT_S = 120.0
ACTIONS = frozenset({"kill", "hold"})


def _parse(text: str) -> dict[str, tuple[int, str]]:
    faults: dict[str, tuple[int, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, rest = item.partition(":")
        count, _, action = rest.partition(":")
        action = action or "kill"
        if point not in POINTS or not count.isdigit() or int(count) < 1 or action not in ACTIONS:
            raise ConfigError(
                f"{ENVIRONMENT_VARIABLE}={text!r}: {item!r} is not POINT:N or POINT:N:hold",
                f"use one of {', '.join(sorted(POINTS))} with N >= 1, or unset it",
            )
        faults[point] = (int(count), action)
    return faults


class Faults:
    """The armed fault points of this process (from ``HEADRACE_FAULT``)."""

    def __init__(self, spec: str | None = None) -> None:
        text = os.environ.get(ENVIRONMENT_VARIABLE, "") if spec is None else spec
        self._armed = _parse(text)
        self._seen: dict[str, int] = {}

    @property
    def armed(self) -> bool:
        return bool(self._armed)

    def reached(self, point: str, stop: threading.Event | None = None) -> None:
        """Count a visit of ``point``; die (or hold until ``stop``) on the armed visit."""
        if not self._armed or point not in self._armed:
            return
        seen = self._seen.get(point, 0) + 1
        self._seen[point] = seen
        count, action = self._armed[point]
        if seen != count:
            return
        if action == "hold":
            if stop is None:
                raise ConfigError(
                    f"{ENVIRONMENT_VARIABLE}: {point} cannot hold", "hold only at snapshot_chunk"
                )
            stop.wait(HOLD_LIMIT_S)
        elif point == "during_apply":
            timer = threading.Timer(DURING_APPLY_DELAY_S, _die)
            timer.daemon = True
            timer.start()
        else:
            _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

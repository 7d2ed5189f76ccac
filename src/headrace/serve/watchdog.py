"""One thread that interrupts DuckDB queries running past their deadline.

A ``threading.Timer`` per tile query started (and joined the start of) a new OS
thread for every query: under load that was about a fifth of a view's compute
time. Here every read thread registers its cursor with a deadline before a
query and removes it after; the single watchdog thread sleeps until the
earliest deadline.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Protocol


class Interruptible(Protocol):
    """What the watchdog needs of a cursor."""

    def interrupt(self) -> None:
        """Stop the query running on this cursor."""


class Watchdog:
    """Interrupts guarded cursors whose deadline passed; one thread for all of them."""

    def __init__(self, name: str = "hr-watchdog") -> None:
        self._cond = threading.Condition()
        # token -> (deadline, cursor); a token is unique per guarded query, so an
        # interrupt can never reach the next query on the same cursor.
        self._guarded: dict[object, tuple[float, Interruptible]] = {}
        self._wake_at = float("inf")
        self._closed = False
        self._fired = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def fired(self) -> int:
        """How many queries were interrupted so far."""
        return self._fired

    @contextlib.contextmanager
    def guard(self, cursor: Interruptible, timeout_s: float) -> Iterator[None]:
        """Interrupt ``cursor`` if the block runs longer than ``timeout_s``."""
        token = object()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._guarded[token] = (deadline, cursor)
            if deadline < self._wake_at:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._guarded.pop(token, None)

    def close(self) -> None:
        """Stop the thread (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for token, (deadline, cursor) in list(self._guarded.items()):
                    if deadline <= now:
                        # Interrupting under the lock: the query's thread cannot
                        # unregister and start its next query in between.
                        del self._guarded[token]
                        self._fired += 1
                        cursor.interrupt()
                self._wake_at = min((d for d, _ in self._guarded.values()), default=float("inf"))
                wait = None if self._wake_at == float("inf") else max(0.0, self._wake_at - now)
                self._cond.wait(wait)

"""Tile results shared by every view computed on one store snapshot.

Views with different filters or ranges still run many identical tile queries:
a tile that does not accept a view's filter renders the same SQL as in the
unfiltered view, and views of the same relative range get the same bounds
(the live hub gives every computation of one store version the same "now").
Such a query runs once per snapshot; the other views take its result, and so
each view still shows one snapshot and one "as of".

A snapshot is named by the store version seen before the read transaction
began plus the position read inside it. A computation that saw the version
move while its transaction began does not share (it may straddle a commit).
One gap remains: a rebuild commits without moving the position, and between
its commit and its version bump (the writer publishes right after committing)
two computations could share across it; the next version recomputes both.

While one thread runs a query, another thread wanting the same result for
the same snapshot waits for it instead of running it too. A thread only
waits while it runs no query of its own, so threads never wait on each other
in a cycle; the wait is bounded, then the waiter runs the query itself.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

SnapshotKey = tuple[int, int | None, datetime | None]
"""(store version before the transaction began, position LSN, position commit time)."""

TileKey = tuple[str, tuple[tuple[str, Any], ...], str]
"""(rendered SQL, its parameters sorted by name, the mask policy's key)."""

TileResult = str
"""What a tile query produced: the JSON members ``"columns":[...],"rows":[...],"truncated":...``
(encoded once, spliced into every view that shows the tile)."""


class _Running:
    """A query being run for everyone: on which snapshot, and its waiters' Event."""

    __slots__ = ("done", "snapshot")

    def __init__(self, snapshot: SnapshotKey) -> None:
        self.snapshot = snapshot
        self.done: threading.Event | None = None


class SharedTiles:
    """Tile results of the newest snapshot each query ran on, and the queries running now."""

    def __init__(self, *, keep_s: float) -> None:
        # Results not used for keep_s are dropped (their views are gone).
        self._keep_s = keep_s
        self._lock = threading.Lock()
        self._results: dict[TileKey, tuple[SnapshotKey, TileResult, float]] = {}
        # Queries running now: their snapshot, and an Event made only once somebody
        # waits (most queries have no waiter; an Event is a Condition and two locks).
        self._running: dict[TileKey, _Running] = {}
        self._stored = 0

    def take(
        self, key: TileKey, snapshot: SnapshotKey, wait_s: float
    ) -> tuple[TileResult | None, bool]:
        """The result of ``key`` on ``snapshot`` if known (waiting up to ``wait_s`` for
        one being computed), else ``(None, claimed)``.

        ``claimed`` True means the caller now runs the query for everyone and must
        call :meth:`finish` (with the result, or None when it failed).
        """
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                stored = self._results.get(key)
                if stored is not None and stored[0] == snapshot:
                    self._results[key] = (snapshot, stored[1], time.monotonic())
                    return stored[1], False
                running = self._running.get(key)
                if running is None:
                    self._running[key] = _Running(snapshot)
                    return None, True
                if running.snapshot != snapshot:
                    # Someone computes it on another snapshot: no use waiting for that.
                    return None, False
                if running.done is None:
                    running.done = threading.Event()
                done = running.done
            left = deadline - time.monotonic()
            if left <= 0 or not done.wait(left):
                return None, False

    def finish(self, key: TileKey, snapshot: SnapshotKey, result: TileResult | None) -> None:
        """Publish the result of a claimed query (None: it failed) and wake its waiters."""
        now = time.monotonic()
        with self._lock:
            running = self._running.get(key)
            if running is not None and running.snapshot == snapshot:
                del self._running[key]
            else:
                running = None
            if result is not None:
                stored = self._results.get(key)
                # Never replace a newer snapshot's result with an older one.
                if stored is None or stored[0][0] <= snapshot[0]:
                    self._results[key] = (snapshot, result, now)
                    self._stored += 1
                    if self._stored % 256 == 0:
                        self._drop_unused(now)
            done = running.done if running is not None else None
        if done is not None:
            done.set()

    def _drop_unused(self, now: float) -> None:
        for key in [k for k, (_, _, used) in self._results.items() if now - used > self._keep_s]:
            del self._results[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._results)

"""Python's cyclic garbage collector, set for a long stream with a large heap in memory.

A streaming run holds a large, long-lived heap (the rules lane's per-key state, the
engine's caches, the snapshot's leftovers) and allocates many short-lived containers
per batch (decoded columns, rows). With CPython's defaults (a young collection every 700
allocations, a full one when the old generation grew by a quarter) the collector took
4.0 s of a 50 s `bench fraud --rate 2500` run, and each full collection stopped every
thread for 240 to 424 ms once streaming (traversing every entry of the lane's dicts): a
stop of the world longer than the fraud rules' latency target. So, once the start-up
heap is built (snapshot loaded, the lane seeded):

- :func:`gc.freeze` moves everything alive into the permanent generation, which no
  collection traverses again (the start-up heap is live state, not garbage);
- the young generation's threshold goes from 700 to :data:`YOUNG_THRESHOLD`, so that a
  batch's temporary containers are mostly freed by reference counting before any
  collection visits them.

Cyclic garbage is still collected (the thresholds are higher, not off). The settings
are the process's; :meth:`Collector.restore` puts the previous ones back when the run
ends (tests run the runner in their own process). :class:`Collector` also counts the
collections and their pauses for ``headrace status``.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

YOUNG_THRESHOLD = 50_000
"""Allocations (minus deallocations) of container objects between young collections."""
OLDER_THRESHOLDS = (20, 10)
"""Young collections per middle one, middle ones per full one (the default is 10, 10)."""


class Collector:
    """The run's collector settings and what the collector did since :meth:`settle`."""

    def __init__(self) -> None:
        self._previous = gc.get_threshold()
        self._lock = threading.Lock()
        self._started = 0.0
        self.collections = [0, 0, 0]
        """Collections per generation (young, middle, full) since :meth:`settle`."""
        self.pause_s = 0.0
        """Total time spent collecting (every thread stopped)."""
        self.longest_pause_s = 0.0
        self.frozen = 0
        """Objects moved to the permanent generation by :meth:`settle`."""
        self._settled = False

    def settle(self) -> Collector:
        """Freeze the start-up heap and raise the young threshold (module docstring)."""
        gc.collect()  # the start-up's own garbage first: frozen garbage would stay
        gc.freeze()
        self.frozen = gc.get_freeze_count()
        gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
        gc.callbacks.append(self._on_collection)
        self._settled = True
        return self

    def restore(self) -> None:
        """The previous thresholds back, the frozen heap collectable again."""
        if not self._settled:
            return
        self._settled = False
        gc.callbacks.remove(self._on_collection)
        gc.set_threshold(*self._previous)
        gc.unfreeze()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs on whichever thread triggered the collection, holding the GIL.
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        with self._lock:
            self.collections[int(info["generation"])] += 1
            self.pause_s += pause
            self.longest_pause_s = max(self.longest_pause_s, pause)

    def document(self) -> dict[str, Any]:
        """For the status file: collections per generation, pause total and longest."""
        with self._lock:
            return {
                "collections": list(self.collections),
                "pause_ms": round(self.pause_s * 1000, 1),
                "longest_pause_ms": round(self.longest_pause_s * 1000, 1),
                "frozen_objects": self.frozen,
                "young_threshold": YOUNG_THRESHOLD,
            }

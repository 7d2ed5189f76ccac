"""Python's cyclic garbage collector, set for a long stream with a large heap in memory.

A streaming run holds a large, long-lived heap (the rules lane's per-key state, the
engine's caches, what the start-up loaded) and allocates many short-lived containers
per batch (decoded columns, rows). A full collection traverses every tracked object and
every entry of every tracked container, so with CPython's defaults each one stopped
every thread for 240 to 424 ms once streaming in `bench fraud --rate 2500` (the
collector took 4.0 s of a 50 s run): longer than the fraud rules' latency target.

So once the start-up heap is built (snapshot loaded, the lane seeded) :func:`gc.freeze`
moves everything alive into the permanent generation, which no collection traverses
again: it is live state, not garbage (the start-up's own garbage is collected first).
After the freeze the old generation is small, so CPython's rule (a full collection once
it grew by a quarter) ran one every ~7 s at 2,500 transactions/s, 50 to 90 ms each
(they also collect the younger generations). :data:`FULL_EVERY` middle collections
between full ones instead of 10: none in a 30 s run, collection time 0.8 s against
1.3 s, longest pause 17 to 26 ms against 79 to 90 ms. The young threshold stays
CPython's: a larger one means fewer but longer pauses for the same total (replaying a
recording: 75 young collections of 0.24 ms median at 700, one of 21.5 ms at 50,000).
Objects created after the freeze are collected as usual, so a cycle that becomes
garbage is still freed (cyclic garbage in the old generation a little later); only what
was alive at the freeze stays. :meth:`Collector.restore` unfreezes and puts the
thresholds back when the run ends (tests run the runner in their own process).
:class:`Collector` also counts the collections and their pauses for ``headrace status``.
"""

from __future__ import annotations

import gc
import time
from typing import Any

FULL_EVERY = 100
"""Middle collections between two full ones while streaming (CPython's default: 10)."""


class Collector:
    """The run's collector settings and what the collector did since :meth:`settle`."""

    def __init__(self) -> None:
        self._thresholds = gc.get_threshold()
        self._started = 0.0
        self.collections = [0, 0, 0]
        """Collections per generation (young, middle, full) since :meth:`settle`."""
        self.pause_s = [0.0, 0.0, 0.0]
        """Time spent collecting per generation (every thread stopped)."""
        self.longest_pause_s = [0.0, 0.0, 0.0]
        self.frozen = 0
        """Objects moved to the permanent generation by :meth:`settle`."""
        self._settled = False

    def settle(self) -> Collector:
        """Freeze the start-up heap, full collections rarer (module docstring)."""
        gc.collect()  # the start-up's own garbage first: frozen garbage would stay
        gc.freeze()
        self.frozen = gc.get_freeze_count()
        young, middle, _ = self._thresholds
        gc.set_threshold(young, middle, FULL_EVERY)
        gc.callbacks.append(self._on_collection)
        self._settled = True
        return self

    def restore(self) -> None:
        """The frozen heap collectable again, the thresholds back; stop counting."""
        if not self._settled:
            return
        self._settled = False
        gc.callbacks.remove(self._on_collection)
        gc.set_threshold(*self._thresholds)
        gc.unfreeze()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs on whichever thread triggered the collection, holding the GIL.
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = int(info["generation"])
        self.collections[generation] += 1
        self.pause_s[generation] += pause
        self.longest_pause_s[generation] = max(self.longest_pause_s[generation], pause)

    def document(self) -> dict[str, Any]:
        """For the status file, per generation (young, middle, full): collections, their
        total and longest pause.

        No lock: the collector runs one collection at a time, so its callbacks never
        overlap, and a collection can start inside this very call (it allocates), its
        callback then running on this thread; with a lock held here, that callback would
        wait for it forever (a status thread hung so). The figures are copied first
        (``list()`` of a list is one step under the GIL), so each list is whole."""
        collections = list(self.collections)
        pause_s = list(self.pause_s)
        longest_pause_s = list(self.longest_pause_s)
        return {
            "collections": collections,
            "pause_ms": [round(s * 1000, 1) for s in pause_s],
            "longest_pause_ms": [round(s * 1000, 1) for s in longest_pause_s],
            "frozen_objects": self.frozen,
        }

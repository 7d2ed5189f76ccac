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
The thresholds stay CPython's: a larger young generation means fewer but longer pauses
for the same total (replaying a recording: 75 young collections of 0.24 ms median at
700, one of 21.5 ms at 50,000). Objects created later are collected as usual, so a
cycle that becomes garbage is still freed; only what was alive at the freeze stays.
:meth:`Collector.restore` unfreezes when the run ends (tests run the runner in their
own process). :class:`Collector` also counts the collections and their pauses for
``headrace status``.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any


class Collector:
    """The run's collector settings and what the collector did since :meth:`settle`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
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
        """Freeze the start-up heap (module docstring)."""
        gc.collect()  # the start-up's own garbage first: frozen garbage would stay
        gc.freeze()
        self.frozen = gc.get_freeze_count()
        gc.callbacks.append(self._on_collection)
        self._settled = True
        return self

    def restore(self) -> None:
        """The frozen heap collectable again; stop counting."""
        if not self._settled:
            return
        self._settled = False
        gc.callbacks.remove(self._on_collection)
        gc.unfreeze()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs on whichever thread triggered the collection, holding the GIL.
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = int(info["generation"])
        with self._lock:
            self.collections[generation] += 1
            self.pause_s[generation] += pause
            self.longest_pause_s[generation] = max(self.longest_pause_s[generation], pause)

    def document(self) -> dict[str, Any]:
        """For the status file, per generation (young, middle, full): collections, their
        total and longest pause."""
        with self._lock:
            return {
                "collections": list(self.collections),
                "pause_ms": [round(s * 1000, 1) for s in self.pause_s],
                "longest_pause_ms": [round(s * 1000, 1) for s in self.longest_pause_s],
                "frozen_objects": self.frozen,
            }

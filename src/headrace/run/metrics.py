"""What the run loop measures: freshness of every applied change, and rates.

Freshness of a change = the moment its batch became visible in the store
(after COMMIT) minus its transaction's commit time on PostgreSQL. It is
counted per change in a histogram with 2%-wide buckets (1 ms to 10 min),
so percentiles cost nothing to keep and can be compared between two moments
(:meth:`FreshnessHistogram.since`), e.g. over a benchmark's measured window.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from headrace.source.changes import COMMIT_TS, ChangeBatch, commit_micros

_RATIO = 1.02
EDGES_MS: tuple[float, ...] = tuple(
    round(_RATIO**i, 3) for i in range(int(math.log(600_000) / math.log(_RATIO)) + 2)
)
"""Upper edges of the freshness buckets in ms (the last bucket is open-ended)."""
_EDGES = np.array(EDGES_MS, dtype=np.float64)


class FreshnessHistogram:
    """Counts of changes per freshness bucket (cumulative since the start)."""

    def __init__(self, counts: Sequence[int] | None = None) -> None:
        self.counts: npt.NDArray[np.int64] = np.zeros(len(EDGES_MS) + 1, dtype=np.int64)
        if counts is not None:
            self.counts[: len(counts)] = np.asarray(counts, dtype=np.int64)[: len(self.counts)]

    def add_batch(self, batch: ChangeBatch, visible_at: float) -> None:
        """Count every change of ``batch``, visible since ``visible_at`` (UNIX seconds)."""
        visible_us = int(visible_at * 1_000_000)
        for table_changes in batch.tables:
            column = table_changes.data.column(COMMIT_TS)
            if not len(column):
                continue
            committed = commit_micros(column)
            self.add_ms((visible_us - committed) / 1000.0)
        if batch.rest_commits:
            times = np.array([t for t, _ in batch.rest_commits], dtype=np.int64)
            counts = np.array([n for _, n in batch.rest_commits], dtype=np.int64)
            self.add_ms(np.repeat((visible_us - times) / 1000.0, counts))

    def add_ms(self, delays_ms: npt.NDArray[np.float64]) -> None:
        buckets = np.searchsorted(_EDGES, delays_ms, side="left")
        self.counts += np.bincount(buckets, minlength=len(self.counts)).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def percentile(self, fraction: float) -> float | None:
        """The freshness (ms) below which ``fraction`` of the changes fall (bucket's upper
        edge, so at most 2% above the truth); None when nothing was counted."""
        total = self.total
        if total == 0:
            return None
        rank = max(1, math.ceil(fraction * total))
        index = int(np.searchsorted(np.cumsum(self.counts), rank, side="left"))
        if index >= len(EDGES_MS):
            return float("inf")
        return float(EDGES_MS[index])

    def since(self, earlier: FreshnessHistogram) -> FreshnessHistogram:
        """The changes counted after ``earlier`` (a copy taken before)."""
        return FreshnessHistogram(list(self.counts - earlier.counts))

    def copy(self) -> FreshnessHistogram:
        return FreshnessHistogram(list(self.counts))

    def to_list(self) -> list[int]:
        return [int(c) for c in self.counts]


class RateWindow:
    """Rates of cumulative counters, and freshness, over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, float], FreshnessHistogram]] = deque()

    def sample(
        self, counters: dict[str, float], freshness: FreshnessHistogram, at: float | None = None
    ) -> None:
        """Record the counters' current values (call about once a second); ``at``: the
        ``time.monotonic()`` of the sample, when not now."""
        now = time.monotonic() if at is None else at
        self._samples.append((now, dict(counters), freshness.copy()))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rate(self, name: str) -> float:
        """Increase of counter ``name`` per second over the window (0 before two samples)."""
        if len(self._samples) < 2:
            return 0.0
        (first_at, first, _), (last_at, last, _) = self._samples[0], self._samples[-1]
        elapsed = last_at - first_at
        if elapsed <= 0:
            return 0.0
        return (last.get(name, 0.0) - first.get(name, 0.0)) / elapsed

    def freshness(self) -> FreshnessHistogram:
        """Changes counted within the window."""
        if len(self._samples) < 2:
            return FreshnessHistogram()
        return self._samples[-1][2].since(self._samples[0][2])

"""The bounded hand-over between the source thread and the writer, counted in changes.

A queue bounded only by a number of batches limits how much the writer can
merge when it falls behind: with ~100 ms micro-batches of ~1,000 changes and
room for 4, a slow store transaction is followed by one of ~5,000 changes,
which pays the per-transaction fixed cost again and again while the backlog
stays on the server. Here small batches may also queue up while their changes
fit into ``max_changes`` (the writer's merge limit), so a backlog is worked off
in few large transactions; large batches are still limited by ``max_batches``.
Memory stays bounded by about ``max(max_batches * batch size, max_changes)``
changes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")

HARD_MAX_ITEMS = 1024
"""Items (batches, heartbeat-only batches included) queued at most, whatever their size."""


class ChangeQueue(Generic[T]):
    """FIFO of items with a size in changes; ``put`` waits while the queue is full.

    Full means: at least ``max_batches`` items are queued *and* the new item's
    changes do not fit into ``max_changes`` together with those queued (or
    :data:`HARD_MAX_ITEMS` items are queued).
    """

    def __init__(self, max_batches: int, max_changes: int) -> None:
        self.max_batches = max(1, max_batches)
        self.max_changes = max(0, max_changes)
        self._items: deque[tuple[T, int]] = deque()
        self._changes = 0
        self._getters_waiting = 0
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)

    def _full(self, changes: int) -> bool:
        count = len(self._items)
        if count >= HARD_MAX_ITEMS:
            return True
        if count < self.max_batches:
            return False
        return self._changes + changes > self.max_changes

    def put(self, item: T, changes: int, timeout: float) -> None:
        """Queue ``item`` (``changes`` changes); raises :class:`queue.Full` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._not_full:
            while self._full(changes):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise queue.Full
                self._not_full.wait(remaining)
            self._items.append((item, changes))
            self._changes += changes
            self._not_empty.notify()

    def get(self, timeout: float) -> T:
        """The oldest item; raises :class:`queue.Empty` after ``timeout`` s without one."""
        deadline = time.monotonic() + timeout
        with self._not_empty:
            while not self._items:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise queue.Empty
                self._getters_waiting += 1
                try:
                    self._not_empty.wait(remaining)
                finally:
                    self._getters_waiting -= 1
            return self._take()

    def consumer_waiting(self) -> bool:
        """Whether a consumer waits in :meth:`get` with nothing queued for it (read without
        the lock: a hint for the producer, which hands on what it holds right away)."""
        return self._getters_waiting > 0 and not self._items

    def get_nowait(self) -> T:
        """The oldest item, or :class:`queue.Empty` at once."""
        with self._lock:
            if not self._items:
                raise queue.Empty
            return self._take()

    def _take(self) -> T:
        item, changes = self._items.popleft()
        self._changes -= changes
        self._not_full.notify_all()
        return item

    def qsize(self) -> int:
        """Items queued now."""
        with self._lock:
            return len(self._items)

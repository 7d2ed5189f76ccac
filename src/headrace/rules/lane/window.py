"""Per-account windows of rows in time order: the state of the lane's window rules.

Velocity burst, structuring, card testing and impossible travel (its card-present uses)
each keep the rows their condition can use within their span of the watermark: by key (to
replace or drop a row its change names), per account as a sorted list of ``(t, key)``
(counts and sums over ``(t - window, t]`` by bisection) and in a heap by time (eviction).
A row moved in time or to another account is removed and added again; a heap entry whose
row has moved on is skipped when it comes up.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Row = TypeVar("Row", bound=tuple[Any, ...])
"""A window row: a plain tuple whose first two items are the account it counts for and its
event time (µs). Plain, not a NamedTuple: CPython stops tracking an exact tuple of atomic
values in the garbage collector, where a NamedTuple per row is traversed by every full
collection (with every thread stopped)."""

Fields = tuple[Any, ...]
"""A window row's evidence fields, in the order of the rule's field names. Copied per
kept row (a tuple: a third of a dict's memory), not referenced in the batch's column
lists: a reference would keep a whole batch alive as long as one of its rows stays in
a window, and windows span up to days."""


def entry_time(entry: tuple[int, Any]) -> int:
    """The time of a ``(t, key)`` entry: ``bisect``'s key over an account's entries
    (``bisect_right(entries, t, key=entry_time)``: past every entry of time <= t)."""
    return entry[0]


class BatchFields:
    """A batch's evidence fields by row, from their columns (in the rule's order); the rows
    are built on first use, all at once (``zip`` in C: a fifth of a tuple built per kept
    row in Python, and nothing when the batch keeps no row)."""

    __slots__ = ("_lists", "_rows")

    def __init__(self, lists: list[list[Any]]) -> None:
        self._lists = lists
        self._rows: list[Fields] | None = None

    def __getitem__(self, i: int) -> Fields:
        if self._rows is None:
            self._rows = list(zip(*self._lists, strict=True))
        return self._rows[i]


@dataclass
class AccountWindows(Generic[Row]):
    """The rows, their evidence fields, each account's sorted times, the eviction heap.

    A base of the lane's window evaluators (its fields are not ``__init__`` arguments)."""

    rows: dict[Hashable, Row] = field(default_factory=dict, init=False)
    """key -> the row (what decides a trigger)."""
    fields: dict[Hashable, Fields] = field(default_factory=dict, init=False)
    """key -> the row's evidence fields."""
    by_account: dict[int, list[tuple[int, Any]]] = field(default_factory=dict, init=False)
    """Each account's rows as sorted (t, key) pairs."""
    expiry: list[tuple[int, Hashable]] = field(default_factory=list, init=False)
    """Heap of (t, key) for eviction; entries whose key has moved on are skipped."""

    def _clear(self) -> None:
        self.rows.clear()
        self.fields.clear()
        self.by_account.clear()
        self.expiry.clear()

    def _add(self, key: Hashable, row: Row, extra: Fields) -> None:
        self.rows[key] = row
        self.fields[key] = extra
        account, t = row[0], row[1]
        bisect.insort(self.by_account.setdefault(account, []), (t, key))
        heapq.heappush(self.expiry, (t, key))

    def _remove(self, key: Hashable) -> None:
        row = self.rows.pop(key, None)
        if row is None:
            return
        del self.fields[key]
        account = row[0]
        entries = self.by_account[account]
        del entries[bisect.bisect_left(entries, (row[1], key))]
        if not entries:
            del self.by_account[account]

    def _update(
        self,
        ends: list[tuple[Hashable, Row | None, int]],
        fields: BatchFields,
        horizon_us: int,
    ) -> None:
        """The window after a batch: each touched key's row replaced by its end row
        (``(key, row, i)``: None, deleted or not counted; ``i`` its batch row, with
        evidence ``fields[i]``) when within ``horizon_us``, older rows evicted."""
        for key, row, i in ends:
            self._remove(key)
            if row is not None and row[1] >= horizon_us:
                self._add(key, row, fields[i])
        self._evict(horizon_us)

    def _evict(self, horizon_us: int) -> None:
        """Drop the rows older than ``horizon_us``."""
        while self.expiry and self.expiry[0][0] < horizon_us:
            t, key = heapq.heappop(self.expiry)
            row = self.rows.get(key)
            if row is not None and row[1] == t:
                self._remove(key)

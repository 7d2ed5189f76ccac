"""Per-account windows of rows in time order: the state of the lane's window rules.

Velocity burst, structuring and card testing each keep the rows their condition can use
within their span of the watermark: by key (to replace or drop a row its change names), per
account as a sorted list of ``(t, key)`` (counts and sums over ``(t - window, t]`` by
bisection) and in a heap by time (eviction). A row moved in time or to another account is
removed and added again; a heap entry whose row has moved on is skipped when it comes up.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar


class Timed(Protocol):
    """A window row: the account it counts for and its event time (µs)."""

    @property
    def account(self) -> int: ...

    @property
    def t(self) -> int: ...


Row = TypeVar("Row", bound=Timed)

Fields = tuple[dict[str, list[Any]], int]
"""A window row's evidence fields, kept by reference to its batch's columns: ``(lists,
i)`` with ``lists`` the columns by the rule's field name and ``i`` the row (no dict
built per row; the lists are shared by every row of the batch)."""


def field_of(fields: Fields, name: str) -> Any:
    """One evidence field of a window row."""
    lists, i = fields
    return lists[name][i]


def field_lists(rows: list[tuple[Any, ...]], names: list[str], first: int) -> dict[str, list[Any]]:
    """Columns ``names`` of query result ``rows`` (from position ``first``) as lists
    (the seed's :data:`Fields`)."""
    return {name: [row[first + n] for row in rows] for n, name in enumerate(names)}


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
        bisect.insort(self.by_account.setdefault(row.account, []), (row.t, key))
        heapq.heappush(self.expiry, (row.t, key))

    def _remove(self, key: Hashable) -> None:
        row = self.rows.pop(key, None)
        if row is None:
            return
        del self.fields[key]
        entries = self.by_account[row.account]
        del entries[bisect.bisect_left(entries, (row.t, key))]
        if not entries:
            del self.by_account[row.account]

    def _evict(self, horizon_us: int) -> None:
        """Drop the rows older than ``horizon_us``."""
        while self.expiry and self.expiry[0][0] < horizon_us:
            t, key = heapq.heappop(self.expiry)
            row = self.rows.get(key)
            if row is not None and row.t == t:
                self._remove(key)

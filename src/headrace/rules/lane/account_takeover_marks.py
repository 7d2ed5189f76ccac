"""Account takeover's risky logins in memory: the SQL rule's marks and what they read.

:class:`RiskyLogins` is the logins' part of
:class:`~headrace.rules.lane.account_takeover.AccountTakeoverLane`; per batch changing the
logins (``W`` the rule's watermark *before* the batch), as ``AccountTakeover._mark`` does:

- **New logins** (``FirstSeen.new_rows``): end rows of logins whose key had no row
  before the batch (after a truncate in the batch: no row before the truncate either,
  since the engine's start rows are then the whole table).
- **Risky logins**, added to the marks:
  ``new_device``: a new successful login whose (customer, device) had no successful
  login before the batch (the devices are updated once every job has run) and is the
  first of the pair among the batch's new logins by (time, key);
  ``failed_logins``: a new failed login ``f`` with at least ``failed_logins`` failed
  logins of its customer in the logins *after* the batch with time in
  ``(f.t - failed_window, f.t]`` and ``>= W - failed_window - lateness``.
  Marks are never retracted (a deleted or corrected login keeps its mark); they are
  pruned below ``W - window - lateness``, which no trigger can reach anyway.

State: every login's (customer, device, success) ("new login" reads start rows of any
age, and pgoutput sends no old values: memory grows with the table), the devices'
successful logins (``jobs.account_takeover__devices``), the failed logins from the
failed horizon ``W - failed_window - lateness`` on and the marks
(``jobs.account_takeover__marks``), both bounded by their spans. The marks depend on
history, not only on the mirror: the lane saves them with its position
(:meth:`RiskyLogins.take_state`); without a record of its own it seeds them from the
SQL rule's table, else as the SQL ``rebuild`` does.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import duckdb

from headrace.jobs.base import state_table
from headrace.rules.base import EARLIEST
from headrace.rules.config import AccountTakeoverConfig, LoginsTable
from headrace.rules.lane.alert import from_us, to_us, us_delta
from headrace.rules.lane.changes import (
    Convert,
    NetChange,
    integers,
    key_columns,
    micros,
    net_change,
)
from headrace.rules.lane.condition import arrow_condition
from headrace.rules.lane.saved import RuleSaved
from headrace.source.changes import ChangeBatch, TableRef
from headrace.store.duckdb.schema import mirror_table, table_exists

RULE = "account_takeover"
SUCCESS = "_lane_success"
"""Name of the logins' ``success`` condition among a net change's values."""


class Mark(NamedTuple):
    """A risky login (a row of ``jobs.account_takeover__marks``; as the payload lists
    one, with ``at`` for ``t``)."""

    t: int
    reason: str
    login: Hashable
    device: Any
    country: Any
    failed: int


Login = tuple[int | None, Any, bool]
"""What the marks read of a login's start row: ``(customer, device, success)``. A plain
tuple, not a NamedTuple: :attr:`RiskyLogins.logins` holds every login, and CPython stops
tracking an exact tuple of atomic values in the garbage collector where a NamedTuple each
was traversed by every full collection (every thread stopped)."""


_End = tuple[Hashable, Login | None, int | None, int]
"""A login the batch touched: its key, its end row (None: deleted), time (µs) and row
in the batch."""


@dataclass
class RiskyLogins:
    """The risky logins over the logins' changes, and their state (module docstring)."""

    config: AccountTakeoverConfig
    table: LoginsTable
    lateness_us: int
    logins: dict[Hashable, Login] = field(default_factory=dict)
    """Every login's start row (the logins before the batch being applied)."""
    devices: dict[tuple[int | None, Any], int] = field(default_factory=dict)
    """(customer, device) -> successful logins (``jobs.account_takeover__devices``)."""
    failures: dict[int, list[tuple[int, Hashable]]] = field(default_factory=dict)
    """Per customer its failed logins' sorted (t, key), from the failed horizon on."""
    failure_of: dict[Hashable, tuple[int, int]] = field(default_factory=dict)
    failure_expiry: list[tuple[int, Hashable]] = field(default_factory=list)
    marks: dict[int, list[tuple[int, int, Mark]]] = field(default_factory=dict)
    """Per customer its marks as sorted (t, arrival, mark)."""
    mark_expiry: list[tuple[int, int]] = field(default_factory=list)
    arrivals: Iterator[int] = field(default_factory=itertools.count)
    marked: set[tuple[Hashable, str]] = field(default_factory=set)
    """(login, reason) of the marks held: a batch evaluated again after a restart (its
    marks are in the saved state already) adds none twice, as SQL marks a login once."""
    marks_changed: bool = False
    """The marks changed since :meth:`take_state` (they are saved with the position)."""

    def __post_init__(self) -> None:
        logins = self.table
        self.ref = TableRef.parse(logins.table)
        # what the net change reads, converted: ids as int64, times as µs
        self.columns: dict[str, Convert | None] = {
            logins.customer: integers,
            logins.time: micros,
            logins.device: None,
            logins.country: None,
        }
        self.success = arrow_condition(logins.success)
        self.window_us = us_delta(self.config.window)
        self.failed_window_us = us_delta(self.config.failed_window)

    def change(self, batch: ChangeBatch) -> NetChange | None:
        """The batch's net change of the logins, with the ``newest_mark`` of their time."""
        return net_change(
            batch, self.ref, self.columns, {SUCCESS: self.success}, mark=self.table.time
        )

    def failed_horizon(self, watermark: int) -> int:
        return watermark - self.failed_window_us - self.lateness_us

    # ----------------------------------------------------------- seeding

    def seed(
        self, con: duckdb.DuckDBPyConnection, watermark_us: int | None, saved: RuleSaved | None
    ) -> None:
        """The logins of the store's mirror (every login, the devices, the failures
        from the horizon of ``watermark_us`` on), and the marks of ``saved`` (the lane's
        record), else of the SQL rule's table or a rebuild."""
        for state in (self.logins, self.devices, self.failures, self.failure_of):
            state.clear()
        for heap in (self.failure_expiry, self.mark_expiry):
            heap.clear()
        self.marks.clear()
        logins = self.table
        horizon = self.failed_horizon(to_us(EARLIEST) if watermark_us is None else watermark_us)
        key = key_columns(con, self.ref)
        width, names = len(key), ", ".join(f'"{k}"' for k in key)
        for row in con.execute(
            f'SELECT {names}, "{logins.customer}"::BIGINT, "{logins.device}", '
            f"coalesce(({logins.success}), false), "
            f'epoch_us(CAST("{logins.time}" AS TIMESTAMPTZ)) FROM {mirror_table(self.ref)}'
        ).fetchall():
            k: Hashable = row[0] if width == 1 else tuple(row[:width])
            login = (row[-4], row[-3], bool(row[-2]))
            self.logins[k] = login
            self._count_device(login, 1)
            self._add_failure(k, login, row[-1], horizon)
        self.marked.clear()
        rows = saved.state_rows() if saved is not None else None
        if rows is not None:
            for customer, t, reason, login_key, device, country, failed in rows:
                k = tuple(login_key) if isinstance(login_key, list) else login_key
                self._add_mark(int(customer), Mark(int(t), reason, k, device, country, failed))
        else:
            self._seed_marks(con, watermark_us, from_store=saved is None)
        self.marks_changed = False

    def _seed_marks(
        self, con: duckdb.DuckDBPyConnection, watermark_us: int | None, from_store: bool
    ) -> None:
        """The marks of ``AccountTakeover.rebuild``, or the SQL rule's own table when
        ``from_store`` and it exists (the rule ran as SQL up to the store's position)."""
        stored = state_table(RULE, "marks")
        schema, name = (part.strip('"') for part in stored.split("."))
        if from_store and table_exists(con, schema, name):
            query = f"SELECT customer, t, reason, login, device, country, failed FROM {stored}"
            params: list[Any] = []
        elif watermark_us is None:
            return
        else:
            query, params = self._rebuild_marks(con, watermark_us)
        for customer, t, reason, login, device, country, failed in con.execute(
            query, params
        ).fetchall():
            if customer is not None and t is not None:
                self._add_mark(
                    int(customer), Mark(to_us(t), reason, login, device, country, int(failed))
                )

    def _rebuild_marks(
        self, con: duckdb.DuckDBPyConnection, watermark_us: int
    ) -> tuple[str, list[Any]]:
        logins, config = self.table, self.config
        mirror = mirror_table(self.ref)
        key = key_columns(con, self.ref)[0]
        horizon = from_us(watermark_us - self.window_us - self.lateness_us)
        window_s = config.failed_window.total_seconds()
        t = f'CAST("{logins.time}" AS TIMESTAMPTZ)'
        columns = (
            f'"{logins.customer}"::BIGINT AS customer, {t} AS t, "{key}" AS login, '
            f'"{logins.device}" AS device, "{logins.country}" AS country'
        )
        new_device = f"""SELECT customer, t, 'new_device', login, device, country, 0 FROM (
                SELECT {columns}, row_number() OVER (PARTITION BY "{logins.customer}",
                    "{logins.device}" ORDER BY "{logins.time}", "{key}") AS n
                FROM {mirror} WHERE coalesce(({logins.success}), false))
            WHERE n = 1 AND t >= ? UNION ALL """
        query = f"""{new_device if config.new_device else ""}
            SELECT * FROM (WITH failures AS (
                SELECT {columns} FROM {mirror}
                WHERE NOT coalesce(({logins.success}), false) AND {t} >= ?)
            SELECT f.customer, f.t, 'failed_logins', f.login, f.device, f.country, count(*)
            FROM failures f JOIN failures w
              ON w.customer = f.customer AND w.t <= f.t AND w.t > f.t - to_seconds({window_s})
            WHERE f.t >= ?
            GROUP BY f.customer, f.t, f.login, f.device, f.country
            HAVING count(*) >= {config.failed_logins})"""
        params = [horizon - config.failed_window, horizon]
        return query, ([horizon, *params] if config.new_device else params)

    def take_state(self) -> Callable[[], list[list[Any]]] | None:
        """When the marks changed since the last call, :meth:`state_rows` (to be called
        when the record is written: ``RuleSaved.state``); None when unchanged. The
        mirrors cannot rebuild the marks exactly (a deleted or corrected login keeps
        its mark)."""
        if not self.marks_changed:
            return None
        self.marks_changed = False
        return self.state_rows

    def state_rows(self) -> list[list[Any]]:
        """The marks as the lane's record holds them."""
        return [
            [customer, m.t, m.reason, m.login, m.device, m.country, m.failed]
            for customer, entries in self.marks.items()
            for _, _, m in entries
        ]

    # ----------------------------------------------------------- per batch

    def apply(self, change: NetChange, previous: int) -> None:
        """``_mark``: the batch's risky logins; then the logins and devices after it.
        ``previous``: the watermark before the batch."""
        horizon = self.failed_horizon(previous)
        self._evict_failures(horizon)
        columns, logins = change.columns, self.table
        customers, times = columns[logins.customer], columns[logins.time]
        devices, success = columns[logins.device], columns[SUCCESS]
        ends: list[_End] = [
            (key, (customers[i], devices[i], success[i]), times[i], i)
            if alive
            else (key, None, None, i)
            for key, i, alive in zip(change.keys, change.rows, change.live, strict=True)
        ]
        # The failures read the logins mirror *after* the batch.
        if change.truncated:
            self.failures.clear()
            self.failure_of.clear()
            self.failure_expiry.clear()
        for key, login, t_us, _ in ends:
            self._remove_failure(key)
            if login is not None:
                self._add_failure(key, login, t_us, horizon)
        # New rows: no start row (the logins before the batch hold every key).
        held = self.logins
        new = [end for end in ends if end[0] not in held]
        if new:
            self._risky(new, columns[logins.country], horizon)
        # Once every job has run: the devices, and the logins as start rows of the next.
        if change.truncated:
            held.clear()
            self.devices.clear()
        for key, login, _, _ in ends:
            old = held.pop(key, None)
            if old is not None:
                self._count_device(old, -1)
            if login is not None:
                held[key] = login
                self._count_device(login, 1)

    def _risky(self, new: list[_End], countries: list[Any], horizon: int) -> None:
        """The marks of the batch's new logins (``first_seen``; failures in the window)."""
        config = self.config
        # first_seen: the first new row of its (customer, device, success) by (t, key),
        # NULL times last
        ordered = sorted(new, key=lambda n: (n[2] is None, n[2] or 0, n[0]))
        firsts: set[tuple[Any, Any]] = set()
        for key, login, t_us, i in ordered:
            if login is None:
                continue
            customer, device, success = login
            if success:
                pair = (customer, device)
                first = pair not in firsts
                firsts.add(pair)
                # a mark without customer or time joins no outflow: not kept
                if (
                    first
                    and config.new_device
                    and not self._known_device(login)
                    and customer is not None
                    and t_us is not None
                ):
                    mark = Mark(t_us, "new_device", key, device, countries[i], 0)
                    self._add_mark(customer, mark)
                continue
            if customer is None or t_us is None:
                continue
            entries = self.failures.get(customer, [])
            # times are whole µs: (x + 1,) sorts after every (x, key)
            upper = bisect.bisect_left(entries, (t_us + 1,))
            lower = max(
                bisect.bisect_left(entries, (t_us - self.failed_window_us + 1,)),
                bisect.bisect_left(entries, (horizon,)),
            )
            if upper - lower >= config.failed_logins:
                failed = upper - lower
                mark = Mark(t_us, "failed_logins", key, device, countries[i], failed)
                self._add_mark(customer, mark)

    def window(self, customer: int, t: int) -> list[Mark]:
        """The customer's marks with time in ``[t - window, t]``, by time."""
        entries = self.marks.get(customer, [])
        lower = bisect.bisect_left(entries, (t - self.window_us,))
        upper = bisect.bisect_left(entries, (t + 1,))
        return [mark for _, _, mark in entries[lower:upper]]

    def prune(self, previous: int) -> None:
        """``DELETE FROM marks WHERE t < horizon`` (``W - window - lateness``, ``W`` the
        watermark ``previous`` to the batch)."""
        horizon = previous - self.window_us - self.lateness_us
        while self.mark_expiry and self.mark_expiry[0][0] < horizon:
            _, customer = heapq.heappop(self.mark_expiry)
            entries = self.marks.get(customer)
            if entries is None:
                continue
            gone = bisect.bisect_left(entries, (horizon,))
            for _, _, mark in entries[:gone]:
                self.marked.discard((mark.login, mark.reason))
                self.marks_changed = True
            del entries[:gone]
            if not entries:
                del self.marks[customer]

    # ----------------------------------------------------------- state

    def _count_device(self, login: Login, sign: int) -> None:
        customer, device, success = login
        if not success:
            return
        pair = (customer, device)
        count = self.devices.get(pair, 0) + sign
        if count:
            self.devices[pair] = count
        else:
            self.devices.pop(pair, None)

    def _known_device(self, login: Login) -> bool:
        # NULLs never join the devices table
        customer, device, _ = login
        if customer is None or device is None:
            return False
        return self.devices.get((customer, device), 0) > 0

    def _add_failure(self, key: Hashable, login: Login, t: int | None, horizon: int) -> None:
        customer, _, success = login
        if success or customer is None or t is None or t < horizon:
            return
        self.failure_of[key] = (customer, t)
        bisect.insort(self.failures.setdefault(customer, []), (t, key))
        heapq.heappush(self.failure_expiry, (t, key))

    def _remove_failure(self, key: Hashable) -> None:
        found = self.failure_of.pop(key, None)
        if found is None:
            return
        customer, t = found
        entries = self.failures[customer]
        del entries[bisect.bisect_left(entries, (t, key))]
        if not entries:
            del self.failures[customer]

    def _evict_failures(self, horizon: int) -> None:
        while self.failure_expiry and self.failure_expiry[0][0] < horizon:
            t, key = heapq.heappop(self.failure_expiry)
            if self.failure_of.get(key, (None, None))[1] == t:
                self._remove_failure(key)

    def _add_mark(self, customer: int, mark: Mark) -> None:
        if (mark.login, mark.reason) in self.marked:
            return
        self.marked.add((mark.login, mark.reason))
        self.marks_changed = True
        bisect.insort(self.marks.setdefault(customer, []), (mark.t, next(self.arrivals), mark))
        heapq.heappush(self.mark_expiry, (mark.t, customer))

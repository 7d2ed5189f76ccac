"""Account takeover evaluated in memory, batch by batch, exactly as the SQL rule does.

:meth:`AccountTakeoverLane.apply` gets every :class:`ChangeBatch` in source order and
returns the alerts the SQL rule (:mod:`headrace.rules.account_takeover` +
:func:`headrace.alerts.store.emit_incidents`) writes for it;
``tests/rules/test_lane_account_takeover.py`` checks the equality on real PostgreSQL
change streams. Per batch (each step named after the SQL code it mirrors):

- **Watermark** (``RuleJob.advance``): ``W`` is the watermark *before* the batch; after
  it ``max(W, least(t, commit_ts))`` over the end rows of the logins *and* of the
  transactions (a batch touching neither leaves it alone).
- **New logins** (``FirstSeen.new_rows``): end rows of logins whose key had no row
  before the batch (after a truncate in the batch: no row before the truncate either,
  since the engine's start rows are then the whole table).
- **Risky logins** (``AccountTakeover._mark``), added to the marks:
  ``new_device``: a new successful login whose (customer, device) had no successful
  login before the batch (the devices are updated once every job has run) and is the
  first of the pair among the batch's new logins by (time, key);
  ``failed_logins``: a new failed login ``f`` with at least ``failed_logins`` failed
  logins of its customer in the logins *after* the batch with time in
  ``(f.t - failed_window, f.t]`` and ``>= W - failed_window - lateness``.
  Marks are never retracted (a deleted or corrected login keeps its mark); they are
  pruned below ``W - window - lateness``, which no trigger can reach anyway.
- **Triggers** (``create_tx_triggers``): end rows of transactions matching ``where``
  (default the outflow condition) that are new, whose account or amount changed, or
  that did not match before, with ``t >= W - lateness``. A time change alone does not
  re-trigger, so the start row of *any* transaction may decide: the lane keeps each
  transaction's (account, amount, matches) (see "State").
- **Balance** (``AccountTakeover._detect``): the account's last version written by the
  batch before the transaction's first change in the batch (``_hr_seq`` order, all of
  the batch's changes, a truncate's earlier ones included), else its balance before the
  batch; the account must exist before the batch (its customer is read there).
- **Candidates**: ``balance > 0``, ``amount >= min_amount``, ``amount >= outflow_share x
  balance`` (decimal arithmetic, as DuckDB with the config's literals), and marks of the
  customer with time in ``[t - window, t]``. Numbers, summary and the payload's logins as
  the SQL computes them: DuckDB divides decimals as doubles, ``round`` rounds a double's
  exact value half away from zero, ``format('{}')`` prints decimals as doubles (``repr``).
- **Incidents** (key ``account_takeover:<account>``): :class:`Incidents`.

State: the accounts (customer, balance), every login's (customer, device, success) and
every transaction's (account, amount, matches): "new login" and "changed outflow" read
start rows of any age, and pgoutput sends no old values; so memory grows with the three
tables (~150 bytes a row). The windows proper (failures, marks) are bounded by spans.

Not ported: unchanged TOAST values (never the rule's columns), batches cut into segments
by a schema change, keys of several columns (the SQL reads ``_k0``). :meth:`seed` is the
SQL ``rebuild``; from a saved record the marks are the store's marks table if any (marks
depend on history, not only on the mirrors; :class:`RuleSaved` cannot hold them).
SQL rule findings the lane follows, as they may be bugs: an outflow of an account
inserted in the same batch is never checked (its alert depends on the batch cut; test
``test_account_opened_in_the_batch_of_its_outflow``); marks are never retracted (a
deleted or corrected login still counts, ``test_restart_from_saved_state``) while a
rebuild recomputes them from the mirror, so a snapshot in between changes the alerts.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

import duckdb
import pyarrow as pa

from headrace.jobs.base import state_table
from headrace.rules.base import EARLIEST, EVIDENCE_LIMIT
from headrace.rules.config import RulesConfig
from headrace.rules.lane.alert import Incidents, LaneAlert, from_us, to_us, us_delta
from headrace.rules.lane.changes import (
    Convert,
    End,
    NetChange,
    integers,
    key_columns,
    keys_of,
    micros,
    net_change,
)
from headrace.rules.lane.condition import arrow_condition
from headrace.rules.lane.duck_numbers import duck_round, duck_text, sql_literal
from headrace.rules.lane.saved import RuleSaved
from headrace.rules.triggers import TX_FIELDS
from headrace.source.changes import OP, SEQ, ChangeBatch, TableRef, old_name
from headrace.store.duckdb.schema import mirror_table

RULE = "account_takeover"
SUCCESS = "_lane_success"
"""Name of the logins' ``success`` condition among a net change's values."""
OUTFLOW = "_lane_outflow"
"""Name of the rule's ``where`` among a net change's values."""


@dataclass(frozen=True)
class AccountTakeoverAlert(LaneAlert):
    """A lane alert with the payload's ``logins`` (the risky logins, as the SQL lists
    them: ordered by time, login, reason)."""

    logins: tuple[Mapping[str, Any], ...] = ()

    def payload(self) -> dict[str, Any]:
        out = super().payload()
        out["logins"] = list(self.logins)
        return out


class _Mark(NamedTuple):
    """A risky login (a row of ``jobs.account_takeover__marks``; as the payload lists
    one, with ``at`` for ``t``)."""

    t: int
    reason: str
    login: Hashable
    device: Any
    country: Any
    failed: int


class _Login(NamedTuple):
    customer: int | None
    device: Any
    success: bool


class _Tx(NamedTuple):
    """What decides whether a transaction's end row is a trigger (tuples: cheaper to build
    per row than frozen dataclasses)."""

    account: int | None
    amount: Any
    matches: bool


def _times(literal: Decimal | float, value: Decimal) -> Decimal | float:
    return literal * value if isinstance(literal, Decimal) else literal * float(value)


def _at_least(value: Decimal, bound: Decimal | float) -> bool:
    return value >= bound if isinstance(bound, Decimal) else float(value) >= bound


def _changes(batch: ChangeBatch, ref: TableRef) -> tuple[pa.Table, tuple[str, ...]] | None:
    """The batch's changes of ``ref`` in order, and its key columns."""
    parts = [c for c in batch.tables if c.table == ref]
    if not parts:
        return None
    data = pa.concat_tables([p.data for p in parts], promote_options="default")
    if len(parts) > 1:
        data = data.sort_by(SEQ)
    return data, parts[0].schema.key_columns


@dataclass
class AccountTakeoverLane:
    """The account-takeover rule over change batches, in memory (module docstring)."""

    rules: RulesConfig
    name: str = RULE
    watermark_us: int | None = None
    accounts: dict[Hashable, tuple[int | None, Any]] = field(default_factory=dict)
    """Account id -> (customer, balance), as before the batch being applied."""
    txs: dict[Hashable, _Tx] = field(default_factory=dict)
    logins: dict[Hashable, _Login] = field(default_factory=dict)
    devices: dict[tuple[int | None, Any], int] = field(default_factory=dict)
    """(customer, device) -> successful logins (``jobs.account_takeover__devices``)."""
    failures: dict[int, list[tuple[int, Hashable]]] = field(default_factory=dict)
    """Per customer its failed logins' sorted (t, key), from the failed horizon on."""
    failure_of: dict[Hashable, tuple[int, int]] = field(default_factory=dict)
    failure_expiry: list[tuple[int, Hashable]] = field(default_factory=list)
    marks: dict[int, list[tuple[int, int, _Mark]]] = field(default_factory=dict)
    """Per customer its marks as sorted (t, arrival, mark)."""
    mark_expiry: list[tuple[int, int]] = field(default_factory=list)
    arrivals: Iterator[int] = field(default_factory=itertools.count)
    marked: set[tuple[Hashable, str]] = field(default_factory=set)
    """(login, reason) of the marks held: a batch evaluated again after a restart (its
    marks are in the saved state already) adds none twice, as SQL marks a login once."""
    marks_changed: bool = False
    """The marks changed since :meth:`take_saved` (they are saved with the position)."""

    def __post_init__(self) -> None:
        config = self.rules.account_takeover
        if config is None:
            raise ValueError("the account takeover lane needs rules.account_takeover")
        self.config = config
        tables = self.rules.tables
        tx = self.tx_table = tables.transactions
        logins, accounts = self.login_table, self.account_table = tables.logins, tables.accounts
        self.tx_ref, self.login_ref, self.account_ref = (
            TableRef.parse(t.table) for t in (tx, logins, accounts)
        )
        # what the net changes read, converted: ids as int64, times as µs
        self.account_columns: dict[str, Convert | None] = {
            accounts.id: integers,
            accounts.customer: integers,
            accounts.balance: None,
        }
        self.login_columns: dict[str, Convert | None] = {
            logins.customer: integers,
            logins.time: micros,
            logins.device: None,
            logins.country: None,
        }
        # TX_FIELDS are the config's column names, but "t" (its ``time``)
        self.columns = {f: getattr(tx, "time" if f == "t" else f) for f in TX_FIELDS}
        self.where_sql = config.where or tx.outflow
        self.where = arrow_condition(self.where_sql)
        self.success = arrow_condition(logins.success)
        self.window_us = us_delta(config.window)
        self.failed_window_us = us_delta(config.failed_window)
        self.lateness_us = us_delta(self.rules.lateness)
        self.earliest_us = to_us(EARLIEST)
        self.min_amount = sql_literal(config.min_amount)
        self.share = sql_literal(config.outflow_share)
        self.incidents = Incidents(us_delta(config.rearm_after))

    def inputs(self) -> tuple[TableRef, ...]:
        return (self.tx_ref, self.login_ref, self.account_ref)

    # ----------------------------------------------------------- seeding

    def seed(self, con: duckdb.DuckDBPyConnection, saved: RuleSaved | None = None) -> None:
        """Start from the store's mirrors, as the SQL ``rebuild`` does after a snapshot:
        the watermark is the newest ``least(t, now())`` of logins and transactions, the
        devices every login's, the marks the SQL rule's table (it ran as SQL before) or the
        rebuild's. ``saved`` (the lane's own record) gives the watermark, incidents and
        marks instead."""
        logins, tx, accounts = self.login_table, self.tx_table, self.account_table
        login_mirror, tx_mirror = mirror_table(self.login_ref), mirror_table(self.tx_ref)
        newest = con.execute(
            "SELECT greatest("
            + ", ".join(
                f'(SELECT max(least(CAST("{time}" AS TIMESTAMPTZ), now())) FROM {mirror})'
                for time, mirror in ((logins.time, login_mirror), (tx.time, tx_mirror))
            )
            + ")"
        ).fetchall()[0][0]
        self.watermark_us = None if newest is None else to_us(newest)
        if saved is not None:
            self.watermark_us = saved.watermark_us
        for state in (self.accounts, self.txs, self.logins, self.devices, self.failures):
            state.clear()
        for heap in (self.failure_of, self.failure_expiry, self.marks, self.mark_expiry):
            heap.clear()
        for account, customer, balance in con.execute(
            f'SELECT "{accounts.id}"::BIGINT, "{accounts.customer}"::BIGINT, '
            f'"{accounts.balance}" FROM {mirror_table(self.account_ref)}'
        ).fetchall():
            self.accounts[account] = (customer, balance)
        tx_key = self._key(con, self.tx_ref)
        for row in con.execute(
            f'SELECT {tx_key}, "{tx.account}"::BIGINT, "{tx.amount}", '
            f"coalesce(({self.where_sql}), false) FROM {tx_mirror}"
        ).fetchall():
            self.txs[self._row_key(row[:-3])] = _Tx(row[-3], row[-2], bool(row[-1]))
        horizon = self._failed_horizon(self._before())
        login_key = self._key(con, self.login_ref)
        for row in con.execute(
            f'SELECT {login_key}, "{logins.customer}"::BIGINT, "{logins.device}", '
            f"coalesce(({logins.success}), false), "
            f'epoch_us(CAST("{logins.time}" AS TIMESTAMPTZ)) FROM {login_mirror}'
        ).fetchall():
            key = self._row_key(row[:-4])
            login = _Login(row[-4], row[-3], bool(row[-2]))
            self.logins[key] = login
            self._count_device(login, 1)
            self._add_failure(key, login, row[-1], horizon)
        self._restore_marks(con, saved)
        self.incidents.restore(con, RULE, saved)

    def _key(self, con: duckdb.DuckDBPyConnection, ref: TableRef) -> str:
        return ", ".join(f'"{k}"' for k in key_columns(con, ref))

    @staticmethod
    def _row_key(values: tuple[Any, ...]) -> Hashable:
        return values[0] if len(values) == 1 else tuple(values)

    @staticmethod
    def _exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
        schema, name = (part.strip('"') for part in table.split("."))
        found = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE schema_name = ? AND table_name = ?",
            [schema, name],
        ).fetchall()[0][0]
        return bool(found)

    def _restore_marks(self, con: duckdb.DuckDBPyConnection, saved: RuleSaved | None) -> None:
        """The marks of the lane's record, else of the SQL rule or a rebuild."""
        self.marked.clear()
        if saved is not None and saved.state is not None:
            for customer, t, reason, login, device, country, failed in saved.state:
                key = tuple(login) if isinstance(login, list) else login
                self._add_mark(int(customer), _Mark(int(t), reason, key, device, country, failed))
        else:
            self._seed_marks(con, saved is None)
        self.marks_changed = False

    def _seed_marks(self, con: duckdb.DuckDBPyConnection, from_store: bool) -> None:
        """The marks of ``AccountTakeover.rebuild``, or the SQL rule's own table when
        ``from_store`` and it exists (the rule ran as SQL up to the store's position)."""
        stored = state_table(RULE, "marks")
        if from_store and self._exists(con, stored):
            query = f"SELECT customer, t, reason, login, device, country, failed FROM {stored}"
            params: list[Any] = []
        elif self.watermark_us is None:
            return
        else:
            query, params = self._rebuild_marks(con, self.watermark_us)
        for customer, t, reason, login, device, country, failed in con.execute(
            query, params
        ).fetchall():
            if customer is not None and t is not None:
                self._add_mark(
                    int(customer), _Mark(to_us(t), reason, login, device, country, int(failed))
                )

    def _rebuild_marks(
        self, con: duckdb.DuckDBPyConnection, watermark_us: int
    ) -> tuple[str, list[Any]]:
        logins, config = self.login_table, self.config
        mirror = mirror_table(self.login_ref)
        key = key_columns(con, self.login_ref)[0]
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

    def take_saved(self) -> RuleSaved:
        """What to record with the lane's position: the watermark, the incidents changed,
        and the marks when they changed (the mirrors cannot rebuild them exactly: a
        deleted or corrected login keeps its mark)."""
        state = None
        if self.marks_changed:
            self.marks_changed = False
            state = [
                [customer, m.t, m.reason, m.login, m.device, m.country, m.failed]
                for customer, entries in self.marks.items()
                for _, _, m in entries
            ]
        return RuleSaved(self.watermark_us, self.incidents.take_touched(), state)

    # ----------------------------------------------------------- state

    def _before(self) -> int:
        return self.watermark_us if self.watermark_us is not None else self.earliest_us

    def _failed_horizon(self, watermark: int) -> int:
        return watermark - self.failed_window_us - self.lateness_us

    def _count_device(self, login: _Login, sign: int) -> None:
        if not login.success:
            return
        pair = (login.customer, login.device)
        count = self.devices.get(pair, 0) + sign
        if count:
            self.devices[pair] = count
        else:
            self.devices.pop(pair, None)

    def _known_device(self, login: _Login) -> bool:
        # NULLs never join the devices table
        if login.customer is None or login.device is None:
            return False
        return self.devices.get((login.customer, login.device), 0) > 0

    def _add_failure(self, key: Hashable, login: _Login, t: int | None, horizon: int) -> None:
        if login.success or login.customer is None or t is None or t < horizon:
            return
        self.failure_of[key] = (login.customer, t)
        bisect.insort(self.failures.setdefault(login.customer, []), (t, key))
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

    def _add_mark(self, customer: int, mark: _Mark) -> None:
        if (mark.login, mark.reason) in self.marked:
            return
        self.marked.add((mark.login, mark.reason))
        self.marks_changed = True
        bisect.insort(self.marks.setdefault(customer, []), (mark.t, next(self.arrivals), mark))
        heapq.heappush(self.mark_expiry, (mark.t, customer))

    def _prune_marks(self, horizon: int) -> None:
        """``DELETE FROM marks WHERE t < horizon``."""
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

    # ----------------------------------------------------------- per batch

    def apply(self, batch: ChangeBatch) -> list[LaneAlert]:
        """Evaluate one batch (module docstring); the alerts it opens, in event order."""
        login_change = self._login_change(batch)
        tx_change = self._tx_change(batch)
        account_change = net_change(batch, self.account_ref, self.account_columns)
        alerts: list[LaneAlert] = []
        if login_change is not None or tx_change is not None:
            previous = self._before()
            times = [
                self._time_mark(end, time)
                for change, time in (
                    (login_change, self.login_table.time),
                    (tx_change, self.tx_table.time),
                )
                if change is not None
                for end in change.ends.values()
                if end.values is not None
            ]
            if times:
                newest = max(times)
                self.watermark_us = newest if self.watermark_us is None else max(previous, newest)
            if login_change is not None:
                self._mark(login_change, previous)
            if tx_change is not None:
                found = self._detect(batch, tx_change, previous)
                alerts = self.incidents.open(found)
                self._update_txs(tx_change)
            self._prune_marks(previous - self.window_us - self.lateness_us)
        if account_change is not None:
            self._update_accounts(account_change)
        return alerts

    def _login_change(self, batch: ChangeBatch) -> NetChange | None:
        return net_change(batch, self.login_ref, self.login_columns, {SUCCESS: self.success})

    def _tx_change(self, batch: ChangeBatch) -> NetChange | None:
        wanted: dict[str, Convert | None] = {column: None for column in self.columns.values()}
        wanted[self.columns["account"]] = integers
        wanted[self.columns["t"]] = micros
        return net_change(batch, self.tx_ref, wanted, {OUTFLOW: self.where})

    @staticmethod
    def _time_mark(end: End, time: str) -> int:
        """``least(t, commit_ts)`` of an end row (the commit time when ``t`` is NULL)."""
        values: dict[str, Any] | None = end.values
        t = values[time] if values is not None else None
        return end.commit_us if t is None else min(t, end.commit_us)

    def _mark(self, change: NetChange, previous: int) -> None:
        """``_mark``: the batch's risky logins; then the logins and devices after it."""
        horizon = self._failed_horizon(previous)
        self._evict_failures(horizon)
        ends = [(key, *self._login(end)) for key, end in change.ends.items()]
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
        new = [end for end in ends if end[0] not in self.logins]
        self._risky(new, horizon)
        # Once every job has run: the devices, and the logins as start rows of the next.
        if change.truncated:
            self.logins.clear()
            self.devices.clear()
        for key, login, _, _ in ends:
            old = self.logins.pop(key, None)
            if old is not None:
                self._count_device(old, -1)
            if login is not None:
                self.logins[key] = login
                self._count_device(login, 1)

    def _login(self, end: End) -> tuple[_Login | None, int | None, Any]:
        """An end row of logins: the login (None: deleted), its time (µs) and country."""
        values: dict[str, Any] | None = end.values
        if values is None:
            return None, None, None
        logins = self.login_table
        login = _Login(values[logins.customer], values[logins.device], values[SUCCESS])
        return login, values[logins.time], values[logins.country]

    def _risky(
        self, new: list[tuple[Hashable, _Login | None, int | None, Any]], horizon: int
    ) -> None:
        """The marks of the batch's new logins (``first_seen``; failures in the window)."""
        config = self.config
        # first_seen: the first new row of its (customer, device, success) by (t, key),
        # NULL times last
        ordered = sorted(new, key=lambda n: (n[2] is None, n[2] or 0, n[0]))
        firsts: set[tuple[Any, Any]] = set()
        for key, login, t_us, country in ordered:
            if login is None:
                continue
            if login.success:
                pair = (login.customer, login.device)
                first = pair not in firsts
                firsts.add(pair)
                # a mark without customer or time joins no outflow: not kept
                if (
                    first
                    and config.new_device
                    and not self._known_device(login)
                    and login.customer is not None
                    and t_us is not None
                ):
                    mark = _Mark(t_us, "new_device", key, login.device, country, 0)
                    self._add_mark(login.customer, mark)
                continue
            if login.customer is None or t_us is None:
                continue
            entries = self.failures.get(login.customer, [])
            # times are whole µs: (x + 1,) sorts after every (x, key)
            upper = bisect.bisect_left(entries, (t_us + 1,))
            lower = max(
                bisect.bisect_left(entries, (t_us - self.failed_window_us + 1,)),
                bisect.bisect_left(entries, (horizon,)),
            )
            if upper - lower >= config.failed_logins:
                mark = _Mark(t_us, "failed_logins", key, login.device, country, upper - lower)
                self._add_mark(login.customer, mark)

    def _detect(self, batch: ChangeBatch, change: NetChange, previous: int) -> list[LaneAlert]:
        """``_detect``: the candidates among the batch's outflows."""
        cutoff = previous - self.lateness_us
        found: list[LaneAlert] = []
        firsts: dict[Hashable, int] | None = None
        versions: dict[int, list[tuple[int, Any]]] | None = None
        t_column, account_column = self.columns["t"], self.columns["account"]
        amount_column = self.columns["amount"]
        for key, end in change.ends.items():
            values: dict[str, Any] | None = end.values
            if values is None or not values[OUTFLOW]:
                continue
            t, account, amount = values[t_column], values[account_column], values[amount_column]
            # the cheap conditions first (all of them must hold; their order is free)
            if t is None or t < cutoff or amount is None or account not in self.accounts:
                continue
            if not _at_least(amount, self.min_amount):
                continue
            start = self.txs.get(key)
            if start is not None and start == (account, amount, True):
                continue  # not new, same account and amount, matched before: no trigger
            if firsts is None or versions is None:
                firsts, versions = self._batch_order(batch)
            customer, balance = self.accounts[account]
            entries = versions.get(account, [])
            index = bisect.bisect_left(entries, (firsts[self._first_column(key)],)) - 1
            if index >= 0 and entries[index][1] is not None:
                balance = entries[index][1]  # coalesce(then_balance, balance)
            if balance is None or not balance > 0 or customer is None:
                continue
            if _at_least(amount, _times(self.share, balance)):
                alert = self._candidate(key, end, values, (customer, balance))
                if alert is not None:
                    found.append(alert)
        return found

    @staticmethod
    def _first_column(key: Hashable) -> Hashable:
        return key[0] if isinstance(key, tuple) else key

    def _batch_order(
        self, batch: ChangeBatch
    ) -> tuple[dict[Hashable, int], dict[int, list[tuple[int, Any]]]]:
        """Each transaction key's first change (``_hr_seq``), each account's versions."""
        firsts: dict[Hashable, int] = {}
        tx = _changes(batch, self.tx_ref)
        if tx is not None:
            data, key = tx
            ops, seqs = data.column(OP).to_pylist(), data.column(SEQ).to_pylist()
            new, old = keys_of(data, key[:1]), keys_of(data, [old_name(key[0])])
            for op, seq, new_key, old_key in zip(ops, seqs, new, old, strict=True):
                row_key = old_key if op == "D" else new_key  # a delete's values are its old
                if op != "T" and row_key is not None:
                    firsts.setdefault(row_key, seq)
        versions: dict[int, list[tuple[int, Any]]] = {}
        accounts = _changes(batch, self.account_ref)
        if accounts is not None:
            data, _ = accounts
            ops, seqs = data.column(OP).to_pylist(), data.column(SEQ).to_pylist()
            ids = integers(data.column(self.account_table.id)).to_pylist()
            balances = data.column(self.account_table.balance).to_pylist()
            for op, seq, account, balance in zip(ops, seqs, ids, balances, strict=True):
                if op in ("I", "U") and account is not None:
                    versions.setdefault(account, []).append((seq, balance))
        return firsts, versions

    def _candidate(
        self,
        key: Hashable,
        end: End,
        values: dict[str, Any],
        account_then: tuple[int, Any],
    ) -> LaneAlert | None:
        """The alert of a trigger priced at a positive balance it takes the share of, when
        its customer has marks in the window."""
        customer, balance = account_then
        amount: Decimal = values[self.columns["amount"]]
        t: int = values[self.columns["t"]]
        entries = self.marks.get(customer, [])
        lower = bisect.bisect_left(entries, (t - self.window_us,))
        upper = bisect.bisect_left(entries, (t + 1,))
        window = [mark for _, _, mark in entries[lower:upper]]
        if not window:
            return None
        account: int = values[self.columns["account"]]
        newest = max(m.t for m in window)
        minutes = (t / 1_000_000 - newest / 1_000_000) / 60
        reasons = sorted({m.reason for m in window})
        percent = duck_round(float(100 * amount) / float(balance))
        listed = sorted(window, key=lambda m: (m.t, m.login, m.reason))
        numbers: dict[str, Any] = {
            "amount": amount,
            "balance": balance,
            "share": duck_round(float(amount) / float(balance), 3),
            "outflow_share": self.config.outflow_share,
            "failed_logins": max(m.failed for m in window),
            "minutes_since_login": duck_round(minutes, 2),
            "reasons": reasons,
        }
        evidence = [
            {
                "id": key,
                "at": from_us(t),
                "account": account,
                **{name: values[self.columns[name]] for name in TX_FIELDS if name != "t"},
            }
        ][:EVIDENCE_LIMIT]
        return AccountTakeoverAlert(
            rule=RULE,
            account=account,
            key=f"{RULE}:{account}",
            trigger=key,
            event_us=t,
            started_us=min(m.t for m in window),
            commit_us=end.commit_us,
            lsn=end.lsn,
            severity=self.config.severity.value,
            summary=(
                f"outflow {duck_text(amount)} = {duck_text(percent)}% of the balance "
                f"{duck_text(balance)} of account {account}, "
                f"{duck_text(duck_round(minutes, 1))} min after {' and '.join(reasons)}"
            ),
            numbers=numbers,
            evidence=evidence,
            logins=tuple(
                {"at": from_us(m.t), **{k: v for k, v in m._asdict().items() if k != "t"}}
                for m in listed
            ),
        )

    def _update_txs(self, change: NetChange) -> None:
        if change.truncated:
            self.txs.clear()
        for key, end in change.ends.items():
            values: dict[str, Any] | None = end.values
            if values is None:
                self.txs.pop(key, None)
                continue
            columns = self.columns
            self.txs[key] = _Tx(
                values[columns["account"]], values[columns["amount"]], values[OUTFLOW]
            )

    def _update_accounts(self, change: NetChange) -> None:
        accounts = self.account_table
        if change.truncated:
            self.accounts.clear()
        for key, end in change.ends.items():
            values: dict[str, Any] | None = end.values
            if values is None:
                self.accounts.pop(key, None)
                continue
            self.accounts[values[accounts.id]] = (
                values[accounts.customer],
                values[accounts.balance],
            )

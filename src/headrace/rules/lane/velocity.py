"""Velocity burst evaluated in memory, batch by batch, exactly as the SQL rule does.

The rules lane gives every :class:`ChangeBatch` to
:meth:`VelocityBurstLane.apply`, in the order of the source; given the same batches
as the engine it returns the alerts the SQL rule
(:mod:`headrace.rules.velocity_burst` + :func:`headrace.alerts.store.emit_incidents`)
writes for that batch. ``tests/rules/test_lane_velocity.py`` checks the equality on
real PostgreSQL change streams. The semantics ported, per batch of the transactions
table (every step is the SQL rule's, named after its code):

- **Net change** (the engine's ``TableDelta``): per key, the *start* row (before the
  batch) and the *end* row (after it; none when deleted). An update changing the key
  deletes the old key (``_hr_old_<key>``, else the new key) and writes the new one. A
  truncate clears the state (the changes after it are new rows).
- **Watermark** (``RuleJob.advance``): ``W`` is the rule's watermark *before* the batch
  (earliest possible before any); after it, ``max(W, max(least(t, commit_ts)))`` over
  the batch's end rows (any row, matching ``where`` or not; NULL ``t``: commit time).
  Batches without changes of the table leave it alone.
- **Window state** (``RecentTransactions``): the rows matching ``where`` with event time
  ``>= W - span`` (``span`` = longest window + ``rules.lateness``) as of *after* the
  batch: the touched keys' rows are replaced by their end rows, rows older than the
  horizon dropped. A delete takes the row out; every attempt counts whatever its
  status (only ``where`` decides).
- **Triggers** (``create_tx_triggers``): end rows matching ``where`` whose start row is
  absent, did not match ``where``, or had another account or event time, with
  ``t >= W - rules.lateness`` (so a transaction moved in time or to another account is
  checked again at its new place; a late one is counted but never triggers). A key
  missing from the window state stands for "no start row": a start row that matched
  but was dropped has ``t < W - span <= W - lateness``, so it could only trigger by
  changing ``t`` or the account, as in SQL.
- **Candidates** (``VelocityBurst.evaluate``): for each trigger ``e`` and limit
  ``(window, count)``: ``n`` = the account's window rows with ``t`` in
  ``(e.t - window, e.t]`` (the trigger included; the window in whole seconds, as the
  candidates statement has it); ``n >= count`` is a candidate. Of several limits
  crossed, the largest ``n / count`` wins, then the shorter window.
  ``started_at`` = the earliest ``t`` counted.
- **Incidents** (dedup key ``velocity_burst:<account>``): :class:`Incidents`.
- **Payload**: the numbers (transactions, limit, window seconds, the amount summed
  over the window), the trigger's key and the window's rows as evidence, ordered by
  ``(t, key)``, at most :data:`~headrace.rules.base.EVIDENCE_LIMIT`.

Not ported: unchanged TOAST values (the rule's columns are never TOASTed). Per changed
row of the transactions table the work is Python (a tuple per kept row, the evidence
fields as a tuple, ``bisect`` on per-account sorted lists): the state stays sorted
incrementally (a batch costs its own rows' inserts and evictions, never a sort of the
whole state).
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any

import duckdb

from headrace.rules.base import EARLIEST, EVIDENCE_LIMIT
from headrace.rules.config import RulesConfig
from headrace.rules.lane.alert import Candidate, Incidents, LaneAlert, from_us, to_us, us_delta
from headrace.rules.lane.changes import key_columns, net_change
from headrace.rules.lane.condition import arrow_condition
from headrace.rules.lane.saved import RuleSaved
from headrace.rules.lane.tx_rule import (
    AMOUNT,
    EVIDENCE_FIELDS,
    advance,
    seeded_watermark,
    time_sql,
    tx_columns,
    tx_wanted,
)
from headrace.rules.lane.window import AccountWindows, BatchFields, entry_time
from headrace.source.changes import ChangeBatch, TableRef
from headrace.store.duckdb.schema import mirror_table

RULE = "velocity_burst"
MATCHES = "_lane_matches"
"""Name of the rule's ``where`` among a net change's values."""


_Row = tuple[int, int]
"""What decides a trigger: ``(account, t)`` (event time in µs; a plain tuple, see
:data:`~headrace.rules.lane.window.Row`)."""


@dataclass
class VelocityBurstLane(AccountWindows[_Row]):
    """The velocity-burst rule over change batches, in memory (module docstring)."""

    rules: RulesConfig
    name: str = RULE
    watermark_us: int | None = None

    def __post_init__(self) -> None:
        burst = self.rules.velocity_burst
        if burst is None:
            raise ValueError("the velocity burst lane needs rules.velocity_burst")
        self.config = burst
        tx = self.rules.tables.transactions
        self.ref = TableRef.parse(tx.table)
        self.columns = tx_columns(tx)
        self.wanted = tx_wanted(self.columns)
        self.where = arrow_condition(burst.where)
        # the candidates statement joins on whole seconds (VALUES of int seconds)
        self.limits = [(int(limit.window.total_seconds()), limit.count) for limit in burst.limits]
        self.span_us = us_delta(max(limit.window for limit in burst.limits) + self.rules.lateness)
        self.lateness_us = us_delta(self.rules.lateness)
        self.earliest_us = to_us(EARLIEST)
        self.incidents = Incidents(us_delta(burst.rearm_after))

    def inputs(self) -> tuple[TableRef, ...]:
        return (self.ref,)

    # ----------------------------------------------------------- seeding

    def seed(self, con: duckdb.DuckDBPyConnection, saved: RuleSaved | None = None) -> None:
        """Start from the store's mirror, as a snapshot rebuild does: the watermark is the
        mirror's newest ``least(t, now())``, the window its rows within the span, the
        incidents' last-seen times the store's. ``saved`` (the lane's own record) gives
        the watermark and incidents instead."""
        mirror = mirror_table(self.ref)
        t = time_sql(self.columns["t"])
        self.watermark_us = seeded_watermark(con, self.ref, self.columns["t"], saved)
        self._clear()
        if self.watermark_us is not None:
            key = key_columns(con, self.ref)
            names = [f'"{k}"' for k in key]
            values = ", ".join(f'"{self.columns[n]}"' for n in EVIDENCE_FIELDS)
            cursor = con.execute(
                f"""SELECT {", ".join(names)}, "{self.columns["account"]}"::BIGINT,
                           epoch_us({t}), {values} FROM {mirror}
                    WHERE coalesce(({self.config.where}), false) AND {t} >= ?
                      AND "{self.columns["account"]}" IS NOT NULL""",
                [from_us(self.watermark_us - self.span_us)],
            )
            width = len(key)
            found = cursor.fetchall()
            for row in found:
                k: Hashable = row[0] if width == 1 else tuple(row[:width])
                fields = tuple(row[width + 2 :])
                self._add(k, (int(row[width]), int(row[width + 1])), fields)
        self.incidents.restore(con, RULE, saved)

    def take_saved(self) -> RuleSaved:
        """What to record with the lane's position: the watermark and the incidents changed."""
        return RuleSaved(self.watermark_us, self.incidents.take_touched())

    # ----------------------------------------------------------- per batch

    def apply(self, batch: ChangeBatch) -> list[LaneAlert]:
        """Evaluate one batch (module docstring); the alerts it opens, in event order."""
        change = net_change(
            batch, self.ref, self.wanted, {MATCHES: self.where}, mark=self.columns["t"]
        )
        if change is None:
            return []
        previous, self.watermark_us = advance(self.watermark_us, self.earliest_us, change)
        # Triggers read the start rows, the table as it was before the batch (the engine's
        # TableDelta.start), even when the batch truncates it: before the state changes.
        cutoff = previous - self.lateness_us
        columns = change.columns
        accounts, times, matches = (
            columns[self.columns["account"]],
            columns[self.columns["t"]],
            columns[MATCHES],
        )
        fields = BatchFields([columns[self.columns[name]] for name in EVIDENCE_FIELDS])
        triggers: list[tuple[Hashable, _Row, int]] = []
        ends: list[tuple[Hashable, _Row | None, int]] = []
        held = self.rows.get
        for key, i, alive in zip(change.keys, change.rows, change.live, strict=True):
            # a row that does not match, or has no account or time, neither triggers
            # nor counts: as a deleted one
            row = None
            if alive and matches[i]:
                account, t = accounts[i], times[i]
                if account is not None and t is not None:
                    row = (account, t)
            ends.append((key, row, i))
            if row is not None and row[1] >= cutoff and held(key) != row:
                triggers.append((key, row, i))
        if change.truncated:
            self._clear()
        self._update(ends, fields, previous - self.span_us)
        found = [
            self._candidate(key, row, change.commits[i], change.lsns[i]) for key, row, i in triggers
        ]
        return self.incidents.open([c for c in found if c is not None])

    def _candidate(self, key: Hashable, row: _Row, commit_us: int, lsn: int) -> Candidate | None:
        account, at = row
        entries = self.by_account.get(account, [])
        upper = bisect.bisect_right(entries, at, key=entry_time)
        best: tuple[float, int, int, int, int] | None = None  # factor, -seconds, n, count, lower
        for seconds, count in self.limits:
            lower = bisect.bisect_right(entries, at - seconds * 1_000_000, key=entry_time)
            n = upper - lower
            if n >= count:
                choice = (n / count, -seconds, n, count, lower)
                if best is None or choice[:2] > best[:2]:
                    best = choice
        if best is None:
            return None
        _, minus_seconds, n, count, lower = best
        found = (-minus_seconds, n, count, lower, upper)
        alert = partial(self._alert, key, row, commit_us, lsn, found)
        return Candidate(f"{RULE}:{account}", at, lsn, key, alert)

    def _alert(
        self,
        key: Hashable,
        row: _Row,
        commit_us: int,
        lsn: int,
        found: tuple[int, int, int, int, int],
    ) -> LaneAlert:
        """The alert of a candidate that opens an incident: the window's amount and
        evidence (time proportional to the window)."""
        account, at = row
        seconds, n, count, lower, upper = found
        window = self.by_account[account][lower:upper]
        amount = sum((self._amount(k) for _, k in window), Decimal(0))
        evidence = [self._evidence(t, k) for t, k in window[:EVIDENCE_LIMIT]]
        return LaneAlert(
            rule=RULE,
            account=account,
            key=f"{RULE}:{account}",
            trigger=key,
            event_us=at,
            started_us=window[0][0],
            commit_us=commit_us,
            lsn=lsn,
            severity=self.config.severity.value,
            summary=f"{n} transactions in {seconds} s on account {account} (limit {count})",
            numbers={
                "transactions": n,
                "limit": count,
                "window_seconds": seconds,
                "amount": amount,
            },
            evidence=evidence,
        )

    def _amount(self, key: Hashable) -> Decimal:
        value = self.fields[key][AMOUNT]
        return Decimal(0) if value is None else Decimal(str(value))

    def _evidence(self, t: int, key: Hashable) -> dict[str, Any]:
        fields = self.fields[key]
        return {
            "id": key,
            "at": from_us(t),
            "account": self.rows[key][0],
            **dict(zip(EVIDENCE_FIELDS, fields, strict=True)),
        }

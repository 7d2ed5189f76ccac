"""Structuring evaluated in memory, batch by batch, exactly as the SQL rule does.

The rules lane gives every :class:`ChangeBatch` to :meth:`StructuringLane.apply`, in
the order of the source; given the same batches as the engine it returns the alerts
the SQL rule (:mod:`headrace.rules.structuring` +
:func:`headrace.alerts.store.emit_incidents`) writes for that batch.
``tests/rules/test_lane_structuring.py`` checks the equality on real PostgreSQL change
streams. The semantics ported, per batch of the transactions table (every step is the
SQL rule's, named after its code; the method is :mod:`headrace.rules.lane.velocity`'s):

- **Net change** (the engine's ``TableDelta``): per key its end row (none when
  deleted); an update changing the key ends the old key. A truncate clears the state
  (the changes after it are new rows).
- **In band** (``Structuring.in_band``): ``where`` holds, ``band_low <= amount <
  threshold`` and ``tables.transactions.cancelled`` does not hold (NULL: not
  cancelled; any other NULL: not in band). The bounds are the SQL literals the rule
  writes (``str`` of the configured floats) read as :class:`~decimal.Decimal`, so the
  comparison with a DECIMAL amount is exact, as DuckDB's DECIMAL comparison is.
- **Watermark** (``RuleJob.advance``): ``W`` is the watermark *before* the batch
  (earliest possible before any); after it ``max(W, max(least(t, commit_ts)))`` over
  the batch's end rows, in band or not (NULL ``t``: the commit time).
- **Band state** (``RecentTransactions``, the rule's rows): the in-band rows with event
  time ``>= W - span`` (``span`` = ``window`` + ``rules.lateness``) as of *after* the
  batch: touched keys' rows replaced by their end rows, older rows dropped. A row
  declined or reversed leaves at once; an amount corrected into the band enters.
- **Triggers** (``create_tx_triggers``): in-band end rows whose start row is absent,
  was not in band, or had another account, amount or event time, with
  ``t >= W - rules.lateness``. A key missing from the band state stands for "no start
  row in band": a start row in band but dropped has ``t < W - span <= W - lateness``,
  so it triggers only by changing ``t`` (then it triggers in SQL too).
- **Candidates** (``Structuring.evaluate``): for each trigger ``e``, ``n`` = the
  account's band rows with ``t`` in ``(e.t - window, e.t]`` (the trigger included);
  ``n >= min_count`` is a candidate; ``started_at`` = the earliest ``t`` counted. The
  trigger prefilter (the same count) is implied by the candidate condition.
- **Incidents** (dedup key ``structuring:<account>``, re-arm ``rearm_after``):
  :class:`~headrace.rules.lane.alert.Incidents`.
- **Payload**: numbers ``transactions`` (int), ``min_count`` (int), ``total`` (sum of
  the window's amounts, Decimal), ``threshold``, ``band_low``, ``window_seconds``
  (floats, as configured); the trigger's key; the window's rows as evidence in
  ``(t, key)`` order, at most :data:`~headrace.rules.base.EVIDENCE_LIMIT`.
- **Summary**: DuckDB's ``format`` prints a DECIMAL (the amounts, their sum) through
  a DOUBLE, shortest round-trip (``9000.0``, ``9950.1``): Python's ``repr(float)``
  prints the same digits; integers (an integer amount column) print as integers. The
  hours are ``round(window_seconds / 3600, 1)`` with DuckDB's rounding (half away
  from zero on ``x * 10``, not Python's half-even ``round``): ``0.25`` h -> ``0.3``.

SQL rule findings, ported as they are (the lane equals the SQL rule, not its docstring):

- **A pattern completed before its newest row is missed.** A trigger counts only the
  window *ending* at it, ``(e.t - window, e.t]``, so a row that completes a pattern but
  is not the newest of it raises nothing: an amount corrected into the band, a
  cancelled row un-cancelled, or a row arriving out of order (within
  ``rules.lateness``) in a later batch than a newer one. Band rows at 0 s and 120 s,
  then one at 60 s in the next batch: three in the band within 2 minutes, no alert
  (``test_sql_rule_misses_patterns_completed_before_their_newest_row``). The module
  docstring of the SQL rule says "an amount corrected into the band can complete a
  pattern": only when it is the newest row of it.
- **Summary text**: amounts print through a DOUBLE (``9000.0``, not ``9000.00``;
  ``1e+16`` for huge sums) and windows under 3 minutes print as ``within 0.0 h``.

Not ported: unchanged TOAST values (the rule's columns are never TOASTed); sums beyond
2^53 cents, where DuckDB's DECIMAL(38) -> DOUBLE cast may round differently from
``float(Decimal)`` in the summary text (never in the numbers).

Cost: a batch none of whose rows has an amount near the band (most batches: band
amounts are rare) reads only keys and event times (the watermark; touched keys leave
the band state), ~4 µs per changed row; other batches read every row's values into
Python, ~10 µs per changed row (measured on ``/tmp/rec_fraud``). The band state keeps
per-account sorted lists (``bisect``); a trigger costs its window's rows (min, max,
sum, evidence).
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from headrace.rules.base import EARLIEST, EVIDENCE_LIMIT
from headrace.rules.config import RulesConfig
from headrace.rules.lane.alert import Candidate, Incidents, LaneAlert, from_us, to_us, us_delta
from headrace.rules.lane.changes import (
    NetChange,
    key_columns,
    micros,
    net_change,
)
from headrace.rules.lane.condition import arrow_condition
from headrace.rules.lane.duck_numbers import duck_round, duck_text
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
from headrace.rules.structuring import Structuring
from headrace.source.changes import ChangeBatch, TableRef
from headrace.store.duckdb.schema import mirror_table

RULE = "structuring"
MATCHES = "_lane_matches"
"""Name of the rule's ``where`` among a net change's values."""
CANCELLED = "_lane_cancelled"
"""Name of ``tables.transactions.cancelled`` among a net change's values."""

Amount = int | float | Decimal
"""An amount as the source column gives it (numeric: Decimal)."""


_Row = tuple[int, int, Amount]
"""What decides a trigger: ``(account, t, amount)`` (event time in µs; a plain tuple, see
:data:`~headrace.rules.lane.window.Row`)."""


@dataclass
class StructuringLane(AccountWindows[_Row]):
    """The structuring rule over change batches, in memory (module docstring)."""

    rules: RulesConfig
    name: str = RULE
    watermark_us: int | None = None

    def __post_init__(self) -> None:
        config = self.rules.structuring
        if config is None:
            raise ValueError("the structuring lane needs rules.structuring")
        self.config = config
        tx = self.rules.tables.transactions
        self.ref = TableRef.parse(tx.table)
        self.columns = tx_columns(tx)
        self.wanted = tx_wanted(self.columns)
        self.where = arrow_condition(config.where)
        self.cancelled = arrow_condition(tx.cancelled)
        # The SQL rule writes the bounds as Python's str of the floats: the same literals.
        self.low = Decimal(str(config.band_low))
        self.threshold = Decimal(str(config.threshold))
        # The cheap path's bounds: a DOUBLE cast of the amount may be off by an ulp.
        self.low_margin = float(self.low) - abs(float(self.low)) * 1e-9 - 1e-9
        self.high_margin = float(self.threshold) + abs(float(self.threshold)) * 1e-9 + 1e-9
        self.window_s = config.window.total_seconds()
        self.window_us = us_delta(config.window)
        self.hours = duck_text(duck_round(self.window_s / 3600, 1))
        self.span_us = us_delta(config.window + self.rules.lateness)
        self.lateness_us = us_delta(self.rules.lateness)
        self.earliest_us = to_us(EARLIEST)
        self.incidents = Incidents(us_delta(config.rearm_after))

    def inputs(self) -> tuple[TableRef, ...]:
        return (self.ref,)

    # ----------------------------------------------------------- seeding

    def seed(self, con: duckdb.DuckDBPyConnection, saved: RuleSaved | None = None) -> None:
        """Start from the store's mirror, as a snapshot rebuild does: the watermark is the
        mirror's newest ``least(t, now())``, the band its in-band rows within the span,
        the incidents' last-seen times the store's. ``saved`` (the lane's own record)
        gives the watermark and incidents instead."""
        mirror = mirror_table(self.ref)
        t = time_sql(self.columns["t"])
        self.watermark_us = seeded_watermark(con, self.ref, self.columns["t"], saved)
        self._clear()
        if self.watermark_us is not None:
            self._seed_band(con, mirror, t, self.watermark_us - self.span_us)
        self.incidents.restore(con, RULE, saved)

    def _seed_band(
        self, con: duckdb.DuckDBPyConnection, mirror: str, t: str, horizon_us: int
    ) -> None:
        """The mirror's in-band rows from ``horizon_us`` on (the SQL rule's own condition)."""
        key = key_columns(con, self.ref)
        names = [f'"{k}"' for k in key]
        values = ", ".join(f'"{self.columns[n]}"' for n in EVIDENCE_FIELDS)
        in_band = Structuring(self.rules).in_band
        cursor = con.execute(
            f"""SELECT {", ".join(names)}, "{self.columns["account"]}"::BIGINT,
                       epoch_us({t}), {values} FROM {mirror}
                WHERE coalesce(({in_band}), false) AND {t} >= ?
                  AND "{self.columns["account"]}" IS NOT NULL""",
            [from_us(horizon_us)],
        )
        width = len(key)
        found = cursor.fetchall()
        for row in found:
            k: Hashable = row[0] if width == 1 else tuple(row[:width])
            fields = tuple(row[width + 2 :])
            self._add(k, (int(row[width]), int(row[width + 1]), fields[AMOUNT]), fields)

    def take_saved(self) -> RuleSaved:
        """What to record with the lane's position: the watermark and the incidents changed."""
        return RuleSaved(self.watermark_us, self.incidents.take_touched())

    # ----------------------------------------------------------- per batch

    def apply(self, batch: ChangeBatch) -> list[LaneAlert]:
        """Evaluate one batch (module docstring); the alerts it opens, in event order."""
        if not self._may_be_in_band(batch):
            return self._apply_out_of_band(batch)
        change = net_change(
            batch,
            self.ref,
            self.wanted,
            {MATCHES: self.where, CANCELLED: self.cancelled},
            mark=self.columns["t"],
        )
        if change is None:
            return []
        previous = self._advance(change)
        # Triggers read the start rows: before the state is updated.
        cutoff = previous - self.lateness_us
        columns = change.columns
        accounts, times = columns[self.columns["account"]], columns[self.columns["t"]]
        amounts, matches, cancelled = (
            columns[self.columns["amount"]],
            columns[MATCHES],
            columns[CANCELLED],
        )
        fields = BatchFields([columns[self.columns[name]] for name in EVIDENCE_FIELDS])
        low, threshold = self.low, self.threshold
        triggers: list[tuple[Hashable, _Row, int]] = []
        ends: list[tuple[Hashable, _Row | None, int]] = []
        held = self.rows.get
        for key, i, alive in zip(change.keys, change.rows, change.live, strict=True):
            # in band (``Structuring.in_band``; NULL anywhere but in ``cancelled``: not in
            # band) with an account and a time, else it neither triggers nor counts
            row = None
            if alive and matches[i] and not cancelled[i]:
                account, t, amount = accounts[i], times[i], amounts[i]
                if (
                    account is not None
                    and t is not None
                    and amount is not None
                    and low <= amount < threshold
                ):
                    row = (account, t, amount)
            ends.append((key, row, i))
            if row is not None and row[1] >= cutoff and held(key) != row:
                triggers.append((key, row, i))
        self._update(ends, fields, previous - self.span_us)
        found = [
            self._candidate(key, row, change.commits[i], change.lsns[i]) for key, row, i in triggers
        ]
        return self.incidents.open([c for c in found if c is not None])

    def _may_be_in_band(self, batch: ChangeBatch) -> bool:
        """Some row of the batch (any version) may have an amount in the band: checked on
        the Arrow column, with a margin for the DOUBLE cast (exact test: :meth:`_in_band`).
        Most batches have none (band amounts are rare) and take the cheap path."""
        for part in batch.tables:
            if part.table != self.ref:
                continue
            try:
                amounts = pc.cast(part.data.column(self.columns["amount"]), pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return True  # not a number Arrow can cast: take the exact path
            near = pc.and_(
                pc.greater_equal(amounts, self.low_margin), pc.less(amounts, self.high_margin)
            )
            if pc.any(near).as_py():
                return True
        return False

    def _apply_out_of_band(self, batch: ChangeBatch) -> list[LaneAlert]:
        """A batch none of whose rows is in the band: no trigger; the touched keys leave
        the band state, the watermark moves, old rows expire (only the keys and event
        times are read: no row values in Python)."""
        time = self.columns["t"]
        change = net_change(batch, self.ref, {time: micros}, mark=time)
        if change is None:
            return []
        previous = self._advance(change)
        for key in change.keys:
            self._remove(key)
        self._evict(previous - self.span_us)
        return []

    def _advance(self, change: NetChange) -> int:
        """Move the watermark past the batch's end rows (clearing the state on a truncate);
        the watermark before the batch (``RuleJob.advance``)."""
        previous, self.watermark_us = advance(self.watermark_us, self.earliest_us, change)
        if change.truncated:
            self._clear()
        return previous

    def _candidate(self, key: Hashable, row: _Row, commit_us: int, lsn: int) -> Candidate | None:
        account, at, _ = row
        entries = self.by_account.get(account, [])
        upper = bisect.bisect_right(entries, at, key=entry_time)
        lower = bisect.bisect_right(entries, at - self.window_us, key=entry_time)
        if upper - lower < self.config.min_count:
            return None
        alert = partial(self._alert, key, row, commit_us, lsn, (lower, upper))
        return Candidate(f"{RULE}:{account}", at, lsn, key, alert)

    def _alert(
        self, key: Hashable, row: _Row, commit_us: int, lsn: int, found: tuple[int, int]
    ) -> LaneAlert:
        """The alert of a candidate that opens an incident (time proportional to the
        window)."""
        account, at, _ = row
        lower, upper = found
        n = upper - lower
        window = self.by_account[account][lower:upper]
        amounts = [self.rows[k][2] for _, k in window]
        total = sum(amounts[1:], amounts[0])
        summary = (
            f"{n} transactions of {duck_text(min(amounts))} to {duck_text(max(amounts))} "
            f"(total {duck_text(total)}) within {self.hours} h on account {account}"
        )
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
            summary=summary,
            numbers={
                "transactions": n,
                "min_count": self.config.min_count,
                "total": total,
                "threshold": self.config.threshold,
                "band_low": self.config.band_low,
                "window_seconds": self.window_s,
            },
            evidence=[self._evidence(t, k) for t, k in window[:EVIDENCE_LIMIT]],
        )

    def _evidence(self, t: int, key: Hashable) -> dict[str, Any]:
        fields = self.fields[key]
        return {
            "id": key,
            "at": from_us(t),
            "account": self.rows[key][0],
            **dict(zip(EVIDENCE_FIELDS, fields, strict=True)),
        }

"""Amount spike evaluated in memory, batch by batch, exactly as the SQL rule does.

The rules lane gives every :class:`ChangeBatch` to :meth:`AmountSpikeLane.apply`, in the
order of the source; given the same batches as the engine it returns the alerts the SQL
rule (:mod:`headrace.rules.amount_spike` + :func:`headrace.alerts.store.emit_incidents`)
writes for that batch. ``tests/rules/test_lane_amount_spike.py`` checks the equality on
real PostgreSQL change streams. The semantics ported, per batch of the transactions
table (every step is the SQL rule's, named after its code):

- **Net change** (the engine's ``TableDelta``): per key, the *start* row (the mirror's
  row before the batch) and the *end* row (after it; none when deleted). An update
  changing the key deletes the old key and writes the new one. A truncate: the end rows
  are those written after it, and the start rows are *every* row of the mirror before
  the batch (``take_start_rows`` reads the whole mirror), for the history as for the
  triggers (see below).
- **Watermark** (``RuleJob.advance``): ``W`` is the watermark *before* the batch
  (earliest possible before any); after it, ``max(W, max(least(t, commit_ts)))`` over
  the batch's end rows (NULL ``t``: commit time). Batches without changes of the table
  leave it alone.
- **Rows** (the mirror's start rows, which the SQL rule reads through the engine): per
  key of a row matching ``where``, its account, amount (as the history's integer units)
  and whether it also matches ``history_where``; a row not matching ``where`` is
  neither history nor a start row that can stop a trigger, so it is not kept. Unlike
  the window rules this is not bounded by time: a reversal or delete arrives as the key
  alone (no old values under the default replica identity) and the history must take
  out the amount it counted; a row moved in time from long ago keeps its start row.
- **History** (``AmountSpike.history``, ``KeyedSums``): per account the count ``n`` and
  exact sum of ``CAST(amount AS DECIMAL(38, 4))`` (kept as integer 1/10,000ths) of its
  rows matching ``where AND history_where``, all time; ``mean = CAST(total AS DOUBLE) /
  n`` (a float). Updated *after* the candidates (the rule's ``after`` hook): the
  candidates of a batch see the history as of before it. An account at ``n = 0`` is
  absent (``WHERE _rows > 0``).
- **Triggers** (``create_tx_triggers`` with columns ``(account, amount)``): end rows
  matching ``where`` whose start row is absent, did not match ``where``, or had another
  account or amount (``IS DISTINCT FROM``: ``700.00`` equals ``700.0``), with ``t >= W -
  rules.lateness - 1 day``. A row moved in time alone does not trigger.
- **Candidates** (``AmountSpike.evaluate``, ``crosses``): the account's history has
  ``n >= min_history``, ``mean > 0``, ``amount >= factor * mean`` (a DECIMAL against a
  DOUBLE: compared as floats) and ``amount >= min_amount`` (DECIMAL against the
  literal as DuckDB parses it: exact decimals unless it has an exponent).
- **Incidents** (dedup key ``amount_spike:<account>``): :class:`Incidents`.
- **Payload and summary**: ``format('{}', x)`` prints a DECIMAL or DOUBLE as Python's
  ``repr`` of the float; ``round(x, p)`` of a DOUBLE is DuckDB 2.0's (half away from
  zero on the exact binary value; ``(x * 10^p) / 10^p`` once ``|x * 10^p| >= 2^52``),
  both checked against DuckDB 2.0.1 on ~10^5 doubles while porting (a sample stays in
  the tests; :func:`duck_round`). Evidence: the trigger row alone.

Ported as the SQL rule has them (reported to the lead, not changed):

- *Possible bug*: an edited row is compared with the history as of before the batch,
  which holds the row itself with its old amount. Five settled purchases of 40, one
  edited to 800: "amount 800.0 is 20.0x the mean 40.0 of 5 earlier transactions",
  although only 4 others exist (``min_history`` 5 is met only by counting the row
  itself). ``test_an_edited_history_row_counts_in_its_own_history``.
- *Net-change semantics of a truncate*: in a batch that truncates the table, the
  triggers' start rows are the whole mirror before the batch, so a row re-inserted after
  the truncate under a key it had before, with the same account and amount, does not
  trigger (as a delete and re-insert in one batch), while a new key is checked against
  the history as of before the truncate. ``test_truncate_compares_with_the_rows_before_it``.

Not ported (the reference schema rules them out): NULL accounts (the SQL history's
primary key rejects them), NULL amounts (SQL counts them in ``n`` and a batch of only
NULL amounts makes the account's sum NULL for good), amount columns of a floating type
(``CAST(double AS DECIMAL(38, 4))`` rounding), unconstrained ``numeric`` columns (they
arrive as text), unchanged TOAST values, schema changes inside a batch. Per changed row
of the transactions table the work is Python (dict lookups; no sort, no scan of the
state).
"""

from __future__ import annotations

import decimal
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

import duckdb

from headrace.rules.base import EARLIEST
from headrace.rules.config import RulesConfig
from headrace.rules.lane.alert import Incidents, LaneAlert, from_us, to_us, us_delta
from headrace.rules.lane.changes import NetChange, first_column, key_columns, net_change
from headrace.rules.lane.condition import arrow_condition
from headrace.rules.lane.duck_numbers import duck_round, duck_text, sql_literal
from headrace.rules.lane.saved import RuleSaved
from headrace.rules.lane.tx_rule import advance, seeded_watermark, tx_columns, tx_wanted
from headrace.rules.triggers import TX_FIELDS
from headrace.source.changes import ChangeBatch, TableRef
from headrace.store.duckdb.schema import mirror_table

RULE = "amount_spike"
MATCHES = "_lane_matches"
"""Name of the rule's ``where`` among a net change's values."""
HISTORY = "_lane_history"
"""Name of the rule's ``history_where`` among a net change's values."""
UNITS = 10_000
"""The history sums ``CAST(amount AS DECIMAL(38, 4))``: integers of 1/10,000ths."""
HORIZON = timedelta(days=1)
"""How far before ``W - lateness`` a transaction is still checked (``evaluate``)."""


def _units(amount: Decimal | float | int) -> int:
    """``CAST(amount AS DECIMAL(38, 4))`` as an integer of 1/10,000ths (half away from 0)."""
    exact = Decimal(amount) * UNITS
    return int(exact.to_integral_value(rounding=decimal.ROUND_HALF_UP))


_Kept = tuple[int | None, int | None, Decimal | None, bool]
"""A row matching ``where`` as a start row, what the triggers and the history read:
``(account, units, exact, in_history)``.

``units`` is ``CAST(amount AS DECIMAL(38, 4))`` in 1/10,000ths (None: NULL amount), no
``Decimal`` per row since this state holds every purchase ever; ``exact`` the amount when
``units`` rounded it (more than 4 decimals), else None, so that comparing two amounts stays
exact. A plain tuple, not a NamedTuple: CPython stops tracking an exact tuple of atomic
values in the garbage collector, while a NamedTuple per row made every full collection
traverse all of them (100,000 rows: ~100 ms with every thread stopped).
"""


def _kept(account: int | None, amount: Any, in_history: bool) -> _Kept:
    if amount is None:
        return (account, None, None, in_history)
    # The exact ratio first: ~1 us where Decimal arithmetic takes ~3 (once per row).
    numerator, denominator = amount.as_integer_ratio()
    if UNITS % denominator == 0:
        return (account, numerator * (UNITS // denominator), None, in_history)
    return (account, _units(amount), Decimal(amount), in_history)


def _same(a: _Kept, b: _Kept) -> bool:
    """Same account and amount (SQL: neither ``IS DISTINCT FROM`` the other's)."""
    return a[:3] == b[:3]


@dataclass
class AmountSpikeLane:
    """The amount-spike rule over change batches, in memory (module docstring)."""

    rules: RulesConfig
    name: str = RULE
    watermark_us: int | None = None
    rows: dict[Hashable, _Kept] = field(default_factory=dict)
    """Every row matching ``where`` (the start rows that matter), by key."""
    history: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Per account with history: (n, sum in 1/10,000ths)."""

    def __post_init__(self) -> None:
        spike = self.rules.amount_spike
        if spike is None:
            raise ValueError("the amount spike lane needs rules.amount_spike")
        self.config = spike
        tx = self.rules.tables.transactions
        self.ref = TableRef.parse(tx.table)
        self.columns = tx_columns(tx)
        self.conditions = {
            MATCHES: arrow_condition(spike.where),
            HISTORY: arrow_condition(spike.history_where),
        }
        self.horizon_us = us_delta(self.rules.lateness + HORIZON)
        self.earliest_us = to_us(EARLIEST)
        self.min_amount = sql_literal(spike.min_amount)
        # ``{factor} * mean``: a DECIMAL (or DOUBLE) literal times a DOUBLE is a DOUBLE
        self.factor = float(sql_literal(spike.factor))
        self.incidents = Incidents(us_delta(spike.rearm_after))
        self.wanted = tx_wanted(self.columns)

    def inputs(self) -> tuple[TableRef, ...]:
        return (self.ref,)

    # ----------------------------------------------------------- seeding

    def seed(self, con: duckdb.DuckDBPyConnection, saved: RuleSaved | None = None) -> None:
        """Start from the store's mirror, as ``AmountSpike.rebuild`` does: the watermark is
        the mirror's newest ``least(t, now())``, the history its rows matching ``where
        AND history_where``, the incidents' last-seen times the store's. ``saved`` (the
        lane's own record) gives the watermark and incidents instead."""
        mirror = mirror_table(self.ref)
        self.watermark_us = seeded_watermark(con, self.ref, self.columns["t"], saved)
        self.rows.clear()
        self.history.clear()
        key = key_columns(con, self.ref)
        names = ", ".join(f'"{k}"' for k in key)
        cursor = con.execute(
            f"""SELECT {names}, "{self.columns["account"]}"::BIGINT, "{self.columns["amount"]}",
                       coalesce(({self.config.history_where}), false)
                FROM {mirror} WHERE coalesce(({self.config.where}), false)"""
        )
        width = len(key)
        for row in cursor.fetchall():
            k: Hashable = row[0] if width == 1 else tuple(row[:width])
            account = None if row[width] is None else int(row[width])
            self._add(k, _kept(account, row[width + 1], bool(row[width + 2])))
        self.incidents.restore(con, RULE, saved)

    def take_saved(self) -> RuleSaved:
        """What to record with the lane's position: the watermark and the incidents changed."""
        return RuleSaved(self.watermark_us, self.incidents.take_touched())

    # ----------------------------------------------------------- state

    def _add(self, key: Hashable, kept: _Kept) -> None:
        self.rows[key] = kept
        account, units, _, in_history = kept
        if in_history and account is not None:
            n, total = self.history.get(account, (0, 0))
            self.history[account] = (n + 1, total + (units or 0))

    def _remove(self, key: Hashable) -> None:
        kept = self.rows.pop(key, None)
        if kept is None:
            return
        account, units, _, in_history = kept
        if not in_history or account is None:
            return
        n, total = self.history[account]
        if n == 1:
            # ``_rows = 0`` reads as absent (and the sum is back to exactly 0)
            del self.history[account]
        else:
            self.history[account] = (n - 1, total - (units or 0))

    # ----------------------------------------------------------- per batch

    def apply(self, batch: ChangeBatch) -> list[LaneAlert]:
        """Evaluate one batch (module docstring); the alerts it opens, in event order."""
        change = net_change(batch, self.ref, self.wanted, self.conditions, mark=self.columns["t"])
        if change is None:
            return []
        previous, self.watermark_us = advance(self.watermark_us, self.earliest_us, change)
        # Triggers and candidates read the start rows and the history before the batch
        # (also when it truncates: the start rows are then the whole mirror before it).
        cutoff = previous - self.horizon_us
        columns = change.columns
        accounts, times = columns[self.columns["account"]], columns[self.columns["t"]]
        amounts, matches, history = (
            columns[self.columns["amount"]],
            columns[MATCHES],
            columns[HISTORY],
        )
        found: list[LaneAlert] = []
        kept: list[tuple[Hashable, _Kept | None]] = []
        held = self.rows.get
        for j, (key, i, alive) in enumerate(
            zip(change.keys, change.rows, change.live, strict=True)
        ):
            if not alive or not matches[i]:
                kept.append((key, None))  # deleted, or not matching ``where``: not kept
                continue
            row = _kept(accounts[i], amounts[i], history[i])
            kept.append((key, row))
            t = times[i]
            if t is None or t < cutoff:
                continue
            start = held(key)
            if start is not None and _same(start, row):
                continue
            candidate = self._candidate(key, row, t, change, j)
            if candidate is not None:
                found.append(candidate)
        # The rule's ``after``: the history (and the start rows) as of after the batch.
        if change.truncated:
            self.rows.clear()
            self.history.clear()
        for key, row_or_none in kept:
            self._remove(key)
            if row_or_none is not None:
                self._add(key, row_or_none)
        return self.incidents.open(found)

    def _candidate(
        self, key: Hashable, row: _Kept, t: int, change: NetChange, j: int
    ) -> LaneAlert | None:
        """The alert of trigger ``row`` (the ``j``-th key of ``change``), if it spikes."""
        account, units, _, _ = row
        if account is None or units is None:
            return None
        sums = self.history.get(account)
        if sums is None:
            return None
        n, total = sums
        mean = total / UNITS / n if n else 0.0
        if n < self.config.min_history or not mean > 0:
            return None
        amount = change.columns[self.columns["amount"]][change.rows[j]]
        amount_float = float(amount)
        if not amount_float >= self.factor * mean:
            return None
        below = (
            float(amount) < self.min_amount
            if isinstance(self.min_amount, float)
            else Decimal(amount) < self.min_amount
        )
        end = change.end(j)
        if below or end.values is None:  # (a trigger is a live row: values are never None)
            return None
        ratio = amount_float / mean
        trigger = first_column(key)
        return LaneAlert(
            rule=RULE,
            account=account,
            key=f"{RULE}:{account}",
            trigger=trigger,
            event_us=t,
            started_us=t,
            commit_us=end.commit_us,
            lsn=end.lsn,
            severity=self.config.severity.value,
            summary=(
                f"amount {duck_text(amount)} is {duck_text(duck_round(ratio, 1))}x the mean "
                f"{duck_text(duck_round(mean, 2))} of {n} earlier transactions of account "
                f"{account}"
            ),
            numbers={
                "amount": amount,
                "mean": duck_round(mean, 2),
                "factor": duck_round(ratio, 2),
                "threshold_factor": self.config.factor,
                "min_amount": self.config.min_amount,
                "history": n,
            },
            evidence=[self._evidence(trigger, t, account, end.values)],
        )

    def _evidence(
        self, trigger: Hashable, t: int, account: int, values: dict[str, Any]
    ) -> dict[str, Any]:
        """``tx_evidence('t')``: the trigger row in the rule shape."""
        out: dict[str, Any] = {"id": trigger, "at": from_us(t), "account": account}
        for name in TX_FIELDS:
            if name not in ("account", "t"):
                out[name] = values[self.columns[name]]
        return out

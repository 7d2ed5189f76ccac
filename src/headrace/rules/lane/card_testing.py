"""Card testing evaluated in memory, batch by batch, exactly as the SQL rule does.

The rules lane gives every :class:`ChangeBatch` to :meth:`CardTestingLane.apply`, in
the order of the source; given the same batches as the engine it returns the alerts
the SQL rule (:mod:`headrace.rules.card_testing` +
:func:`headrace.alerts.store.emit_incidents`) writes for that batch.
``tests/rules/test_lane_card_testing.py`` checks the equality on real PostgreSQL
change streams. The semantics ported, per batch of the transactions table (every
step is the SQL rule's, named after its code):

- **Net change** (the engine's ``TableDelta``): per key its end row (none when
  deleted), see :func:`~headrace.rules.lane.changes.net_change`.
- **Attempt** (``CardTesting.qualifies``): a row is an attempt when ``online`` holds
  and (``amount < small_amount`` or ``declines`` holds), each condition NULL as false.
  ``amount < small_amount`` compares the amount with the literal the SQL text has
  (``str(small_amount)``: a DuckDB DECIMAL literal, compared exactly, so as a
  :class:`~decimal.Decimal`; with an exponent a DOUBLE, compared as a float).
- **Watermark** (``RuleJob.advance``): ``W`` is the rule's watermark *before* the batch
  (earliest possible before any); after it, ``max(W, max(least(t, commit_ts)))`` over
  the batch's end rows (attempts or not; NULL ``t``: the commit time).
- **Window state** (``RecentTransactions``): the attempts with event time
  ``>= W - span`` (``span`` = ``window`` + ``rules.lateness``) as of *after* the batch:
  the touched keys' rows are replaced by their end rows, rows older than the horizon
  dropped; a truncate empties it first. Per row: account, time, amount, merchant, and
  ``declined`` (``tables.transactions.declined``, NULL as false: the evidence count,
  not the rule's ``declines``).
- **Triggers** (``create_tx_triggers`` with the columns account, amount, merchant,
  time): end rows that are attempts whose start row is absent, was no attempt, or had
  another account, amount, merchant or event time, with ``t >= W - rules.lateness``. A
  status change of a row that already was an attempt (e.g. a small attempt declined)
  does not trigger; one that makes it an attempt (a large one declined) does. A key
  missing from the window state stands for "no start row": a start row that was an
  attempt but was dropped has ``t < W - span <= W - lateness``, so it could only
  trigger by changing ``t``, as in SQL. The start rows are the table *before the
  batch* even when the batch truncates it (the engine's ``start`` is then the whole
  mirror): a key truncated and written again in the same batch with the same values
  does not trigger, so the triggers are taken before the truncate clears the state.
- **Candidates** (``CardTesting.evaluate``): for each trigger ``e``: the account's
  window rows with ``t`` in ``(e.t - window, e.t]`` (the trigger included); at least
  ``min_attempts`` of them at at least ``min_merchants`` distinct merchants (NULL
  merchants count as attempts, not as merchants: ``count(DISTINCT)``) is a candidate.
  ``started_at`` = the earliest ``t`` counted.
- **Incidents** (dedup key ``card_testing:<account>``): :class:`Incidents`.
- **Payload**: the numbers (attempts, merchants, declined, small: the rows with
  ``amount < small_amount``, the three settings; ``window_seconds`` as the float
  ``window.total_seconds()``), the trigger's key and the window's rows as evidence,
  ordered by ``(t, key)``, at most :data:`~headrace.rules.base.EVIDENCE_LIMIT`.
  Summary: ``"<n> small or declined online attempts at <m> merchants within <w> s on
  account <a> (<d> declined)"``, ``<w>`` as DuckDB renders the DECIMAL literal
  ``600.0`` (durations are whole seconds, so Python's ``str`` of the float).

**SQL rule finding, kept on purpose** (the lane equals the SQL rule; see
``test_a_pattern_completed_behind_the_newest_attempt_waits``): a trigger is checked
only against the window *ending* at it, never against the later windows that now
contain it. So an attempt arriving out of order (within ``rules.lateness``), or an
earlier attempt declined now (pending -> declined), whose pattern lies in the window
ending at an attempt already evaluated raises no alert until the account's next
attempt (and none if no attempt follows within ``window``).

For a key of several columns the SQL rule names only its first column (``_k0``) as
the trigger and evidence id; so does the lane (the state is keyed by the whole key).

Not ported: unchanged TOAST values (the rule's columns are never TOASTed). Per changed
row of the transactions table the work is Python (dicts, ``bisect`` on per-account
sorted lists, a heap for eviction); per trigger a scan of its window (the attempts of
one account within ``window``).
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
from headrace.rules.lane.changes import first_column, key_columns, net_change
from headrace.rules.lane.condition import RowCondition, arrow_condition
from headrace.rules.lane.saved import RuleSaved
from headrace.rules.lane.tx_rule import (
    AMOUNT,
    EVIDENCE_FIELDS,
    MERCHANT,
    advance,
    seeded_watermark,
    time_sql,
    tx_columns,
    tx_wanted,
)
from headrace.rules.lane.window import AccountWindows, BatchFields, entry_time
from headrace.source.changes import ChangeBatch, TableRef
from headrace.store.duckdb.schema import mirror_table

RULE = "card_testing"
ONLINE = "_lane_online"
"""Name of ``tables.transactions.online`` among a net change's values."""
DECLINES = "_lane_declines"
"""Name of the rule's ``declines`` (declined attempts counting whatever their amount)."""
DECLINED = "_lane_declined"
"""Name of ``tables.transactions.declined`` (the payload's ``declined`` count)."""


_Attempt = tuple[int, int, Any, Any, bool, bool]
"""One attempt of the window state: ``(account, t, amount, merchant, small, declined)``,
what decides a trigger (the first four: another value re-triggers the row) and what the
numbers count (a plain tuple, see :data:`~headrace.rules.lane.window.Row`)."""
WATCHED = 4
"""The trigger's columns: ``attempt[:WATCHED]``."""
MERCHANT_AT, SMALL_AT, DECLINED_AT = 3, 4, 5


@dataclass
class CardTestingLane(AccountWindows[_Attempt]):
    """The card-testing rule over change batches, in memory (module docstring)."""

    rules: RulesConfig
    name: str = RULE
    watermark_us: int | None = None

    def __post_init__(self) -> None:
        config = self.rules.card_testing
        if config is None:
            raise ValueError("the card testing lane needs rules.card_testing")
        self.config = config
        tx = self.rules.tables.transactions
        self.tx = tx
        self.ref = TableRef.parse(tx.table)
        self.columns = tx_columns(tx)
        self.conditions: dict[str, RowCondition] = {
            ONLINE: arrow_condition(tx.online),
            DECLINED: arrow_condition(tx.declined),
        }
        if config.declines:
            self.conditions[DECLINES] = arrow_condition(config.declines)
        # The SQL text compares with the literal str(small_amount): DECIMAL unless it has
        # an exponent (then DOUBLE, and DuckDB compares as doubles).
        literal = str(config.small_amount)
        self.small_amount: Decimal | float = (
            float(literal) if "e" in literal.lower() else Decimal(literal)
        )
        self.window_seconds = config.window.total_seconds()
        self.window_us = us_delta(config.window)
        self.span_us = us_delta(config.window + self.rules.lateness)
        self.lateness_us = us_delta(self.rules.lateness)
        self.earliest_us = to_us(EARLIEST)
        self.incidents = Incidents(us_delta(config.rearm_after))
        self.wanted = tx_wanted(self.columns)

    def inputs(self) -> tuple[TableRef, ...]:
        return (self.ref,)

    # ----------------------------------------------------------- seeding

    def _qualifies_sql(self) -> str:
        """``CardTesting.qualifies`` (SQL over a source row)."""
        small = f'"{self.tx.amount}" < {self.config.small_amount}'
        if self.config.declines:
            small = f"{small} OR coalesce(({self.config.declines}), false)"
        return f"({self.tx.online}) AND ({small})"

    def seed(self, con: duckdb.DuckDBPyConnection, saved: RuleSaved | None = None) -> None:
        """Start from the store's mirror, as a snapshot rebuild does: the watermark is the
        mirror's newest ``least(t, now())``, the window its attempts within the span, the
        incidents' last-seen times the store's. ``saved`` (the lane's own record) gives
        the watermark and incidents instead."""
        mirror = mirror_table(self.ref)
        t = time_sql(self.columns["t"])
        self.watermark_us = seeded_watermark(con, self.ref, self.columns["t"], saved)
        self._clear()
        if self.watermark_us is not None:
            self._seed_rows(con, mirror, t, self.watermark_us)
        self.incidents.restore(con, RULE, saved)

    def _seed_rows(
        self, con: duckdb.DuckDBPyConnection, mirror: str, t: str, watermark_us: int
    ) -> None:
        """The mirror's attempts within the span of the watermark (``rebuild_recent``)."""
        key = key_columns(con, self.ref)
        names = [f'"{k}"' for k in key]
        values = ", ".join(f'"{self.columns[name]}"' for name in EVIDENCE_FIELDS)
        cursor = con.execute(
            f"""SELECT {", ".join(names)}, "{self.columns["account"]}"::BIGINT, epoch_us({t}),
                       coalesce(({self.tx.declined}), false), {values} FROM {mirror}
                WHERE coalesce(({self._qualifies_sql()}), false) AND {t} >= ?
                  AND "{self.columns["account"]}" IS NOT NULL""",
            [from_us(watermark_us - self.span_us)],
        )
        width = len(key)
        found = cursor.fetchall()
        for row in found:
            k: Hashable = row[0] if width == 1 else tuple(row[:width])
            account, t_us, declined = row[width : width + 3]
            fields = tuple(row[width + 3 :])
            amount = fields[AMOUNT]
            small = amount is not None and amount < self.small_amount
            attempt = (int(account), int(t_us), amount, fields[MERCHANT], small, bool(declined))
            self._add(k, attempt, fields)

    def take_saved(self) -> RuleSaved:
        """What to record with the lane's position: the watermark and the incidents changed."""
        return RuleSaved(self.watermark_us, self.incidents.take_touched())

    # ----------------------------------------------------------- per batch

    def apply(self, batch: ChangeBatch) -> list[LaneAlert]:
        """Evaluate one batch (module docstring); the alerts it opens, in event order."""
        change = net_change(batch, self.ref, self.wanted, self.conditions, mark=self.columns["t"])
        if change is None:
            return []
        previous, self.watermark_us = advance(self.watermark_us, self.earliest_us, change)
        # Triggers compare with the start rows (the table before the batch, a truncate in
        # it or not): before the state is updated.
        cutoff = previous - self.lateness_us
        columns = change.columns
        online, declined = columns[ONLINE], columns[DECLINED]
        declines = columns.get(DECLINES)
        accounts, times = columns[self.columns["account"]], columns[self.columns["t"]]
        amounts, merchants = columns[self.columns["amount"]], columns[self.columns["merchant"]]
        fields = BatchFields([columns[self.columns[name]] for name in EVIDENCE_FIELDS])
        small_amount = self.small_amount
        triggers: list[tuple[Hashable, _Attempt, int]] = []
        ends: list[tuple[Hashable, _Attempt | None, int]] = []
        held = self.rows.get
        for key, i, alive in zip(change.keys, change.rows, change.live, strict=True):
            # an attempt: online, small or a counted decline, with an account and a time
            # (else it never joins a window nor completes one); most rows of a payments
            # stream are not online
            attempt = None
            if alive and online[i]:
                account, t, amount = accounts[i], times[i], amounts[i]
                small = amount is not None and amount < small_amount
                if account is not None and t is not None and (small or (declines and declines[i])):
                    attempt = (account, t, amount, merchants[i], small, declined[i])
            ends.append((key, attempt, i))
            if attempt is None or attempt[1] < cutoff:
                continue
            before = held(key)
            if before is None or before[:WATCHED] != attempt[:WATCHED]:
                triggers.append((key, attempt, i))
        if change.truncated:
            self._clear()
        self._update(ends, fields, previous - self.span_us)
        found = [
            self._candidate(key, attempt, change.commits[i], change.lsns[i])
            for key, attempt, i in triggers
        ]
        return self.incidents.open([c for c in found if c is not None])

    def _candidate(
        self, key: Hashable, row: _Attempt, commit_us: int, lsn: int
    ) -> Candidate | None:
        account, at = row[0], row[1]
        entries = self.by_account.get(account, [])
        upper = bisect.bisect_right(entries, at, key=entry_time)
        lower = bisect.bisect_right(entries, at - self.window_us, key=entry_time)
        config = self.config
        if upper - lower < config.min_attempts:
            return None
        rows = self.rows
        merchants = len(
            {m for _, k in entries[lower:upper] if (m := rows[k][MERCHANT_AT]) is not None}
        )
        if merchants < config.min_merchants:
            return None
        found = (lower, upper, merchants)
        alert = partial(self._alert, key, row, commit_us, lsn, found)
        return Candidate(f"{RULE}:{account}", at, lsn, first_column(key), alert)

    def _alert(
        self, key: Hashable, row: _Attempt, commit_us: int, lsn: int, found: tuple[int, int, int]
    ) -> LaneAlert:
        """The alert of a candidate that opens an incident (time proportional to the
        window)."""
        account, at = row[0], row[1]
        config = self.config
        lower, upper, merchants = found
        n = upper - lower
        window = [(t, k, self.rows[k]) for t, k in self.by_account[account][lower:upper]]
        declined = sum(1 for _, _, w in window if w[DECLINED_AT])
        small = sum(1 for _, _, w in window if w[SMALL_AT])
        evidence = [self._evidence(t, k, w) for t, k, w in window[:EVIDENCE_LIMIT]]
        return LaneAlert(
            rule=RULE,
            account=account,
            key=f"{RULE}:{account}",
            trigger=first_column(key),
            event_us=at,
            started_us=window[0][0],
            commit_us=commit_us,
            lsn=lsn,
            severity=config.severity.value,
            summary=(
                f"{n} small or declined online attempts at {merchants} merchants within "
                f"{self.window_seconds} s on account {account} ({declined} declined)"
            ),
            numbers={
                "attempts": n,
                "merchants": merchants,
                "declined": declined,
                "small": small,
                "min_attempts": config.min_attempts,
                "min_merchants": config.min_merchants,
                "window_seconds": self.window_seconds,
            },
            evidence=evidence,
        )

    def _evidence(self, t: int, key: Hashable, row: _Attempt) -> dict[str, Any]:
        fields = self.fields[key]
        return {
            "id": first_column(key),
            "at": from_us(t),
            "account": row[0],
            **dict(zip(EVIDENCE_FIELDS, fields, strict=True)),
        }

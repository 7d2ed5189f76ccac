"""The recent transactions the window rules read: one table shared by four rules.

Velocity burst, card testing, impossible travel and structuring each read
the account's recent transactions that pass the rule's own filter, within
the rule's span (its window plus ``rules.lateness``) of its watermark.
Instead of one window table per rule, they share ``jobs.rules__recent``:
the union of the columns they read (``_k0``..., :data:`TX_FIELDS`,
``declined``) and one boolean per rule (``_in_<rule>``: the row passes the
rule's filter). A row is kept while some rule keeps it (its flag is set and
its time is within that rule's horizon); each rule reads its own rows with
:meth:`RecentTransactions.rows` (flag set, time within its horizon), which
are exactly the rows its own window table held.

Per batch one DELETE (rows out of every rule's span, and the touched keys)
and one INSERT (the touched keys' end rows some rule keeps) replace the
four pairs the rules ran before: on DuckDB each statement costs
milliseconds whatever its size. Likewise the rules' trigger prefilters
over their recent rows (velocity burst's limits, impossible travel's earlier
use elsewhere, card testing's and structuring's counts in the window ending
at the trigger) are computed by one correlated subquery per trigger row
(:meth:`RecentTransactions.check`, :meth:`RecentTransactions.checks_column`)
instead of one each: every subquery is planned and run as its own delim join,
a few milliseconds apiece whatever the rows.

A store written before this table existed gets it at the first batch (or
snapshot rebuild), filled from the transactions mirror with the rules'
current horizons; :meth:`RecentTransactions.setup` drops the old per-rule
window tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import duckdb

from headrace.jobs.base import TableDelta, state_table
from headrace.jobs.state import create_like, state_tables
from headrace.pipeline.model import quote_ident
from headrace.rules.config import TransactionsTable
from headrace.rules.triggers import tx_columns

MEMBERS = ("velocity_burst", "impossible_travel", "structuring", "card_testing")
"""The rules reading the shared table (each has a flag column, configured or not, so the
table's shape does not depend on the configuration)."""

OLD_TABLES = (
    ("velocity_burst", "events"),
    ("impossible_travel", "uses"),
    ("structuring", "band"),
    ("card_testing", "attempts"),
)
"""The per-rule window tables the shared table replaced (dropped by setup)."""


CHECKS = "_recent_checks"
"""Column of the trigger rows holding the rules' checks over their recent rows (a struct
with one boolean per rule; see :meth:`RecentTransactions.check`)."""


def flag(rule: str) -> str:
    """Quoted name of ``rule``'s membership column."""
    return quote_ident(f"_in_{rule}")


def _time_literal(value: datetime) -> str:
    return f"CAST('{value.isoformat()}' AS TIMESTAMPTZ)"


@dataclass
class RecentTransactions:
    """The shared table of recent transactions (module docstring).

    ``filters`` maps each configured member rule to its filter (SQL over the
    source row). Each batch, every member rule sets its horizon
    (:meth:`set_horizon`) before :meth:`update` runs.
    """

    tx: TransactionsTable
    filters: Mapping[str, str]
    table: str = field(default_factory=lambda: state_table("rules", "recent"))
    ready: bool = False
    """The table exists (cleared when the engine reloads)."""
    horizons: dict[str, datetime | None] = field(default_factory=dict)
    """Each member's horizon for the batch being applied (None: keeps nothing)."""
    checks: dict[str, str] = field(default_factory=dict)
    """Each member's trigger check this batch: SQL aggregate over its recent rows of the
    trigger's account (see :meth:`check`)."""

    def __post_init__(self) -> None:
        unknown = set(self.filters) - set(MEMBERS)
        if unknown:
            raise ValueError(f"not a window rule: {sorted(unknown)}")

    def begin(self) -> None:
        """Forget the previous batch's horizons and checks (before the rules evaluate)."""
        self.horizons.clear()
        self.checks.clear()

    def set_horizon(self, rule: str, horizon: datetime | None) -> None:
        """``rule`` keeps its rows with event time at or after ``horizon`` this batch."""
        self.horizons[rule] = horizon

    def rows(self, rule: str) -> str:
        """SQL: ``rule``'s recent transactions (its filter, within its horizon)."""
        return f"(SELECT * FROM {self.table} w WHERE {self.own(rule)})"

    def own(self, rule: str, alias: str = "w") -> str:
        """SQL: the recent row ``alias`` is one of ``rule``'s (its flag, within its horizon)."""
        horizon = self.horizons.get(rule)
        within = "false" if horizon is None else f"{alias}.t >= {_time_literal(horizon)}"
        return f"({alias}.{flag(rule)} AND {within})"

    def check(self, rule: str, aggregate: str) -> str:
        """SQL over a trigger row ``e``: ``aggregate`` holds for its account's recent rows.

        ``aggregate`` is a boolean SQL aggregate over the rows ``w`` of the trigger's
        account (every member's: restrict it with :meth:`own`); it may read ``e``. The
        checks of every rule are computed by one correlated subquery per trigger row
        (:meth:`checks_column`) instead of one each.
        """
        self.checks[rule] = aggregate
        return f"e.{CHECKS}.{quote_ident(rule)}"

    def checks_column(self) -> str:
        """SQL select item over a trigger row ``e``: the struct :meth:`check` reads ("" when
        no rule asked)."""
        if not self.checks:
            return ""
        fields = ", ".join(
            f"{quote_ident(rule)} := coalesce(({aggregate}), false)"
            for rule, aggregate in self.checks.items()
        )
        return (
            f"(SELECT struct_pack({fields}) FROM {self.table} w "
            f"WHERE w.account = e.account) AS {CHECKS}"
        )

    def _select(self, source: str, key: Iterable[str]) -> str:
        keys = [f"{quote_ident(k)} AS _k{i}" for i, k in enumerate(key)]
        values = [f"{sql} AS {quote_ident(name)}" for name, sql in tx_columns(self.tx)]
        values.append(f"coalesce(({self.tx.declined}), false) AS declined")
        flags = [
            f"coalesce(({self.filters[rule]}), false) AS {flag(rule)}"
            if rule in self.filters
            else f"false AS {flag(rule)}"
            for rule in MEMBERS
        ]
        return f"SELECT {', '.join(keys + values + flags)} FROM {source}"

    def _kept(self, alias: str) -> str:
        """SQL: the row ``alias`` is kept by some member (flag set, within its horizon)."""
        kept = []
        for rule in self.filters:
            if rule not in self.horizons:
                kept.append(f"{alias}.{flag(rule)}")  # no horizon this batch: prune nothing
                continue
            horizon = self.horizons[rule]
            if horizon is not None:
                kept.append(f"({alias}.{flag(rule)} AND {alias}.t >= {_time_literal(horizon)})")
        return f"coalesce({' OR '.join(kept) or 'false'}, false)"

    def setup(self, con: duckdb.DuckDBPyConnection) -> None:
        """Drop the per-rule window tables of stores written before the table was shared."""
        self.ready = False
        for job, part in OLD_TABLES:
            con.execute(f"DROP TABLE IF EXISTS {state_table(job, part)}")

    def ensure(self, con: duckdb.DuckDBPyConnection, mirror: str, key: tuple[str, ...]) -> bool:
        """Create the table if absent; True when it was created now (then it is empty)."""
        if self.table in state_tables(con):
            return False
        create_like(con, self.table, self._select(mirror, key) + " LIMIT 0")
        return True

    def update(self, con: duckdb.DuckDBPyConnection, delta: TableDelta) -> None:
        """Drop rows no member keeps and the touched keys' rows; insert their end rows."""
        if not self.ready:
            if self.ensure(con, delta.mirror, delta.key):
                # The mirror holds the batch's end rows: the touched keys are replaced
                # below, so this is the table as of before the batch, then updated.
                self.rebuild(con, delta.mirror, delta.key)
            self.ready = True
        if delta.truncated:
            con.execute(f"DELETE FROM {self.table}")
        else:
            match = " AND ".join(f"w._k{i} = k.{quote_ident(k)}" for i, k in enumerate(delta.key))
            con.execute(
                f"DELETE FROM {self.table} w WHERE NOT {self._kept('w')} "
                f"OR EXISTS (SELECT 1 FROM {delta.keys} k WHERE {match})"
            )
        if delta.end_count:
            con.execute(
                f"INSERT INTO {self.table} SELECT * FROM ({self._select(delta.end, delta.key)}) r "
                f"WHERE {self._kept('r')}"
            )

    def rebuild(self, con: duckdb.DuckDBPyConnection, mirror: str, key: tuple[str, ...]) -> None:
        """Refill from ``mirror`` with the members' horizons (after a snapshot)."""
        self.ensure(con, mirror, key)
        con.execute(f"DELETE FROM {self.table}")
        con.execute(
            f"INSERT INTO {self.table} SELECT * FROM ({self._select(mirror, key)}) r "
            f"WHERE {self._kept('r')}"
        )
        self.ready = True

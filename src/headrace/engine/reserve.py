"""Min/max reserves: each group's values near its extremes, so a retracted extreme is
replaced without reading the mirror.

A sum or a count takes a retraction by subtracting; a min or a max needs the next
value. Reading it from the mirror scans the whole table (rows of a group are
spread over it), a cost that grows with the mirror. A *reserve* keeps, per group,
the multiset of the values at either end instead:

- the state row of a group holds two bounds, ``lo`` and ``hi``; the reserve table
  (``rollup.<name>__reserve_<j>``: group columns, ``_hr_value``, ``_hr_n``) holds
  exactly the group's values ``v <= lo`` or ``v >= hi``, with their row counts;
  both bounds NULL means *complete*: every value of the group is in the reserve;
- a batch appends, before its MERGE, the in-bound values of its weighted rows
  (+1 new, -1 old) under the bounds the state holds then (:func:`append_sql`);
  appended rows are folded by the rollup's compaction like side tables;
- the new min of a group whose min was retracted is the smallest value of its
  reserve with a positive count among ``v <= lo`` (every value of the group at or
  below ``lo`` is there, and every other value is above it); likewise for max;
- when that side is empty but the group is bounded, the reserve is *exhausted*:
  the extreme is recomputed from the mirror and the group's reserve rebuilt from
  it (new bounds, as a build would set them);
- between batches, after each compaction cycle: groups with more than
  :data:`TRIM_AT` distinct values are trimmed to their :data:`KEEP` smallest and
  largest (``lo`` only moves down, ``hi`` only up, so the reserve stays exactly
  the values beyond them), and groups with a side thinner than :data:`THIN_AT`
  values are rebuilt from the mirror, so that a batch rarely finds a side
  empty (a workload that deletes as much as it inserts wears sides down).

A builder of the state (creation, rebuild, refill) computes the bounds with the
same formula from the same mirror rows as the reserve's rows
(:meth:`Reserve.bounds_sql`, :func:`reserve_select`), so the two always agree.

Exactness is tested against PostgreSQL with reserves one and two values deep, so
that every path (trims, refills between batches, sides running out within a
batch) is taken often (``tests/engine/test_extremes.py``).

One reserve serves every min/max measure of a rollup over the same value and
filter (``min(amount)`` and ``max(amount)`` share one).
"""

from __future__ import annotations

from dataclasses import dataclass

KEEP = 16
"""Values kept at each end of a group when its reserve is built or trimmed. A side
empties (and the mirror is read for that group) only after about this many more of
its values are retracted than added beyond its bound. Deeper reserves make a batch
append more rows to them and fold them more often (`bench replay` of a 100k/s
recording: 32 cost ~4 ms more a 146,000-change batch than 16; at 16 the store writes
22% more WAL than with no reserve)."""

TRIM_AT = 3 * KEEP
"""Distinct values above which a group's reserve is trimmed back to :data:`KEEP` at
each end (after a compaction cycle)."""

THIN_AT = KEEP // 2
"""Values at one end below which a bounded group's reserve is rebuilt from the mirror
(after a compaction cycle)."""

VALUE = "_hr_value"
COUNT = "_hr_n"


def match_sql(columns: list[str], left: str, right: str) -> str:
    """Join condition of aliases ``left`` and ``right`` on ``columns`` (NULL matches NULL)."""
    return " AND ".join(f"{left}.{c} IS NOT DISTINCT FROM {right}.{c}" for c in columns)


def _qualified(columns: list[str], alias: str) -> str:
    return ", ".join(f"{alias}.{c}" for c in columns)


@dataclass(frozen=True)
class Reserve:
    """One reserve of a rollup: its number, the projection columns of its value and
    filter, its table and the state's bound columns."""

    index: int
    value: str
    filter: str | None
    table: str

    @property
    def lo(self) -> str:
        return f"_hr_x{self.index}_lo"

    @property
    def hi(self) -> str:
        return f"_hr_x{self.index}_hi"

    @property
    def low(self) -> str:
        """Column of :func:`sides_sql`: the smallest value kept at or below ``lo``."""
        return f"_hr_x{self.index}_low"

    @property
    def high(self) -> str:
        """Column of :func:`sides_sql`: the largest value kept at or above ``hi``."""
        return f"_hr_x{self.index}_high"

    @property
    def bounded(self) -> str:
        """Column of :func:`sides_sql`: whether the group's reserve is bounded."""
        return f"_hr_x{self.index}_bounded"

    def exhausted(self, alias: str) -> str:
        """Over a row of alias ``alias`` with :func:`sides_sql`'s columns: the group is
        bounded and a side is empty (its next extreme is not in the reserve)."""
        low, high = f"{alias}.{self.low}", f"{alias}.{self.high}"
        return f"({alias}.{self.bounded} AND ({low} IS NULL OR {high} IS NULL))"

    def condition(self, alias: str | None = None) -> str:
        """The projection rows whose value counts (filter true, value not NULL)."""
        prefix = f"{alias}." if alias else ""
        parts = [f"{prefix}{self.value} IS NOT NULL"]
        if self.filter is not None:
            parts.append(f"{prefix}{self.filter}")
        return " AND ".join(parts)

    def in_bounds(self, value: str, bounds: str) -> str:
        """Whether ``value`` belongs in the reserve under the bounds of alias ``bounds``."""
        lo, hi = f"{bounds}.{self.lo}", f"{bounds}.{self.hi}"
        return f"({lo} IS NULL OR {value} <= {lo} OR {value} >= {hi})"

    def bounds_sql(self, rows: str) -> list[str]:
        """Aggregates over projection rows ``rows`` (alias) giving a group's bounds:
        the :data:`KEEP`-th smallest and largest counted value, NULL (complete) when
        the group has fewer."""
        counted = self.condition(rows)
        value = f"{rows}.{self.value}"
        return [
            f"min({value}, {KEEP}) FILTER (WHERE {counted})[{KEEP}] AS {self.lo}",
            f"max({value}, {KEEP}) FILTER (WHERE {counted})[{KEEP}] AS {self.hi}",
        ]


def bounds_select(reserve: Reserve, group_columns: list[str], rows: str) -> str:
    """Each group's bounds (:meth:`Reserve.bounds_sql`) over projected mirror rows
    ``rows`` (a subquery or a table)."""
    bounds = ", ".join(reserve.bounds_sql("p"))
    return f"SELECT {_qualified(group_columns, 'p')}, {bounds} FROM {rows} p GROUP BY ALL"


def _kept_values(reserve: Reserve, group_columns: list[str], join: str = "") -> str:
    """The reserve's values with a positive count per group (``v``), its rows (alias
    ``r``) narrowed by ``join`` (e.g. a semi join on some groups)."""
    return (
        f"SELECT {_qualified(group_columns, 'r')}, r.{VALUE} AS v FROM {reserve.table} r"
        f"{join} GROUP BY ALL HAVING sum(r.{COUNT}) > 0"
    )


def reserve_select(reserve: Reserve, group_columns: list[str], rows: str) -> str:
    """The reserve's rows from projected mirror rows ``rows`` (a subquery), under the
    bounds :func:`bounds_select` computes from the same rows."""
    return (
        f"WITH p AS (SELECT * FROM {rows}) "
        f"SELECT {_qualified(group_columns, 'p')}, p.{reserve.value} AS {VALUE}, "
        f"CAST(count(*) AS BIGINT) AS {COUNT} "
        f"FROM p JOIN ({bounds_select(reserve, group_columns, 'p')}) b "
        f"ON {match_sql(group_columns, 'p', 'b')} "
        f"WHERE {reserve.condition('p')} AND {reserve.in_bounds(f'p.{reserve.value}', 'b')} "
        f"GROUP BY ALL"
    )


def append_sql(reserve: Reserve, group_columns: list[str], state: str, weighted: str) -> str:
    """``INSERT`` of a batch's in-bound values (``weighted``: projection rows with
    ``_hr_w``) under the bounds ``state`` holds before the batch's MERGE (a group
    not in the state is new: complete)."""
    names = ", ".join([*group_columns, VALUE, COUNT])
    return (
        f"INSERT INTO {reserve.table} ({names}) "
        f"SELECT {_qualified(group_columns, 'w')}, w.{reserve.value}, "
        f"CAST(sum(w._hr_w) AS BIGINT) "
        f"FROM {weighted} w LEFT JOIN {state} s ON {match_sql(group_columns, 'w', 's')} "
        f"WHERE {reserve.condition('w')} AND {reserve.in_bounds(f'w.{reserve.value}', 's')} "
        f"GROUP BY ALL HAVING sum(w._hr_w) <> 0"
    )


def sides_sql(reserve: Reserve, group_columns: list[str], flagged: str) -> str:
    """Per group of ``flagged`` (rows with the group columns and the bounds as the state
    held them): the reserve's smallest value at or below ``lo`` (:attr:`Reserve.low`)
    and largest at or above ``hi`` (:attr:`Reserve.high`), over values whose count is
    positive; and whether the group is bounded (:attr:`Reserve.bounded`)."""
    flagged_only = f" SEMI JOIN {flagged} f ON {match_sql(group_columns, 'r', 'f')}"
    values = _kept_values(reserve, group_columns, flagged_only)
    lo, hi = f"f.{reserve.lo}", f"f.{reserve.hi}"
    return (
        f"SELECT {_qualified(group_columns, 'f')}, "
        f"min(v.v) FILTER (WHERE {lo} IS NULL OR v.v <= {lo}) AS {reserve.low}, "
        f"max(v.v) FILTER (WHERE {lo} IS NULL OR v.v >= {hi}) AS {reserve.high}, "
        f"{lo} IS NOT NULL AS {reserve.bounded} "
        f"FROM {flagged} f LEFT JOIN ({values}) v ON {match_sql(group_columns, 'v', 'f')} "
        f"GROUP BY ALL"
    )


def thin_sql(reserve: Reserve, group_columns: list[str], state: str, into: str) -> str:
    """``CREATE TEMP TABLE into`` of the bounded groups of ``state`` with fewer than
    :data:`THIN_AT` values kept at one end."""
    s_groups = _qualified(group_columns, "s")
    lo, hi = f"s.{reserve.lo}", f"s.{reserve.hi}"
    return (
        f"CREATE OR REPLACE TEMP TABLE {into} AS SELECT {s_groups} FROM {state} s "
        f"LEFT JOIN ({_kept_values(reserve, group_columns)}) r "
        f"ON {match_sql(group_columns, 'r', 's')} WHERE {lo} IS NOT NULL "
        f"GROUP BY {s_groups}, {lo}, {hi} "
        f"HAVING count(r.v) FILTER (WHERE r.v <= {lo}) < {THIN_AT} "
        f"OR count(r.v) FILTER (WHERE r.v >= {hi}) < {THIN_AT}"
    )


def trim_sql(reserve: Reserve, group_columns: list[str], state: str) -> list[str]:
    """Statements trimming every group with more than :data:`TRIM_AT` distinct values in
    the reserve to :data:`KEEP` at each end (the module docstring)."""
    lo, hi = reserve.lo, reserve.hi
    return [
        f"CREATE OR REPLACE TEMP TABLE _hr_trim AS "
        f"SELECT {_qualified(group_columns, 'r')}, "
        f"least(any_value(s.{lo}), min(r.v, {KEEP})[{KEEP}]) AS {lo}, "
        f"greatest(any_value(s.{hi}), max(r.v, {KEEP})[{KEEP}]) AS {hi} "
        f"FROM ({_kept_values(reserve, group_columns)}) r "
        f"JOIN {state} s ON {match_sql(group_columns, 'r', 's')} "
        f"GROUP BY ALL HAVING count(*) > {TRIM_AT}",
        update_bounds_sql(reserve, group_columns, state, "_hr_trim"),
        f"DELETE FROM {reserve.table} r USING _hr_trim t "
        f"WHERE {match_sql(group_columns, 'r', 't')} AND r.{VALUE} > t.{lo} AND r.{VALUE} < t.{hi}",
    ]


def update_bounds_sql(reserve: Reserve, group_columns: list[str], state: str, bounds: str) -> str:
    """``UPDATE`` of the state's bounds from ``bounds`` (a table or subquery with the group
    columns and the bounds)."""
    lo, hi = reserve.lo, reserve.hi
    return (
        f"UPDATE {state} s SET {lo} = t.{lo}, {hi} = t.{hi} FROM {bounds} t "
        f"WHERE {match_sql(group_columns, 's', 't')}"
    )

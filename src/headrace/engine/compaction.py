"""Compaction: folding a rollup's appended delta rows together between batches.

Batches append their group deltas to a rollup's tables instead of merging them in
place: the state (unless min/max merge it, :meth:`RollupPlan.appends_state`), the
count-distinct side tables and the min/max reserves; the views sum a key's rows.
Compaction folds those rows back to one a key, in steps small enough that no step
stalls the batches for long, and keeps the min/max reserves in shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import duckdb

from headrace.engine.extremes import maintain_reserves
from headrace.engine.rollup import RollupPlan

if TYPE_CHECKING:
    from headrace.engine.registry import RollupRuntime

COMPACT_MIN_ROWS = 20_000
"""Appended rollup rows below which a rollup is never compacted."""

RESERVES_STEP = -1
"""The table number of a compaction cycle's step that trims and refills min/max reserves."""

COMPACT_STEP_ROWS = 200_000
"""Rows one compaction step folds, about. Each step reads the whole table twice (its hash
slice is a filter over every row), so a cycle costs about (slices x table size): smaller
steps bound a step's stall less than they multiply the total. At 200,000, `bench
pipeline`'s rollup tables fold in one step of ~25 ms, and maintaining after every batch of
a 100k/s load (`bench replay`) costs ~15 ms a batch against ~24 ms (budget-bound) at 20,000;
a 5M-row table takes 25 steps instead of 250."""


class Compactor:
    """When and how much of each rollup to fold (used from the writer thread only)."""

    def __init__(self) -> None:
        self.min_rows = COMPACT_MIN_ROWS
        """Appended rows below which a rollup is never compacted."""
        self.step_rows = COMPACT_STEP_ROWS
        """Rows one compaction step folds, about (see :meth:`step`)."""

    def due(self, rollups: Mapping[str, RollupRuntime]) -> list[str]:
        """Rollups in a compaction cycle, or that appended enough rows to start one
        (no query)."""
        return [
            name
            for name, runtime in rollups.items()
            if runtime.active
            and (
                runtime.compaction
                or runtime.appended >= max(self.min_rows, runtime.compacted_rows or 0)
            )
        ]

    def step(self, con: duckdb.DuckDBPyConnection, runtime: RollupRuntime) -> bool:
        """One step of a rollup's compaction; False when there was nothing to do.

        A cycle starts when the rows appended since the last one reach the
        compacted size (and :attr:`min_rows`), so view reads touch at most about
        twice the compacted rows and the cost is amortized. A cycle folds each
        appended table one hash slice of about :attr:`step_rows` rows at a time,
        so no step stalls the batches for long; sums stay exact at every step (the
        rows of one key are always in the same slice, and rows appended meanwhile
        are summed like any other). With min/max, the cycle's last step keeps the
        reserves in shape (:func:`~headrace.engine.extremes.maintain_reserves`), a
        step of its own.
        """
        plan = runtime.plan
        if plan is None:
            return False
        tables = plan.compacted_tables()
        if not runtime.compaction:
            if runtime.compacted_rows is None:
                # First time since a restart: the tables' size tells whether to wait.
                runtime.compacted_rows = max(0, rollup_rows(con, plan) - runtime.appended)
                if runtime.appended < max(self.min_rows, runtime.compacted_rows):
                    return False
            sizes = _sizes(con, [t[0] for t in tables])
            runtime.compaction = [
                (number, slices, index)
                for number, size in enumerate(sizes)
                for slices in [max(1, -(-size // self.step_rows))]
                for index in range(slices)
            ]
            if plan.reserves:
                runtime.compaction.append((RESERVES_STEP, 1, 0))
            runtime.appended = 0  # rows appended from now on count for the next cycle
        number, slices, index = runtime.compaction.pop(0)
        if number == RESERVES_STEP:
            runtime.mirror_reads.groups_refilled += maintain_reserves(con, plan)
        else:
            for statement in plan.compact_sql(tables[number], slices, index):
                con.execute(statement)
        if not runtime.compaction:
            runtime.compacted_rows = rollup_rows(con, plan)
        return True

    @staticmethod
    def fold_all(con: duckdb.DuckDBPyConnection, runtime: RollupRuntime) -> None:
        """Fold all of a rollup's appended rows now, in one go."""
        plan = runtime.plan
        if plan is None:
            return
        for table in plan.compacted_tables():
            for statement in plan.compact_sql(table):
                con.execute(statement)
        runtime.mirror_reads.groups_refilled += maintain_reserves(con, plan)
        runtime.compaction = []
        runtime.compacted_rows, runtime.appended = rollup_rows(con, plan), 0


def rollup_rows(con: duckdb.DuckDBPyConnection, plan: RollupPlan) -> int:
    """Rows of all of a rollup's tables."""
    return sum(_sizes(con, plan.owned_tables()))


def _sizes(con: duckdb.DuckDBPyConnection, tables: list[str]) -> list[int]:
    if not tables:
        return []
    counts = ", ".join(f"(SELECT count(*) FROM {t})" for t in tables)
    row = con.execute(f"SELECT {counts}").fetchone()
    return [int(v) for v in row] if row is not None else [0] * len(tables)

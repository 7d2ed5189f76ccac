"""First sightings: is this (customer, device) pair new? Keyed state for "new device" checks.

State: per pair, how many rows matching ``where`` (e.g. successful logins)
carried it, maintained as end rows minus start rows.

A new row of a batch is a *first sighting* when it matches ``where``, the
pair had no row before the batch, and no earlier row of the same batch
(by event time, then key) carried it. Rows are assumed to arrive in event
time order; a row inserted later with an older time does not turn an
earlier sighting into a repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from headrace.jobs.base import TableDelta
from headrace.jobs.state import KeyedSums, state_tables
from headrace.pipeline.model import quote_ident


@dataclass(frozen=True)
class FirstSeen:
    """Pairs (``owner``, ``item``) seen in rows matching ``where`` (module docstring).

    ``owner``, ``item``, ``time`` and ``where`` are SQL over the source row.
    """

    table: str
    owner: str
    item: str
    time: str
    where: str

    def sums(self) -> KeyedSums:
        return KeyedSums(
            table=self.table,
            groups=(("owner", self.owner), ("item", self.item)),
            sums=(),
            where=self.where,
        )

    def ensure(
        self, con: duckdb.DuckDBPyConnection, mirror: str, before: str | None = None
    ) -> None:
        """Create the table if absent; one created now is filled from ``before`` when given
        (SQL: the source table as it was before the batch), so a job added to a running
        store, or a table now shared by two jobs, knows the pairs seen so far."""
        created = before is not None and self.table not in state_tables(con)
        self.sums().ensure(con, mirror)
        if created and before is not None:
            self.sums().rebuild(con, before)

    def new_rows(self, delta: TableDelta, columns: str) -> str:
        """SQL: the batch's new rows (keys absent before), with ``columns`` (SQL select list
        over the source row) and ``first_seen`` (bool). Also ``_k0``, ``commit_ts``, ``lsn``."""
        keys = ", ".join(f"{quote_ident(k)} AS _k{i}" for i, k in enumerate(delta.key))
        match = delta.key_match("s", "e")
        return f"""(SELECT x.* EXCLUDE (_match),
                   x._match AND coalesce(k._rows, 0) = 0
                   AND row_number() OVER (PARTITION BY x._owner, x._item, x._match
                                          ORDER BY x._t, x._k0) = 1 AS first_seen
            FROM (SELECT {keys}, {columns}, {self.owner} AS _owner, {self.item} AS _item,
                         coalesce(({self.where}), false) AS _match, _hr_commit_ts AS commit_ts,
                         _hr_lsn AS lsn, CAST({self.time} AS TIMESTAMPTZ) AS _t
                  FROM (SELECT e.* FROM {delta.end_rows()} e
                        ANTI JOIN {delta.start} s ON {match})) x
            LEFT JOIN {self.table} k ON k.owner = x._owner AND k.item = x._item)"""

    def update(self, con: duckdb.DuckDBPyConnection, delta: TableDelta) -> None:
        self.sums().update(con, delta)

    def rebuild(self, con: duckdb.DuckDBPyConnection, mirror: str) -> None:
        self.sums().rebuild(con, mirror)

"""Reusable keyed state for stream jobs: keyed sums, watermarks.

(Recent rows per account are kept in one table for all the window rules:
:mod:`headrace.rules.recent`.)

:class:`KeyedSums`
    sums per group (e.g. per account, or per account and 5-minute bucket)
    maintained by adding each batch's end rows and subtracting its start
    rows; a group whose row count ``_rows`` drops to zero counts as absent
    (it is deleted when a batch deletes rows, or by a rebuild).

They are rebuilt from the mirror with one statement after a snapshot.

Definitions: what each job's state was built for (``headrace.job_definitions``,
see :meth:`headrace.jobs.base.StreamJob.definition`), so a job whose definition
changed between runs is rebuilt from the mirrors instead of carrying on with
state built for another window or table.

Watermarks: a job's event-time clock is the largest ``least(event time,
commit time)`` it has seen (the commit time caps a row dated in the future),
kept in ``headrace.job_watermarks`` in the batch's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import duckdb

from headrace.jobs.base import JOBS_SCHEMA, TableDelta
from headrace.pipeline.model import quote_ident
from headrace.store.duckdb.schema import META

WATERMARKS = f"{META}.job_watermarks"
DEFINITIONS = f"{META}.job_definitions"

SETUP_DDL: tuple[str, ...] = (
    f"CREATE SCHEMA IF NOT EXISTS {JOBS_SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {WATERMARKS} (
        job TEXT PRIMARY KEY,
        watermark TIMESTAMPTZ,
        horizon TIMESTAMPTZ,
        updated_at TIMESTAMPTZ NOT NULL
    )""",
    f"""CREATE TABLE IF NOT EXISTS {DEFINITIONS} (
        job TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        built_at TIMESTAMPTZ NOT NULL
    )""",
)


def read_definitions(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Every job's definition as of its last build (job name → definition)."""
    rows = con.execute(f"SELECT job, definition FROM {DEFINITIONS}").fetchall()
    return {str(r[0]): str(r[1]) for r in rows}


def write_definitions(con: duckdb.DuckDBPyConnection, values: dict[str, str]) -> None:
    """Record that the given jobs' state is now built for these definitions."""
    for job, definition in values.items():
        con.execute(
            f"""INSERT INTO {DEFINITIONS} (job, definition, built_at) VALUES (?, ?, now())
                ON CONFLICT (job) DO UPDATE SET definition = excluded.definition,
                    built_at = excluded.built_at""",
            [job, definition],
        )


def read_watermarks(
    con: duckdb.DuckDBPyConnection,
) -> dict[str, tuple[datetime | None, datetime | None]]:
    """Every job's stored (watermark, horizon)."""
    rows = con.execute(f"SELECT job, watermark, horizon FROM {WATERMARKS}").fetchall()
    return {str(r[0]): (r[1], r[2]) for r in rows}


def write_watermarks(
    con: duckdb.DuckDBPyConnection,
    values: dict[str, tuple[datetime | None, datetime | None]],
) -> None:
    """Store the given jobs' (watermark, horizon), in one statement."""
    if not values:
        return
    rows = ", ".join("(?, CAST(? AS TIMESTAMPTZ), CAST(? AS TIMESTAMPTZ), now())" for _ in values)
    params: list[object] = []
    for job, (watermark, horizon) in values.items():
        params += [job, watermark, horizon]
    # MERGE: the same upsert as INSERT ... ON CONFLICT, ~1/4 less CPU on DuckDB.
    con.execute(
        f"""MERGE INTO {WATERMARKS} _old
            USING (VALUES {rows}) _new(job, watermark, horizon, updated_at) ON _old.job = _new.job
            WHEN MATCHED THEN UPDATE SET watermark = _new.watermark, horizon = _new.horizon,
                updated_at = _new.updated_at
            WHEN NOT MATCHED THEN INSERT (job, watermark, horizon, updated_at)
                VALUES (_new.job, _new.watermark, _new.horizon, _new.updated_at)""",
        params,
    )


def state_tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The quoted names (``jobs.<name>``) of the jobs' state tables that exist."""
    rows = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = ?", [JOBS_SCHEMA]
    ).fetchall()
    return {f"{JOBS_SCHEMA}.{quote_ident(str(r[0]))}" for r in rows}


def mirror_time(con: duckdb.DuckDBPyConnection, mirror: str, time: str) -> datetime | None:
    """Largest ``least(time, now)`` of a mirror (the watermark a snapshot starts from)."""
    rows = con.execute(
        f"SELECT max(least(CAST({time} AS TIMESTAMPTZ), now())) FROM {mirror}"
    ).fetchall()
    return rows[0][0] if rows else None


def latest(*times: datetime | None) -> datetime | None:
    present = [t for t in times if t is not None]
    return max(present) if present else None


def create_like(
    con: duckdb.DuckDBPyConnection,
    table: str,
    select_sql: str,
    primary_key: Sequence[str] = (),
) -> None:
    """Create ``table`` (if absent) with the columns and types ``select_sql`` returns."""
    described = con.execute(f"DESCRIBE {select_sql}").fetchall()
    columns = [f"{quote_ident(str(r[0]))} {r[1]}" for r in described]
    if primary_key:
        columns.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in primary_key)})")
    con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(columns)})")


@dataclass(frozen=True)
class KeyedSums:
    """Sums per group, maintained as end rows minus start rows (module docstring).

    ``groups`` and ``sums`` are (name, SQL over the source row); a row count
    ``_rows`` is kept too. ``where`` filters rows (it may use any column).
    """

    table: str
    groups: tuple[tuple[str, str], ...]
    sums: tuple[tuple[str, str], ...]
    where: str = "true"

    def _select(self, source: str, sign: int) -> str:
        groups = [f"{sql} AS {quote_ident(name)}" for name, sql in self.groups]
        sums = [f"{sign} * ({sql}) AS {quote_ident(name)}" for name, sql in self.sums]
        return (
            f"SELECT {', '.join([*groups, *sums, f'{sign} AS _rows'])} FROM {source} "
            f"WHERE ({self.where})"
        )

    def _aggregate(self, inner: str) -> str:
        columns = [quote_ident(name) for name, _ in self.groups]
        columns += [f"sum({quote_ident(name)}) AS {quote_ident(name)}" for name, _ in self.sums]
        columns.append("CAST(sum(_rows) AS BIGINT) AS _rows")
        return f"SELECT {', '.join(columns)} FROM ({inner}) GROUP BY ALL"

    def ensure(self, con: duckdb.DuckDBPyConnection, mirror: str) -> None:
        create_like(
            con,
            self.table,
            self._aggregate(self._select(mirror, 1)) + " LIMIT 0",
            [name for name, _ in self.groups],
        )

    def update(
        self,
        con: duckdb.DuckDBPyConnection,
        delta: TableDelta,
        extra_where: str = "true",
        extra_rows: str | None = None,
    ) -> None:
        """Add the end rows, subtract the start rows (``extra_where`` filters both).

        ``extra_rows``: SQL selecting more rows to add, by name with the groups,
        the sums and ``_rows`` (also filtered by ``extra_where``): the same
        statement then does the work of a second update.
        """
        extra = f" UNION ALL BY NAME {extra_rows}" if extra_rows is not None else ""
        inner = (
            f"SELECT * FROM ({self._select(delta.end, 1)} UNION ALL BY NAME "
            f"{self._select(delta.start, -1)}{extra}) WHERE ({extra_where})"
        )
        names = [quote_ident(name) for name, _ in self.sums] + ["_rows"]
        keys = [quote_ident(name) for name, _ in self.groups]
        match = " AND ".join(f"_old.{k} = _new.{k}" for k in keys)
        updates = ", ".join(f"{n} = _old.{n} + _new.{n}" for n in names)
        columns = ", ".join([*keys, *names])
        values = ", ".join(f"_new.{n}" for n in [*keys, *names])
        # MERGE rather than INSERT ... ON CONFLICT: the same upsert, without the extra
        # grouping DuckDB adds to make the conflict keys unique (ours are grouped
        # already); ~15% less CPU per statement.
        con.execute(
            f"MERGE INTO {self.table} _old USING ({self._aggregate(inner)}) _new ON {match} "
            f"WHEN MATCHED THEN UPDATE SET {updates} "
            f"WHEN NOT MATCHED THEN INSERT ({columns}) VALUES ({values})"
        )
        if delta.deletes or delta.truncated:
            # Updates can leave groups at zero rows too (a transaction leaving the
            # filter); readers treat those as absent, and a rebuild drops them.
            con.execute(f"DELETE FROM {self.table} WHERE _rows = 0")

    def rebuild(
        self, con: duckdb.DuckDBPyConnection, source: str, extra_where: str = "true"
    ) -> None:
        con.execute(f"DELETE FROM {self.table}")
        inner = f"SELECT * FROM ({self._select(source, 1)}) WHERE ({extra_where})"
        con.execute(f"INSERT INTO {self.table} {self._aggregate(inner)}")

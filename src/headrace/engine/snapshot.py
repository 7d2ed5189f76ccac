"""The snapshot's bulk path: Arrow chunks appended to the mirrors (and history) as they come."""

from __future__ import annotations

import contextlib
from datetime import datetime

import duckdb

from headrace.engine.tables import TableModel
from headrace.engine.types import storable_table
from headrace.pipeline.model import quote_ident
from headrace.source.changes import SnapshotChunk
from headrace.store.duckdb.schema import EVENT_TS, META, ROW_LSN


def append_chunk(
    con: duckdb.DuckDBPyConnection, model: TableModel, chunk: SnapshotChunk, at: datetime
) -> None:
    """Append one chunk: one INSERT … SELECT from the registered Arrow table per target.

    Snapshot rows get ``_hr_lsn`` = the consistent point, the snapshot's time
    as commit time (event time of commit-time tables), and op ``S`` in history.
    """
    data = storable_table(chunk.rows)
    present = set(data.column_names)
    columns = []
    for column in model.columns:
        source = quote_ident(column.name) if column.name in present else "NULL"
        columns.append((column.name, f"CAST({source} AS {column.duck_type})"))
    lsn = f"CAST({int(chunk.consistent_point)} AS UBIGINT)"
    con.register("_hr_snapshot", data)
    try:
        if model.config.mirror:
            extra = [(ROW_LSN, lsn)]
            if model.commit_time:
                extra.append((EVENT_TS, "CAST(? AS TIMESTAMPTZ)"))
            names = ", ".join(quote_ident(n) for n, _ in columns + extra)
            values = ", ".join(sql for _, sql in columns + extra)
            con.execute(
                f"INSERT INTO {model.mirror} ({names}) SELECT {values} FROM _hr_snapshot",
                [at] if model.commit_time else [],
            )
        if model.config.history:
            meta = [
                ("_hr_lsn", lsn),
                ("_hr_commit_ts", "CAST(? AS TIMESTAMPTZ)"),
                ("_hr_xid", "CAST(NULL AS BIGINT)"),
                ("_hr_seq", "CAST(0 AS INTEGER)"),
                ("_hr_op", "'S'"),
            ]
            names = ", ".join(quote_ident(n) for n, _ in meta + columns)
            values = ", ".join(sql for _, sql in meta + columns)
            con.execute(
                f"INSERT INTO {model.history} ({names}) SELECT {values} FROM _hr_snapshot", [at]
            )
    except BaseException:
        # A failed INSERT aborts the transaction, and then unregister fails too:
        # the INSERT's error is the one that says what happened.
        with contextlib.suppress(duckdb.Error):
            con.unregister("_hr_snapshot")
        raise
    con.unregister("_hr_snapshot")


def write_snapshot_meta(
    con: duckdb.DuckDBPyConnection, model: TableModel, position: int, at: datetime
) -> None:
    """Row count and position of a table the snapshot loaded."""
    rows = 0
    if model.config.mirror:
        rows = int(con.execute(f"SELECT count(*) FROM {model.mirror}").fetchall()[0][0])
    con.execute(
        f"""UPDATE {META}.tables SET rows = ?, last_lsn = ?, applied_at = now(),
               last_commit_ts = coalesce(last_commit_ts, ?)
            WHERE table_name = ?""",
        [rows, position, at, model.name],
    )

"""Writing a batch's row versions: history rows, mirror rows, dead letters."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from headrace.engine.resolve import TableWork, compute_prev, old_key
from headrace.engine.types import storable_table
from headrace.pipeline.model import quote_ident
from headrace.source.changes import COMMIT_TS, LSN, OP, SEQ, XID
from headrace.store.duckdb.schema import META


def write_history(con: duckdb.DuckDBPyConnection, work: TableWork) -> None:
    """Append every change to ``history.<table>`` (deletes carry the deleted row's values).

    Must run before :func:`write_mirror`: a deleted row's values come from its
    previous version in the batch or, failing that, from the mirror.
    """
    model, c = work.model, work.changes
    names = [quote_ident(col.name) for col in model.columns]
    meta = f"{LSN}, {COMMIT_TS}, {XID}, _hr_txseq AS {SEQ}, {OP}"
    if not (model.config.mirror and work.deletes):
        con.execute(
            f"INSERT INTO {model.history} BY NAME "
            f"SELECT {meta}, {', '.join(names)} FROM {c} ORDER BY {SEQ}"
        )
        return
    if not work.has_prev:
        compute_prev(con, work)
    first = model.key[0]
    match = " AND ".join(f"m.{quote_ident(k)} = d.{old_key(j)}" for j, k in enumerate(model.key))
    values = ", ".join(
        f"CASE WHEN d.{OP} <> 'D' THEN d.{n} WHEN p._hr_prev IS NOT NULL THEN pv.{n} "
        f"WHEN m.{quote_ident(first)} IS NOT NULL THEN m.{n} ELSE d.{n} END AS {n}"
        for n in names
    )
    con.execute(
        f"""INSERT INTO {model.history} BY NAME
        SELECT d.{LSN}, d.{COMMIT_TS}, d.{XID}, d._hr_txseq AS {SEQ}, d.{OP}, {values}
        FROM {c} d
        LEFT JOIN {work.prev} p ON p.{SEQ} = d.{SEQ}
        LEFT JOIN {c} pv ON pv.{SEQ} = p._hr_prev
        LEFT JOIN {model.mirror} m ON d.{OP} = 'D' AND p._hr_prev IS NULL AND {match}
        ORDER BY d.{SEQ}"""
    )


def write_mirror(con: duckdb.DuckDBPyConnection, work: TableWork) -> None:
    """Replace the touched keys' mirror rows by the batch's end rows."""
    model = work.model
    if work.truncated_at is not None:
        con.execute(f"DELETE FROM {model.mirror}")
    else:
        on = " AND ".join(f"m.{quote_ident(k)} = k.{quote_ident(k)}" for k in model.key)
        con.execute(f"DELETE FROM {model.mirror} m USING {work.keys} k WHERE {on}")
    columns = ", ".join(quote_ident(n) for n, _ in model.mirror_columns())
    con.execute(
        f"INSERT INTO {model.mirror} ({columns}) SELECT {columns} FROM {work.end} "
        f"ORDER BY {', '.join(quote_ident(k) for k in model.key)}"
    )


def write_dead_letters(
    con: duckdb.DuckDBPyConnection, table_name: str, reason: str, data: pa.Table
) -> int:
    """Keep every change of ``data`` in ``headrace.dead_letters`` (one JSON payload each)."""
    if not data.num_rows:
        return 0
    con.register("_hr_dead", storable_table(data))
    try:
        con.execute(
            f"""INSERT INTO {META}.dead_letters (lsn, table_name, reason, payload, "at")
            SELECT {LSN}, ?, ?, to_json(d), now() FROM _hr_dead d ORDER BY {SEQ}""",
            [table_name, reason],
        )
    finally:
        con.unregister("_hr_dead")
    return int(data.num_rows)

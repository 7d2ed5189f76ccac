"""Writing a batch's row versions: history rows, mirror rows, dead letters."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from headrace.engine.batch_changes import VIEW_CHANGES, positional
from headrace.engine.inherit import compute_prev
from headrace.engine.resolve import TableWork, old_key
from headrace.engine.types import storable_table
from headrace.pipeline.model import quote_ident, quote_literal
from headrace.source.changes import (
    COMMIT_TS,
    LSN,
    META_FIELDS,
    OLD_KIND,
    OP,
    SEQ,
    TOAST,
    XID,
    TableSchema,
)
from headrace.store.duckdb.arrow_scan import hold_arrow, release_arrow
from headrace.store.duckdb.prepared import execute_cached
from headrace.store.duckdb.schema import META


def write_history(con: duckdb.DuckDBPyConnection, work: TableWork) -> None:
    """Append every change to ``history.<table>`` (deletes carry the deleted row's values).

    A deleted row's values come from its previous version in the batch or, failing
    that, from its start row (its mirror row before the batch).
    """
    model, c = work.model, work.changes
    names = [quote_ident(col.name) for col in model.columns]
    meta = f"{LSN}, {COMMIT_TS}, {XID}, _hr_txseq AS {SEQ}, {OP}"
    if not (model.config.mirror and work.deletes):
        execute_cached(
            con,
            f"INSERT INTO {model.history} BY NAME "
            f"SELECT {meta}, {', '.join(names)} FROM {c} ORDER BY {SEQ}",
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
    execute_cached(
        con,
        f"""INSERT INTO {model.history} BY NAME
        SELECT d.{LSN}, d.{COMMIT_TS}, d.{XID}, d._hr_txseq AS {SEQ}, d.{OP}, {values}
        FROM {c} d
        LEFT JOIN {work.prev} p ON p.{SEQ} = d.{SEQ}
        LEFT JOIN {c} pv ON pv.{SEQ} = p._hr_prev
        LEFT JOIN {work.start} m ON d.{OP} = 'D' AND p._hr_prev IS NULL AND {match}
        ORDER BY d.{SEQ}""",
    )


def write_mirror(con: duckdb.DuckDBPyConnection, work: TableWork) -> None:
    """Put the batch's end rows in the mirror (the touched keys' rows, or after a
    truncate all rows, are out already: :func:`~headrace.engine.resolve.take_start_rows`)."""
    model = work.model
    if not work.end_rows:
        return  # only deletes
    columns = ", ".join(quote_ident(n) for n, _ in model.mirror_columns())
    # Sorted by key, a batch's rows keep the key ranges of the row groups they fill
    # narrow, which lets a later batch's scan for its keys skip them. A large batch
    # (VIEW_CHANGES or more of a table's changes) is appended as it comes: sorting it
    # cost more than it saved (`bench replay` of a 100k/s recording: 504 against 559
    # ms per 146,000-change batch; a fintech recording of small batches was no faster
    # unsorted, so they stay sorted).
    large = work.num_changes >= VIEW_CHANGES
    order = "" if large else f" ORDER BY {', '.join(quote_ident(k) for k in model.key)}"
    execute_cached(
        con, f"INSERT INTO {model.mirror} ({columns}) SELECT {columns} FROM {work.end}{order}"
    )


def write_dead_letters(
    con: duckdb.DuckDBPyConnection,
    table_name: str,
    reason: str,
    schema: TableSchema,
    data: pa.Table,
    *,
    keep_nothing: bool = False,
) -> int:
    """Keep every change of ``data`` in ``headrace.dead_letters``, one JSON payload each:
    the change's metadata, ``new`` and ``old`` values by column, ``unchanged_toast``
    (``keep_nothing``: in a long transaction, see
    :func:`~headrace.store.duckdb.arrow_scan.hold_arrow`)."""
    if not data.num_rows:
        return 0
    renamed, new_names, old_names = positional(schema, storable_table(data))

    def row_object(names: dict[str, str]) -> str:
        pairs = ", ".join(f"{quote_literal(column)}, d.{alias}" for column, alias in names.items())
        return f"json_object({pairs})" if pairs else "json_object()"

    meta = ", ".join(f"'{f.name}', d.{f.name}" for f in META_FIELDS)
    sent = " OR ".join(f"d.{alias} IS NOT NULL" for alias in old_names.values()) or "false"
    payload = (
        f"json_object({meta}, 'new', {row_object(new_names)}, "
        f"'old', CASE WHEN d.{OLD_KIND} IS NOT NULL OR {sent} "
        f"THEN {row_object(old_names)} END, "
        f"'old_kind', d.{OLD_KIND}, 'unchanged_toast', d.{TOAST})"
    )
    hold_arrow(con, "_hr_dead", renamed, keep_nothing=keep_nothing)
    try:
        con.execute(
            f"""INSERT INTO {META}.dead_letters (lsn, table_name, reason, payload, "at")
            SELECT d.{LSN}, ?, ?, {payload}, now() FROM _hr_dead d ORDER BY d.{SEQ}""",
            [table_name, reason],
        )
    finally:
        release_arrow(con, "_hr_dead", keep_nothing=keep_nothing)
    return int(data.num_rows)

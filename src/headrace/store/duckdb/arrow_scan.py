"""A temp table made from an Arrow table, with or without DuckDB keeping the Arrow table.

``con.register(name, table)`` adds a view to the connection's catalog, and
DuckDB keeps every catalog entry a transaction created or dropped, with the
Arrow table it holds, until that transaction ends (``unregister`` included;
measured: +8 MB per registered 1M-row column, freed only at COMMIT). For a
batch's one statement per table that costs nothing. A huge source
transaction applied a piece at a time in one store transaction would keep
every piece's changes to the end, so there the rows go in through a
relation's ``insert_into``, which keeps nothing (measured: 0 MB) and reports
a failing row as it is (a relation's ``query`` would keep nothing either,
but inside a transaction it reports any failure as "transaction is aborted").
DuckDB's replacement scan of a Python variable is off under ``headrace run
--serve``, which closes the shared instance to external access.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

ARROW_INPUT = "_hr_arrow_input"
"""The name the SELECT list of :func:`create_temp_table` reads its Arrow table by."""


def create_temp_table(
    con: duckdb.DuckDBPyConnection,
    name: str,
    select_list: str,
    table: pa.Table,
    *,
    keep_nothing: bool = False,
) -> duckdb.DuckDBPyConnection:
    """``CREATE OR REPLACE TEMP TABLE name AS SELECT select_list FROM table`` on ``con``.

    ``keep_nothing``: inside a long transaction, so that DuckDB does not hold on to
    ``table`` until it ends (two statements instead of one). Returns the statement's
    cursor (for a row count) when ``keep_nothing`` is off.
    """
    create = f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT {select_list} FROM {ARROW_INPUT}"
    if not keep_nothing:
        con.register(ARROW_INPUT, table)
        try:
            return con.execute(create)
        finally:
            con.unregister(ARROW_INPUT)
    # The columns and their types from an empty table of the same schema (a slice
    # would share, and so keep, the table's buffers); then the rows, kept by nobody.
    con.register(ARROW_INPUT, table.schema.empty_table())
    try:
        created = con.execute(create)
    finally:
        con.unregister(ARROW_INPUT)
    con.from_arrow(table).project(select_list).insert_into(name)
    return created

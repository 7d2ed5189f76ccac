"""Arrow tables in DuckDB statements, with or without DuckDB keeping them.

``con.register(name, table)`` adds a view to the connection's catalog, and
DuckDB keeps every catalog entry a transaction created or dropped, with the
Arrow table it holds, until that transaction ends (``unregister`` included;
measured: +8 MB per registered 1M-row column, freed only at COMMIT). For a
batch's few registrations that costs nothing. A huge source transaction
applied a piece at a time in one store transaction would keep every piece's
changes to the end, so there (``keep_nothing``) the rows go into a temp table
through a relation's ``insert_into``, which keeps nothing (measured: 0 MB)
and reports a failing row as it is (a relation's ``query`` would keep nothing
either, but inside a transaction it reports any failure as "transaction is
aborted"). DuckDB's replacement scan of a Python variable is off under
``headrace run --serve``, which closes the shared instance to external access.
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
) -> None:
    """``CREATE OR REPLACE TEMP TABLE name AS SELECT select_list FROM table`` on ``con``
    (``keep_nothing``: inside a long transaction; two statements instead of one)."""
    create = f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT {select_list} FROM {ARROW_INPUT}"
    # Kept: the whole table, or (keep_nothing) an empty one of its schema, whose columns
    # and types make the temp table (a slice would share, and so keep, the buffers).
    con.register(ARROW_INPUT, table.schema.empty_table() if keep_nothing else table)
    try:
        con.execute(create)
    finally:
        con.unregister(ARROW_INPUT)
    if keep_nothing:
        con.from_arrow(table).project(select_list).insert_into(name)


def create_temp_view(
    con: duckdb.DuckDBPyConnection, name: str, select_list: str, table: pa.Table, input_name: str
) -> None:
    """``CREATE OR REPLACE TEMP VIEW name AS SELECT select_list`` over ``table``, registered
    as ``input_name`` until :func:`release_arrow` of it: nothing is copied, and every
    statement that reads the view scans the Arrow table again (cheaper than a copy for a
    large table read once; not inside a long transaction, see the module docstring)."""
    con.register(input_name, table)
    con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT {select_list} FROM {input_name}")


def hold_arrow(
    con: duckdb.DuckDBPyConnection, name: str, table: pa.Table, *, keep_nothing: bool
) -> None:
    """Make ``table`` readable as ``name`` until :func:`release_arrow`: registered, or
    (``keep_nothing``) copied into a temp table of that name."""
    if keep_nothing:
        create_temp_table(con, name, "*", table, keep_nothing=True)
    else:
        con.register(name, table)


def release_arrow(con: duckdb.DuckDBPyConnection, name: str, *, keep_nothing: bool) -> None:
    """Undo :func:`hold_arrow` (so that a later batch can register the name)."""
    if keep_nothing:
        con.execute(f"DROP TABLE IF EXISTS {name}")
    else:
        con.unregister(name)

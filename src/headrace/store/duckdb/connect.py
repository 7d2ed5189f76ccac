"""Opening a store file so that its name never clashes with the store's schemas.

DuckDB names a file's catalog after the file (``headrace.duckdb`` → ``headrace``), and
a catalog named like one of the store's schemas (``headrace``, ``mirror``, ``rollup``,
``history``) makes every ``headrace.position`` ambiguous. So a store is attached under
the fixed catalog name :data:`CATALOG`, whatever the file is called, and each
connection or cursor selects it with ``USE``.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

CATALOG = "headrace_store"

ConfigValue = str | bool | int | float | list[str]


def open_store(
    path: str | Path,
    *,
    read_only: bool = False,
    config: dict[str, ConfigValue] | None = None,
    row_group_size: int | None = None,
) -> duckdb.DuckDBPyConnection:
    """A connection whose default catalog is the store file at ``path``.

    ``config`` is applied at connect time, except ``enable_external_access=False``,
    which is applied after the file is attached (it forbids attaching files).
    ``row_group_size`` sets the rows per row group of what this connection writes
    (DuckDB's default when None; an attach option, not kept in the file).
    """
    settings = dict(config or {})
    deny_external = settings.pop("enable_external_access", True) is False
    con = duckdb.connect(":memory:", config=settings)
    try:
        literal = str(path).replace("'", "''")
        if read_only:
            mode = " (READ_ONLY)"
        elif row_group_size is not None:
            mode = f" (ROW_GROUP_SIZE {int(row_group_size)})"
        else:
            mode = ""
        con.execute(f"ATTACH '{literal}' AS {CATALOG}{mode}")
        con.execute(f"USE {CATALOG}")
        if deny_external:
            con.execute("SET enable_external_access = false")
    except BaseException:
        con.close()
        raise
    return con


def store_cursor(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A cursor of ``con`` (for another thread) with the store as its default catalog."""
    cursor = con.cursor()
    cursor.execute(f"USE {CATALOG}")
    return cursor

"""Reading what a DuckDB write statement returns."""

from __future__ import annotations

from typing import cast

import duckdb


def rows_written(result: duckdb.DuckDBPyConnection) -> int:
    """The row count DuckDB returns for INSERT, UPDATE, DELETE and CREATE TABLE AS
    (reading it is free: no count query needed)."""
    row = result.fetchone()
    return int(cast(int, row[0])) if row is not None else 0

"""A store file may be named like one of the store's schemas (the default is headrace.duckdb)."""

from __future__ import annotations

from pathlib import Path

import pytest

from headrace.store.duckdb.store import DuckDBStore


@pytest.mark.parametrize("name", ["headrace.duckdb", "mirror.duckdb", "rollup.duckdb"])
def test_store_named_like_a_schema_opens_and_reopens(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    store = DuckDBStore(path)
    cursor = store.cursor()
    try:
        rows = cursor.execute("SELECT value FROM headrace.store_info").fetchall()
    finally:
        cursor.close()
    assert rows
    store.close()
    reader = DuckDBStore(path, read_only=True)
    try:
        cursor = reader.cursor()
        assert cursor.execute("SELECT count(*) FROM headrace.store_info").fetchone() == (len(rows),)
        cursor.close()
    finally:
        reader.close()

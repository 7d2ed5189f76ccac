"""Statements run as prepared ones read what a direct execution reads, fail as it fails,
and are parsed once per connection (a real DuckDB file)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from headrace.store.duckdb import prepared
from headrace.store.duckdb.prepared import cached_statements, execute_cached, prepared_text


@pytest.fixture
def con(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(str(tmp_path / "p.duckdb"))
    connection.execute("CREATE TABLE target (x BIGINT)")
    return connection


def _count(con: duckdb.DuckDBPyConnection) -> int:
    row = con.execute("SELECT count(*) FROM target").fetchone()
    return int(row[0]) if row else 0


def test_a_repeated_statement_is_prepared_once_and_reads_the_current_temp_table(
    con: duckdb.DuckDBPyConnection,
) -> None:
    insert = "INSERT INTO target SELECT x FROM batch_rows"
    for size in (3, 5, 2):
        # Replaced every time, as a batch's temp tables are: the statement binds again.
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE batch_rows AS SELECT range AS x FROM range({size})"
        )
        assert execute_cached(con, insert).fetchone() == (size,)
    assert _count(con) == 10
    assert cached_statements(con) == 1
    assert prepared_text(con, "EXECUTE _hr_prepared_0") is None
    name = next(iter(prepared._caches[con].names.values()))
    assert prepared_text(con, f"EXECUTE {name}") == insert


def test_parameters_run_directly(con: duckdb.DuckDBPyConnection) -> None:
    execute_cached(con, "INSERT INTO target VALUES (?)", [7])
    assert _count(con) == 1
    assert cached_statements(con) == 0


def test_a_failure_is_the_statements_own_and_survives_rollback(
    con: duckdb.DuckDBPyConnection,
) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE batch_rows AS SELECT 1 AS x")
    insert = "INSERT INTO target SELECT x FROM batch_rows"
    con.execute("BEGIN")
    execute_cached(con, insert)
    execute_cached(con, insert)  # prepared
    con.execute("ROLLBACK")  # the prepared statement stays; the row does not
    assert _count(con) == 0
    con.execute("CREATE OR REPLACE TEMP TABLE batch_rows AS SELECT 'text' AS x")
    with pytest.raises(duckdb.ConversionException) as cached_error:
        execute_cached(con, insert)
    with pytest.raises(duckdb.ConversionException) as direct_error:
        con.execute(insert)
    # The same error; only the direct one points into the statement's text.
    assert str(direct_error.value).startswith(str(cached_error.value).strip())
    con.execute("DROP TABLE batch_rows")
    with pytest.raises(duckdb.CatalogException, match="batch_rows"):
        execute_cached(con, insert)


def test_the_cache_starts_afresh_past_its_bound(
    con: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepared, "MAX_CACHED", 4)
    for value in range(10):
        for _ in range(2):  # prepared the second time
            assert execute_cached(con, f"SELECT {value} AS v").fetchone() == (value,)
    assert cached_statements(con) == 4  # the oldest dropped
    assert execute_cached(con, "SELECT 0 AS v").fetchone() == (0,)
    assert execute_cached(con, "SELECT 9 AS v").fetchone() == (9,)
    assert len(prepared._caches[con].seen) <= 4


def test_a_text_run_once_is_not_prepared(con: duckdb.DuckDBPyConnection) -> None:
    assert execute_cached(con, "SELECT 41 + 1").fetchone() == (42,)
    assert cached_statements(con) == 0
    assert execute_cached(con, "SELECT 41 + 1").fetchone() == (42,)
    assert cached_statements(con) == 1


def test_connections_keep_their_own_statements(con: duckdb.DuckDBPyConnection) -> None:
    other = con.cursor()
    for _ in range(2):
        assert execute_cached(con, "SELECT 1").fetchone() == (1,)
        assert execute_cached(other, "SELECT 1").fetchone() == (1,)  # prepared on its own
    assert cached_statements(con) == cached_statements(other) == 1

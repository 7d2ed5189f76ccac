"""The SQL policy on its own: what passes, what is refused, and masking that cannot be bypassed."""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import pytest

from headrace.serve.catalog import Catalog, MaskPolicy, load_catalog
from headrace.serve.sql import SqlRejectedError, mask_trusted_sql, prepare_sql

SECRET = "4111000011112222"  # noqa: S105 - a fake card number, not a credential


@pytest.fixture
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect()
    con.execute(
        "CREATE SCHEMA mirror; CREATE SCHEMA history; CREATE SCHEMA rollup; CREATE SCHEMA headrace;"
        "CREATE TABLE mirror.cards (id INTEGER PRIMARY KEY, number VARCHAR, cvv INTEGER, "
        "owner VARCHAR);"
        f"INSERT INTO mirror.cards VALUES (1, '{SECRET}', 123, 'ann');"
        "CREATE TABLE history.cards AS SELECT 1::BIGINT AS _hr_lsn, * FROM mirror.cards;"
        "CREATE TABLE rollup.x__state (a INTEGER); CREATE VIEW rollup.x_5m AS SELECT * FROM "
        "rollup.x__state;"
    )
    yield con
    con.close()


@pytest.fixture
def catalog(con: duckdb.DuckDBPyConnection) -> Catalog:
    return load_catalog(con)


POLICY = MaskPolicy(("*.cards.number", "*.cards.CVV"))


def run(con: duckdb.DuckDBPyConnection, catalog: Catalog, sql: str) -> list[tuple[object, ...]]:
    prepared = prepare_sql(sql, catalog, POLICY, row_limit=100)
    return con.sql(prepared.sql).fetchall()


def test_catalog_hides_engine_state(catalog: Catalog) -> None:
    assert catalog.has("rollup.x_5m")
    assert not catalog.has("rollup.x__state")
    assert catalog.has("mirror.cards")
    assert catalog.has("history.cards")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM mirror.cards",
        "SELECT number FROM mirror.cards",
        "SELECT c.number AS n FROM mirror.cards AS c",
        "SELECT upper(number) || '' FROM mirror.cards",
        "SELECT substr(number, 1, 16) FROM mirror.cards",
        "SELECT c FROM mirror.cards c",
        "SELECT COLUMNS(*) FROM mirror.cards",
        "SELECT * FROM history.cards",
        "WITH x AS (SELECT * FROM mirror.cards) SELECT * FROM x",
        "SELECT (SELECT number FROM mirror.cards) AS n",
        "SELECT list(number) FROM mirror.cards",
        "SELECT t.* FROM mirror.cards t JOIN mirror.cards u USING (id)",
        "SELECT * FROM (SELECT number AS n FROM mirror.cards) s",
        "SELECT to_json(c) FROM mirror.cards c",
        "FROM mirror.cards",
        "SELECT number FROM mirror.cards UNION ALL SELECT number FROM history.cards",
        "SELECT * FROM mirror.cards, LATERAL (SELECT number AS n2) l",
    ],
)
def test_masked_column_never_leaks(
    con: duckdb.DuckDBPyConnection, catalog: Catalog, sql: str
) -> None:
    rows = run(con, catalog, sql)
    assert rows, sql
    assert SECRET not in repr(rows), rows
    assert "123" not in repr(rows), rows


def test_masked_column_is_not_an_oracle(con: duckdb.DuckDBPyConnection, catalog: Catalog) -> None:
    assert run(con, catalog, f"SELECT id FROM mirror.cards WHERE number = '{SECRET}'") == []
    assert run(con, catalog, "SELECT id FROM mirror.cards WHERE cvv = 123") == []
    assert run(con, catalog, "SELECT id FROM mirror.cards WHERE number LIKE '4111%'") == []


def test_unmasked_columns_and_other_roles(con: duckdb.DuckDBPyConnection, catalog: Catalog) -> None:
    assert run(con, catalog, "SELECT owner, id FROM mirror.cards") == [("ann", 1)]
    prepared = prepare_sql("SELECT number FROM mirror.cards", catalog, MaskPolicy(), row_limit=10)
    assert con.sql(prepared.sql).fetchall() == [(SECRET,)]


def test_trusted_queries_are_masked_too(con: duckdb.DuckDBPyConnection, catalog: Catalog) -> None:
    sql = mask_trusted_sql("SELECT number FROM mirror.cards WHERE id = $id", catalog, POLICY)
    assert con.sql(sql, params={"id": 1}).fetchall() == [("****",)]
    unchanged = "SELECT number FROM mirror.cards"
    assert mask_trusted_sql(unchanged, catalog, MaskPolicy()) == unchanged


def test_row_limit_is_applied(con: duckdb.DuckDBPyConnection, catalog: Catalog) -> None:
    prepared = prepare_sql("SELECT * FROM range(1000000)", catalog, POLICY, row_limit=10)
    assert len(con.sql(prepared.sql).fetchall()) == 11  # one more, to detect truncation
    prepared = prepare_sql("SELECT * FROM range(100) LIMIT 3", catalog, POLICY, row_limit=10)
    assert len(con.sql(prepared.sql).fetchall()) == 3
    prepared = prepare_sql(
        "SELECT * FROM range(100) LIMIT 50 OFFSET 5", catalog, POLICY, row_limit=10
    )
    assert len(con.sql(prepared.sql).fetchall()) == 11


def test_explain_passes(con: duckdb.DuckDBPyConnection, catalog: Catalog) -> None:
    prepared = prepare_sql("EXPLAIN SELECT * FROM mirror.cards", catalog, POLICY, row_limit=10)
    assert prepared.explain
    assert con.sql(prepared.sql).fetchall()


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("", "empty"),
        ("SELECT 1; SELECT 2", "exactly one statement"),
        ("DELETE FROM mirror.cards", "DELETE is not allowed"),
        ("WITH d AS (DELETE FROM mirror.cards RETURNING *) SELECT * FROM d", "DELETE"),
        ("SELECT * FROM cards", "unknown table"),
        ("SELECT * FROM mirror.nope", "unknown relation"),
        ("SELECT * FROM rollup.x__state", "unknown relation"),
        ("SELECT * FROM other.mirror.cards", "only this store"),
        ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
        ("SELECT * FROM 'data.parquet'", "unknown table"),
        ("SELECT * FROM duckdb_settings()", "not allowed"),
        ("SELECT getenv('HOME')", "getenv"),
        ("SELECT 1 INTO t", "INTO"),
        ("SELEC 1", "does not parse"),
    ],
)
def test_rejections_say_why(catalog: Catalog, sql: str, reason: str) -> None:
    with pytest.raises(SqlRejectedError, match=reason):
        prepare_sql(sql, catalog, POLICY, row_limit=10)

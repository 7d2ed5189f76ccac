"""Binary COPY decoding gives exactly what the CSV path (the stream's text conversion) gives.

The same rows are copied both ways from a real PostgreSQL: edge values of
every type decoded from binary, NULLs everywhere, text with quotes,
newlines and non-ASCII, and rows split across blocks.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import psycopg
import pyarrow as pa
import pytest

from headrace.source.changes import TableRef
from headrace.source.postgres.snapshot_binary import (
    binary_block_to_arrow,
    binary_copyable,
    text_cast_columns,
)
from headrace.source.postgres.snapshot_catalog import TablePlan, copy_statement, read_table_plans
from headrace.source.postgres.snapshot_copy import (
    csv_block_to_arrow,
    open_snapshot_connection,
    read_binary_copy_blocks,
    read_copy_blocks,
)
from headrace.source.postgres.types import TypeRegistry
from tests.conftest import PgDatabase
from tests.source.test_snapshot import exported_snapshot

_CREATE = """
CREATE TABLE edge (
    k    int4 PRIMARY KEY,
    b    bool,
    i2   int2,
    i8   int8,
    f4   float4,
    f8   float8,
    n    numeric(18, 2),
    nu   numeric,
    d    date,
    ts   timestamp,
    tstz timestamptz,
    t    text,
    v    varchar(20),
    c    char(5)
)
"""
_ROWS = [
    "(1, true, 32767, 9223372036854775807, 'NaN', 'Infinity', 9999999999999999.99, "
    "'NaN', 'infinity', 'infinity', 'infinity', '', '', '')",
    "(2, false, -32768, -9223372036854775808, '-Infinity', '-0', -9999999999999999.99, "
    "'-123456789012345678901234567890.000000000001', '-infinity', '-infinity', '-infinity', "
    "'a \"quoted\", comma', 'new\nline', 'x')",
    "(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    "(4, true, 0, 0, 1.1, 0.1, 0, 0, '4713-11-24 BC', '4713-11-24 00:00:00 BC', "
    "'294276-12-31 23:59:59.999999+00', 'héllo wörld ✓', '\\N', 'ab  ')",
    "(5, false, 1, 1, 3.4028235e38, 1.7976931348623157e308, 0.01, 1e-20, "
    "'5874897-12-31', '1999-12-31 23:59:59.999999', '2000-01-01 00:00:00+00', "
    "repeat('long text ', 50), 'twenty characters!!!', 'abcde')",
]


@contextlib.contextmanager
def snapshot_connection(pg_db: PgDatabase) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A copy connection under a snapshot exported by an open transaction."""
    with exported_snapshot(pg_db) as exported:
        conn = open_snapshot_connection(pg_db.dsn, exported.name)
        try:
            yield conn
        finally:
            conn.close()


def _plan(conn: psycopg.Connection[tuple[object, ...]], registry: TypeRegistry) -> TablePlan:
    (plan,) = read_table_plans(
        conn, (TableRef("public", "edge"),), registry=registry, publication=None, range_pages=0
    )
    return plan


def _binary_and_csv_copies(
    conn: psycopg.Connection[tuple[object, ...]],
    plan: TablePlan,
    registry: TypeRegistry,
    block_rows: int,
) -> tuple[list[pa.Table], list[pa.Table]]:
    """The table's first range copied in binary (in blocks of ``block_rows``) and as CSV."""
    schema, whole, stop = plan.schema, plan.ranges[0], threading.Event()
    binary = [
        binary_block_to_arrow(block, schema, registry)
        for block in read_binary_copy_blocks(
            conn,
            copy_statement(plan, whole, "binary", text_cast_columns(schema)),
            block_rows=block_rows,
            block_bytes=1 << 20,
            stop=stop,
        )
    ]
    csv = [
        csv_block_to_arrow(block, schema, registry)
        for block in read_copy_blocks(
            conn, copy_statement(plan, whole), block_rows=1000, block_bytes=1 << 20, stop=stop
        )
    ]
    return binary, csv


@pytest.mark.parametrize("block_rows", [1, 2, 1000])
def test_binary_copy_equals_csv_copy(pg_db: PgDatabase, block_rows: int) -> None:
    pg_db.execute(_CREATE)
    pg_db.execute("INSERT INTO edge VALUES " + ", ".join(_ROWS))
    pg_db.execute("INSERT INTO edge (k, t) SELECT g, 'row ' || g FROM generate_series(10, 300) g")
    with snapshot_connection(pg_db) as conn:
        registry = TypeRegistry.load(conn)
        plan = _plan(conn, registry)
        schema = plan.schema
        assert binary_copyable(schema)
        assert text_cast_columns(schema) == {"n", "nu"}
        binary, csv = _binary_and_csv_copies(conn, plan, registry, block_rows)
    got = pa.concat_tables(binary)
    expected = pa.concat_tables(csv)
    assert got.num_rows == expected.num_rows == len(_ROWS) + 291
    assert got.schema == expected.schema
    for name in got.column_names:
        assert _comparable(got.column(name)) == _comparable(expected.column(name)), name
    if block_rows == 1:
        assert len(binary) == got.num_rows


def _comparable(values: pa.ChunkedArray) -> list[object]:
    """The values, with NaN spelled out (NaN != NaN), times as their integers
    (the infinities lie beyond Python's dates)."""
    if pa.types.is_temporal(values.type):
        storage = pa.int32() if values.type.bit_width == 32 else pa.int64()
        values = pa.chunked_array([c.view(storage) for c in values.chunks], type=storage)
    return ["NaN" if isinstance(v, float) and math.isnan(v) else v for v in values.to_pylist()]


_NUMERICS = """
CREATE TABLE money (
    k  int4 PRIMARY KEY,
    n  numeric(18, 2),
    n0 numeric(18, 0),
    n6 numeric(10, 6),
    n4 numeric(4, 4),
    n1 numeric(1, 0),
    n9 numeric(18, 9)
)
"""
_NUMERIC_ROWS = [
    "(1, 'NaN', 'NaN', 'NaN', 'NaN', 'NaN', 'NaN')",
    "(2, 0, 0, 0, 0, 0, 0)",
    "(3, -0.01, -1, -0.000001, -0.0001, -9, -0.000000001)",
    "(4, 0.05, 999999999999999999, 1234.5678, 0.9999, 9, 123456789.123456789)",
    "(5, -9999999999999999.99, -999999999999999999, -9999.999999, -0.9999, -1, "
    "-999999999.999999999)",
    "(6, 10000.00, 100000000, 1000, 0.1, 1, 100000000)",
    "(7, 12345678.9, 10000000000000000, 0.0001, 0.001, 5, 0.1)",
    "(8, NULL, NULL, NULL, NULL, NULL, NULL)",
]


@pytest.mark.parametrize("block_rows", [1, 1000])
def test_numerics_of_a_binary_copy_equal_the_csv_copy(pg_db: PgDatabase, block_rows: int) -> None:
    """numeric(p, s) in a binary COPY (selected as text) equals the CSV copy: every
    digit group position, signs, zero, the precision's limits, NULL, and NaN
    (NULL, as the text converter makes it)."""
    pg_db.execute(_NUMERICS)
    pg_db.execute("INSERT INTO money VALUES " + ", ".join(_NUMERIC_ROWS))
    pg_db.execute(
        "INSERT INTO money SELECT g, (g * 7919.37 - 5000000)::numeric(18, 2), g * -104729, "
        "(g % 9973) / 997.0, (g % 9999) / 10000.0, g % 10 - 5, g * -123456.789012345 "
        "FROM generate_series(10, 2000) g"
    )
    with snapshot_connection(pg_db) as conn:
        registry = TypeRegistry.load(conn)
        (plan,) = read_table_plans(
            conn, (TableRef("public", "money"),), registry=registry, publication=None, range_pages=0
        )
        schema = plan.schema
        assert text_cast_columns(schema) == {"n", "n0", "n6", "n4", "n1", "n9"}
        binary, csv = _binary_and_csv_copies(conn, plan, registry, block_rows)
    got = pa.concat_tables(binary)
    expected = pa.concat_tables(csv)
    assert got.schema == expected.schema
    assert got.num_rows == expected.num_rows == len(_NUMERIC_ROWS) + 1991
    for name in got.column_names:
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    first = got.slice(0, 1).to_pylist()[0]
    assert first == {"k": 1} | dict.fromkeys(["n", "n0", "n6", "n4", "n1", "n9"])


def test_binary_copy_of_an_empty_table(pg_db: PgDatabase) -> None:
    pg_db.execute(_CREATE)
    with snapshot_connection(pg_db) as conn:
        registry = TypeRegistry.load(conn)
        plan = _plan(conn, registry)
        blocks = list(
            read_binary_copy_blocks(
                conn,
                copy_statement(plan, plan.ranges[0], "binary", text_cast_columns(plan.schema)),
                block_rows=10,
                block_bytes=1 << 20,
                stop=threading.Event(),
            )
        )
    assert blocks == []


def test_tables_with_other_types_are_copied_as_csv(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE DOMAIN positive AS int4 CHECK (VALUE > 0)")
    pg_db.execute("CREATE TABLE other (k int4 PRIMARY KEY, tags text[], p positive, j jsonb)")
    with snapshot_connection(pg_db) as conn:
        registry = TypeRegistry.load(conn)
        (plan,) = read_table_plans(
            conn, (TableRef("public", "other"),), registry=registry, publication=None, range_pages=0
        )
    assert not binary_copyable(plan.schema)

"""Tile rows rendered as JSON by DuckDB: the same values as the Python path, in order, exact."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from headrace.serve.catalog import MaskPolicy
from headrace.serve.compute import StoreReader, ViewSpec
from headrace.serve.metrics import ServeMetrics
from headrace.serve.results import rows_to_json
from headrace.serve.settings import LiveSettings
from headrace.serve.tile_json import (
    TileShape,
    describe_sql,
    render_sql,
    rows_json,
    shape_from_description,
)
from headrace.serve.tiles import ChartType, Dashboard, Dimension, Tile, TimeRange

CELLS = """
SELECT * FROM (VALUES
  (1, true, 42::TINYINT, 170141183460469231731687303715884105727::HUGEINT,
   123456789012345678901234.56::DECIMAL(38, 2), 0.1::DOUBLE, 0.5::FLOAT,
   TIMESTAMPTZ '2026-11-29 03:55:00.123456+02', TIMESTAMP '2026-11-29 01:55:00',
   TIMESTAMP_NS '2026-11-29 01:55:00.000001', DATE '2026-11-29', TIME '01:02:03',
   INTERVAL '1 day 2 seconds', '\\xAA\\x01'::BLOB, 'é "quoted" \\ back' || chr(10) || 'line',
   '6f1c0d6e-8f3a-4b7c-9d2e-1a2b3c4d5e6f'::UUID, 'b'::ENUM('a', 'b'), '{"k": [1]}'::JSON),
  (2, NULL, NULL, NULL, NULL, 'nan'::DOUBLE, 'inf'::FLOAT, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL),
  (3, false, -1::TINYINT, -5::HUGEINT, -0.01::DECIMAL(38, 2), '-inf'::DOUBLE, -2.25::FLOAT,
   TIMESTAMPTZ 'infinity', TIMESTAMP '1999-12-31 23:59:59.5', NULL, DATE '2000-01-01',
   NULL, INTERVAL '-90 minutes', ''::BLOB, '', NULL, 'a', NULL)
) t(id, b, ti, hi, dec, dbl, flt, tstz, ts, tsns, d, tm, iv, bl, txt, u, e, j)
ORDER BY id;
-- a trailing comment"""


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(tmp_path / "cells.duckdb")
    connection.execute("SET TimeZone = 'UTC'")
    try:
        yield connection
    finally:
        connection.close()


def shape_of(con: duckdb.DuckDBPyConnection, sql: str) -> TileShape:
    con.execute(describe_sql(sql)).fetchall()
    return shape_from_description([(str(d[0]), str(d[1])) for d in con.description or ()])


def render(con: duckdb.DuckDBPyConnection, shape: TileShape, sql: str, limit: int) -> Any:
    rendering = render_sql(shape, sql, limit)
    assert rendering is not None
    return rows_json(con.execute(rendering).fetchall(), limit)


def rendered(con: duckdb.DuckDBPyConnection, shape: TileShape, sql: str, limit: int = 5000) -> Any:
    return json.loads(render(con, shape, sql, limit)[0], parse_float=Decimal)


def test_cells_render_as_the_python_path_renders_them_with_exact_decimals(
    con: duckdb.DuckDBPyConnection,
) -> None:
    shape = shape_of(con, CELLS)
    rows = rendered(con, shape, CELLS)
    con.execute(CELLS)
    python_rows = con.fetchall()
    columns = [(str(d[0]), str(d[1])) for d in con.description or ()]
    expected = json.loads(json.dumps(rows_to_json(columns, python_rows)), parse_float=Decimal)
    assert json.loads(shape.columns_json) == expected["columns"]
    names = [name for name, _ in columns]
    for got, want in zip(rows, expected["rows"], strict=True):
        for name, g, w in zip(names, got, want, strict=True):
            if name == "dec" and w is not None:
                # The Python path rounds DECIMALs through a float; DuckDB keeps every digit.
                assert isinstance(g, Decimal)
                assert float(g) == float(w)
            elif name in ("tstz", "ts", "tsns") and w is not None and g != "infinity":
                # Always with microseconds here; the same instant.
                assert datetime.fromisoformat(g) == datetime.fromisoformat(w), name
            elif name == "tstz" and g == "infinity":
                assert w is not None  # Python gets a clamped datetime; DuckDB says infinity
            elif name == "tm" and w is not None:
                assert g == w  # 01:02:03 both ways (fractions differ in form only)
            else:
                assert g == w, (name, g, w)
    assert rows[0][4] == Decimal("123456789012345678901234.56")
    assert rows[0][3] == 170141183460469231731687303715884105727
    assert rows[0][7] == "2026-11-29T01:55:00.123456+00:00"
    assert [rows[1][5], rows[1][6], rows[2][5]] == [None, None, None]  # nan, inf, -inf


def test_rows_keep_the_query_order_and_are_cut_at_the_limit(
    con: duckdb.DuckDBPyConnection,
) -> None:
    con.execute("SET threads = 4")
    con.execute("CREATE TABLE t AS SELECT (random() * 1e12)::BIGINT AS k, i FROM range(20000) r(i)")
    sql = "SELECT k, i FROM t ORDER BY k DESC, i"
    expected = [list(r) for r in con.execute(sql).fetchall()]
    shape = shape_of(con, sql)
    assert rendered(con, shape, sql, limit=50_000) == expected
    text, truncated = render(con, shape, sql, 5000)
    assert truncated
    assert json.loads(text) == expected[:5000]
    empty = "SELECT k FROM t WHERE false"
    assert render(con, shape_of(con, empty), empty, 10) == ("[]", False)


def test_types_without_a_rendering_take_the_python_path(con: duckdb.DuckDBPyConnection) -> None:
    for sql in ("SELECT [1, 2] AS l", "SELECT {'a': 1} AS s", "SELECT 1 AS x, MAP {'k': 1} AS m"):
        shape = shape_of(con, sql)
        assert render_sql(shape, sql, 10) is None
        assert json.loads(shape.columns_json)[0]["name"] in ("l", "s", "x")


class FileStore:
    """A DuckDB file served as is (the test moves its version)."""

    def __init__(self, path: Path) -> None:
        self.con = duckdb.connect(path)
        self.con.execute("SET TimeZone = 'UTC'")
        self.version = 1

    def cursor(self) -> duckdb.DuckDBPyConnection:
        cursor = self.con.cursor()
        cursor.execute("SET TimeZone = 'UTC'")
        return cursor

    def subscribe(self, listener: Callable[[Any], None]) -> Callable[[], None]:
        return lambda: None


def test_a_view_renders_in_duckdb_falls_back_and_follows_column_changes(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store.duckdb")
    store.con.execute("CREATE SCHEMA mirror")
    store.con.execute("CREATE SCHEMA headrace")
    store.con.execute("CREATE TABLE headrace.position (lsn BIGINT, commit_ts TIMESTAMPTZ)")
    store.con.execute("CREATE TABLE mirror.t AS SELECT 1 AS id, 2.50::DECIMAL(10, 2) AS amount")
    dashboard = Dashboard(
        name="d",
        dimensions=[Dimension(name="id")],
        tiles=[
            Tile(name="rows", chart=ChartType.TABLE, query="SELECT * FROM mirror.t;\n-- end"),
            Tile(name="nested", query="SELECT [id, id] AS pair FROM mirror.t"),
            Tile(name="missing", query="SELECT * FROM mirror.nowhere"),
            Tile(
                name="after",
                chart=ChartType.STAT,
                query="SELECT count(*) AS n FROM mirror.t WHERE {filters}",
            ),
        ],
    )
    metrics = ServeMetrics(store.cursor)
    reader = StoreReader(store, LiveSettings(), metrics)

    def describes() -> float:
        value = metrics.registry.get_sample_value(
            "headrace_serve_store_queries_total", {"kind": "describe"}
        )
        return value or 0.0

    cur = store.cursor()
    spec = ViewSpec(dashboard, TimeRange.parse("1h"), (), MaskPolicy())
    try:
        result = reader.compute_view(cur, spec, 1)
        view = json.loads(result.payload, parse_float=Decimal)
        assert (view["version"], view["seq"], result.version, result.seq) == (1, 1, 1, 1)
        tiles = {t["name"]: t for t in view["tiles"]}
        assert tiles["rows"]["columns"] == [
            {"name": "id", "type": "INTEGER"},
            {"name": "amount", "type": "DECIMAL(10,2)"},
        ]
        assert tiles["rows"]["rows"] == [[1, Decimal("2.5")]]
        assert tiles["rows"]["truncated"] is False
        assert tiles["nested"]["rows"] == [[[1, 1]]]  # the Python path
        assert tiles["missing"]["error"].startswith("not in the store yet")
        assert tiles["missing"]["rows"] == []
        assert tiles["after"]["rows"] == [[1]]

        # Another filter set: other SQL, same columns, nothing described again.
        before = describes()
        filtered = ViewSpec(dashboard, TimeRange.parse("1h"), (("id", "2"),), MaskPolicy())
        view = json.loads(reader.compute_view(cur, filtered, 2).payload)
        assert {t["name"]: t["rows"] for t in view["tiles"]}["after"] == [[0]]
        # Only the tile that failed to describe (missing relation) tries again.
        assert describes() - before == 1

        # The table is replaced with other columns: the catalog, read again when the
        # version moved, makes the tiles be described again.
        store.con.execute(
            "CREATE OR REPLACE TABLE mirror.t AS SELECT 'x' AS code, TIMESTAMPTZ "
            "'2026-01-01 00:00:00+00' AS at, 'nan'::DOUBLE AS ratio"
        )
        store.version = 2
        view = json.loads(reader.compute_view(cur, spec, 2).payload)
        tiles = {t["name"]: t for t in view["tiles"]}
        assert [c["name"] for c in tiles["rows"]["columns"]] == ["code", "at", "ratio"]
        assert tiles["rows"]["rows"] == [["x", "2026-01-01T00:00:00.000000+00:00", None]]
    finally:
        reader.close()
        cur.close()
        store.con.close()

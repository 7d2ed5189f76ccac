"""Columnar text -> Arrow conversion of PostgreSQL's text forms, taken from a real server."""

from __future__ import annotations

from typing import Any

import psycopg
import pyarrow as pa
import pytest

from headrace.source.postgres.arrays import ArraySyntaxError, parse_array
from headrace.source.postgres.convert_text import parse_interval
from headrace.source.postgres.types import (
    TypeRegistry,
    arrow_type_for,
    numeric_precision_scale,
    text_column_to_arrow,
)
from tests.conftest import PgDatabase


def _texts_and_values(
    db: PgDatabase, type_name: str, literals: list[str], settings: str = ""
) -> tuple[list[str | None], list[Any]]:
    """Each literal's text form (under ``settings``) and psycopg's value of it."""
    with db.connect() as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for setting in filter(None, settings.split(";")):
            conn.execute(setting.encode())
        texts = [_one(conn, f"SELECT ({literal})::{type_name}::text") for literal in literals]
        conn.execute("SET TimeZone = 'UTC'")
        values = [_one(conn, f"SELECT ({literal})::{type_name}") for literal in literals]
    return [None if t is None else str(t) for t in texts], values


def _one(conn: psycopg.Connection[tuple[Any, ...]], query: str) -> Any:
    row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return row[0]


def _convert(db: PgDatabase, type_name: str, texts: list[str | None]) -> pa.Array:
    with db.connect() as conn:
        registry = TypeRegistry.load(conn)
        oid = int(_one(conn, f"SELECT '{type_name}'::regtype::oid::int8"))
    arrow_type = arrow_type_for(oid, -1, registry)
    return text_column_to_arrow(pa.array(texts, pa.string()), arrow_type, registry.lookup(oid))


def test_bytea_escape_output_form(pg_db: PgDatabase) -> None:
    literals = ["'\\x00015c27ff'::bytea", "'abc'::bytea", "''::bytea"]
    texts, values = _texts_and_values(pg_db, "bytea", literals, "SET bytea_output = 'escape'")
    assert texts[0] == "\\000\\001\\\\'\\377"
    assert _convert(pg_db, "bytea", [*texts, None]).to_pylist() == [*values, None]


def test_timestamptz_in_a_zone_with_second_offsets(pg_db: PgDatabase) -> None:
    literals = [
        "'1900-01-01 00:00:00+00'",
        "'2024-07-01 12:00:00+00'",
        "'0044-03-15 12:00:00+00 BC'",
    ]
    texts, values = _texts_and_values(
        pg_db, "timestamptz", literals[:2], "SET TimeZone = 'Asia/Kolkata'"
    )
    bc_texts, _ = _texts_and_values(
        pg_db, "text", [f"{literals[2]}::timestamptz"], "SET TimeZone = 'Asia/Kolkata'"
    )
    texts += bc_texts
    assert str(texts[0]).endswith("+05:21:10")
    assert str(texts[2]).endswith(" BC")
    converted = _convert(pg_db, "timestamptz", texts)
    assert converted.slice(0, 2).to_pylist() == values
    bc_micros = pg_db.fetchall(
        "SELECT (extract(epoch FROM '0044-03-15 12:00:00+00 BC'::timestamptz) * 1000000)::int8"
    )[0][0]
    assert converted.cast(pa.int64())[2].as_py() == bc_micros


def test_intervals_of_every_shape(pg_db: PgDatabase) -> None:
    literals = [
        "'1 year 2 mons -3 days 04:05:06.789'",
        "'-1 year -1 mon'",
        "'1 day'",
        "'-2 days'",
        "'00:00:00.000001'",
        "'-1:00:00'",
        "'2562047:00:54.775807'",
        "'-178000000 years'",
    ]
    texts, _ = _texts_and_values(pg_db, "interval", literals)
    fields = pg_db.fetchall(
        "SELECT (extract(year FROM i) * 12 + extract(month FROM i))::int8, "
        "extract(day FROM i)::int8, ((extract(hour FROM i) * 3600 + extract(minute FROM i) * 60)"
        " * 1000000 + extract(microseconds FROM i))::int8 FROM unnest(ARRAY["
        + ", ".join(f"{lit}::interval" for lit in literals)
        + "]) WITH ORDINALITY AS u(i, n) ORDER BY n"
    )
    converted = _convert(pg_db, "interval", texts).to_pylist()
    assert [(v.months, v.days, v.nanoseconds // 1000) for v in converted] == [
        tuple(row) for row in fields
    ]
    # Past int64 nanoseconds: NULL (counted), not an error.
    huge, _ = _texts_and_values(pg_db, "interval", ["'2562047788:00:54.775807'"])
    assert _convert(pg_db, "interval", huge).to_pylist() == [None]
    assert parse_interval("not an interval") is None
    assert parse_interval("") is None


def test_unparseable_values_become_null_not_errors() -> None:
    registry = TypeRegistry()
    for oid in (23, 1082, 1114, 1184, 1186, 1083, 1007, 17, 1700):
        pg_type = registry.lookup(oid)
        arrow_type = arrow_type_for(oid, 0x00120006 if oid == 1700 else -1, registry)
        garbage = "\\xZZ" if oid == 17 else "garbage"  # any text is escape-form bytea
        converted = text_column_to_arrow(pa.array([garbage, None]), arrow_type, pg_type)
        assert converted.to_pylist() == [None, None], pg_type.name


@pytest.mark.parametrize(
    ("text", "elements", "dimensions"),
    [
        ("{}", [], 0),
        ("{1,2,3}", ["1", "2", "3"], 1),
        ('{NULL,null,"NULL"}', [None, "null", "NULL"], 1),
        ('{"a,b","c\\"d","e\\\\f"," g ",""}', ["a,b", 'c"d', "e\\f", " g ", ""], 1),
        ("{{1,2},{3,NULL}}", ["1", "2", "3", None], 2),
        ('{{"{}","}"},{",",x}}', ["{}", "}", ",", "x"], 2),
        ("[0:1]={7,8}", ["7", "8"], 1),
        ("{\x1f,a\xa0b}", ["\x1f", "a\xa0b"], 1),
        ("{ 1 , 2 }", ["1", "2"], 1),
    ],
)
def test_array_literals(text: str, elements: list[str | None], dimensions: int) -> None:
    parsed = parse_array(text)
    assert parsed.elements == elements
    assert parsed.dimensions == dimensions


def test_box_arrays_use_semicolons() -> None:
    assert parse_array("{(1,1),(0,0);(2,2),(1,1)}", ";").elements == ["(1,1),(0,0)", "(2,2),(1,1)"]


@pytest.mark.parametrize("text", ["", "{", "{1,2", "1,2", '{"a}', "{1,,2}", "{1}x", "{{1},2"])
def test_array_syntax_errors(text: str) -> None:
    with pytest.raises(ArraySyntaxError):
        parse_array(text)


def test_array_literals_from_the_server(pg_db: PgDatabase) -> None:
    literals = [
        "ARRAY['a,b', 'c\"d', NULL, 'NULL', '', 'x\\y', ' sp ', '{}', E'\\t', 'ü']",
        "ARRAY[[ 'a', 'b' ], [ 'c', NULL ]]",
        "'{}'::text[]",
    ]
    texts, values = _texts_and_values(pg_db, "text[]", literals)
    converted = _convert(pg_db, "text[]", texts).to_pylist()
    flat = [[x for sub in v for x in (sub if isinstance(sub, list) else [sub])] for v in values]
    assert converted == flat


def test_numeric_modifiers() -> None:
    assert numeric_precision_scale(-1) is None
    assert numeric_precision_scale(((18 << 16) | 2) + 4) == (18, 2)
    assert numeric_precision_scale(((5 << 16) | (-3 & 0x7FF)) + 4) == (5, -3)
    registry = TypeRegistry()
    assert str(arrow_type_for(1700, ((5 << 16) | (-3 & 0x7FF)) + 4, registry)) == "string"
    assert str(arrow_type_for(1700, ((80 << 16) | 2) + 4, registry)) == "string"
    assert str(arrow_type_for(1700, ((39 << 16) | 2) + 4, registry)) == "decimal256(39, 2)"


def test_chunked_and_large_string_input() -> None:
    registry = TypeRegistry()
    pg_type = registry.lookup(20)
    chunked = pa.chunked_array([pa.array(["1", None]), pa.array(["-3"])])
    converted = text_column_to_arrow(chunked, pa.int64(), pg_type)
    assert converted.to_pylist() == [1, None, -3]
    large = pa.array(["7", None], pa.large_string())
    assert text_column_to_arrow(large, pa.int64(), pg_type).to_pylist() == [7, None]

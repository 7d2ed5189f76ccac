"""Every common PostgreSQL type, with edge values, through the real stream.

Each value is written in PostgreSQL, decoded from pgoutput by the batcher and
compared with what a SELECT returns through psycopg (adapted where the two
representations legitimately differ: uuid as text, interval as
months/days/microseconds, JSON and unconstrained numeric as their text).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from headrace.errors import SourceError
from headrace.source.postgres.batcher import Batcher
from headrace.source.postgres.convert import DATE_INFINITY, TIMESTAMP_INFINITY
from tests.conftest import PgDatabase
from tests.source.pgoutput_slot import LogicalSlot, rows_of, select

Adapt = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


def _text(value: Any) -> Any:
    return None if value is None else str(value)


def _flatten(value: Any) -> Any:
    if value is None or not isinstance(value, list):
        return value
    out: list[Any] = []
    for item in value:
        if isinstance(item, list):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


def _interval_ours(value: Any) -> Any:
    if value is None:
        return None
    return (value.months, value.days, value.nanoseconds // 1000)


def _float_key(value: Any) -> Any:
    if value is None:
        return None
    if math.isnan(value):
        return "nan"
    return (value, math.copysign(1.0, value))


@dataclass(frozen=True)
class Case:
    """One column type, the SQL literals to store, how to compare."""

    ddl: str
    literals: tuple[str, ...]
    select: str = "{c}"  # expression giving the expected value
    ours: Adapt = _same  # adapts the Arrow value
    theirs: Adapt = _same  # adapts psycopg's value
    arrow: str | None = None  # expected Arrow type


_INTERVAL_SELECT = (
    "CASE WHEN {c} IS NULL THEN NULL ELSE ARRAY["
    "(extract(year FROM {c}) * 12 + extract(month FROM {c}))::int8, "
    "extract(day FROM {c})::int8, "
    "((extract(hour FROM {c}) * 3600 + extract(minute FROM {c}) * 60) * 1000000 "
    "+ extract(microseconds FROM {c}))::int8] END"
)

CASES: tuple[Case, ...] = (
    Case("int2", ("-32768", "32767", "0"), arrow="int16"),
    Case("int4", ("-2147483648", "2147483647"), arrow="int32"),
    Case("int8", ("-9223372036854775808", "9223372036854775807"), arrow="int64"),
    Case(
        "numeric(18,2)",
        ("0", "-0.01", "9999999999999999.99", "-9999999999999999.99", "1.5"),
        arrow="decimal128(18, 2)",
    ),
    Case(
        "numeric(38,10)",
        ("1234567890123456789012345678.0123456789", "-0.0000000001"),
        arrow="decimal128(38, 10)",
    ),
    Case(
        "numeric(60,20)",
        ("1234567890123456789012345678901234567890.01234567890123456789",),
        arrow="decimal256(60, 20)",
    ),
    Case(
        "numeric",
        (
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "1e-30",
            "123456789012345678901234567890.000001",
            "0.000",
            "-12.5",
        ),
        select="{c}::text",
        arrow="string",
    ),
    Case(
        "float4",
        ("'NaN'", "'Infinity'", "'-Infinity'", "'-0'", "3.4028235e+38", "1.4e-45", "0.1"),
        ours=_float_key,
        # psycopg parses float4 text into a double; Arrow keeps the float32.
        theirs=lambda v: _float_key(None if v is None else float(np.float32(v))),
        arrow="float",
    ),
    Case(
        "float8",
        (
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "'-0'",
            "1.7976931348623157e308",
            "5e-324",
            "0.1",
            "-2.2250738585072014e-308",
        ),
        ours=_float_key,
        theirs=_float_key,
        arrow="double",
    ),
    Case("bool", ("true", "false"), arrow="bool"),
    Case(
        "text",
        (
            "''",
            "'héllo wörld ✓ 𝄞 日本'",
            "'a,b\"c\\d{}'",
            "E'line\\nbreak\\ttab'",
            "'NULL'",
            "repeat('long ', 3000)",
        ),
        arrow="string",
    ),
    Case("varchar(5)", ("'abc'", "''"), arrow="string"),
    Case("char(5)", ("'ab'", "'abcde'"), arrow="string"),
    Case('"char"', ("'x'",), arrow="string"),
    Case("name", ("'a name'",), arrow="string"),
    Case(
        "uuid",
        ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "'00000000-0000-0000-0000-000000000000'"),
        theirs=_text,
        arrow="string",
    ),
    Case(
        "date",
        ("'2024-02-29'", "'0001-01-01'", "'9999-12-31'", "'1970-01-01'"),
        arrow="date32[day]",
    ),
    Case(
        "time",
        ("'00:00:00'", "'23:59:59.999999'", "'12:34:56.5'"),
        arrow="time64[us]",
    ),
    Case(
        "timestamp",
        (
            "'2024-01-01 00:00:00'",
            "'1900-01-01 12:00:00.000001'",
            "'0001-01-01 00:00:00'",
            "'9999-12-31 23:59:59.999999'",
        ),
        arrow="timestamp[us]",
    ),
    Case(
        "timestamptz",
        (
            "'2024-06-01 12:00:00+05:30'",
            "'1900-01-01 00:00:00 Asia/Kolkata'",
            "'2024-01-01 00:00:00.123456-08'",
            "'0001-01-01 00:00:00+00'",
        ),
        arrow="timestamp[us, tz=UTC]",
    ),
    Case(
        "interval",
        (
            "'1 year 2 mons -3 days 04:05:06.789'",
            "'0'",
            "'-1 mon'",
            "'-00:00:00.000001'",
            "'1000000 hours'",
            "'-178000000 years'",
            "'3 days -04:00:00'",
        ),
        select=_INTERVAL_SELECT,
        ours=_interval_ours,
        theirs=lambda v: None if v is None else tuple(v),
        arrow="month_day_nano_interval",
    ),
    Case(
        "json",
        ('\'{"a": [1, 2.5, null], "b": "x"}\'', "'\"str\"'", "'[]'"),
        select="{c}::text",
        arrow="string",
    ),
    Case(
        "jsonb",
        ('\'{"a": [1, 2.5, null], "b": "ü"}\'', "'null'"),
        select="{c}::text",
        arrow="string",
    ),
    Case(
        "bytea",
        ("'\\x'", "'\\x00ff10'", "decode(repeat('ab', 1000), 'hex')", "'abc'::bytea"),
        arrow="binary",
    ),
    Case("mood", ("'happy'", "'sad'"), arrow="string"),
    Case("posint", ("1", "2147483647"), arrow="int32"),
    Case("money2", ("12.34",), arrow="decimal128(10, 2)"),
    Case(
        "int4[]",
        ("'{1,2,NULL}'", "'{}'", "'{{1,2},{3,4}}'", "'{-2147483648}'"),
        theirs=_flatten,
        arrow="list<item: int32>",
    ),
    Case(
        "text[]",
        (
            "ARRAY['a,b', 'c\"d', NULL, 'NULL', '', 'x\\y', ' sp ', '{}', 'ü']",
            "'{}'",
            "ARRAY[[ 'a', 'b' ], [ 'c', NULL ]]",
        ),
        theirs=_flatten,
        arrow="list<item: string>",
    ),
    Case(
        "numeric(10,2)[]",
        ("'{1.5,NULL,-99999999.99}'",),
        arrow="list<item: decimal128(10, 2)>",
    ),
    Case(
        "timestamptz[]",
        ("ARRAY['2024-01-01 00:00:00+02'::timestamptz, NULL]",),
        arrow="list<item: timestamp[us, tz=UTC]>",
    ),
    Case("bool[]", ("'{t,f,NULL}'",), arrow="list<item: bool>"),
    Case(
        "uuid[]",
        ("ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]",),
        theirs=lambda v: None if v is None else [str(x) for x in v],
        arrow="list<item: string>",
    ),
    Case("date[]", ("'{2024-01-01,1999-12-31}'",), arrow="list<item: date32[day]>"),
    Case(
        "float8[]",
        ("'{NaN,Infinity,-0,1.5}'",),
        ours=lambda v: None if v is None else [_float_key(x) for x in v],
        theirs=lambda v: None if v is None else [_float_key(x) for x in v],
        arrow="list<item: double>",
    ),
    Case(
        "jsonb[]",
        ("ARRAY['{\"a\": 1}'::jsonb, 'null'::jsonb]",),
        select="{c}::text[]",
        arrow="list<item: string>",
    ),
    Case("bytea[]", ("ARRAY['\\x01'::bytea, '\\x'::bytea, NULL]",), arrow="list<item: binary>"),
    Case("mood[]", ("'{happy,sad}'",), select="{c}::text[]", arrow="list<item: string>"),
    Case(
        "interval[]",
        ("ARRAY['1 day'::interval]",),
        select="{c}::text",
        ours=lambda v: None if v is None else [_interval_ours(x) for x in v],
        theirs=lambda v: None if v is None else [(0, 1, 0)],
        arrow="list<item: month_day_nano_interval>",
    ),
    Case(
        "inet",
        ("'192.168.0.1/24'", "'::1'"),
        select="CASE WHEN {c} IS NOT NULL THEN format('%s', {c}) END",
        arrow="string",
    ),
    Case("money", ("12.34",), select="{c}::text", arrow="string"),
    Case("pair", ("ROW(1, 'a b')", "ROW(NULL, NULL)"), select="{c}::text", arrow="string"),
    Case("int4range", ("'[1,5)'",), select="{c}::text", arrow="string"),
)


def _create(db: PgDatabase) -> None:
    db.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
    db.execute("CREATE TYPE pair AS (a int, b text)")
    db.execute("CREATE DOMAIN posint AS int4 CHECK (VALUE > 0)")
    db.execute("CREATE DOMAIN money2 AS numeric(10,2)")
    columns = ", ".join(f"c{i} {case.ddl}" for i, case in enumerate(CASES))
    db.execute(f"CREATE TABLE typed (id int PRIMARY KEY, {columns})")


def _insert_all(db: PgDatabase) -> int:
    rows = max(len(case.literals) for case in CASES) + 1  # the last row is all NULL
    with db.connect(autocommit=False) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for row in range(rows):
            values = ", ".join(
                case.literals[row] if row < len(case.literals) else "NULL" for case in CASES
            )
            conn.execute(f"INSERT INTO typed VALUES ({row}, {values})".encode())
        conn.commit()
    return rows


@pytest.fixture
def typed_slot(pg_db: PgDatabase) -> LogicalSlot:
    _create(pg_db)
    slot = LogicalSlot(pg_db).create()
    _insert_all(pg_db)
    return slot


def _expected(db: PgDatabase) -> list[tuple[Any, ...]]:
    exprs = ", ".join(case.select.format(c=f"c{i}") for i, case in enumerate(CASES))
    return select(db, f"SELECT {exprs} FROM typed ORDER BY id")


def _compare(rows: list[dict[str, Any]], expected: list[tuple[Any, ...]]) -> None:
    problems = []
    for i, case in enumerate(CASES):
        for row, want_row in zip(rows, expected, strict=True):
            got = case.ours(row[f"c{i}"])
            want = case.theirs(want_row[i])
            if isinstance(want, Decimal) and isinstance(got, Decimal):
                same = got == want and str(got) == str(want)
            else:
                same = got == want
            if not same:
                problems.append(f"{case.ddl} row {row['id']}: got {got!r}, want {want!r}")
    assert not problems, "\n".join(problems)


def test_every_type_matches_select(typed_slot: LogicalSlot) -> None:
    batch = typed_slot.batch()
    part = batch.tables[0]
    for i, case in enumerate(CASES):
        if case.arrow is not None:
            assert str(part.schema.columns[i + 1].arrow_type) == case.arrow, case.ddl
    _compare(rows_of(batch, "typed"), _expected(typed_slot.db))


def test_proto_1_without_streaming_gives_the_same(typed_slot: LogicalSlot) -> None:
    batch = typed_slot.batch(proto=1, streaming=False)
    _compare(rows_of(batch, "typed"), _expected(typed_slot.db))


def test_binary_format_fixed_width_types(pg_db: PgDatabase) -> None:
    pg_db.execute(
        "CREATE TABLE bin (id int2 PRIMARY KEY, i int4, b int8, f float4, d float8, ok bool, "
        "t text, dt date, ts timestamp, tz timestamptz, tm time, u uuid, raw bytea)"
    )
    slot = LogicalSlot(pg_db).create()
    binary_slot = LogicalSlot(pg_db, slot="sb").create_slot()
    pg_db.execute(
        "INSERT INTO bin VALUES (1, -2147483648, 9223372036854775807, 'NaN', '-Infinity', true, "
        "'ü', '2024-02-29', '1900-01-01 00:00:00.000001', '2024-06-01 12:00:00+05:30', "
        "'23:59:59.999999', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff'), "
        "(2, NULL, NULL, NULL, NULL, NULL, NULL, 'infinity', '-infinity', 'infinity', NULL, "
        "NULL, NULL)"
    )
    text_batch = slot.batch()
    binary_batch = binary_slot.batch(binary=True)
    text_data = text_batch.tables[0].data
    binary_data = binary_batch.tables[0].data
    for name in ("i", "b", "ok", "t", "dt", "ts", "tz", "tm", "u", "raw"):
        assert binary_data.column(name).equals(text_data.column(name)), name
    for name in ("f", "d"):
        assert str(binary_data.column(name).to_pylist()) == str(text_data.column(name).to_pylist())


def test_binary_numeric_is_a_clear_error(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE n (id int PRIMARY KEY, v numeric(10,2))")
    slot = LogicalSlot(pg_db).create()
    pg_db.execute("INSERT INTO n VALUES (1, 1.5)")
    with pytest.raises(SourceError, match="binary-format values of type numeric"):
        slot.batch(binary=True)


def test_special_dates_and_times(pg_db: PgDatabase) -> None:
    pg_db.execute(
        "CREATE TABLE special (id int PRIMARY KEY, d date, ts timestamp, tz timestamptz, t time)"
    )
    slot = LogicalSlot(pg_db).create()
    pg_db.execute(
        "INSERT INTO special VALUES "
        "(1, '4713-01-01 BC', '4713-01-01 00:00:00 BC', '0044-03-15 12:00:00+00 BC', '24:00:00'),"
        "(2, '10000-01-01', '200000-12-31 23:59:59.999999', '99999-06-01 00:00:00+00', NULL),"
        "(3, 'infinity', 'infinity', 'infinity', NULL),"
        "(4, '-infinity', '-infinity', '-infinity', NULL),"
        # Past int64 microseconds since 1970: NULL, counted, logged.
        "(5, '5874897-12-31', '294276-12-31 23:59:59.999999', NULL, NULL)"
    )
    data = slot.batch().tables[0].data
    days = data.column("d").cast(pa.int32()).to_pylist()
    expected_days = select(
        pg_db, "SELECT (d - '1970-01-01'::date) FROM special WHERE id <= 2 ORDER BY id"
    )
    assert days[:2] == [r[0] for r in expected_days]
    assert days[2:4] == [DATE_INFINITY, -DATE_INFINITY]
    assert days[4] == select(pg_db, "SELECT d - '1970-01-01'::date FROM special WHERE id = 5")[0][0]
    assert data.column("ts")[4].as_py() is None
    micros = select(
        pg_db,
        "SELECT (extract(epoch FROM ts) * 1000000)::int8, (extract(epoch FROM tz) * 1000000)::int8 "
        "FROM special WHERE id <= 2 ORDER BY id",
    )
    assert data.column("ts").cast(pa.int64()).to_pylist()[:2] == [r[0] for r in micros]
    assert data.column("tz").cast(pa.int64()).to_pylist()[:2] == [r[1] for r in micros]
    assert data.column("ts").cast(pa.int64()).to_pylist()[2:4] == [
        TIMESTAMP_INFINITY,
        -TIMESTAMP_INFINITY,
    ]
    assert data.column("t").cast(pa.int64()).to_pylist()[0] == 86_400_000_000


def test_nan_in_constrained_numeric_becomes_null_with_warning(
    pg_db: PgDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    from headrace.source.postgres.convert_issues import conversion_issues  # noqa: PLC0415

    pg_db.execute("CREATE TABLE n (id int PRIMARY KEY, v numeric(10,2))")
    slot = LogicalSlot(pg_db).create()
    pg_db.execute("INSERT INTO n VALUES (1, 'NaN'), (2, 3.25)")
    before = sum(conversion_issues.values())
    with caplog.at_level(logging.WARNING):
        rows = rows_of(slot.batch(), "n")
    assert [r["v"] for r in rows] == [None, Decimal("3.25")]
    assert sum(conversion_issues.values()) == before + 1


def test_composite_type_is_text_with_one_warning(
    pg_db: PgDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    pg_db.execute("CREATE TYPE pair AS (a int, b text)")
    pg_db.execute("CREATE TABLE c (id int PRIMARY KEY, p pair)")
    slot = LogicalSlot(pg_db).create()
    pg_db.execute("INSERT INTO c VALUES (1, ROW(1, 'x y')), (2, ROW(2, NULL))")
    pg_db.execute("INSERT INTO c VALUES (3, ROW(3, 'z'))")
    with caplog.at_level(logging.WARNING):
        rows = rows_of(slot.batch(), "c")
    assert [r["p"] for r in rows] == ['(1,"x y")', "(2,)", "(3,z)"]
    warnings = [r for r in caplog.records if "pair" in r.getMessage()]
    assert len(warnings) == 1
    assert "text form" in warnings[0].getMessage()


def test_unknown_type_without_catalog_is_text(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE DOMAIN posint AS int4 CHECK (VALUE > 0)")
    pg_db.execute("CREATE TABLE u (id int PRIMARY KEY, v posint)")
    slot = LogicalSlot(pg_db).create()
    pg_db.execute("INSERT INTO u VALUES (1, 5)")
    batcher = Batcher()  # no catalog: the domain is unknown
    for lsn, payload in slot.changes():
        batcher.feed(lsn, payload)
    batch = batcher.take()
    assert batch is not None
    assert rows_of(batch, "u")[0]["v"] == "5"

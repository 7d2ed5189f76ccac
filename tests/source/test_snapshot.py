"""The snapshot copy into Arrow: values, NULLs, CTID ranges, progress, errors.

Each test copies under a snapshot exported by an ordinary REPEATABLE READ
transaction (``pg_export_snapshot()``), so no slot is needed; the slot's own
exported snapshot and the hand-over to streaming are tested in
``test_snapshot_handover.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from headrace.errors import ConfigError, SourceError
from headrace.source.changes import SnapshotChunk, TableRef
from headrace.source.postgres.snapshot import (
    ExportedSnapshot,
    SnapshotSettings,
    Snapshotter,
    same_columns,
)
from headrace.source.postgres.snapshot_progress import RichSnapshotProgress, TableProgress
from tests.conftest import PgDatabase


@contextlib.contextmanager
def exported_snapshot(pg_db: PgDatabase) -> Iterator[ExportedSnapshot]:
    """A snapshot exported by an open REPEATABLE READ transaction."""
    with psycopg.connect(pg_db.dsn) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        yield ExportedSnapshot(slot="", consistent_point=0, name=str(row[0]))


def copy_tables(
    pg_db: PgDatabase, *tables: str, progress: list[TableProgress] | None = None, **options: object
) -> list[SnapshotChunk]:
    """Every chunk of a snapshot of ``tables``."""
    settings = SnapshotSettings(
        dsn=pg_db.dsn,
        tables=tuple(TableRef.parse(t) for t in tables),
        slot="unused",
        **options,  # type: ignore[arg-type]
    )
    snapshotter = Snapshotter(settings, progress=None if progress is None else progress.append)
    with exported_snapshot(pg_db) as exported:
        return list(snapshotter.copy_exported(exported))


def rows_of(chunks: list[SnapshotChunk], table: str) -> pa.Table:
    ref = TableRef.parse(table)
    parts = [c.rows for c in chunks if c.schema.table == ref]
    assert parts, f"no chunk for {table}"
    return pa.concat_tables(parts)


def sorted_rows(table: pa.Table, key: str = "id") -> list[dict[str, object]]:
    rows: list[dict[str, object]] = table.sort_by(key).to_pylist()
    return rows


# -- every type equals SELECT ---------------------------------------------------

TYPES_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN money2 AS numeric(12,2);
CREATE TABLE every_type (
    id int8 PRIMARY KEY,
    i2 int2, i4 int4, i8 int8,
    n numeric(18,2), n_big numeric(50,10), n_free numeric,
    f4 float4, f8 float8,
    b bool,
    t text, vc varchar(20), ch char(5),
    u uuid,
    d date, tm time, ts timestamp, tstz timestamptz,
    iv interval,
    js json, jsb jsonb,
    by bytea,
    e mood,
    dom money2,
    ai int4[], at text[], an numeric(10,3)[]
)
"""

TYPES_ROWS = """
INSERT INTO every_type VALUES
(1, -32768, -2147483648, -9223372036854775808,
 -1234567890123456.78, 12345678901234567890123456789012345678.1234567890, 'NaN',
 'NaN', '-Infinity', true,
 '', '', '',
 '00000000-0000-0000-0000-000000000000',
 '0001-01-01', '00:00:00', '1970-01-01 00:00:00', '1999-12-31 23:59:59.999999+00',
 '-1 year -2 mons +3 days -04:05:06.789', '{"a": [1, 2.5, null]}', '{"b": {"c": "d"}}',
 '\\x', 'sad', 0.01,
 '{}', '{}', '{}'),
(2, 32767, 2147483647, 9223372036854775807,
 9999999999999999.99, -0.0000000001, '3.14159265358979323846264338327950288419716939937510',
 'Infinity', 2.2250738585072014e-308, false,
 E'tab\\there, "quoted", new\\nline, back\\\\slash', 'ünïcødé ✓', 'abc',
 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
 '2024-02-29', '23:59:59.999999', '2262-04-11 23:47:16.854775', '2024-06-30 12:34:56.5-07:30',
 '1 day 00:00:00.000001', '[]', '[1, "x", {"y": null}]',
 '\\x00ff10', 'happy', -99.99,
 '{1,NULL,3}', '{"a,b","","NULL",NULL,"q\\"uote"}', '{1.5,NULL,-2.125}'),
(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)
"""

# SELECT expressions whose psycopg values are what the Arrow values must equal.
SELECT_AS_ARROW = {
    "u": "u::text",
    "js": "js::text",
    "jsb": "jsb::text",
    "e": "e::text",
    "n_free": "n_free::text",
    "iv": (
        "CASE WHEN iv IS NULL THEN NULL ELSE ARRAY[extract(year FROM iv)::int8 * 12 + "
        "extract(month FROM iv)::int8, extract(day FROM iv)::int8, "
        "(extract(epoch FROM iv - date_trunc('day', iv)) * 1000000000)::int8] END"
    ),
}


def arrow_value(column: str, value: object) -> object:
    """The Python value Arrow gives for a SELECT value of ``column``."""
    if column == "iv" and isinstance(value, list):
        return pa.MonthDayNano(value)
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def same_value(have: object, want: object) -> bool:
    """Equal, with NaN equal to NaN."""
    if isinstance(want, float) and math.isnan(want):
        return isinstance(have, float) and math.isnan(have)
    return have == want


def test_every_type_equals_select(pg_db: PgDatabase) -> None:
    pg_db.execute(TYPES_DDL)
    pg_db.execute(TYPES_ROWS)
    chunks = copy_tables(pg_db, "every_type")
    (schema,) = {c.schema for c in chunks}
    names = [c.name for c in schema.columns]
    got = sorted_rows(rows_of(chunks, "every_type"))
    select = ", ".join(SELECT_AS_ARROW.get(n, n) for n in names)
    expected = [
        {n: arrow_value(n, v) for n, v in zip(names, row, strict=True)}
        for row in pg_db.fetchall(f"SELECT {select} FROM every_type ORDER BY id")
    ]
    for got_row, want_row in zip(got, expected, strict=True):
        for name in names:
            have, want = got_row[name], want_row[name]
            assert same_value(have, want), (name, have, want)
    # The schema is the table's, as pgoutput would announce it.
    assert schema.key_columns == ("id",)
    assert schema.version == 1
    assert schema.relation_oid > 0
    types = {c.name: c.arrow_type for c in schema.columns}
    assert types["n"] == pa.decimal128(18, 2)
    assert types["dom"] == pa.decimal128(12, 2)
    assert types["tstz"] == pa.timestamp("us", tz="UTC")
    assert types["ai"] == pa.list_(pa.int32())


# -- NULL vs '' vs hard strings ------------------------------------------------

HARD_STRINGS = [
    "",
    " ",
    "  padded  ",
    ",",
    '"',
    '""',
    "a,b",
    'he said "hi", then left',
    "line1\nline2",
    "cr\rlf\r\n",
    "\n",
    "\\.",
    "\\N",
    "NULL",
    "null",
    "tab\there",
    "back\\slash",
    "ünïcødé ✓ 😀",
    "x" * 10_000,
]


def test_null_empty_and_hard_strings_stay_distinct(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE s (id int8 PRIMARY KEY, v text, w varchar)")
    values = [*HARD_STRINGS, None]
    with pg_db.connect() as conn:
        conn.cursor().executemany(
            "INSERT INTO s VALUES (%s, %s, %s)",
            [(i, v, values[-1 - i]) for i, v in enumerate(values)],
        )
    got = sorted_rows(rows_of(copy_tables(pg_db, "s"), "s"))
    assert [r["v"] for r in got] == values
    assert [r["w"] for r in got] == values[::-1]


def test_one_column_table_with_null_and_empty_rows(pg_db: PgDatabase) -> None:
    # COPY writes a one-column NULL as an empty line: it must still be a row.
    pg_db.execute("CREATE TABLE one (v text)")
    pg_db.execute("INSERT INTO one VALUES (NULL), (''), (NULL), ('x'), (NULL)")
    got = rows_of(copy_tables(pg_db, "one"), "one").column("v").to_pylist()
    assert sorted(got, key=lambda v: (v is not None, v or "")) == [None, None, None, "", "x"]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(
            st.none() | st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
            st.none() | st.integers(-(2**63), 2**63 - 1),
            st.none()
            | st.decimals(min_value=-(10**15), max_value=10**15, places=2, allow_nan=False),
            st.none() | st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
            st.none() | st.floats(width=64),
        ),
        max_size=30,
    )
)
def test_random_rows_equal_select(
    pg_db: PgDatabase,
    rows: list[tuple[str | None, int | None, Decimal | None, datetime | None, float | None]],
) -> None:
    pg_db.execute(
        "DROP TABLE IF EXISTS r; CREATE TABLE r (id int4 PRIMARY KEY, t text, i int8, "
        "n numeric(18,2), ts timestamptz, f float8)"
    )
    with pg_db.connect() as conn:
        conn.cursor().executemany(
            "INSERT INTO r VALUES (%s, %s, %s, %s, %s, %s)",
            [
                (i, t, n8, d, None if ts is None else ts.replace(tzinfo=UTC), f)
                for i, (t, n8, d, ts, f) in enumerate(rows)
            ],
        )
    got = sorted_rows(rows_of(copy_tables(pg_db, "r", chunk_rows=7), "r"))
    want = pg_db.fetchall("SELECT id, t, i, n, ts, f FROM r ORDER BY id")
    assert len(got) == len(want)
    for have, row in zip(got, want, strict=True):
        expected = dict(zip(("id", "t", "i", "n", "ts", "f"), row, strict=True))
        for name, value in expected.items():
            assert same_value(have[name], arrow_value(name, value)), (name, have, expected)


# -- CTID ranges -------------------------------------------------------------


def test_ctid_split_table_gives_every_row_exactly_once(pg_db: PgDatabase) -> None:
    pg_db.execute(
        "CREATE TABLE big (id int8 PRIMARY KEY, pad text) WITH (fillfactor = 50);"
        "INSERT INTO big SELECT g, repeat('x', g % 200) FROM generate_series(1, 20000) g;"
        # Holes: deleted rows, and updated rows that moved to other pages.
        "DELETE FROM big WHERE id % 7 = 0;"
        "UPDATE big SET pad = pad || 'moved' WHERE id % 11 = 0;"
        "ANALYZE big"
    )
    (pages,) = pg_db.fetchall("SELECT pg_relation_size('big') / 8192")[0]
    assert isinstance(pages, int)
    assert pages > 100
    progress: list[TableProgress] = []
    chunks = copy_tables(pg_db, "big", progress=progress, range_pages=16, chunk_rows=500, workers=3)
    ids = rows_of(chunks, "big").column("id").to_pylist()
    want = [row[0] for row in pg_db.fetchall("SELECT id FROM big ORDER BY id")]
    assert sorted(ids) == want
    assert len(ids) == len(set(ids))
    assert len(chunks) > pages // 16  # it really was split
    final = progress[-1]
    assert final.finished
    assert final.rows == len(want)
    assert final.pages_done >= pages
    assert [p.rows for p in progress] == sorted(p.rows for p in progress)


def test_several_tables_copy_in_parallel_and_empty_tables_show_up(pg_db: PgDatabase) -> None:
    pg_db.execute(
        "CREATE SCHEMA other;"
        'CREATE TABLE other."Mixed Case" (k text PRIMARY KEY, v int4);'
        "INSERT INTO other.\"Mixed Case\" SELECT 'k' || g, g FROM generate_series(1, 500) g;"
        "CREATE TABLE empty (id int8 PRIMARY KEY);"
        "CREATE TABLE a (id int8 PRIMARY KEY);"
        "INSERT INTO a SELECT generate_series(1, 3000)"
    )
    chunks = copy_tables(pg_db, "other.Mixed Case", "empty", "a", workers=4, chunk_rows=100)
    assert rows_of(chunks, "other.Mixed Case").num_rows == 500
    assert rows_of(chunks, "a").num_rows == 3000
    empty = rows_of(chunks, "empty")
    assert empty.num_rows == 0
    assert empty.schema == pa.schema([pa.field("id", pa.int64())])
    assert {c.consistent_point for c in chunks} == {0}


def test_snapshot_sees_only_rows_committed_before_it(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int8 PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'old')")
    settings = SnapshotSettings(dsn=pg_db.dsn, tables=(TableRef.parse("t"),), slot="unused")
    with exported_snapshot(pg_db) as exported:
        pg_db.execute("INSERT INTO t VALUES (2, 'new'); UPDATE t SET v = 'changed' WHERE id = 1")
        chunks = list(Snapshotter(settings).copy_exported(exported))
    assert rows_of(chunks, "t").to_pylist() == [{"id": 1, "v": "old"}]


# -- columns and keys as pgoutput announces them ------------------------------


def test_columns_and_keys_follow_replica_identity_and_publication(pg_db: PgDatabase) -> None:
    pg_db.execute(
        "CREATE TABLE pk (a int4, b int4, c text, g int4 GENERATED ALWAYS AS (a * 2) STORED, "
        "PRIMARY KEY (b, a));"
        "ALTER TABLE pk DROP COLUMN c;"
        "CREATE TABLE full_id (a int4, b text); ALTER TABLE full_id REPLICA IDENTITY FULL;"
        "CREATE TABLE by_index (a int4 NOT NULL, b text);"
        "CREATE UNIQUE INDEX by_index_a ON by_index (a);"
        "ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_a;"
        "CREATE TABLE filtered (id int4 PRIMARY KEY, secret text, amount int4);"
        "INSERT INTO filtered VALUES (1, 's', 5), (2, 's', 50), (3, NULL, 500);"
        "INSERT INTO pk VALUES (1, 2);"
        "CREATE PUBLICATION p FOR TABLE pk, full_id, by_index, "
        "filtered (id, amount) WHERE (amount > 10)"
    )
    chunks = copy_tables(pg_db, "pk", "full_id", "by_index", "filtered", publication="p")
    schemas = {c.schema.table.name: c.schema for c in chunks}
    assert [c.name for c in schemas["pk"].columns] == ["a", "b"]
    assert schemas["pk"].key_columns == ("a", "b")
    assert schemas["full_id"].key_columns == ("a", "b")
    assert schemas["by_index"].key_columns == ("a",)
    assert [c.name for c in schemas["filtered"].columns] == ["id", "amount"]
    assert sorted_rows(rows_of(chunks, "filtered")) == [
        {"id": 2, "amount": 50},
        {"id": 3, "amount": 500},
    ]
    assert same_columns(schemas["pk"], schemas["pk"])
    assert not same_columns(schemas["pk"], schemas["by_index"])


def test_table_not_in_publication_is_an_error(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int4 PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t;")
    pg_db.execute("CREATE TABLE u (id int4 PRIMARY KEY)")
    with pytest.raises(SourceError, match="not in publication"):
        copy_tables(pg_db, "t", "u", publication="p")


def test_missing_table_and_view_are_errors(pg_db: PgDatabase) -> None:
    pg_db.execute("CREATE TABLE t (id int4); CREATE VIEW v AS SELECT * FROM t")
    with pytest.raises(SourceError, match="does not exist") as missing:
        copy_tables(pg_db, "nope")
    assert missing.value.fix
    with pytest.raises(SourceError, match="is not a table"):
        copy_tables(pg_db, "v")


# -- progress ----------------------------------------------------------------


def test_rich_progress_shows_rows_rate_and_eta(pg_db: PgDatabase) -> None:
    pg_db.execute(
        "CREATE TABLE t (id int8 PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 5000);"
        "ANALYZE t"
    )
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False)
    with RichSnapshotProgress(console) as show:
        settings = SnapshotSettings(dsn=pg_db.dsn, tables=(TableRef.parse("t"),), slot="unused")
        with exported_snapshot(pg_db) as exported:
            rows = sum(
                c.rows.num_rows
                for c in Snapshotter(settings, progress=show).copy_exported(exported)
            )
    assert rows == 5000
    text = out.getvalue()
    assert "public.t" in text
    assert "5000/5000" in text
    assert "rows/s" in text
    assert "ETA" in text


def test_progress_estimates_rows() -> None:
    update = TableProgress(
        table=TableRef("public", "t"),
        rows=100,
        estimated_rows=None,
        pages_done=10,
        pages=40,
        started=0.0,
        finished=False,
    )
    assert update.expected_rows == 400
    assert update.rows_per_second > 0
    assert json.dumps(update.expected_rows) == "400"


def test_settings_out_of_range_are_refused() -> None:
    table = TableRef("public", "t")
    with pytest.raises(ConfigError, match="workers"):
        Snapshotter(SnapshotSettings(dsn="", tables=(table,), slot="s", workers=0))
    with pytest.raises(ConfigError, match="each named once"):
        Snapshotter(SnapshotSettings(dsn="", tables=(table, table), slot="s"))
    with pytest.raises(ConfigError, match="at least one table"):
        Snapshotter(SnapshotSettings(dsn="", tables=(), slot="s"))


def test_partitioned_table_is_copied_through_its_parent(pg_db: PgDatabase) -> None:
    pg_db.execute(
        "CREATE TABLE ev (id int8, day date, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);"
        "CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');"
        "CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM ('2024-02-01') TO ('2024-03-01');"
        "INSERT INTO ev SELECT g, date '2024-01-01' + (g % 59) FROM generate_series(1, 2000) g;"
        "CREATE PUBLICATION p FOR TABLE ev WITH (publish_via_partition_root = true)"
    )
    chunks = copy_tables(pg_db, "ev", publication="p", range_pages=1)
    ids = rows_of(chunks, "ev").column("id").to_pylist()
    assert sorted(ids) == list(range(1, 2001))
    assert {c.schema.table for c in chunks} == {TableRef("public", "ev")}

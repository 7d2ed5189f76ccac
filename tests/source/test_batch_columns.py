"""A batch's columns are cut and converted together: each still gets its own values.

The assembler cuts the values of every table, column and tuple side (new and
old) of a batch out of the block at once and converts all columns of one type
in one call; these tests mix tables, types, old tuples on some rows only, and
NULLs in one batch, and check every value where it belongs.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pytest

from headrace.errors import ProtocolError
from headrace.source.changes import OLD_KIND, OP, old_name
from headrace.source.postgres import tuples
from headrace.source.postgres.batcher import Batcher
from headrace.source.postgres.tuples import MessageBlock, read_tuples
from tests.conftest import PgDatabase
from tests.source.pgoutput_slot import LogicalSlot, rows_of


@pytest.fixture
def slot(pg_db: PgDatabase) -> LogicalSlot:
    pg_db.execute(
        "CREATE TABLE a (id int8 PRIMARY KEY, name text, amount numeric(10,2), at timestamptz)"
    )
    pg_db.execute("ALTER TABLE a REPLICA IDENTITY FULL")
    pg_db.execute(
        "CREATE TABLE b (id int8 PRIMARY KEY, name text, amount numeric(10,2), live bool)"
    )
    pg_db.execute("CREATE TABLE c (id int4 PRIMARY KEY, note text, amount numeric(12,3))")
    return LogicalSlot(pg_db).create()


def _picked(rows: list[dict[str, object]], *names: str) -> list[tuple[object, ...]]:
    return [tuple(row[n] for n in names) for row in rows]


def test_tables_types_and_tuple_sides_keep_their_own_values(slot: LogicalSlot) -> None:
    slot.db.execute(
        "BEGIN;"
        "INSERT INTO a VALUES (1, 'a1', 1.50, '2024-01-01 00:00:00+00');"
        "INSERT INTO b VALUES (1, 'b1', 2.25, true);"
        "INSERT INTO c VALUES (1, 'c1', 3.125);"
        "UPDATE a SET name = 'a1x', amount = 1.75 WHERE id = 1;"
        "UPDATE b SET name = NULL WHERE id = 1;"
        "INSERT INTO b VALUES (2, '', 0.00, false);"
        "DELETE FROM b WHERE id = 1;"
        "INSERT INTO a VALUES (2, NULL, NULL, NULL);"
        "DELETE FROM a WHERE id = 1;"
        "UPDATE c SET id = 2, note = 'c2' WHERE id = 1;"
        "COMMIT"
    )
    batch = slot.batch()
    assert {t.table.name for t in batch.tables} == {"a", "b", "c"}

    a = rows_of(batch, "a")
    at = datetime(2024, 1, 1, tzinfo=UTC)
    assert _picked(a, OP, "id", "name", "amount", "at") == [
        ("I", 1, "a1", Decimal("1.50"), at),
        ("U", 1, "a1x", Decimal("1.75"), at),
        ("I", 2, None, None, None),
        ("D", None, None, None, None),
    ]
    old_columns = [old_name(n) for n in ("id", "name", "amount", "at")]
    assert _picked(a, OLD_KIND, *old_columns) == [
        (None, None, None, None, None),
        ("O", 1, "a1", Decimal("1.50"), at),
        (None, None, None, None, None),
        ("O", 1, "a1x", Decimal("1.75"), at),
    ]

    b = rows_of(batch, "b")
    assert _picked(b, OP, "id", "name", "amount", "live", OLD_KIND, old_name("id")) == [
        ("I", 1, "b1", Decimal("2.25"), True, None, None),
        ("U", 1, None, Decimal("2.25"), True, None, None),
        ("I", 2, "", Decimal("0.00"), False, None, None),
        ("D", None, None, None, None, "K", 1),
    ]
    assert [r[old_name("name")] for r in b] == [None] * 4  # a key-only old tuple

    c = rows_of(batch, "c")
    assert _picked(c, OP, "id", "note", "amount", OLD_KIND, old_name("id")) == [
        ("I", 1, "c1", Decimal("3.125"), None, None),
        ("U", 2, "c2", Decimal("3.125"), "K", 1),
    ]
    assert [r[old_name("note")] for r in c] == [None, None]


def _insert(columns: list[tuple[str, bytes | None]]) -> bytes:
    body = bytearray(b"I" + struct.pack("!I", 16384) + b"N" + struct.pack("!h", len(columns)))
    for kind, value in columns:
        body += kind.encode()
        if value is not None:
            body += struct.pack("!i", len(value)) + value
    return bytes(body)


@pytest.mark.parametrize(
    ("length", "what"),
    [
        (-1, "column 2 claims -1 bytes"),
        (1000, "column 2 claims 1000 bytes, 0 remain"),
        (2**31 - 1, "column 2 claims 2147483647 bytes"),
    ],
)
def test_a_bad_value_length_is_reported_at_its_column(length: int, what: str) -> None:
    good = _insert([("t", b"12"), ("t", b"")])
    bad = good[:-4] + struct.pack("!i", length)  # the last column's length
    block = MessageBlock.build([good, bad, good], [10, 20, 30], np.ones(3, dtype=np.int64))
    rows = np.arange(3, dtype=np.int64)
    with pytest.raises(ProtocolError, match=what) as info:
        read_tuples(block, rows, block.starts + 6, 2)
    assert info.value.lsn == 20
    assert info.value.offset == len(good) - 4


def test_a_block_past_the_binary_array_limit_gives_the_same_values(
    slot: LogicalSlot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2 GiB of values is too much for a test: lower the limit instead, so
    # the values are cut as large_binary and converted column by column.
    slot.db.execute(
        "INSERT INTO a SELECT g, 'name ' || g, g / 8.0, '2024-01-01 00:00:00+00'::timestamptz "
        "+ g * interval '1 minute' FROM generate_series(1, 40) AS g;"
        "INSERT INTO b SELECT g, NULL, g / 4.0, g % 2 = 0 FROM generate_series(1, 30) AS g"
    )
    messages = slot.changes()
    registry = slot.registry()

    def decode() -> dict[str, pa.Table]:
        batcher = Batcher(registry)
        for lsn, payload in messages:
            batcher.feed(lsn, payload)
        batch = batcher.take()
        assert batch is not None
        return {t.table.name: t.data for t in batch.tables}

    expected = decode()
    monkeypatch.setattr(tuples, "_INT32_LIMIT", 64)
    got = decode()
    assert got.keys() == expected.keys() == {"a", "b"}
    for name, data in expected.items():
        assert got[name].equals(data)

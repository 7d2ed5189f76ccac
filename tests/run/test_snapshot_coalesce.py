"""Snapshot chunks are joined per table before the store appends them (``_coalesced``)."""

from __future__ import annotations

import pyarrow as pa

from headrace.run.initial import _coalesced
from headrace.source.changes import Column, SnapshotChunk, TableRef, TableSchema


def _schema(name: str) -> TableSchema:
    column = Column(
        name="k",
        type_oid=20,
        type_modifier=-1,
        type_name="int8",
        arrow_type=pa.int64(),
        is_key=True,
    )
    return TableSchema(table=TableRef("public", name), columns=(column,), version=1)


def _chunk(schema: TableSchema, first: int, rows: int) -> SnapshotChunk:
    data = pa.table({"k": pa.array(range(first, first + rows), pa.int64())})
    return SnapshotChunk(schema, data, 7)


def test_chunks_are_joined_per_table_and_every_row_is_kept_once() -> None:
    a, b = _schema("a"), _schema("b")
    chunks = [
        _chunk(a, 0, 40),
        _chunk(b, 0, 30),
        _chunk(a, 40, 40),
        _chunk(b, 30, 5),
        _chunk(a, 80, 3),
    ]
    out = list(_coalesced(iter(chunks), min_rows=100))
    # 110 rows wait after the third chunk: both tables are handed over; the rest at the end.
    assert [(c.schema.table.name, c.rows.num_rows) for c in out] == [
        ("a", 80),
        ("b", 30),
        ("b", 5),
        ("a", 3),
    ]
    keys: dict[str, list[int]] = {"a": [], "b": []}
    for chunk in out:
        keys[chunk.schema.table.name] += chunk.rows.column("k").to_pylist()
    assert keys == {"a": list(range(83)), "b": list(range(35))}


def test_an_empty_table_passes_at_once() -> None:
    a, empty = _schema("a"), _schema("empty")
    chunks = [_chunk(a, 0, 5), _chunk(empty, 0, 0)]
    out = list(_coalesced(iter(chunks), min_rows=100))
    assert [(c.schema.table.name, c.rows.num_rows) for c in out] == [("empty", 0), ("a", 5)]

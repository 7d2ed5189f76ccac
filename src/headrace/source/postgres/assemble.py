"""Build the Arrow tables of a :class:`ChangeBatch` from buffered row messages.

The :class:`~headrace.source.postgres.batcher.Batcher` keeps committed row
messages as raw bytes in *runs* (consecutive messages of one transaction under
one set of relation schemas). Here all pending runs are parsed at once
(:mod:`headrace.source.postgres.tuples`), grouped per table and schema
version, and every column is converted in one call per batch
(:mod:`headrace.source.postgres.convert`): the column layout is the one
documented in :mod:`headrace.source.changes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Final

import numpy as np
import pyarrow as pa

from headrace.errors import ProtocolError
from headrace.source.changes import (
    COMMIT_TS,
    LSN,
    OLD_KIND,
    OP,
    SEQ,
    TOAST,
    XID,
    Column,
    TableChanges,
    TableSchema,
    old_name,
)
from headrace.source.postgres.protocol import (
    KIND_BINARY,
    KIND_TEXT,
    KIND_UNCHANGED,
    MSG_DELETE,
    MSG_INSERT,
    MSG_UPDATE,
)
from headrace.source.postgres.tuples import (
    Int64Array,
    MessageBlock,
    TupleColumns,
    read_heads,
    read_tuples,
    value_array,
)
from headrace.source.postgres.types import TypeRegistry

_OPS: Final = pa.array(["I", "U", "D", "T"], pa.string())
_OLD_KINDS: Final = pa.array(["K", "O"], pa.string())
_N: Final = ord("N")
_K: Final = ord("K")
_O: Final = ord("O")
_OP_TRUNCATE: Final = 3


@dataclass
class Run:
    """Consecutive row messages of one transaction, as received."""

    header: int  # bytes before the relation OID: 1, or 5 inside a streamed transaction
    subxid: int | None = None  # streamed transactions: the (sub)transaction they belong to
    # Relation OID -> schema for these rows, when known on arrival (None inside
    # a stream: the schemas as of the transaction's commit then).
    relations: Mapping[int, TableSchema] | None = None
    payloads: list[bytes | memoryview] = field(default_factory=list)
    lsns: list[int] = field(default_factory=list)


@dataclass
class CommittedRun:
    """A run of a committed transaction, with what is needed to decode it."""

    run: Run
    transaction: int  # index into the pending transactions
    first_seq: int
    relations: Mapping[int, TableSchema]  # relation OID -> schema, as of the run


@dataclass
class TruncateRow:
    """One table of a committed TRUNCATE."""

    seq: int
    transaction: int
    schema: TableSchema


@dataclass
class TransactionMeta:
    """Commit LSN, time and id of each pending transaction, in commit order."""

    commit_lsns: list[int] = field(default_factory=list)
    commit_ts: list[int] = field(default_factory=list)  # Unix-epoch microseconds
    xids: list[int] = field(default_factory=list)


@dataclass
class _Group:
    """Rows of one table version in a block."""

    schema: TableSchema
    rows: Int64Array


def assemble(
    runs: list[CommittedRun],
    truncates: list[TruncateRow],
    meta: TransactionMeta,
    registry: TypeRegistry,
) -> list[TableChanges]:
    """The pending changes as one :class:`TableChanges` per table version,
    ordered by their first change."""
    tables: dict[int, tuple[TableSchema, list[pa.Table]]] = {}
    nonempty = [r for r in runs if r.run.payloads]
    if nonempty:
        for schema, table in _assemble_rows(nonempty, meta, registry):
            tables.setdefault(id(schema), (schema, []))[1].append(table)
    for schema, rows in _truncates_by_schema(truncates):
        tables.setdefault(id(schema), (schema, []))[1].append(_truncate_table(schema, rows, meta))
    out: list[TableChanges] = []
    for schema, parts in tables.values():
        data = parts[0] if len(parts) == 1 else pa.concat_tables(parts).sort_by(SEQ)
        out.append(TableChanges(schema, data))
    out.sort(key=lambda t: t.data.column(SEQ)[0].as_py())
    return out


def _assemble_rows(
    runs: list[CommittedRun], meta: TransactionMeta, registry: TypeRegistry
) -> list[tuple[TableSchema, pa.Table]]:
    sizes = np.fromiter((len(r.run.payloads) for r in runs), dtype=np.int64, count=len(runs))
    payloads = list(chain.from_iterable(r.run.payloads for r in runs))
    lsns = list(chain.from_iterable(r.run.lsns for r in runs))
    headers = np.repeat(np.fromiter((r.run.header for r in runs), np.int64, len(runs)), sizes)
    block = MessageBlock.build(payloads, lsns, headers)
    run_starts = np.cumsum(sizes) - sizes
    total = int(sizes.sum())
    first_seqs = np.fromiter((r.first_seq for r in runs), np.int64, len(runs))
    seqs = np.arange(total, dtype=np.int64) + np.repeat(first_seqs - run_starts, sizes)
    transactions = np.repeat(np.fromiter((r.transaction for r in runs), np.int64, len(runs)), sizes)
    heads = read_heads(block)

    # Which schema each row belongs to: its run's relation map, its OID.
    map_ids: dict[int, int] = {}
    maps: list[Mapping[int, TableSchema]] = []
    run_map = np.empty(len(runs), dtype=np.int64)
    for index, run in enumerate(runs):
        key = id(run.relations)
        if key not in map_ids:
            map_ids[key] = len(maps)
            maps.append(run.relations)
        run_map[index] = map_ids[key]
    keys = (np.repeat(run_map, sizes) << 32) | heads.relation_oids
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    schemas: list[TableSchema] = []
    schema_index: dict[int, int] = {}
    unique_schema = np.empty(len(unique_keys), dtype=np.int64)
    for index, key in enumerate(unique_keys.tolist()):
        schema = maps[key >> 32].get(key & 0xFFFFFFFF)
        if schema is None:
            row = int(np.argmax(keys == key))
            raise block.fail(
                row,
                int(block.starts[row] + block.header[row]),
                f"change of relation OID {key & 0xFFFFFFFF} before any Relation message for it",
            )
        unique_schema[index] = schema_index.setdefault(id(schema), len(schemas))
        if unique_schema[index] == len(schemas):
            schemas.append(schema)
    row_schema = unique_schema[inverse.reshape(-1)]
    commit_lsns = np.asarray(meta.commit_lsns, dtype=np.uint64)
    commit_ts = np.asarray(meta.commit_ts, dtype=np.int64)
    xids = np.asarray(meta.xids, dtype=np.int64)
    out = []
    for index, schema in enumerate(schemas):
        rows = np.flatnonzero(row_schema == index)
        group = _Group(schema, rows)
        table = _group_table(
            block=block,
            kinds=heads.kinds,
            markers=heads.markers,
            marker_positions=heads.marker_positions,
            group=group,
            registry=registry,
        )
        txn = transactions[rows]
        meta_arrays = [
            pa.array(seqs[rows]),
            _ops(heads.kinds[rows]),
            pa.array(commit_lsns[txn]),
            pa.array(commit_ts[txn]).view(pa.timestamp("us", tz="UTC")),
            pa.array(xids[txn]),
        ]
        out.append((schema, _with_meta(schema, meta_arrays, table)))
    return out


def _ops(kinds: Int64Array) -> pa.Array:
    codes = np.where(kinds == MSG_INSERT, 0, np.where(kinds == MSG_UPDATE, 1, 2))
    return _OPS.take(pa.array(codes))


def _group_table(
    *,
    block: MessageBlock,
    kinds: Int64Array,
    markers: Int64Array,
    marker_positions: Int64Array,
    group: _Group,
    registry: TypeRegistry,
) -> dict[str, pa.Array]:
    rows = group.rows
    schema = group.schema
    count = len(rows)
    column_count = len(schema.columns)
    row_kinds = kinds[rows]
    row_markers = markers[rows]
    row_marker_at = marker_positions[rows]
    message_ends = block.ends[rows]
    has_old = (row_markers == _K) | (row_markers == _O)
    has_new = row_kinds != MSG_DELETE
    new_at = row_marker_at + 1
    old: TupleColumns | None = None
    old_local = np.flatnonzero(has_old)
    if len(old_local):
        old = read_tuples(block, rows[old_local], row_marker_at[old_local] + 1, column_count)
        is_update = row_kinds[old_local] == MSG_UPDATE
        after = old.ends
        deletes_end = ~is_update & (after != message_ends[old_local])
        if deletes_end.any():
            index = int(np.argmax(deletes_end))
            raise block.fail(int(rows[old_local[index]]), int(after[index]), "trailing bytes")
        short = is_update & (after >= message_ends[old_local])
        if short.any():
            index = int(np.argmax(short))
            raise block.fail(
                int(rows[old_local[index]]), int(after[index]), "message ends before new tuple"
            )
        update_after = after[is_update]
        bad_marker = block.data[update_after] != _N
        if bad_marker.any():
            index = int(np.argmax(bad_marker))
            raise block.fail(
                int(rows[old_local[is_update][index]]),
                int(update_after[index]),
                f"expected the new tuple marker 'N', got {chr(block.data[update_after[index]])!r}",
            )
        new_at[old_local[is_update]] = update_after + 1
    new_local = np.flatnonzero(has_new)
    new = read_tuples(block, rows[new_local], new_at[new_local], column_count)
    trailing = new.ends != message_ends[new_local]
    if trailing.any():
        index = int(np.argmax(trailing))
        raise block.fail(
            int(rows[new_local[index]]), int(new.ends[index]), "unexpected trailing bytes"
        )
    row_starts = block.starts[rows]
    arrays: dict[str, pa.Array] = {}
    for column_index, column in enumerate(schema.columns):
        arrays[column.name] = _column(
            block=block,
            row_starts=row_starts,
            local=new_local,
            tuples=new,
            column_index=column_index,
            count=count,
            registry=registry,
            column=column,
        )
    arrays[OLD_KIND] = _old_kinds(row_markers, has_old)
    for column_index, column in enumerate(schema.columns):
        name = old_name(column.name)
        if old is None:
            arrays[name] = pa.nulls(count, column.arrow_type)
        else:
            arrays[name] = _column(
                block=block,
                row_starts=row_starts,
                local=old_local,
                tuples=old,
                column_index=column_index,
                count=count,
                registry=registry,
                column=column,
            )
    arrays[TOAST] = _toast(schema, new, new_local, count)
    return arrays


def _column(
    *,
    block: MessageBlock,
    row_starts: Int64Array,
    local: Int64Array,
    tuples: TupleColumns,
    column_index: int,
    count: int,
    registry: TypeRegistry,
    column: Column,
) -> pa.Array:
    kinds = tuples.kinds[:, column_index]
    text = kinds == KIND_TEXT
    binary = kinds == KIND_BINARY
    if len(local) == count:  # every row has this tuple (e.g. only inserts)
        starts = tuples.starts[:, column_index]
        lengths = tuples.lengths[:, column_index]
        valid = text | binary
    else:
        starts = row_starts.copy()
        lengths = np.zeros(count, dtype=np.int64)
        valid = np.zeros(count, dtype=bool)
        starts[local] = tuples.starts[:, column_index]
        lengths[local] = tuples.lengths[:, column_index]
        valid[local] = text | binary
    is_binary = bool(binary.any())
    if is_binary and text.any():
        raise ProtocolError(
            f"column {column.name} mixes text and binary values in one batch",
            lsn=int(block.lsns[0]),
        )
    raw = value_array(block, starts, lengths, valid)
    return registry.convert(raw, column, binary=is_binary)


def _old_kinds(markers: Int64Array, has_old: np.ndarray) -> pa.Array:
    if not has_old.any():
        return pa.nulls(len(markers), pa.string())
    codes = pa.array(np.where(markers == _K, 0, 1), mask=~has_old)
    return _OLD_KINDS.take(codes)


def _toast(schema: TableSchema, new: TupleColumns, new_local: Int64Array, count: int) -> pa.Array:
    unchanged = new.kinds == KIND_UNCHANGED
    if not unchanged.any():
        return pa.nulls(count, pa.list_(pa.string()))
    names = [c.name for c in schema.columns]
    cells: list[list[str] | None] = [None] * count
    for local_index in np.flatnonzero(unchanged.any(axis=1)).tolist():
        flags = unchanged[local_index]
        cells[int(new_local[local_index])] = [n for n, f in zip(names, flags, strict=True) if f]
    return pa.array(cells, pa.list_(pa.string()))


def _with_meta(
    schema: TableSchema, meta_arrays: list[pa.Array], arrays: dict[str, pa.Array]
) -> pa.Table:
    change_schema = schema.change_schema()
    columns = list(meta_arrays)
    columns.extend(arrays[f.name] for f in change_schema if f.name not in _META_NAMES)
    return pa.Table.from_arrays(columns, schema=change_schema)


_META_NAMES: Final = frozenset({SEQ, OP, LSN, COMMIT_TS, XID})


def _truncates_by_schema(
    truncates: list[TruncateRow],
) -> list[tuple[TableSchema, list[TruncateRow]]]:
    grouped: dict[int, tuple[TableSchema, list[TruncateRow]]] = {}
    for row in truncates:
        grouped.setdefault(id(row.schema), (row.schema, []))[1].append(row)
    return list(grouped.values())


def _truncate_table(
    schema: TableSchema, rows: list[TruncateRow], meta: TransactionMeta
) -> pa.Table:
    count = len(rows)
    txn = [r.transaction for r in rows]
    meta_arrays = [
        pa.array([r.seq for r in rows], pa.int64()),
        _OPS.take(pa.array([_OP_TRUNCATE] * count)),
        pa.array([meta.commit_lsns[t] for t in txn], pa.uint64()),
        pa.array([meta.commit_ts[t] for t in txn], pa.int64()).view(pa.timestamp("us", tz="UTC")),
        pa.array([meta.xids[t] for t in txn], pa.int64()),
    ]
    arrays: dict[str, pa.Array] = {OLD_KIND: pa.nulls(count, pa.string())}
    for column in schema.columns:
        arrays[column.name] = pa.nulls(count, column.arrow_type)
        arrays[old_name(column.name)] = pa.nulls(count, column.arrow_type)
    arrays[TOAST] = pa.nulls(count, pa.list_(pa.string()))
    return _with_meta(schema, meta_arrays, arrays)

"""Build the Arrow tables of a :class:`ChangeBatch` from buffered row messages.

The :class:`~headrace.source.postgres.batcher.Batcher` keeps committed row
messages as raw bytes in *runs* (consecutive messages of one transaction under
one set of relation schemas). Here all pending runs are parsed at once
(:mod:`headrace.source.postgres.tuples`), grouped per table and schema
version, and every column is converted in one call per batch
(:mod:`headrace.source.postgres.convert`): the column layout is the one
documented in :mod:`headrace.source.changes`.

The runs themselves are in :mod:`.runs`, the batch's column conversion in
:mod:`.assemble_columns` and the per table version kits in :mod:`.assemble_kits`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Final

import numpy as np
import pyarrow as pa

from headrace.source.changes import (
    COMMIT_TS,
    LSN,
    OLD_KIND,
    OP,
    SEQ,
    TOAST,
    XID,
    TableChanges,
    TableSchema,
    old_name,
)
from headrace.source.postgres.assemble_columns import ParsedGroup, convert_columns
from headrace.source.postgres.assemble_kits import schema_kit
from headrace.source.postgres.protocol import (
    KIND_UNCHANGED,
    MSG_DELETE,
    MSG_UPDATE,
)
from headrace.source.postgres.runs import CommittedRun, TransactionMeta, TruncateRow
from headrace.source.postgres.tuples import (
    Int64Array,
    MessageBlock,
    MessageHeads,
    TupleColumns,
    read_heads,
    read_tuples,
)
from headrace.source.postgres.types import TypeRegistry

_OPS: Final = pa.array(["I", "U", "D", "T"], pa.string())
_OLD_KINDS: Final = pa.array(["K", "O"], pa.string())
_TOAST_TYPE: Final = pa.list_(pa.string())
_N: Final = ord("N")
_K: Final = ord("K")
_O: Final = ord("O")
_OP_TRUNCATE: Final = 3


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
    nonempty = [r for r in runs if r.run.count]
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
    read = [r.run.rows() for r in runs]
    sizes = np.fromiter((len(p) for p, _ in read), dtype=np.int64, count=len(runs))
    payloads = list(chain.from_iterable(p for p, _ in read))
    lsns = list(chain.from_iterable(lsn for _, lsn in read))
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
    groups = [
        _parse_group(block, heads, _Group(schema, np.flatnonzero(row_schema == index)))
        for index, schema in enumerate(schemas)
    ]
    columns = convert_columns(block, groups, registry)
    out = []
    for group, (new_columns, old_columns) in zip(groups, columns, strict=True):
        rows = group.rows
        txn = transactions[rows]
        meta_arrays = [
            pa.array(seqs[rows]),
            _ops(heads.kinds[rows]),
            pa.array(commit_lsns[txn]),
            pa.array(commit_ts[txn]).view(_COMMIT_TS_TYPE),
            pa.array(xids[txn]),
        ]
        data = [
            *meta_arrays,
            *new_columns,
            _old_kinds(group.markers, group.has_old),
            *old_columns,
            _toast(group.schema, group.new, group.new_local, group.count),
        ]
        change_schema = schema_kit(group.schema, registry).change_schema
        out.append((group.schema, pa.Table.from_arrays(data, schema=change_schema)))
    return out


_COMMIT_TS_TYPE: Final = pa.timestamp("us", tz="UTC")


def _ops(kinds: Int64Array) -> pa.Array:
    """The op column: a row message's type byte (I, U or D) is its op letter."""
    count = len(kinds)
    offsets = np.arange(count + 1, dtype=np.int32)
    letters = kinds.astype(np.uint8)
    return pa.Array.from_buffers(
        pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(letters)]
    )


_STRING_NULLS: Final = pa.nulls(1024, pa.string())
_TOAST_NULLS: Final = pa.nulls(1024, _TOAST_TYPE)


def _nulls(count: int, kept: pa.Array) -> pa.Array:
    """``count`` NULLs of ``kept``'s type: a slice of it when it is long enough."""
    return kept.slice(0, count) if count <= len(kept) else pa.nulls(count, kept.type)


def _parse_group(block: MessageBlock, heads: MessageHeads, group: _Group) -> ParsedGroup:
    """Parse the old and new tuples of a table version's rows."""
    rows = group.rows
    schema = group.schema
    column_count = len(schema.columns)
    row_kinds = heads.kinds[rows]
    row_markers = heads.markers[rows]
    row_marker_at = heads.marker_positions[rows]
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
    return ParsedGroup(
        schema=schema,
        rows=rows,
        markers=row_markers,
        has_old=has_old,
        new=new,
        new_local=new_local,
        old=old,
        old_local=old_local,
    )


def _old_kinds(markers: Int64Array, has_old: np.ndarray) -> pa.Array:
    if not has_old.any():
        return _nulls(len(markers), _STRING_NULLS)
    codes = pa.array(np.where(markers == _K, 0, 1), mask=~has_old)
    return _OLD_KINDS.take(codes)


def _toast(schema: TableSchema, new: TupleColumns, new_local: Int64Array, count: int) -> pa.Array:
    unchanged = new.kinds == KIND_UNCHANGED
    if not unchanged.any():
        return _nulls(count, _TOAST_NULLS)
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
        pa.array([meta.commit_ts[t] for t in txn], pa.int64()).view(_COMMIT_TS_TYPE),
        pa.array([meta.xids[t] for t in txn], pa.int64()),
    ]
    arrays: dict[str, pa.Array] = {OLD_KIND: pa.nulls(count, pa.string())}
    for column in schema.columns:
        arrays[column.name] = pa.nulls(count, column.arrow_type)
        arrays[old_name(column.name)] = pa.nulls(count, column.arrow_type)
    arrays[TOAST] = pa.nulls(count, pa.list_(pa.string()))
    return _with_meta(schema, meta_arrays, arrays)

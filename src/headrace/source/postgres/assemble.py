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

import threading
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
    TableChanges,
    TableSchema,
    old_name,
)
from headrace.source.postgres.convert import convert_column
from headrace.source.postgres.pgtypes import PgType
from headrace.source.postgres.protocol import (
    KIND_BINARY,
    KIND_TEXT,
    KIND_UNCHANGED,
    MSG_DELETE,
    MSG_UPDATE,
)
from headrace.source.postgres.spill import SpilledRows, SpillFile
from headrace.source.postgres.tuples import (
    BoolArray,
    ColumnBlock,
    Int64Array,
    MessageBlock,
    MessageHeads,
    TupleColumns,
    cut_columns,
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
class Run:
    """Consecutive row messages of one transaction, as received."""

    header: int  # bytes before the relation OID: 1, or 5 inside a streamed transaction
    subxid: int | None = None  # streamed transactions: the (sub)transaction they belong to
    # Relation OID -> schema for these rows, when known on arrival (None inside
    # a stream: the schemas as of the transaction's commit then).
    relations: Mapping[int, TableSchema] | None = None
    payloads: list[bytes | memoryview] = field(default_factory=list)
    lsns: list[int] = field(default_factory=list)
    spilled: list[SpilledRows] = field(default_factory=list)
    """Earlier rows of the run, moved to disk (:mod:`.spill`): they come before
    ``payloads``, which holds the rows received since."""
    spilled_rows: int = 0
    """Rows in :attr:`spilled` (counted once: :attr:`count` is read per transaction)."""

    @property
    def count(self) -> int:
        """Rows of the run, in memory and on disk."""
        return len(self.payloads) + self.spilled_rows

    def spill(self, file: SpillFile) -> int:
        """Move the rows held in memory to ``file``; returns how many moved."""
        moved = len(self.payloads)
        if moved:
            self.spilled.append(file.write(self.payloads, self.lsns))
            self.spilled_rows += moved
            self.payloads, self.lsns = [], []
        return moved

    def rows(self) -> tuple[list[bytes | memoryview], list[int]]:
        """Every row message and its LSN, in order (reading what is on disk)."""
        if not self.spilled:
            return self.payloads, self.lsns
        payloads: list[bytes | memoryview] = []
        lsns: list[int] = []
        for block in self.spilled:
            read, read_lsns = block.read()
            payloads += read
            lsns += read_lsns
        return payloads + self.payloads, lsns + self.lsns

    def part(self, start: int, end: int) -> Run:
        """Rows ``start:end`` of the run as a run of their own (nothing read from disk)."""
        spilled: list[SpilledRows] = []
        at = 0
        for block in self.spilled:
            low, high = max(start - at, 0), min(end - at, len(block))
            if low < high:
                spilled.append(block.part(low, high))
            at += len(block)
        low, high = max(start - at, 0), max(end - at, 0)
        return Run(
            header=self.header,
            subxid=self.subxid,
            relations=self.relations,
            payloads=self.payloads[low:high],
            lsns=self.lsns[low:high],
            spilled=spilled,
            spilled_rows=sum(len(block) for block in spilled),
        )


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
    columns = _convert_columns(block, groups, registry)
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
        change_schema = _kit(group.schema, registry).change_schema
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


@dataclass
class _ParsedGroup:
    """The tuples of one table version's rows, parsed (values not yet cut out)."""

    schema: TableSchema
    rows: Int64Array
    markers: Int64Array  # per row: N, K or O
    has_old: BoolArray
    new: TupleColumns  # of the rows with a new tuple (new_local)
    new_local: Int64Array
    old: TupleColumns | None  # of the rows with an old tuple (old_local), if any
    old_local: Int64Array

    @property
    def count(self) -> int:
        return len(self.rows)


def _parse_group(block: MessageBlock, heads: MessageHeads, group: _Group) -> _ParsedGroup:
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
    return _ParsedGroup(
        schema=schema,
        rows=rows,
        markers=row_markers,
        has_old=has_old,
        new=new,
        new_local=new_local,
        old=old,
        old_local=old_local,
    )


def _convert_columns(
    block: MessageBlock, groups: list[_ParsedGroup], registry: TypeRegistry
) -> list[tuple[list[pa.Array], list[pa.Array]]]:
    """Every column of every group, new values and old: per group ``(new, old)``
    arrays in the schema's column order.

    The values of all columns are cut out of the block together, and each
    conversion (PostgreSQL type, Arrow type, text or binary) runs once for all
    columns that need it, whatever their table: per batch a handful of Arrow
    calls instead of a few per column, which decided the cost of small
    batches. A column without any value (no old tuples, only NULLs) is NULLs.
    """
    sides: list[list[pa.Array | None]] = []  # per group: new columns, then old columns
    blocks: list[ColumnBlock] = []
    targets: list[list[pa.Array | None]] = []  # per block: where its columns go
    members: dict[tuple[int, bool], list[tuple[int, int]]] = {}
    kits = [_kit(group.schema, registry) for group in groups]
    for group, kit in zip(groups, kits, strict=True):
        for tuples, local in ((group.new, group.new_local), (group.old, group.old_local)):
            arrays: list[pa.Array | None] = [None] * len(group.schema.columns)
            sides.append(arrays)
            if tuples is None:
                continue
            found = _column_block(block, group, tuples, local)
            if found is None:
                continue
            values, binary_columns = found
            for column_index in np.flatnonzero(values.valid.any(axis=1)).tolist():
                key = (kit.conversions[column_index], binary_columns[column_index])
                members.setdefault(key, []).append((len(blocks), column_index))
            blocks.append(values)
            targets.append(arrays)
    if blocks:
        groups_of_columns = list(members.values())
        raw_groups = cut_columns(block, blocks, groups_of_columns)
        for (conversion, binary), group_columns, raw in zip(
            members, groups_of_columns, raw_groups, strict=True
        ):
            arrow_type, pg_type = _conversions[conversion]
            large = raw.type == pa.large_binary()  # 2 GiB or more: convert column by column
            converted = None if large else convert_column(raw, arrow_type, pg_type, binary=binary)
            offset = 0
            for block_index, column_index in group_columns:
                count = blocks[block_index].starts.shape[1]
                if converted is None:
                    values = raw.slice(offset, count).cast(pa.binary())
                    column = convert_column(values, arrow_type, pg_type, binary=binary)
                else:
                    column = converted.slice(offset, count)
                targets[block_index][column_index] = column
                offset += count
    out: list[tuple[list[pa.Array], list[pa.Array]]] = []
    for index, (group, kit) in enumerate(zip(groups, kits, strict=True)):
        new, old = (
            [
                kit.nulls(column_index, group.count) if array is None else array
                for column_index, array in enumerate(arrays)
            ]
            for arrays in sides[2 * index : 2 * index + 2]
        )
        out.append((new, old))
    return out


def _column_block(
    block: MessageBlock, group: _ParsedGroup, tuples: TupleColumns, local: Int64Array
) -> tuple[ColumnBlock, list[bool]] | None:
    """Where one tuple side's values lie for all the group's rows (None when it
    has no value at all), and per column whether its values are binary."""
    kinds = tuples.kinds.T  # columns x rows, contiguous per column
    text = kinds == KIND_TEXT
    binary = kinds == KIND_BINARY
    has_binary = binary.any(axis=1)
    valid = text
    if has_binary.any():
        mixed = has_binary & text.any(axis=1)
        if mixed.any():
            name = group.schema.columns[int(np.argmax(mixed))].name
            raise ProtocolError(
                f"column {name} mixes text and binary values in one batch",
                lsn=int(block.lsns[0]),
            )
        valid = text | binary
    if not valid.any():
        return None
    starts, lengths = tuples.starts.T, tuples.lengths.T
    count = group.count
    if len(local) != count:  # only some rows have this tuple: the others hold no value
        shape = (len(group.schema.columns), count)
        starts, lengths, valid = _spread(local, shape, starts, lengths, valid)
    return ColumnBlock(starts, lengths, valid), has_binary.tolist()


def _spread(
    local: Int64Array,
    shape: tuple[int, int],
    starts: Int64Array,
    lengths: Int64Array,
    valid: BoolArray,
) -> tuple[Int64Array, Int64Array, BoolArray]:
    """Columns x some rows spread to columns x all rows (``local``: which)."""
    all_starts = np.zeros(shape, dtype=np.int64)
    all_lengths = np.zeros(shape, dtype=np.int64)
    all_valid = np.zeros(shape, dtype=bool)
    all_starts[:, local] = starts
    all_lengths[:, local] = lengths
    all_valid[:, local] = valid
    return all_starts, all_lengths, all_valid


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


@dataclass
class _SchemaKit:
    """What assembling a table version's changes needs, made once per version."""

    schema: TableSchema
    change_schema: pa.Schema
    conversions: list[int]  # per column: its conversion's number in _conversions
    kept_nulls: list[pa.Array]  # per column: NULLs to slice from

    def nulls(self, column_index: int, count: int) -> pa.Array:
        """``count`` NULLs of the column's type (most columns of a batch have no
        old values: a slice costs less than making them each time)."""
        kept = self.kept_nulls[column_index]
        if count > len(kept):
            if count > _NULLS_KEPT_MAX:  # a large batch: making them costs little per row
                return pa.nulls(count, kept.type)
            kept = pa.nulls(min(max(count, 2 * len(kept)), _NULLS_KEPT_MAX), kept.type)
            self.kept_nulls[column_index] = kept
        return kept.slice(0, count)


# A conversion is a (Arrow type, PostgreSQL type) pair; columns of any table
# with the same one are converted together. Numbered so that grouping a
# batch's columns hashes small integers, not types.
_conversions: list[tuple[pa.DataType, PgType]] = []
_conversion_numbers: dict[tuple[pa.DataType, PgType], int] = {}
_kits: dict[int, _SchemaKit] = {}
_kits_lock = threading.Lock()


def _kit(schema: TableSchema, registry: TypeRegistry) -> _SchemaKit:
    """The kit of a table version (by identity: the batcher keeps one
    TableSchema object per version and its registry resolves a type once)."""
    kit = _kits.get(id(schema))
    if kit is not None and kit.schema is schema:
        return kit
    conversions = []
    with _kits_lock:  # sources in several threads must not number one pair twice
        if len(_kits) > _KITS_KEPT:
            _kits.clear()
        for column in schema.columns:
            conversion = (column.arrow_type, registry.lookup(column.type_oid))
            number = _conversion_numbers.get(conversion)
            if number is None:
                number = _conversion_numbers[conversion] = len(_conversions)
                _conversions.append(conversion)
            conversions.append(number)
    kit = _SchemaKit(
        schema=schema,
        change_schema=schema.change_schema(),
        conversions=conversions,
        kept_nulls=[pa.nulls(_NULLS_KEPT, c.arrow_type) for c in schema.columns],
    )
    _kits[id(schema)] = kit
    return kit


_KITS_KEPT: Final = 1024
_NULLS_KEPT: Final = 256
# Kept NULLs stay small: a kit lives as long as its table version, for every column.
_NULLS_KEPT_MAX: Final = 8192
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

"""Every column of a batch's table versions converted together (:func:`convert_columns`).

The values of all columns and tuple sides (new and old) of all the batch's
table versions are cut out of the message block at once and each conversion
runs once for all columns that need it. Apart from :mod:`.assemble`, which
parses the tuples and builds the tables around these columns, because it is
the batch's one columnar conversion step, with its own bookkeeping (which
block and column each converted slice goes to).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from headrace.errors import ProtocolError
from headrace.source.changes import TableSchema
from headrace.source.postgres.assemble_kits import conversion_pairs, schema_kit
from headrace.source.postgres.convert import convert_column
from headrace.source.postgres.protocol import KIND_BINARY, KIND_TEXT
from headrace.source.postgres.tuples import (
    BoolArray,
    ColumnBlock,
    Int64Array,
    MessageBlock,
    TupleColumns,
    cut_columns,
)
from headrace.source.postgres.types import TypeRegistry


@dataclass
class ParsedGroup:
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


def convert_columns(
    block: MessageBlock, groups: list[ParsedGroup], registry: TypeRegistry
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
    kits = [schema_kit(group.schema, registry) for group in groups]
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
            arrow_type, pg_type = conversion_pairs[conversion]
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
    block: MessageBlock, group: ParsedGroup, tuples: TupleColumns, local: Int64Array
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

"""Per table version, what assembling its changes needs, made once (:class:`SchemaKit`).

A kit holds a table version's change schema, the number of each column's
conversion (an Arrow type and PostgreSQL type pair, numbered here for every
source so that columns of any table with the same pair convert together) and
NULLs to slice from. Kept apart from :mod:`.assemble` because it is a cache with
a lifetime of its own (per ``TableSchema`` object, shared by threads), not a
step of the assembly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

import pyarrow as pa

from headrace.source.changes import TableSchema
from headrace.source.postgres.pgtypes import PgType
from headrace.source.postgres.types import TypeRegistry


@dataclass
class SchemaKit:
    """What assembling a table version's changes needs, made once per version."""

    schema: TableSchema
    change_schema: pa.Schema
    conversions: list[int]  # per column: its conversion's number in conversion_pairs
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
conversion_pairs: list[tuple[pa.DataType, PgType]] = []
_conversion_numbers: dict[tuple[pa.DataType, PgType], int] = {}
_kits: dict[int, SchemaKit] = {}
_kits_lock = threading.Lock()


def schema_kit(schema: TableSchema, registry: TypeRegistry) -> SchemaKit:
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
                number = _conversion_numbers[conversion] = len(conversion_pairs)
                conversion_pairs.append(conversion)
            conversions.append(number)
    kit = SchemaKit(
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

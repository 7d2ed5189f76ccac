"""A batch cut where a table's schema changes, so every part is applied under one schema.

A Relation message can arrive in the middle of a batch (even of a
transaction: ``ALTER TABLE`` then ``INSERT``). The batch's changes are
ordered by ``_hr_seq``; each table's first change under a new column layout
starts a new segment, and the schema change is applied between segments.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from headrace.engine.tables import TableModel, signature
from headrace.source.changes import LSN, SEQ, TableChanges, TableRef, TableSchema


@dataclass
class Segment:
    """Schema changes to apply first (schema, LSN), then changes (schema, rows) in order."""

    schema_changes: list[tuple[TableSchema, int]]
    items: list[tuple[TableSchema, pa.Table]]


def first_seq(data: pa.Table) -> int:
    value = pc.min(data[SEQ]).as_py() if data.num_rows else None
    return int(value) if value is not None else 0


def first_lsn(data: pa.Table) -> int:
    value = pc.min(data[LSN]).as_py() if data.num_rows else None
    return int(value) if value is not None else 0


def split_segments(
    changes: list[TableChanges], tables: Mapping[TableRef, TableModel]
) -> list[Segment]:
    """Cut ``changes`` (of known tables) at each table's change of column layout."""
    ordered = sorted(
        (tc for tc in changes if tc.table in tables), key=lambda tc: first_seq(tc.data)
    )
    current = {ref: signature(model.source_columns) for ref, model in tables.items()}
    boundaries: list[tuple[int, TableSchema, int]] = []
    for table_changes in ordered:
        layout = signature(table_changes.schema.columns)
        if current.get(table_changes.table) != layout:
            boundaries.append(
                (first_seq(table_changes.data), table_changes.schema, first_lsn(table_changes.data))
            )
            current[table_changes.table] = layout
    items = [(tc.schema, tc.data) for tc in ordered]
    if not boundaries:
        return [Segment([], items)]
    edges: list[int | None] = [None, *(seq for seq, _, _ in boundaries), None]
    segments = []
    for low, high in itertools.pairwise(edges):
        sliced = []
        for schema, data in items:
            part = _between(data, low, high)
            if part.num_rows:
                sliced.append((schema, part))
        here = [(schema, lsn) for seq, schema, lsn in boundaries if seq == low]
        segments.append(Segment(here, sliced))
    return segments


def _between(data: pa.Table, low: int | None, high: int | None) -> pa.Table:
    mask = None
    if low is not None:
        mask = pc.greater_equal(data[SEQ], low)
    if high is not None:
        upper = pc.less(data[SEQ], high)
        mask = upper if mask is None else pc.and_(mask, upper)
    return data.filter(mask) if mask is not None else data

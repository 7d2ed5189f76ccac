"""Several waiting batches applied as one: fewer, larger store transactions when behind.

Merging keeps the change model's meaning: ``_hr_seq`` stays a global order
(each batch's numbers are shifted past the previous one's), a table keeps
one :class:`TableChanges` per schema, and the merged position is the last
batch's. Batches are merged only while every table keeps a single schema
across them, so the engine's split at schema changes sees the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from headrace.source.changes import SEQ, ChangeBatch, TableChanges, TableRef, TableSchema


def can_join(group: Sequence[ChangeBatch], batch: ChangeBatch) -> bool:
    """Whether ``batch`` can be merged into ``group`` (no table changes schema across them)."""
    if batch.in_pieces or any(member.in_pieces for member in group):
        return False  # a huge transaction is applied on its own, a piece at a time
    seen: dict[TableRef, TableSchema] = {}
    for member in (*group, batch):
        tables = [tc.table for tc in member.tables]
        if len(tables) != len(set(tables)):
            return False  # a schema change inside one batch: apply it on its own
        for table_changes in member.tables:
            known = seen.setdefault(table_changes.table, table_changes.schema)
            if known != table_changes.schema:
                return False
    return True


def merge_batches(batches: Sequence[ChangeBatch]) -> ChangeBatch:
    """One batch with the changes of ``batches`` (which :func:`can_join` accepted), in order."""
    if len(batches) == 1:
        return batches[0]
    parts: dict[TableRef, list[pa.Table]] = {}
    schemas: dict[TableRef, TableSchema] = {}
    offset = 0
    for batch in batches:
        top = -1
        for table_changes in batch.tables:
            data = table_changes.data
            if data.num_rows:
                shifted = pc.add(data.column(SEQ), pa.scalar(offset, pa.int64()))
                data = data.set_column(data.schema.get_field_index(SEQ), SEQ, shifted)
                top = max(top, int(pc.max(shifted).as_py()))
            schemas.setdefault(table_changes.table, table_changes.schema)
            parts.setdefault(table_changes.table, []).append(data)
        offset = max(offset, top + 1)
    tables = tuple(
        TableChanges(schemas[ref], pa.concat_tables(chunks) if len(chunks) > 1 else chunks[0])
        for ref, chunks in parts.items()
    )
    commit_ts = [b.last_commit_ts for b in batches if b.last_commit_ts is not None]
    first_lsn = [b.first_commit_lsn for b in batches if b.first_commit_lsn is not None]
    return ChangeBatch(
        tables=tables,
        position=max(b.position for b in batches),
        transactions=sum(b.transactions for b in batches),
        first_commit_lsn=first_lsn[0] if first_lsn else None,
        last_commit_ts=commit_ts[-1] if commit_ts else None,
        messages=tuple(m for b in batches for m in b.messages),
    )


def materialized(batch: ChangeBatch) -> ChangeBatch:
    """``batch`` with every piece decoded into :attr:`~ChangeBatch.tables` (the pieces keep
    their ``_hr_seq``; a table keeps one :class:`TableChanges` per schema, in order)."""
    if not batch.in_pieces:
        return batch
    parts: dict[int, tuple[TableSchema, list[pa.Table]]] = {}
    for tables in batch.pieces(again=True):  # the writer decodes them too
        for table_changes in tables:
            key = id(table_changes.schema)
            parts.setdefault(key, (table_changes.schema, []))[1].append(table_changes.data)
    ordered = sorted(
        (TableChanges(schema, pa.concat_tables(chunks)) for schema, chunks in parts.values()),
        key=lambda tc: tc.data.column(SEQ)[0].as_py(),
    )
    return replace(batch, tables=tuple(ordered), rest=None, rest_changes=0, rest_commits=())

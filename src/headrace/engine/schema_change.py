"""Schema changes of a source table while running: what changed and how the store follows.

=========================  ===============================================
change in PostgreSQL       what the store does
=========================  ===============================================
column added               ``ALTER TABLE … ADD COLUMN`` in mirror and
                           history (NULL for older rows)
column dropped             kept, NULL from then on; rollups that need it
                           are paused (the others continue)
column widened             ``ALTER COLUMN … TYPE`` in place (larger
                           integer, float4 → float8, numeric with more
                           precision and the same scale, varchar(n) → text);
                           rollups that read it are rebuilt
anything else (a type      the table's changes go to
narrowed or changed, a     ``headrace.dead_letters`` (with LSN and reason)
new primary key)           from that change on; its rollups are paused
=========================  ===============================================

Every change is recorded as a new version in ``headrace.schema_versions``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import duckdb

from headrace.engine.registry import Registry
from headrace.engine.tables import DEAD, KnownColumn, TableModel, signature
from headrace.engine.types import duckdb_type, is_widening
from headrace.errors import format_lsn
from headrace.pipeline.model import quote_ident
from headrace.source.changes import Column, TableChanges, TableRef, TableSchema

log = logging.getLogger(__name__)


@dataclass
class SchemaChange:
    """The difference between what the store holds for a table and a new source schema."""

    added: list[Column] = field(default_factory=list)
    revived: list[Column] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    widened: list[tuple[str, str, str]] = field(default_factory=list)
    relabelled: list[tuple[str, str, str]] = field(default_factory=list)
    incompatible: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (
            self.added
            or self.revived
            or self.dropped
            or self.widened
            or self.relabelled
            or self.incompatible
        )

    def describe(self) -> str:
        parts = []
        parts += [f"added {c.name} {c.type_name}" for c in self.added]
        parts += [f"re-added {c.name} {c.type_name}" for c in self.revived]
        parts += [f"dropped {name}" for name in self.dropped]
        parts += [f"widened {n} {old} -> {new}" for n, old, new in self.widened]
        parts += [f"retyped {n} {old} -> {new} (same storage)" for n, old, new in self.relabelled]
        parts += self.incompatible
        return "; ".join(parts)


def same_schema(model: TableModel, schema: TableSchema) -> bool:
    """Fast check: the source sends exactly the columns last seen."""
    return signature(model.source_columns) == signature(schema.columns)


def diff_schema(model: TableModel, schema: TableSchema) -> SchemaChange:
    """Classify how ``schema`` differs from the table's known columns."""
    change = SchemaChange()
    incoming = {c.name: c for c in schema.columns}
    new_key = tuple(model.config.primary_key) if model.config.primary_key else schema.key_columns
    # REPLICA IDENTITY FULL flags every column as part of the key: a superset
    # of the key in use keeps it. A key column no longer flagged is a new key.
    if not set(model.key) <= set(new_key) and not model.config.primary_key:
        change.incompatible.append(
            f"the key changed from ({', '.join(model.key)}) to ({', '.join(new_key)})"
        )
    for column in schema.columns:
        known = model.column(column.name)
        new_type = duckdb_type(column.arrow_type)
        if known is None:
            change.added.append(column)
            continue
        if known.duck_type != new_type:
            if is_widening(known.duck_type, new_type):
                change.widened.append((column.name, known.duck_type, new_type))
            else:
                change.incompatible.append(
                    f"column {column.name} changed type from {known.type_name} "
                    f"({known.duck_type}) to {column.type_name} ({new_type}), which is not a "
                    f"widening"
                )
                continue
        elif (known.type_oid, known.type_modifier) != (column.type_oid, column.type_modifier):
            change.relabelled.append((column.name, known.type_name, column.type_name))
        if known.dropped:
            change.revived.append(column)
    for known in model.live_columns:
        if known.name not in incoming:
            if known.name in model.key:
                change.incompatible.append(f"key column {known.name} was dropped")
            else:
                change.dropped.append(known.name)
    return change


def apply_schema_change(
    con: duckdb.DuckDBPyConnection,
    model: TableModel,
    schema: TableSchema,
    change: SchemaChange,
    lsn: int | None,
) -> None:
    """Alter mirror and history to follow a compatible change, and record the new version."""
    tables = []
    if model.config.mirror:
        tables.append(model.mirror)
    if model.config.history:
        tables.append(model.history)
    for column in change.added:
        duck_type = duckdb_type(column.arrow_type)
        for table in tables:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {quote_ident(column.name)} {duck_type}")
        model.columns.append(
            KnownColumn(
                column.name,
                duck_type,
                column.type_name,
                column.type_oid,
                column.type_modifier,
                is_key=column.name in model.key,
            )
        )
    for name, _old, new in change.widened:
        for table in tables:
            con.execute(f"ALTER TABLE {table} ALTER COLUMN {quote_ident(name)} TYPE {new}")
        widened = model.column(name)
        if widened is not None:
            widened.duck_type = new
    incoming = {c.name: c for c in schema.columns}
    for known in model.columns:
        if known.name in incoming:
            source = incoming[known.name]
            known.dropped = False
            known.type_name = source.type_name
            known.type_oid, known.type_modifier = source.type_oid, source.type_modifier
        elif known.name in change.dropped:
            known.dropped = True
    model.source_columns = schema.columns
    model.version += 1
    model.record_version(con, lsn, change.describe())


def follow_schema_change(
    con: duckdb.DuckDBPyConnection, registry: Registry, schema: TableSchema, lsn: int
) -> None:
    """Bring the store in line with a table's new schema (see the module docstring)."""
    model = registry.tables[schema.table]
    change = diff_schema(model, schema) if model.state != DEAD else SchemaChange()
    if change.is_empty:
        model.source_columns = schema.columns
        return
    if change.incompatible:
        reason = f"schema change at LSN {format_lsn(lsn)}: {'; '.join(change.incompatible)}"
        log.error(
            "table %s stopped: %s; its changes go to headrace.dead_letters", model.name, reason
        )
        model.state, model.reason = DEAD, reason
        model.source_columns = schema.columns
        model.version += 1
        model.record_version(con, lsn, change.describe())
        for name in registry.rollups_on(model.ref):
            registry.pause(con, name, f"table {model.name} stopped: {reason}")
        return
    log.info("table %s schema change at LSN %s: %s", model.name, format_lsn(lsn), change.describe())
    apply_schema_change(con, model, schema, change, lsn)
    if change.dropped:
        dropped = ", ".join(change.dropped)
        for name in registry.rollups_reading(model.ref, set(change.dropped)):
            registry.pause(
                con,
                name,
                f"column(s) {dropped} of {model.name} dropped at LSN {format_lsn(lsn)}; "
                "change the rollup and rebuild it",
            )
    widened = {name for name, _, _ in change.widened}
    for column in widened:
        known = model.column(column)
        if known is None:
            continue
        for fact, hidden in registry.lookup_columns_on(model.ref, column):
            con.execute(
                f"ALTER TABLE {fact.mirror} ALTER COLUMN {quote_ident(hidden)} "
                f"TYPE {known.duck_type}"
            )
            fact.lookup_types[hidden] = known.duck_type
    for name in registry.rollups_reading(model.ref, widened):
        registry.build(con, name)


def indexes_in_the_way(
    registry: Registry, tables: Sequence[TableChanges], *, in_pieces: bool
) -> list[TableModel]:
    """The mirrors whose key index must go before a batch of ``tables`` is applied:
    DuckDB refuses ``ALTER COLUMN … TYPE`` on an indexed table, also in the transaction
    that dropped the index, so the index is dropped in a transaction of its own first
    (:mod:`headrace.engine.key_index`). That is: the tables whose columns change type in
    the batch, the mirrors holding a looked-up copy of such a column, and (``in_pieces``:
    later pieces are not seen yet) every indexed table of the batch."""
    if not any(model.key_index for model in registry.tables.values()):
        return []  # the usual case: nothing to drop, no schema to compare
    found: dict[TableRef, TableModel] = {}
    for changes in tables:
        model = registry.tables.get(changes.table)
        if model is None or model.state == DEAD:
            continue
        if in_pieces and model.key_index:
            found[model.ref] = model
        if signature(changes.schema.columns) == signature(model.source_columns):
            continue  # the layout the table has: no type changes
        for name, _old, _new in diff_schema(model, changes.schema).widened:
            if model.key_index:
                found[model.ref] = model
            for fact, _hidden in registry.lookup_columns_on(model.ref, name):
                if fact.key_index:
                    found[fact.ref] = fact
    return list(found.values())

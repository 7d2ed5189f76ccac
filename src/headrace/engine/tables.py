"""What the engine knows about each captured table: columns, key, hidden columns, state.

A table's columns are the union of every column the source ever sent for
it: a column dropped in PostgreSQL stays in the mirror and history (NULL
from then on) and is marked ``dropped``. The engine numbers the table's
schema versions itself (1, 2, ...) and records each in
``headrace.schema_versions``; it compares column lists, not the source's
version numbers, which restart with every source process.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import cast

import duckdb

from headrace.engine.types import duckdb_type
from headrace.pipeline.model import COMMIT_TIME, LookupConfig, TableConfig, quote_ident
from headrace.source.changes import Column, TableRef, TableSchema
from headrace.store.duckdb.schema import (
    EVENT_TS,
    HISTORY_META,
    LOOKUP_PREFIX,
    META,
    MIRROR,
    ROW_LSN,
    history_table,
    mirror_table,
    table_label,
)

ACTIVE = "active"
DEAD = "dead_letter"


@dataclass
class KnownColumn:
    """One source column as stored (``dropped``: gone from the source, kept as NULL)."""

    name: str
    duck_type: str
    type_name: str
    type_oid: int = 0
    type_modifier: int = -1
    is_key: bool = False
    dropped: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "type": self.type_name,
            "type_oid": self.type_oid,
            "type_modifier": self.type_modifier,
            "duckdb_type": self.duck_type,
            "is_key": self.is_key,
            "dropped": self.dropped,
        }

    @classmethod
    def from_source(cls, column: Column) -> KnownColumn:
        return cls(
            name=column.name,
            duck_type=duckdb_type(column.arrow_type),
            type_name=column.type_name,
            type_oid=column.type_oid,
            type_modifier=column.type_modifier,
            is_key=column.is_key,
        )


def signature(columns: tuple[Column, ...]) -> tuple[tuple[str, int, int, bool], ...]:
    """What identifies a table's row layout: names, type OIDs and modifiers, key flags.

    Type names and version numbers differ between the snapshot and the stream
    (and between source processes), so they are not compared.
    """
    return tuple((c.name, c.type_oid, c.type_modifier, c.is_key) for c in columns)


@dataclass(frozen=True)
class LookupColumn:
    """A hidden mirror column recording a looked-up value with each row version."""

    name: str
    spec: LookupConfig
    target: TableRef

    @staticmethod
    def column_name(spec: LookupConfig) -> str:
        raw = f"{TableRef.parse(spec.table).name}__{spec.column}__{'_'.join(spec.on)}"
        return LOOKUP_PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", raw).lower()


@dataclass
class TableModel:
    """The engine's view of one source table."""

    ref: TableRef
    config: TableConfig
    key: tuple[str, ...]
    columns: list[KnownColumn]
    version: int = 1
    source_columns: tuple[Column, ...] = ()
    lookups: dict[str, LookupColumn] = field(default_factory=dict)
    lookup_types: dict[str, str] = field(default_factory=dict)
    state: str = ACTIVE
    reason: str | None = None
    key_index: bool = False
    """The mirror has an index on its key (:mod:`headrace.engine.key_index`)."""
    key_index_keys: int = 0
    """Most touched keys a batch takes through the key index: more would cost more than
    a scan of a mirror of its size (:func:`~headrace.engine.key_index.max_keys`), set
    at load, after a snapshot and at every review."""
    key_lookups: list[int] = field(default_factory=lambda: [0, 0])
    """Batches since the key index was last reviewed: [those the index would serve,
    the others] (:func:`~headrace.engine.key_index.count_lookup`)."""

    @property
    def name(self) -> str:
        return self.ref.qualified

    @property
    def mirror(self) -> str:
        return mirror_table(self.ref)

    @property
    def history(self) -> str:
        return history_table(self.ref)

    @property
    def commit_time(self) -> bool:
        """Rows get their event time from the commit of their insert (hidden column)."""
        return self.config.event_time == COMMIT_TIME

    @property
    def live_columns(self) -> list[KnownColumn]:
        return [c for c in self.columns if not c.dropped]

    def column(self, name: str) -> KnownColumn | None:
        for column in self.columns:
            if column.name == name:
                return column
        return None

    def hidden_columns(self) -> list[tuple[str, str]]:
        """(name, DuckDB type) of the engine's own mirror columns."""
        hidden = [(ROW_LSN, "UBIGINT")]
        if self.commit_time:
            hidden.append((EVENT_TS, "TIMESTAMPTZ"))
        hidden.extend((name, self.lookup_types[name]) for name in self.lookups)
        return hidden

    def mirror_columns(self) -> list[tuple[str, str]]:
        """(name, DuckDB type) of every mirror column, source columns first."""
        return [(c.name, c.duck_type) for c in self.columns] + self.hidden_columns()

    def columns_json(self) -> str:
        return json.dumps([c.to_json() for c in self.columns])

    # ------------------------------------------------------------------ DDL

    def create_tables(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create the mirror and history tables if they do not exist."""
        if self.config.mirror:
            body = ", ".join(f"{quote_ident(n)} {t}" for n, t in self.mirror_columns())
            con.execute(f"CREATE TABLE IF NOT EXISTS {self.mirror} ({body})")
        if self.config.history:
            meta = [f"{quote_ident(n)} {t}" for n, t in HISTORY_META]
            cols = [f"{quote_ident(c.name)} {c.duck_type}" for c in self.columns]
            con.execute(f"CREATE TABLE IF NOT EXISTS {self.history} ({', '.join(meta + cols)})")

    def record_version(self, con: duckdb.DuckDBPyConnection, lsn: int | None, change: str) -> None:
        """Write the current columns as schema version :attr:`version`."""
        con.execute(
            f"""INSERT INTO {META}.schema_versions VALUES (?, ?, ?, ?, now(), ?)
                ON CONFLICT DO NOTHING""",
            [self.name, self.version, self.columns_json(), lsn, change],
        )
        con.execute(
            f"""INSERT INTO {META}.tables (table_name, mirror_table, schema_version, key_columns,
                                           state, reason)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (table_name) DO UPDATE SET schema_version = excluded.schema_version,
                    mirror_table = excluded.mirror_table, key_columns = excluded.key_columns,
                    state = excluded.state, reason = excluded.reason""",
            [
                self.name,
                f"{MIRROR}.{table_label(self.ref)}" if self.config.mirror else None,
                self.version,
                json.dumps(list(self.key)),
                self.state,
                self.reason,
            ],
        )

    def save_state(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(
            f"UPDATE {META}.tables SET state = ?, reason = ? WHERE table_name = ?",
            [self.state, self.reason, self.name],
        )


def new_table_model(ref: TableRef, config: TableConfig, schema: TableSchema) -> TableModel:
    """The model of a table seen for the first time."""
    key = tuple(config.primary_key) if config.primary_key else schema.key_columns
    columns = [KnownColumn.from_source(c) for c in schema.columns]
    for column in columns:
        column.is_key = column.name in key
    return TableModel(
        ref=ref, config=config, key=key, columns=columns, source_columns=schema.columns
    )


def load_table_model(
    con: duckdb.DuckDBPyConnection, ref: TableRef, config: TableConfig
) -> TableModel | None:
    """The model of a table the store already holds, or ``None``."""
    rows = con.execute(
        f"""SELECT t.schema_version, t.key_columns, t.state, t.reason, v.columns
            FROM {META}.tables t JOIN {META}.schema_versions v
              ON v.table_name = t.table_name AND v.version = t.schema_version
            WHERE t.table_name = ?""",
        [ref.qualified],
    ).fetchall()
    if not rows:
        return None
    version, key_json, state, reason, columns_json = rows[0]
    columns = [
        KnownColumn(
            name=str(c["name"]),
            duck_type=str(c["duckdb_type"]),
            type_name=str(c["type"]),
            type_oid=int(c.get("type_oid", 0)),
            type_modifier=int(c.get("type_modifier", -1)),
            is_key=bool(c["is_key"]),
            dropped=bool(c["dropped"]),
        )
        for c in json.loads(str(columns_json))
    ]
    key = tuple(json.loads(str(key_json)))
    return TableModel(
        ref=ref,
        config=config,
        key=key,
        columns=columns,
        version=int(cast(int, version)),
        state=str(state),
        reason=None if reason is None else str(reason),
    )

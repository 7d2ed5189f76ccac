"""What the pipeline needs to know about a table's columns, from PostgreSQL or from the stream.

The pipeline file does not list columns. They come from the PostgreSQL
catalog (``headrace validate --connect``, and the primary key when the file
does not give one) or from the :class:`~headrace.source.changes.TableSchema`
the source hands to the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psycopg
import pyarrow as pa

from headrace.errors import SourceError
from headrace.pipeline.model import PipelineConfig
from headrace.source.changes import TableRef, TableSchema

TIME_TYPES = frozenset(
    {
        "timestamp with time zone",
        "timestamp without time zone",
        "timestamptz",
        "timestamp",
        "date",
    }
)


@dataclass(frozen=True)
class TableCatalog:
    """A table's columns (name → type name), which of them are time-typed, and its key."""

    table: TableRef
    columns: Mapping[str, str]
    time_columns: frozenset[str]
    primary_key: tuple[str, ...]

    @classmethod
    def from_schema(
        cls, schema: TableSchema, primary_key: Iterable[str] | None = None
    ) -> TableCatalog:
        """The catalog view of a source :class:`TableSchema`."""
        return cls(
            table=schema.table,
            columns={c.name: c.type_name for c in schema.columns},
            time_columns=frozenset(
                c.name
                for c in schema.columns
                if pa.types.is_timestamp(c.arrow_type) or pa.types.is_date(c.arrow_type)
            ),
            primary_key=tuple(primary_key) if primary_key else schema.key_columns,
        )


_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# The primary key, else the replica identity index: the columns pgoutput
# sends as the old key of updates and deletes.
_KEY_SQL = """
WITH idx AS (
    SELECT indrelid, indkey::int2[] AS attnums FROM pg_index
    WHERE indrelid = %s::regclass AND (indisprimary OR indisreplident)
    ORDER BY indisprimary DESC LIMIT 1
)
SELECT a.attname
FROM idx
CROSS JOIN LATERAL unnest(idx.attnums) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = idx.indrelid AND a.attnum = k.attnum
ORDER BY k.ord
"""


def read_table_catalog(
    conn: psycopg.Connection[tuple[object, ...]], table: TableRef
) -> TableCatalog:
    """Read a table's columns and primary key from PostgreSQL.

    Raises :class:`SourceError` when the table does not exist.
    """
    qualified = f'"{table.schema}"."{table.name}"'
    exists = conn.execute("SELECT to_regclass(%s)", (qualified,)).fetchone()
    if exists is None or exists[0] is None:
        raise SourceError(
            f"table {table} does not exist in the source database",
            "create it, or fix its name under source.tables in the pipeline file",
        )
    columns = {
        str(name): str(type_name)
        for name, type_name in conn.execute(_COLUMNS_SQL, (qualified,)).fetchall()
    }
    key = tuple(str(name) for (name,) in conn.execute(_KEY_SQL, (qualified,)).fetchall())
    return TableCatalog(
        table=table,
        columns=columns,
        time_columns=frozenset(n for n, t in columns.items() if t in TIME_TYPES),
        primary_key=key,
    )


def primary_key(conn: psycopg.Connection[tuple[object, ...]], table: TableRef) -> tuple[str, ...]:
    """The primary key (or replica identity index) columns of ``table``; empty if it has none."""
    return read_table_catalog(conn, table).primary_key


def with_primary_keys(
    config: PipelineConfig, conn: psycopg.Connection[tuple[object, ...]]
) -> PipelineConfig:
    """``config`` with every table's ``primary_key`` filled from the catalog when not given.

    The engine keys mirrors by ``primary_key``; without it, it would use the
    key the stream flags, which under REPLICA IDENTITY FULL is every column.
    """
    tables = dict(config.source.tables)
    for name, table in tables.items():
        if table.primary_key is None:
            key = primary_key(conn, TableRef.parse(name))
            if key:
                tables[name] = table.model_copy(update={"primary_key": list(key)})
    source = config.source.model_copy(update={"tables": tables})
    return config.model_copy(update={"source": source})

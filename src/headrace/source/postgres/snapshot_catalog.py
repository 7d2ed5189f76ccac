"""What a snapshot copies: each table's columns and its split into CTID ranges.

Everything here is read inside the snapshot's own transaction (after ``SET
TRANSACTION SNAPSHOT``), so the columns are the ones the copied rows have.

Columns and key flags mirror what pgoutput announces in its Relation
message, so a snapshot row and a streamed row of the same table line up:

* dropped and generated columns are left out (pgoutput does not send them);
* when a publication is given and it has a column list for the table, only
  those columns are copied, and its row filter (``WHERE``) is applied;
* key columns are the replica identity: the primary key (``DEFAULT``), the
  chosen index (``USING INDEX``), every column (``FULL``), none (``NOTHING``,
  or ``DEFAULT`` without a primary key).

A partitioned table is copied through its parent, in one piece (no CTID
ranges across partitions); that matches a publication with
``publish_via_partition_root = true``. Without it the stream names the
partitions, so configure those instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import sql

from headrace.errors import SourceError
from headrace.source.changes import Column, TableRef, TableSchema
from headrace.source.postgres.types import TypeRegistry

# TID range scans (``WHERE ctid >= ... AND ctid < ...`` read only those pages)
# arrived in PostgreSQL 14; before that each range would scan the whole table.
TID_RANGE_SCAN_VERSION = 140000
# Publication column lists and row filters (``pg_publication_tables.attnames``
# and ``.rowfilter``) arrived in PostgreSQL 15.
PUBLICATION_COLUMNS_VERSION = 150000


@dataclass(frozen=True)
class CopyRange:
    """One unit of copy work: a table, or a CTID range of its pages.

    ``first_page`` / ``end_page`` bound the heap pages copied (``end_page``
    excluded); ``None`` means the start / the end of the table. The last
    range is open-ended so rows in pages added after the size was measured
    are not missed (they are invisible to the snapshot anyway, but this keeps
    the ranges a partition of the whole table by construction).
    """

    table: TableRef
    first_page: int | None
    end_page: int | None
    pages: int
    estimated_rows: int


@dataclass(frozen=True)
class TablePlan:
    """How one table is copied."""

    schema: TableSchema
    pages: int
    estimated_rows: int | None
    row_filter: str | None
    partitioned: bool
    ranges: tuple[CopyRange, ...]


_TABLE_QUERY = """
SELECT c.oid, c.relkind::text, c.relreplident::text,
       pg_relation_size(c.oid) / current_setting('block_size')::int8,
       c.reltuples::float8
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""

_COLUMNS_QUERY = """
SELECT a.attname::text, a.atttypid::int8, a.atttypmod, format_type(a.atttypid, a.atttypmod),
       a.attgenerated <> ''
FROM pg_attribute a
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# The columns of the replica identity index: the primary key for DEFAULT,
# the index marked indisreplident for USING INDEX.
_IDENTITY_QUERY = """
SELECT a.attname::text
FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = %s AND (CASE WHEN %s = 'd' THEN i.indisprimary ELSE i.indisreplident END)
"""

_PUBLICATION_QUERY = """
SELECT attnames::text[], rowfilter FROM pg_publication_tables
WHERE pubname = %s AND schemaname = %s AND tablename = %s
"""


def read_table_plans(
    conn: psycopg.Connection[tuple[object, ...]],
    tables: tuple[TableRef, ...],
    *,
    registry: TypeRegistry,
    publication: str | None,
    range_pages: int,
) -> list[TablePlan]:
    """Read every table's columns and split large ones into CTID ranges.

    ``range_pages`` is the number of heap pages per range; a table of at most
    that many pages is copied whole. Raises :class:`SourceError` for a table
    that does not exist, is not a table, or is not in the publication.
    """
    version = conn.info.server_version
    plans = []
    for table in tables:
        row = conn.execute(_TABLE_QUERY, (table.schema, table.name)).fetchone()
        if row is None:
            raise SourceError(
                f"table {table} does not exist",
                "create it, or remove it from the configured tables (names are "
                "case-sensitive and schema-qualified: schema.table)",
            )
        oid, relkind, replident, pages, reltuples = row
        if relkind not in ("r", "p"):
            raise SourceError(
                f"{table} is not a table (relkind {relkind!r})",
                "configure only ordinary or partitioned tables; views and foreign "
                "tables have no change stream",
            )
        attnames: list[str] | None = None
        row_filter: str | None = None
        if publication is not None:
            attnames, row_filter = _publication_filter(conn, publication, table, version)
        columns = _read_columns(
            conn,
            table,
            int(str(oid)),
            replident=str(replident),
            attnames=attnames,
            registry=registry,
        )
        page_count = int(str(pages))
        estimate = float(str(reltuples))
        # reltuples is -1 (PG14+) or 0 with pages > 0 until the first ANALYZE.
        estimated_rows = (
            int(estimate) if estimate >= 0 and (estimate > 0 or not page_count) else None
        )
        partitioned = relkind == "p"
        split = not partitioned and version >= TID_RANGE_SCAN_VERSION
        ranges = _split(table, page_count, estimated_rows, range_pages if split else 0)
        plans.append(
            TablePlan(
                schema=TableSchema(
                    table=table, version=1, columns=columns, relation_oid=int(str(oid))
                ),
                pages=page_count,
                estimated_rows=estimated_rows,
                row_filter=row_filter,
                partitioned=partitioned,
                ranges=ranges,
            )
        )
    return plans


def _publication_filter(
    conn: psycopg.Connection[tuple[object, ...]],
    publication: str,
    table: TableRef,
    version: int,
) -> tuple[list[str] | None, str | None]:
    """The publication's column list and row filter for ``table`` (PG15+)."""
    if version < PUBLICATION_COLUMNS_VERSION:
        found = conn.execute(
            "SELECT 1 FROM pg_publication_tables "
            "WHERE pubname = %s AND schemaname = %s AND tablename = %s",
            (publication, table.schema, table.name),
        ).fetchone()
        if found is None:
            raise _not_published(publication, table)
        return None, None
    row = conn.execute(_PUBLICATION_QUERY, (publication, table.schema, table.name)).fetchone()
    if row is None:
        raise _not_published(publication, table)
    attnames, row_filter = row
    names = [str(n) for n in attnames] if isinstance(attnames, list) else None
    return names, None if row_filter is None else str(row_filter)


def _not_published(publication: str, table: TableRef) -> SourceError:
    return SourceError(
        f"table {table} is not in publication {publication!r} (or the publication is missing)",
        f"ALTER PUBLICATION {publication} ADD TABLE {table} (or let headrace create "
        "the publication)",
    )


def _read_columns(
    conn: psycopg.Connection[tuple[object, ...]],
    table: TableRef,
    oid: int,
    *,
    replident: str,
    attnames: list[str] | None,
    registry: TypeRegistry,
) -> tuple[Column, ...]:
    if replident in ("d", "i"):
        keys = {str(r[0]) for r in conn.execute(_IDENTITY_QUERY, (oid, replident)).fetchall()}
    else:
        keys = set()
    published = set(attnames) if attnames is not None else None
    columns = []
    for row in conn.execute(_COLUMNS_QUERY, (oid,)).fetchall():
        name, generated = str(row[0]), bool(row[4])
        if generated or (published is not None and name not in published):
            continue
        type_oid, typmod = int(str(row[1])), int(str(row[2]))
        columns.append(
            Column(
                name=name,
                type_oid=type_oid,
                type_modifier=typmod,
                type_name=str(row[3]),
                arrow_type=registry.arrow_type(type_oid, typmod),
                is_key=replident == "f" or name in keys,
            )
        )
    if not columns:
        raise SourceError(
            f"table {table} has no columns to copy",
            "give it at least one (non-generated) column, or leave it out",
        )
    return tuple(columns)


def _split(
    table: TableRef, pages: int, estimated_rows: int | None, range_pages: int
) -> tuple[CopyRange, ...]:
    """Cut ``pages`` into ranges of ``range_pages`` (0: one range, the whole table)."""
    if range_pages <= 0 or pages <= range_pages:
        return (CopyRange(table, None, None, pages, estimated_rows or 0),)
    count = math.ceil(pages / range_pages)
    rows_per_page = (estimated_rows or 0) / pages
    ranges = []
    for index in range(count):
        first = index * range_pages
        end = None if index == count - 1 else first + range_pages
        span = (end if end is not None else pages) - first
        ranges.append(
            CopyRange(
                table,
                first if index else None,
                end,
                span,
                round(span * rows_per_page),
            )
        )
    return tuple(ranges)


def copy_statement(
    plan: TablePlan,
    copy_range: CopyRange,
    copy_format: Literal["csv", "binary"] = "csv",
    text_columns: frozenset[str] = frozenset(),
) -> sql.Composed:
    """``COPY (SELECT <columns> FROM <table> WHERE <range, filter>) TO STDOUT (FORMAT csv)``.

    CSV keeps NULL (an unquoted empty field) apart from the empty string
    (``""``), and writes each row as one CopyData message. In ``binary``,
    the ``text_columns`` are selected as ``col::text`` (their text form is
    sent; see :mod:`.snapshot_binary`).
    """
    table = plan.schema.table
    conditions: list[sql.Composable] = []
    if copy_range.first_page is not None:
        conditions.append(
            sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({copy_range.first_page},0)"))
        )
    if copy_range.end_page is not None:
        conditions.append(
            sql.SQL("ctid < {}::tid").format(sql.Literal(f"({copy_range.end_page},0)"))
        )
    if plan.row_filter is not None:
        # The publication's row filter as PostgreSQL deparsed it.
        conditions.append(sql.SQL("({})").format(sql.SQL(plan.row_filter)))
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(
            sql.SQL("{}::text").format(sql.Identifier(c.name))
            if c.name in text_columns
            else sql.Identifier(c.name)
            for c in plan.schema.columns
        ),
        sql.Identifier(table.schema, table.name),
    )
    if conditions:
        query = sql.SQL("{} WHERE {}").format(query, sql.SQL(" AND ").join(conditions))
    return sql.SQL("COPY ({}) TO STDOUT (FORMAT {})").format(query, sql.SQL(copy_format))

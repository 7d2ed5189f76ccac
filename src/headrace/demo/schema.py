"""Apply, check and drop the reference fintech schema (``schema.sql``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources

import psycopg
from psycopg import sql

from headrace.errors import ConfigError

SCHEMA_MARKER = "headrace fintech demo schema v1"
"""Comment on ``public.customers`` that identifies (and versions) the schema."""

BUSINESS_TABLES: tuple[str, ...] = (
    "customers",
    "accounts",
    "cards",
    "merchants",
    "transactions",
    "ledger_entries",
    "logins",
)
"""The seven OLTP tables, parents before children."""

GROUND_TRUTH_TABLE = "fraud_ground_truth"
"""The side table of labelled fraud scenarios (not business data)."""

ALL_TABLES: tuple[str, ...] = (*BUSINESS_TABLES, GROUND_TRUTH_TABLE)

# A constant key for pg_advisory_xact_lock so two processes applying the
# schema at once do not race on CREATE ... IF NOT EXISTS (which is not
# concurrency-safe in PostgreSQL).
_LOCK_KEY = 0x6865616472616365  # "headrace"


def schema_sql() -> str:
    """The DDL text shipped in the package."""
    return resources.files("headrace.demo").joinpath("schema.sql").read_text()


def _check_existing(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Refuse to mix our DDL into same-named tables that are not ours."""
    rows = conn.execute(
        "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
        "AND c.relname = ANY(%s)",
        (list(ALL_TABLES),),
    ).fetchall()
    if not rows:
        return
    found = {str(name): comment for name, comment in rows}
    marker = found.get("customers")
    if marker == SCHEMA_MARKER:
        return
    names = ", ".join(sorted(found))
    if marker is not None and str(marker).startswith("headrace fintech demo schema"):
        raise ConfigError(
            f"the database holds another version of the demo schema ({marker!r})",
            "drop it first: headrace demo schema --drop --dsn ...",
        )
    raise ConfigError(
        f"tables named like the demo schema already exist and are not headrace's: {names}",
        "use an empty database for the demo, or drop those tables",
    )


def apply_schema(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Create the demo tables and indexes; a no-op when they already exist.

    Runs in one transaction. Raises :class:`ConfigError` when same-named
    tables exist that are not the demo schema.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        _check_existing(conn)
        conn.execute(schema_sql().encode())


def drop_schema(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Drop every demo table (and its data). Missing tables are ignored."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        for table in reversed(ALL_TABLES):
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier("public", table))
            )


def truncate_tables(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Empty every demo table (keeps the DDL)."""
    with conn.transaction():
        names = sql.SQL(", ").join(sql.Identifier("public", t) for t in ALL_TABLES)
        conn.execute(sql.SQL("TRUNCATE {}").format(names))


def sync_id_sequences(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Move each identity sequence past the largest id in its table.

    The generator and the history loader assign ids themselves; this keeps
    hand-written INSERTs that rely on the default from colliding with them.
    """
    with conn.transaction():
        for table in BUSINESS_TABLES:
            conn.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({}, 'id'), "
                    "COALESCE((SELECT max(id) FROM {}), 0) + 1, false)"
                ).format(sql.Literal(f"public.{table}"), sql.Identifier("public", table))
            )


@contextmanager
def bulk_load_mode(conn: psycopg.Connection[tuple[object, ...]]) -> Iterator[None]:
    """Drop the demo tables' foreign keys and secondary indexes; restore them on exit.

    For loading many rows into empty tables: checking a foreign key row by
    row costs far more than one validating join afterwards, and an index
    built once from sorted data is cheaper than one grown row by row. Use it
    inside a transaction, so a failed load also restores the DDL. Primary
    keys and unique constraints stay (they guard the load itself).
    """
    names = list(ALL_TABLES)
    foreign_keys = conn.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE contype = 'f' AND connamespace = 'public'::regnamespace "
        "AND conrelid::regclass::text = ANY(%s) ORDER BY conrelid::regclass::text, conname",
        (names,),
    ).fetchall()
    indexes = conn.execute(
        "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = 'public' "
        "AND i.tablename = ANY(%s) AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
        "WHERE c.conname = i.indexname AND c.connamespace = 'public'::regnamespace) "
        "ORDER BY i.indexname",
        (names,),
    ).fetchall()
    for table, name, _ in foreign_keys:
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(str(table)), sql.Identifier(str(name))
            )
        )
    for name, _ in indexes:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(str(name))))
    yield
    for _, definition in indexes:
        conn.execute(str(definition).encode())
    for table, name, definition in foreign_keys:
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(
                sql.Identifier(str(table)), sql.Identifier(str(name))
            )
            + sql.SQL(str(definition))  # catalog text, not user input
        )

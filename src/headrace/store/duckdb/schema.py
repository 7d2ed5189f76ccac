"""Names and DDL of the DuckDB store layout (see ``docs/store.md``).

Source table ``public.x`` is mirrored as ``mirror.x``; ``s.x`` in another
schema as ``mirror.s__x``. A rollup ``r`` with grains ``5m, 1h`` is served by
the views ``rollup.r_5m`` and ``rollup.r_1h``, backed by engine-owned state
tables ``rollup.r__state``, ``rollup.r__distinct_<measure>`` and
``rollup.r__hll_<measure>``.
"""

from __future__ import annotations

import re
from datetime import timedelta

import duckdb

from headrace.pipeline.durations import format_duration
from headrace.pipeline.model import quote_ident
from headrace.source.changes import TableRef

FORMAT_VERSION = 1

MIRROR = "mirror"
HISTORY = "history"
ROLLUP = "rollup"
META = "headrace"

# Hidden engine columns of mirror tables.
ROW_LSN = "_hr_lsn"
EVENT_TS = "_hr_event_ts"
LOOKUP_PREFIX = "_hr_lk_"

# Columns of history tables before the row's own columns.
HISTORY_META: tuple[tuple[str, str], ...] = (
    ("_hr_lsn", "UBIGINT"),
    ("_hr_commit_ts", "TIMESTAMPTZ"),
    ("_hr_xid", "BIGINT"),
    ("_hr_seq", "INTEGER"),
    ("_hr_op", "VARCHAR"),
)

# Rollup state bookkeeping column: rows in the group (the group is deleted at 0).
ROWS = "_hr_rows"


def table_exists(con: duckdb.DuckDBPyConnection, schema: str, name: str) -> bool:
    """Whether the store has table ``schema.name`` (names unquoted)."""
    rows = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = ? AND table_name = ?",
        [schema, name],
    ).fetchall()
    return bool(rows[0][0])


def table_label(ref: TableRef) -> str:
    """The name of a source table inside the store's schemas (``x`` or ``s__x``)."""
    return ref.name if ref.schema == "public" else f"{ref.schema}__{ref.name}"


KEY_INDEX_SUFFIX = "__hr_key"
"""A mirror's key index is named after it: ``mirror.<label>__hr_key``
(:mod:`headrace.engine.key_index`)."""


def key_index_label(ref: TableRef) -> str:
    """The (unquoted) name of the index on ``ref``'s mirror key."""
    return table_label(ref) + KEY_INDEX_SUFFIX


def mirror_table(ref: TableRef) -> str:
    """Quoted ``mirror.<label>``."""
    return f"{MIRROR}.{quote_ident(table_label(ref))}"


def history_table(ref: TableRef) -> str:
    """Quoted ``history.<label>``."""
    return f"{HISTORY}.{quote_ident(table_label(ref))}"


def grain_label(grain: timedelta) -> str:
    """``5m``, ``1h``, ``1d``: the suffix of a rollup view."""
    return format_duration(grain)


def rollup_view(name: str, grain: timedelta) -> str:
    """Quoted ``rollup.<name>_<grain>``."""
    return f"{ROLLUP}.{quote_ident(f'{name}_{grain_label(grain)}')}"


def rollup_state(name: str, suffix: str = "") -> str:
    """Quoted ``rollup.<name>__state`` (or a side table ``<name>__<suffix>``)."""
    table = f"{name}__{suffix or 'state'}"
    return f"{ROLLUP}.{quote_ident(table)}"


def rollup_table_prefix(name: str) -> str:
    """Unquoted prefix of every engine-owned table of rollup ``name``."""
    return f"{name}__"


def is_rollup_table(name: str, table: str) -> bool:
    """Whether ``table`` (unquoted) is one of rollup ``name``'s: its state or a side table
    (``distinct_<i>``, ``hll_<i>``, ``reserve_<i>``, ``side_<i>``; see :func:`rollup_state`),
    not a table of a rollup named ``<name>__<more>``."""
    suffix = r"(state|(distinct|hll|reserve|side)_[0-9]+)"
    return re.fullmatch(re.escape(rollup_table_prefix(name)) + suffix, table) is not None


METADATA_DDL: tuple[str, ...] = (
    f"CREATE SCHEMA IF NOT EXISTS {META}",
    f"CREATE SCHEMA IF NOT EXISTS {MIRROR}",
    f"CREATE SCHEMA IF NOT EXISTS {HISTORY}",
    f"CREATE SCHEMA IF NOT EXISTS {ROLLUP}",
    f"""CREATE TABLE IF NOT EXISTS {META}.store_info (
        key TEXT PRIMARY KEY,
        value TEXT
    )""",
    f"""CREATE TABLE IF NOT EXISTS {META}.position (
        source TEXT PRIMARY KEY,
        lsn UBIGINT NOT NULL,
        commit_ts TIMESTAMPTZ,
        updated_at TIMESTAMPTZ NOT NULL
    )""",
    f"""CREATE TABLE IF NOT EXISTS {META}.tables (
        table_name TEXT PRIMARY KEY,
        mirror_table TEXT,
        rows BIGINT NOT NULL DEFAULT 0,
        last_commit_ts TIMESTAMPTZ,
        last_lsn UBIGINT,
        applied_at TIMESTAMPTZ,
        schema_version INTEGER NOT NULL DEFAULT 1,
        key_columns JSON,
        state TEXT NOT NULL DEFAULT 'active',
        reason TEXT
    )""",
    f"""CREATE TABLE IF NOT EXISTS {META}.schema_versions (
        table_name TEXT NOT NULL,
        version INTEGER NOT NULL,
        columns JSON NOT NULL,
        lsn UBIGINT,
        seen_at TIMESTAMPTZ NOT NULL,
        change TEXT,
        PRIMARY KEY (table_name, version)
    )""",
    f"CREATE SEQUENCE IF NOT EXISTS {META}.dead_letter_ids",
    f"""CREATE TABLE IF NOT EXISTS {META}.dead_letters (
        id BIGINT PRIMARY KEY DEFAULT nextval('{META}.dead_letter_ids'),
        lsn UBIGINT,
        table_name TEXT,
        reason TEXT NOT NULL,
        payload JSON,
        "at" TIMESTAMPTZ NOT NULL
    )""",
    f"""CREATE TABLE IF NOT EXISTS {META}.rollups (
        name TEXT PRIMARY KEY,
        table_name TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        definition JSON NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        retained_from TIMESTAMPTZ,
        views JSON
    )""",
)

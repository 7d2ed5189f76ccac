"""A starting pipeline file written from what a PostgreSQL database holds (``headrace init``).

The file follows every table that PostgreSQL can publish completely (a primary key, a
replica identity index, or REPLICA IDENTITY FULL with a key headrace can use), names
an event-time column where one is evident, and adds one example rollup on the largest
table with an event time, so that ``headrace run --serve`` shows something at once.
Tables it cannot follow are listed as comments saying why and what to do. The result
is meant to be edited: every choice made is visible in the file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from headrace.errors import SourceError
from headrace.pipeline.catalog import TIME_TYPES, read_table_catalog
from headrace.source.changes import TableRef

NUMERIC_TYPES = re.compile(r"^(smallint|integer|bigint|numeric|real|double precision|money)")
"""Column types a generated rollup may sum (``format_type`` spelling)."""

TEXT_TYPES = re.compile(r"^(text|character varying|character|boolean)")
"""Column types a generated rollup may group by, when few distinct values are known."""

EVENT_TIME_NAMES = (
    "created_at",
    "inserted_at",
    "occurred_at",
    "event_time",
    "event_at",
    "happened_at",
    "ts",
    "timestamp",
    "time",
    "at",
    "created",
    "date",
)
"""Column names taken as a row's event time, in order of preference."""

_UNNAMEABLE = re.compile(r"[.\s]")
"""Characters a table name in ``source.tables`` cannot hold (``schema.table`` is split on dots)."""

MAX_DIMENSION_VALUES = 50
"""A column with at most this many distinct values (PostgreSQL's statistics) is a dimension."""

_TABLES_SQL = """
SELECT n.nspname, c.relname, c.relreplident, greatest(c.reltuples, 0)::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname = ANY(%s)
ORDER BY n.nspname, c.relname
"""

_FEW_VALUES_SQL = """
SELECT attname FROM pg_stats
WHERE schemaname = %s AND tablename = %s AND n_distinct BETWEEN 2 AND %s
"""


@dataclass(frozen=True)
class DiscoveredTable:
    """What ``headrace init`` learnt about one table."""

    table: TableRef
    columns: dict[str, str]
    """Column name → type, as ``format_type`` spells it."""
    key: tuple[str, ...]
    """The primary key, else the replica identity index; empty when there is neither."""
    identity: str
    """``relreplident``: ``d`` default (the primary key), ``i`` index, ``f`` full, ``n`` none."""
    estimated_rows: int
    few_values: frozenset[str]
    """Columns with few distinct values according to PostgreSQL's statistics."""

    @property
    def problem(self) -> str | None:
        """Why headrace cannot follow the table as it is, or None."""
        if _UNNAMEABLE.search(self.table.schema) or _UNNAMEABLE.search(self.table.name):
            return (
                "a space or a dot in its name, which a pipeline file cannot name yet: "
                "rename it to follow it"
            )
        if self.key:
            return None
        if self.identity == "f":
            return (
                "no primary key (it has REPLICA IDENTITY FULL): choose columns that identify "
                "a row and list them under primary_key"
            )
        return (
            "no primary key or replica identity index, so PostgreSQL does not publish its "
            f"updates and deletes: add a primary key, or run ALTER TABLE {self.table} "
            "REPLICA IDENTITY FULL and list the columns identifying a row under primary_key"
        )

    @property
    def event_time(self) -> str | None:
        """The column taken as the row's event time: a time-typed column with a telling
        name (``created_at``, ``ts``, ...), else the only time-typed column; or None."""
        times = [name for name, type_name in self.columns.items() if type_name in TIME_TYPES]
        for wanted in EVENT_TIME_NAMES:
            if wanted in times:
                return wanted
        return times[0] if len(times) == 1 else None

    @property
    def summed_column(self) -> str | None:
        """A numeric column worth summing in an example rollup (not a key or a reference)."""
        for name, type_name in self.columns.items():
            if name in self.key or name == "id" or name.endswith("_id"):
                continue
            if NUMERIC_TYPES.match(type_name):
                return name
        return None

    @property
    def dimension_columns(self) -> list[str]:
        """Text-like columns with few distinct values (at most two)."""
        return [
            name
            for name, type_name in self.columns.items()
            if name in self.few_values and name not in self.key and TEXT_TYPES.match(type_name)
        ][:2]


def discover_tables(
    conn: psycopg.Connection[tuple[object, ...]],
    schemas: Sequence[str],
    tables: Sequence[str] = (),
) -> list[DiscoveredTable]:
    """The tables of ``schemas`` (or exactly ``tables``, ``schema.table`` or ``table``);
    raises :class:`SourceError` for a named table that does not exist."""
    wanted = [TableRef.parse(name) for name in tables]
    search = sorted({t.schema for t in wanted}) if wanted else list(schemas)
    rows = conn.execute(_TABLES_SQL, (search,)).fetchall()
    found = {TableRef(str(r[0]), str(r[1])): r for r in rows}
    missing = [t for t in wanted if t not in found]
    if missing:
        raise SourceError(
            f"no such table in database {conn.info.dbname}: " + ", ".join(str(t) for t in missing),
            "write each table as schema.table (or table for schema public), as PostgreSQL "
            "stores the name (case-sensitive)",
        )
    out = []
    for ref in wanted or list(found):
        _, _, identity, estimated = found[ref]
        catalog = read_table_catalog(conn, ref)
        few = conn.execute(_FEW_VALUES_SQL, (ref.schema, ref.name, MAX_DIMENSION_VALUES)).fetchall()
        out.append(
            DiscoveredTable(
                table=ref,
                columns=dict(catalog.columns),
                key=catalog.primary_key,
                identity=str(identity),
                estimated_rows=int(str(estimated)),
                few_values=frozenset(str(n) for (n,) in few),
            )
        )
    return out


def dsn_for_file(dsn: str) -> tuple[str | None, bool]:
    """The DSN to write into the file (None when it holds a password, which is not
    written), and whether a password was left out."""
    params = conninfo_to_dict(dsn)
    if params.pop("password", None) is not None:
        return None, True
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None}), False


def _yaml_str(text: str) -> str:
    """A double-quoted YAML scalar."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_PLAIN = re.compile(r"^[a-z_][a-z0-9_]*$")
"""Names written as they are; headrace's own names (rollups, measures) must be such."""


_YAML_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})
"""Plain scalars YAML reads as booleans or null."""


def _scalar(name: str) -> str:
    """A column or table name as a YAML scalar (quoted unless plain)."""
    plain = re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", name) and name.lower() not in _YAML_WORDS
    return name if plain else _yaml_str(name)


def _table_key(ref: TableRef) -> str:
    return ref.name if ref.schema == "public" else str(ref)


def _rollup_name(ref: TableRef) -> str:
    base = re.sub(r"[^a-z0-9_]", "_", ref.name.lower()).strip("_") or "table"
    return f"{base}_activity"


def pipeline_yaml(
    tables: Sequence[DiscoveredTable], *, dsn: str | None, dsn_env: str, origin: str
) -> str:
    """The text of a starting ``headrace.yaml`` (see the module docstring)."""
    followed = [t for t in tables if t.problem is None]
    lines = [
        f"# headrace.yaml written by `headrace init` from {origin}.",
        '# Edit freely: every field is described in the README ("Running a pipeline").',
        "# Check it with: headrace validate --config headrace.yaml --connect",
        "source:",
    ]
    if dsn is not None:
        lines.append(f"  dsn: {_yaml_str(dsn)}")
    else:
        lines.append(f"  dsn_env: {dsn_env}   # the DSN has a password: set it in this variable")
    lines += ["  publication: headrace", "  slot: headrace", "  tables:"]
    for table in tables:
        key = _table_key(table.table)
        if table.problem is not None:
            lines.append(f"    # {_scalar(key)}: not followed: {table.problem}")
            continue
        settings = []
        comment = f"key: {', '.join(table.key)}; ~{table.estimated_rows:,} rows"
        if (event_time := table.event_time) is not None:
            settings.append(f"event_time: {_scalar(event_time)}")
        else:
            comment += "; event time: the commit time (no evident time column)"
        lines.append(f"    {_scalar(key)}: {{{', '.join(settings)}}}   # {comment}")
    lines += ["store:", "  path: headrace.duckdb"]
    example = _example_rollup(followed)
    if example:
        lines += example
    return "\n".join(lines) + "\n"


def _example_rollup(followed: Sequence[DiscoveredTable]) -> list[str]:
    """One rollup on the largest followed table with an event time, or none."""
    timed = [t for t in followed if t.event_time is not None]
    if not timed:
        return []
    table = max(timed, key=lambda t: t.estimated_rows)
    lines = [
        "rollups:",
        "  # An example to start from: rows per 5 minutes (and per hour and day).",
        f"  - name: {_rollup_name(table.table)}",
        f"    table: {_scalar(_table_key(table.table))}",
        "    grain: 5m",
        "    coarser: [1h, 1d]",
    ]
    dimensions = [d for d in table.dimension_columns if _PLAIN.match(d)]
    if dimensions:
        lines.append(f"    dimensions: [{', '.join(dimensions)}]")
    lines += ["    measures:", "      - {name: row_count, fn: count}"]
    if (summed := table.summed_column) is not None:
        name = "sum_" + re.sub(r"[^a-z0-9_]", "_", summed.lower())
        lines.append(f"      - {{name: {name}, fn: sum, column: {_scalar(summed)}}}")
    return lines

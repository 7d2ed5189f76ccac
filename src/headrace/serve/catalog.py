"""What the store holds, as SQL users may see it: the schema browser and the SQL allowlist.

Only four schemas are visible: ``mirror``, ``history``, ``rollup`` and
``headrace``. Engine-private relations (rollup state tables, named with a
double underscore) are hidden. Masked columns per role are resolved here too.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import duckdb

VISIBLE_SCHEMAS: tuple[str, ...] = ("mirror", "history", "rollup", "headrace")


@dataclass(frozen=True)
class Relation:
    """A table or view of the store."""

    schema: str
    name: str
    kind: str  # "table" or "view"
    columns: tuple[tuple[str, str], ...]  # (name, DuckDB type)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Catalog:
    """Visible relations, keyed by lower-case (schema, name)."""

    relations: dict[tuple[str, str], Relation] = field(default_factory=dict)
    columns: tuple[tuple[str, str, str, str], ...] = field(default=(), compare=False)
    """Every visible column as read (schema, relation, column, type), hidden ones too:
    when a new read finds the same, the catalog is unchanged."""

    def get(self, schema: str, name: str) -> Relation | None:
        """The relation ``schema.name`` (case-insensitive), if visible."""
        return self.relations.get((schema.lower(), name.lower()))

    def has(self, qualified: str) -> bool:
        """True when ``schema.name`` exists and is visible."""
        schema, _, name = qualified.partition(".")
        return self.get(schema, name) is not None


def is_hidden(schema: str, name: str) -> bool:
    """Engine-private relations that serving never shows."""
    return schema == "rollup" and "__" in name


def load_catalog(cur: duckdb.DuckDBPyConnection, previous: Catalog | None = None) -> Catalog:
    """Read the visible relations and their columns from DuckDB's catalog.

    Returns ``previous`` itself when no column changed (one statement instead of
    two: which relations are views is then not read again; a table replaced by a
    view with the very same columns keeps its old kind until a column changes).
    """
    schemas = ", ".join(f"'{s}'" for s in VISIBLE_SCHEMAS)
    rows = tuple(
        cur.execute(
            "SELECT schema_name, table_name, column_name, data_type FROM duckdb_columns() "
            f"WHERE schema_name IN ({schemas}) AND database_name = current_database() "
            "ORDER BY schema_name, table_name, column_index"
        ).fetchall()
    )
    if previous is not None and previous.columns == rows:
        return previous
    kinds = dict(
        ((s, n), "view")
        for s, n in cur.execute(
            "SELECT schema_name, view_name FROM duckdb_views() "
            f"WHERE NOT internal AND schema_name IN ({schemas}) "
            "AND database_name = current_database()"
        ).fetchall()
    )
    grouped: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for schema, name, column, dtype in rows:
        if is_hidden(schema, name):
            continue
        grouped.setdefault((schema, name), []).append((column, dtype))
    relations = {
        (s.lower(), n.lower()): Relation(s, n, kinds.get((s, n), "table"), tuple(cols))
        for (s, n), cols in grouped.items()
    }
    return Catalog(relations, rows)


@dataclass(frozen=True)
class MaskPolicy:
    """Glob patterns ``schema.table.column`` a role sees masked."""

    patterns: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Identifies the policy (roles with the same patterns share live computations)."""
        return "|".join(sorted(self.patterns))

    def masks(self, schema: str, table: str, column: str) -> bool:
        """True when ``schema.table.column`` is masked."""
        target = f"{schema}.{table}.{column}".lower()
        return any(fnmatch.fnmatchcase(target, p.lower()) for p in self.patterns)

    def masked_columns(self, relation: Relation) -> list[str]:
        """The relation's masked column names."""
        return [c for c, _ in relation.columns if self.masks(relation.schema, relation.name, c)]


def mask_policy(masked_columns: dict[str, list[str]], role: str) -> MaskPolicy:
    """The policy configured for ``role``."""
    return MaskPolicy(tuple(masked_columns.get(role, ())))

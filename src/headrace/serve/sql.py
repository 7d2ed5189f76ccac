"""Safe SQL: what passes to DuckDB, and how masked columns stay masked.

Policy (checked on sqlglot's DuckDB-dialect parse tree, then re-rendered, so
DuckDB only ever executes what the checker saw):

1. Exactly one statement, a query (SELECT, WITH ... SELECT, set operations),
   optionally prefixed by ``EXPLAIN`` or ``EXPLAIN ANALYZE``.
2. No data-changing or session node anywhere in the tree (DML in a CTE,
   ``SELECT ... INTO``, COPY, ATTACH, SET, PRAGMA, INSTALL/LOAD, ...).
3. Every relation is either a CTE of the query, ``range``/``generate_series``/
   ``unnest``/``VALUES``, or a visible store relation named with its schema
   (``mirror.``, ``history.``, ``rollup.``, ``headrace.``). Every other table
   function (``read_csv``, ``read_parquet``, ``glob``, ``query_table``,
   ``duckdb_settings``...) is refused, and so are file paths as tables.
4. Functions that read files, the environment or DuckDB's internals are refused
   by name even as scalars.
5. Masking: each store relation with masked columns for the caller's role is
   replaced by a subquery that projects the masked columns as ``'****'`` (text)
   or a typed NULL, under the same alias. The raw table never appears in the
   executed SQL, so ``SELECT *``, aliases, functions, struct-packing a row, or
   joins cannot reach the real values.
6. A ``LIMIT row_limit + 1`` is put on the outer query (to detect truncation).

DuckDB itself is the second wall: the instance runs with
``enable_external_access=false``, and ``headrace serve`` also locks its configuration
(see store.py). In embedded mode (``headrace run --serve``) the engine shares the
instance and sets a time zone per cursor, so the configuration is not locked there;
the parser's refusal of SET/PRAGMA/RESET (2.) is what keeps queries from changing it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from headrace.serve.catalog import Catalog, MaskPolicy

# sqlglot logs a warning when it falls back to an opaque Command; we reject those anyway.
logging.getLogger("sqlglot").setLevel(logging.ERROR)

_EXPLAIN = re.compile(r"^\s*EXPLAIN(\s+ANALYZE)?\b", re.IGNORECASE)
_LEADING_COMMENTS = re.compile(r"^(\s*(--[^\n]*\n|/\*.*?\*/))*\s*", re.DOTALL)

_FORBIDDEN_NODES: tuple[tuple[type[exp.Expr], str], ...] = tuple(
    (node, label)
    for name, label in (
        ("Insert", "INSERT"),
        ("Update", "UPDATE"),
        ("Delete", "DELETE"),
        ("Merge", "MERGE"),
        ("Create", "CREATE"),
        ("Drop", "DROP"),
        ("Alter", "ALTER"),
        ("TruncateTable", "TRUNCATE"),
        ("Copy", "COPY"),
        ("Command", "this command"),
        ("Set", "SET"),
        ("Pragma", "PRAGMA"),
        ("Attach", "ATTACH"),
        ("Detach", "DETACH"),
        ("Install", "INSTALL"),
        ("Use", "USE"),
        ("Transaction", "BEGIN"),
        ("Commit", "COMMIT"),
        ("Rollback", "ROLLBACK"),
        ("Describe", "DESCRIBE"),
        ("Summarize", "SUMMARIZE"),
        ("LoadData", "LOAD"),
        ("Into", "SELECT ... INTO"),
        ("Export", "EXPORT"),
        ("Grant", "GRANT"),
        ("Pivot", "PIVOT statement"),
    )
    if (node := getattr(exp, name, None)) is not None
)

_ALLOWED_TABLE_FUNCTIONS: tuple[type[exp.Expr], ...] = (
    exp.GenerateSeries,
    exp.Unnest,
    exp.Values,
)

_FORBIDDEN_FUNCTION_PREFIXES: tuple[str, ...] = (
    "read_",
    "glob",
    "query",
    "sniff_",
    "parquet_",
    "iceberg_",
    "delta_",
    "sqlite_",
    "postgres_",
    "mysql_",
    "duckdb_",
    "pragma_",
    "getenv",
    "which_secret",
    "load_",
    "install_",
    "checkpoint",
    "force_checkpoint",
    "export_",
    "import_",
    "enable_",
    "disable_",
    "set_",
    "current_setting",
    "test_",
    "icu_",
    "arrow_scan",
    "python_",
)


class SqlRejectedError(ValueError):
    """The query is not allowed; the message says why (shown to the user)."""


@dataclass(frozen=True)
class PreparedSql:
    """A checked query, ready to run."""

    sql: str
    explain: bool
    row_limit: int | None
    relations: tuple[str, ...]
    masked: tuple[str, ...]


def _function_name(node: exp.Func) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    return node.sql_name().lower()


def _cte_names(tree: exp.Expr) -> set[str]:
    return {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}


def _masked_value(dtype: str) -> exp.Expr:
    if dtype.upper().startswith(("VARCHAR", "TEXT", "STRING")):
        return exp.Literal.string("****")
    try:
        return exp.cast(exp.null(), exp.DataType.build(dtype, dialect="duckdb"))
    except (ParseError, TokenError, ValueError):
        return exp.null()


def _masking_subquery(table: exp.Table, relation_cols: list[tuple[str, bool, str]]) -> exp.Expr:
    projections: list[exp.Expr] = []
    for column, masked, dtype in relation_cols:
        ident = exp.to_identifier(column, quoted=True)
        projections.append(exp.alias_(_masked_value(dtype), ident) if masked else exp.column(ident))
    source = exp.Table(
        this=exp.to_identifier(table.name, quoted=True),
        db=exp.to_identifier(table.db, quoted=True),
    )
    inner = exp.select(*projections).from_(source)
    alias = table.args.get("alias")
    if alias is None:
        alias = exp.TableAlias(this=exp.to_identifier(table.name, quoted=True))
    return exp.Subquery(this=inner, alias=alias.copy())


def _check_relations(
    tree: exp.Expr, catalog: Catalog, policy: MaskPolicy
) -> tuple[list[str], list[str]]:
    ctes = _cte_names(tree)
    seen: list[str] = []
    masked: list[str] = []
    for table in list(tree.find_all(exp.Table)):
        target = table.this
        if isinstance(target, _ALLOWED_TABLE_FUNCTIONS):
            continue
        if not isinstance(target, exp.Identifier):
            label = target.sql(dialect="duckdb")[:60] if isinstance(target, exp.Expr) else "?"
            raise SqlRejectedError(
                f"table functions are not allowed ({label}): query the store's relations "
                "(see the schema browser); file, network and catalog functions are blocked"
            )
        if table.catalog:
            raise SqlRejectedError(
                f"{table.sql(dialect='duckdb')}: only this store's schemas can be queried "
                "(mirror, history, rollup, headrace)"
            )
        if not table.db:
            if table.name.lower() in ctes:
                continue
            raise SqlRejectedError(
                f"unknown table {table.name!r}: name store relations with their schema, "
                "e.g. mirror.<table>, history.<table>, rollup.<name>_5m, headrace.tables"
            )
        relation = catalog.get(table.db, table.name)
        if relation is None:
            raise SqlRejectedError(
                f"unknown relation {table.db}.{table.name}: see GET /api/schema for what "
                "the store holds"
            )
        seen.append(relation.qualified)
        hidden = policy.masked_columns(relation)
        if hidden:
            masked.extend(f"{relation.qualified}.{c}" for c in hidden)
            cols = [(c, c in hidden, t) for c, t in relation.columns]
            table.replace(_masking_subquery(table, cols))
    return seen, masked


def _check_nodes(tree: exp.Expr) -> None:
    for node in tree.walk():
        for kind, label in _FORBIDDEN_NODES:
            if isinstance(node, kind):
                raise SqlRejectedError(
                    f"{label} is not allowed: the SQL endpoint is read-only "
                    "(only SELECT, WITH ... SELECT and EXPLAIN run)"
                )
        if isinstance(node, exp.Func) and not isinstance(node, _ALLOWED_TABLE_FUNCTIONS):
            name = _function_name(node)
            if name.startswith(_FORBIDDEN_FUNCTION_PREFIXES):
                raise SqlRejectedError(
                    f"function {name}() is not allowed: it reads files, settings or "
                    "DuckDB internals"
                )


def _apply_limit(tree: exp.Query, limit: int) -> exp.Query:
    existing = tree.args.get("limit")
    if existing is None and tree.args.get("offset") is None:
        tree.set("limit", exp.Limit(expression=exp.Literal.number(limit)))
        return tree
    value = existing.expression if isinstance(existing, exp.Limit) else None
    if (
        isinstance(existing, exp.Limit)
        and isinstance(value, exp.Literal)
        and value.is_int
        and tree.args.get("offset") is None
    ):
        if int(value.name) > limit:
            existing.set("expression", exp.Literal.number(limit))
        return tree
    return exp.select("*").from_(tree.subquery("_hr_q")).limit(limit)


def prepare_sql(
    text: str,
    catalog: Catalog,
    policy: MaskPolicy,
    *,
    row_limit: int | None,
    max_chars: int = 20_000,
) -> PreparedSql:
    """Check ``text`` against the policy; the SQL to execute, or SqlRejectedError saying why."""
    if not text or not text.strip():
        raise SqlRejectedError("the query is empty")
    if len(text) > max_chars:
        raise SqlRejectedError(
            f"the query is {len(text)} characters long; at most {max_chars} allowed"
        )
    body = _LEADING_COMMENTS.sub("", text, count=1)
    explain_match = _EXPLAIN.match(body)
    prefix = ""
    if explain_match:
        prefix = "EXPLAIN ANALYZE " if explain_match.group(1) else "EXPLAIN "
        body = body[explain_match.end() :]
    try:
        statements = [s for s in sqlglot.parse(body, read="duckdb") if s is not None]
    except (ParseError, TokenError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise SqlRejectedError(f"the query does not parse: {first}") from exc
    if len(statements) != 1:
        raise SqlRejectedError(
            f"exactly one statement is allowed, found {len(statements)}: "
            "remove the extra statements"
        )
    tree = statements[0]
    if not isinstance(tree, exp.Query):
        kind = type(tree).__name__.upper()
        label = next((lbl for k, lbl in _FORBIDDEN_NODES if isinstance(tree, k)), kind)
        raise SqlRejectedError(
            f"{label} is not allowed: the SQL endpoint is read-only "
            "(only SELECT, WITH ... SELECT and EXPLAIN run)"
        )
    _check_nodes(tree)
    seen, masked = _check_relations(tree, catalog, policy)
    limit = None
    if not prefix and row_limit is not None:
        limit = row_limit
        tree = _apply_limit(tree, row_limit + 1)
    sql = prefix + tree.sql(dialect="duckdb")
    return PreparedSql(sql, bool(prefix), limit, tuple(dict.fromkeys(seen)), tuple(masked))


def mask_trusted_sql(text: str, catalog: Catalog, policy: MaskPolicy) -> str:
    """Apply only the masking rewrite to a trusted (configured) query.

    Tile and API queries are written by the operator or built by the server, so
    they skip the allowlist, but a role's masked columns must still be masked.
    Without masks for the role the text is returned unchanged.
    """
    if not policy.patterns:
        return text
    try:
        tree = sqlglot.parse_one(text, read="duckdb")
    except (ParseError, TokenError) as exc:
        raise SqlRejectedError(f"cannot apply column masking to this query: {exc}") from exc
    if tree is None:
        raise SqlRejectedError("cannot apply column masking to an empty query")
    for table in list(tree.find_all(exp.Table)):
        if not isinstance(table.this, exp.Identifier) or not table.db:
            continue
        relation = catalog.get(table.db, table.name)
        if relation is None:
            continue
        hidden = policy.masked_columns(relation)
        if hidden:
            cols = [(c, c in hidden, t) for c, t in relation.columns]
            table.replace(_masking_subquery(table, cols))
    return tree.sql(dialect="duckdb")

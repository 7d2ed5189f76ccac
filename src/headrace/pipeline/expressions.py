"""Checks of the SQL expressions users write in rollups (dimensions, measures, filters).

An expression is DuckDB SQL over one row of one table: column references,
literals, operators and scalar functions. It is parsed with sqlglot so a typo
or a forbidden construct (a subquery, an aggregate, a reference to another
table, a function whose result changes from run to run) is a configuration
error when the file is loaded, not a crash in the middle of a batch.

>>> sorted(expression_columns("amount * 2 + fee"))
['amount', 'fee']
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

# Functions whose value is not a function of the row: a retraction would not
# subtract what the insertion added.
NONDETERMINISTIC = frozenset(
    {
        "random",
        "rand",
        "uuid",
        "gen_random_uuid",
        "now",
        "current_timestamp",
        "current_date",
        "current_time",
        "today",
        "get_current_timestamp",
        "get_current_time",
        "transaction_timestamp",
        "nextval",
        "currval",
        "setseed",
        "current_setting",
    }
)

_FORBIDDEN_NODES: tuple[tuple[type[exp.Expr], str], ...] = (
    (exp.Query, "a subquery"),
    (exp.Subquery, "a subquery"),
    (exp.Table, "a table reference"),
    (exp.Star, "`*`"),
    (exp.AggFunc, "an aggregate function"),
    (exp.Window, "a window function"),
    (exp.Placeholder, "a parameter placeholder"),
    (exp.Parameter, "a parameter"),
    (exp.Rand, "random()"),
    (exp.CurrentTimestamp, "current_timestamp"),
    (exp.CurrentDate, "current_date"),
    (exp.CurrentTime, "current_time"),
)


class ExpressionError(ValueError):
    """An expression is not a valid per-row DuckDB SQL expression."""


def parse_row_expression(sql: str) -> exp.Expr:
    """Parse ``sql`` as one DuckDB scalar expression over a row (else :class:`ExpressionError`)."""
    if not sql.strip():
        raise ExpressionError("the expression is empty")
    try:
        statements = sqlglot.parse(sql, read="duckdb")
    except SqlglotError as exc:
        raise ExpressionError(f"not valid SQL: {_first_line(str(exc))}") from exc
    if len(statements) != 1 or statements[0] is None:
        raise ExpressionError("write one expression, not several statements")
    tree = statements[0]
    if isinstance(tree, exp.Query | exp.Command | exp.DDL | exp.DML):
        raise ExpressionError("write an expression over the row's columns, not a statement")
    for node in tree.walk():
        for kind, label in _FORBIDDEN_NODES:
            if isinstance(node, kind):
                raise ExpressionError(f"{label} is not allowed in a per-row expression")
        if isinstance(node, exp.Func):
            name = node.sql_name().lower() if not isinstance(node, exp.Anonymous) else node.name
            if name.lower() in NONDETERMINISTIC or name.lower().startswith("read_"):
                raise ExpressionError(
                    f"{name}() is not allowed: an expression must depend on the row only"
                )
        if isinstance(node, exp.Column) and node.table:
            raise ExpressionError(
                f"{node.sql()} names a table: refer to the row's columns by their bare name"
            )
    return tree


def expression_columns(sql: str) -> set[str]:
    """Names of the columns ``sql`` refers to (it must pass :func:`parse_row_expression`)."""
    tree = parse_row_expression(sql)
    return {column.name for column in tree.find_all(exp.Column)}


def unknown_columns(sql: str, known: set[str]) -> list[str]:
    """Columns ``sql`` refers to that are not in ``known`` (unquoted names match any case)."""
    tree = parse_row_expression(sql)
    lowered = {name.lower() for name in known}
    missing: list[str] = []
    for column in tree.find_all(exp.Column):
        identifier = column.this
        quoted = bool(getattr(identifier, "quoted", False))
        name = column.name
        found = name in known if quoted else (name in known or name.lower() in lowered)
        if not found and name not in missing:
            missing.append(name)
    return missing


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text

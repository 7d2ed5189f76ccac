"""Tile rows rendered as JSON text by DuckDB, so that a read thread holds the GIL
for microseconds per tile instead of per row and cell.

Fetching a tile's rows as Python objects (``fetchall``) and converting every
cell for JSON is done with the GIL held: ~2 ms of a 5 ms query for 289 rows of
five columns, time the engine's writer thread (same process in embedded mode)
spends waiting. Here DuckDB renders each row as one JSON array
(``json_array``), the read thread fetches one string per row and joins them.

A tile query's columns are learnt once (:func:`describe_sql`, a ``LIMIT 0``
run): the rendering of each cell depends on its type. Values render as
:func:`headrace.serve.results.json_value` renders them (intervals in seconds,
BLOBs in base64, non-finite floats as null), except that DECIMALs stay exact
(a JSON number with every digit, not a float) and timestamps are ISO 8601
always with microseconds (``2026-11-29T01:55:00.000000+00:00``, in UTC for
TIMESTAMP WITH TIME ZONE). Types without a rendering here (nested types, BIT,
BIGNUM, TIME WITH TIME ZONE, ...) leave the tile to the Python path.

A description is kept until the store's catalog changes (see
``StoreReader``) or a rendering query fails. Checking the row type inside
the rendering query (``typeof`` of the row against the described one) was
measured at +0.5-0.8 ms of planning per tile query, more than the rendering
saves on small tiles; the catalog is read again once per store version
instead (~3 ms for every view of that version), and a tile whose rendering
query fails is read again at once without it (its columns taken from the
result), so a schema change never shows as an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import duckdb

# Types DuckDB's json_array renders as headrace always did (DECIMAL: exactly).
_AS_IS = re.compile(
    r"^(BOOLEAN|TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT|UTINYINT|USMALLINT|UINTEGER|UBIGINT"
    r"|UHUGEINT|VARCHAR|UUID|DATE|DECIMAL\(\d+,\s*\d+\))$"
)
_ISO_UTC = "'%Y-%m-%dT%H:%M:%S.%f+00:00'"
_ISO = "'%Y-%m-%dT%H:%M:%S.%f'"


@dataclass(frozen=True)
class TileShape:
    """A tile query's columns and how its rows render as JSON arrays.

    Filters only change a tile query's WHERE clause, so one shape serves the
    query under every filter set (see :func:`render_sql`).
    """

    columns_json: str
    """``[{"name": ..., "type": ...}, ...]`` as JSON text (DuckDB type names)."""
    cells: str | None
    """``json_array``'s arguments, one per column; None when a column's type has no
    rendering here (the tile takes the Python path)."""


def describe_sql(sql: str) -> str:
    """A statement with the columns of ``sql`` and no rows (same parameters)."""
    # S608: the SQL is the tile's configured (trusted, masked) query, no user input.
    return f"SELECT * FROM (\n{_statement(sql)}\n) LIMIT 0"  # noqa: S608


def shape_from_description(columns: list[tuple[str, str]]) -> TileShape:
    """The shape of a query with these ``(name, DuckDB type)`` columns."""
    columns_json = json.dumps(
        [{"name": name, "type": dtype} for name, dtype in columns],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    cells = [cell_expression(f"#{i}", dtype) for i, (_, dtype) in enumerate(columns, start=1)]
    if not columns or any(cell is None for cell in cells):
        return TileShape(columns_json, None)
    return TileShape(columns_json, ", ".join(c for c in cells if c is not None))


def render_sql(shape: TileShape, sql: str, limit: int) -> str | None:
    """One VARCHAR column, a JSON array per row of ``sql``, in its order, at most
    ``limit + 1`` rows (one more tells the tile was cut); None when the shape has
    no rendering. ``sql`` keeps its parameters."""
    if shape.cells is None:
        return None
    # S608: the trusted tile query and expressions made here from its column types.
    return (
        f"SELECT json_array({shape.cells})::VARCHAR "  # noqa: S608
        f"FROM (\n{_statement(sql)}\n) AS q LIMIT {int(limit) + 1}"
    )


def cell_expression(ref: str, dtype: str) -> str | None:
    """SQL rendering the column ``ref`` of type ``dtype`` for ``json_array``, or None."""
    if _AS_IS.match(dtype):
        return ref
    if dtype.startswith("ENUM("):
        return f"{ref}::VARCHAR"
    if dtype == "TIMESTAMP WITH TIME ZONE":
        return _timestamp(f"({ref} AT TIME ZONE 'UTC')", _ISO_UTC)
    if dtype in ("TIMESTAMP", "TIMESTAMP_S", "TIMESTAMP_MS", "TIMESTAMP_NS"):
        return _timestamp(f"{ref}::TIMESTAMP", _ISO)
    template = _TEMPLATES.get(dtype)
    return None if template is None else template.format(ref=ref)


# Other types with a rendering: non-finite floats are null, intervals in seconds,
# BLOBs in base64, TIME and JSON as text (TIME: DuckDB's text, e.g. 01:02:03.5).
_TEMPLATES = {
    "DOUBLE": "CASE WHEN isfinite({ref}) THEN {ref} END",
    "FLOAT": "CASE WHEN isfinite({ref}) THEN {ref} END",
    "INTERVAL": "epoch({ref})",
    "BLOB": "to_base64({ref})",
    "TIME": "{ref}::VARCHAR",
    "JSON": "{ref}::VARCHAR",
}


def _timestamp(naive: str, fmt: str) -> str:
    # Always with microseconds: one strftime per cell. Branching to leave them out
    # when zero (as Python's isoformat does) made a small tile query ~25% costlier
    # to plan and run. Infinite timestamps render as 'infinity'.
    return f"strftime({naive}, {fmt})"


def _statement(sql: str) -> str:
    """``sql`` without what may follow its end: comments and semicolons (it goes in
    parentheses). DuckDB's tokenizer tells comments from text in string literals."""
    text = sql.encode()  # the tokenizer's offsets count bytes
    end = len(text)
    for offset, kind in reversed(duckdb.tokenize(sql)):
        if kind == duckdb.token_type.comment or (
            kind == duckdb.token_type.operator and not text[offset:end].strip(b" \t\r\n;")
        ):
            end = offset
            continue
        break
    return text[:end].decode().rstrip()


def rows_json(rendered: list[tuple[str]], limit: int) -> tuple[str, bool]:
    """The JSON array of the first ``limit`` rendered rows, and whether rows were cut."""
    return "[" + ",".join([row[0] for row in rendered[:limit]]) + "]", len(rendered) > limit

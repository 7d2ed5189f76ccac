"""Statements every batch runs again, parsed once per connection.

A streamed batch is a dozen or more statements whose text is the same from one
batch to the next (the rollups' appends, the mirror's insert: only the temp
tables they read are new). DuckDB 2.0's parser costs ~0.3-1 ms a statement
of that size, a tenth of a small batch's time. :func:`execute_cached` runs a
statement as a prepared one (``PREPARE`` the first time its text is seen on a
connection, ``EXECUTE`` after), so it is parsed once. DuckDB binds and plans it
again whenever a table it reads was replaced (the batch's temp tables are, every
batch), so results always read the current tables: what is saved is the parse
(`bench replay` of a 10k/s recording: 46-52 against 50-58 ms a batch).

Only statements without parameters are cached: DuckDB's ``EXECUTE`` takes
literals, not ``?`` parameters. Prepared statements belong to their connection
and outlive a rolled back transaction; a failing one raises the error the
statement raises when executed directly (without its pointer into the text).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Final
from weakref import WeakKeyDictionary

import duckdb

MAX_CACHED: Final = 256
"""Prepared statements kept per connection; past it the cache starts afresh (the texts
of a stream's batches repeat, so this is reached only when they stop repeating)."""

_caches: WeakKeyDictionary[duckdb.DuckDBPyConnection, dict[str, str]] = WeakKeyDictionary()
_names = itertools.count(1)


def execute_cached(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[object] | None = None
) -> duckdb.DuckDBPyConnection:
    """``con.execute(sql, params)``, as a prepared statement when ``params`` is empty."""
    if params:
        return con.execute(sql, params)
    cache = _caches.get(con)
    if cache is None:
        cache = _caches[con] = {}
    name = cache.get(sql)
    if name is None:
        if len(cache) >= MAX_CACHED:
            for old in cache.values():
                con.execute(f"DEALLOCATE {old}")
            cache.clear()
        name = f"_hr_prepared_{next(_names)}"
        con.execute(f"PREPARE {name} AS {sql}")
        cache[sql] = name
    return con.execute(f"EXECUTE {name}")


def prepared_text(con: duckdb.DuckDBPyConnection, query: str) -> str | None:
    """The statement behind ``query`` when it is an ``EXECUTE`` of this module's on ``con``
    (for timings that name statements by their text), else None."""
    if not query.startswith("EXECUTE _hr_prepared_"):
        return None
    name = query.removeprefix("EXECUTE ")
    return next((sql for sql, known in _caches.get(con, {}).items() if known == name), None)


def cached_statements(con: duckdb.DuckDBPyConnection) -> int:
    """How many prepared statements :func:`execute_cached` keeps for ``con``."""
    return len(_caches.get(con, {}))

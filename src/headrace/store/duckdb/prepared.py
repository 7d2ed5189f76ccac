"""Statements every batch runs again, parsed once per connection.

A streamed batch is a dozen or more statements whose text is the same from one
batch to the next (the rollups' appends, the mirror's insert: only the temp
tables they read are new). DuckDB 2.0's parser costs ~0.3-1 ms a statement
of that size, a tenth of a small batch's time. :func:`execute_cached` runs a
statement as a prepared one (``PREPARE`` the second time its text is seen on a
connection, ``EXECUTE`` from then on), so it is parsed once. DuckDB binds and plans it
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
"""Prepared statements kept per connection; past it the oldest is dropped (the texts of
a stream's batches repeat, so this is reached only when they stop repeating)."""


class _Cache:
    """One connection's prepared statements, and the texts seen once."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.seen: dict[str, None] = {}


_caches: WeakKeyDictionary[duckdb.DuckDBPyConnection, _Cache] = WeakKeyDictionary()
_names = itertools.count(1)


def execute_cached(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[object] | None = None
) -> duckdb.DuckDBPyConnection:
    """``con.execute(sql, params)``; as a prepared statement from the second time the
    same text runs without ``params`` on ``con`` (a text run once, e.g. with a literal
    that changes, is not worth the ``PREPARE``)."""
    if params:
        return con.execute(sql, params)
    cache = _caches.get(con)
    if cache is None:
        cache = _caches[con] = _Cache()
    name = cache.names.get(sql)
    if name is None:
        if sql not in cache.seen:
            cache.seen[sql] = None
            if len(cache.seen) > MAX_CACHED:
                del cache.seen[next(iter(cache.seen))]
            return con.execute(sql)
        del cache.seen[sql]
        if len(cache.names) >= MAX_CACHED:
            oldest = next(iter(cache.names))
            con.execute(f"DEALLOCATE {cache.names.pop(oldest)}")
        name = f"_hr_prepared_{next(_names)}"
        con.execute(f"PREPARE {name} AS {sql}")
        cache.names[sql] = name
    return con.execute(f"EXECUTE {name}")


def prepared_text(con: duckdb.DuckDBPyConnection, query: str) -> str | None:
    """The statement behind ``query`` when it is an ``EXECUTE`` of this module's on ``con``
    (for timings that name statements by their text), else None."""
    if not query.startswith("EXECUTE _hr_prepared_"):
        return None
    name = query.removeprefix("EXECUTE ")
    cache = _caches.get(con)
    names = cache.names.items() if cache is not None else ()
    return next((sql for sql, known in names if known == name), None)


def cached_statements(con: duckdb.DuckDBPyConnection) -> int:
    """How many prepared statements :func:`execute_cached` keeps for ``con``."""
    cache = _caches.get(con)
    return len(cache.names) if cache is not None else 0

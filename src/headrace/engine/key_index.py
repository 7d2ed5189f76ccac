"""An ART index on a mirror's key, so that a small batch over a large mirror finds its
rows without scanning the whole mirror (``store.mirror_key_index``).

Without it, a batch's start rows come from one ``DELETE … USING keys … RETURNING``
(:func:`~headrace.engine.resolve.take_start_rows`): a hash join whose probe side is a
scan of the mirror's key column, about 5-10 ns a row. That is cheap for recent keys
(DuckDB skips the row groups outside the keys' range) and for large batches, but
uniformly random updates touch every row group, so at a steady rate each batch costs
in proportion to the table's size. Measured with `bench replay` of 10k changes/s
recordings (~1,000 touched keys a batch): that statement 55 ms a batch over a 5M-row
mirror (62% of the batch) and 14 ms over 1M rows; through the index, 13.6 and 9.6 ms.

DuckDB 2.0.1 uses an ART index for a constant ``IN`` list (not for ``= ANY(?)`` or a
join), so the lookup is ``DELETE … WHERE key IN (k1, k2, …) RETURNING *``, for batches
of at most :data:`MAX_KEYS` keys; a larger batch scans as before (thousands of
constants cost more to plan than the scan). Only a single integer key qualifies: its
values render as literals exactly.

The price is paid by every write: each appended and deleted mirror row updates the
index (`bench replay` of a 100k changes/s recording: 28% more CPU a batch), and a
checkpoint writes it (about 1.7x longer). Off by default; worth it for tables of
millions of rows updated at random at moderate rates.

DuckDB refuses ``ALTER COLUMN … TYPE`` on an indexed table, even in the transaction
that dropped the index: a batch that changes a column's type has the index dropped in a
transaction of its own first
(:func:`~headrace.engine.schema_change.indexes_in_the_way`), and the next start builds
it again. So does a batch in pieces (a huge transaction, whose later pieces are not seen
in advance); the index would not serve its thousands of keys anyway.
"""

from __future__ import annotations

import logging
import time

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from headrace.engine.tables import TableModel
from headrace.pipeline.model import quote_ident
from headrace.store.duckdb.schema import MIRROR, table_label

log = logging.getLogger(__name__)

MAX_KEYS = 4000
"""Most touched keys a batch looks up through the index; a larger batch scans."""

INTEGER_TYPES = frozenset(
    {
        "TINYINT",
        "SMALLINT",
        "INTEGER",
        "BIGINT",
        "HUGEINT",
        "UTINYINT",
        "USMALLINT",
        "UINTEGER",
        "UBIGINT",
    }
)


def index_name(model: TableModel) -> str:
    """The index's name (in the mirror schema)."""
    return quote_ident(f"{table_label(model.ref)}__hr_key")


def indexable(model: TableModel) -> bool:
    """A mirrored table whose key is one integer column."""
    if not model.config.mirror or len(model.key) != 1:
        return False
    column = model.column(model.key[0])
    return column is not None and column.duck_type.upper() in INTEGER_TYPES


def sync_key_index(con: duckdb.DuckDBPyConnection, model: TableModel, *, enabled: bool) -> None:
    """Create the index when ``enabled`` and the table qualifies, else drop it if present;
    :attr:`TableModel.key_index` says which."""
    name = f"{MIRROR}.{index_name(model)}"
    if enabled and indexable(model):
        started = time.monotonic()
        con.execute(
            f"CREATE INDEX IF NOT EXISTS {index_name(model)} ON {model.mirror} "
            f"({quote_ident(model.key[0])})"
        )
        seconds = time.monotonic() - started
        if seconds > 1.0:
            log.info("index on the key of %s built in %.1f s", model.mirror, seconds)
        model.key_index = True
        return
    con.execute(f"DROP INDEX IF EXISTS {name}")
    model.key_index = False


def keys_in_list(model: TableModel, keys: pa.Array | pa.ChunkedArray) -> str | None:
    """``key IN (…)`` over ``keys`` (the batch's touched keys) when the index can serve
    them, else None (no index, none or too many keys, or keys that are not integers)."""
    if not model.key_index or not 0 < len(keys) <= MAX_KEYS:
        return None
    if not pa.types.is_integer(keys.type):
        return None  # never a literal that is not an integer
    values = pc.drop_null(keys).to_pylist()
    if not values:
        return None
    return f"{quote_ident(model.key[0])} IN ({', '.join(map(str, values))})"

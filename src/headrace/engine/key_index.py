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
join), so the lookup is ``DELETE … WHERE key IN (k1, k2, …) RETURNING *``. Planning
the constants is most of its cost, ~15-20 µs a key, so it serves a batch of at most one
key per :data:`ROWS_PER_KEY` rows of the mirror (800 keys over 2M rows, 2,000 over 5M,
never more than :data:`MAX_KEYS`); a larger batch scans as before. Only a single
integer key qualifies: its values render as literals exactly.

The price is paid by every write: each appended and deleted mirror row updates the
index (`bench replay` of a 100k changes/s recording: 28% more CPU a batch), and a
checkpoint writes it (about 1.7x longer). Worth it for tables of millions of rows
updated at random at moderate rates, hence ``auto`` below.

DuckDB refuses ``ALTER COLUMN … TYPE`` on an indexed table, even in the transaction
that dropped the index: a batch that changes a column's type has the index dropped in a
transaction of its own first
(:func:`~headrace.engine.schema_change.indexes_in_the_way`), and it is built again
between batches (:class:`KeyIndexKeeper`: ``true`` at once, ``auto`` at its next review).
So does a batch in pieces (a huge
transaction, whose later pieces are not seen in advance); the index would not serve its
thousands of keys anyway.

``auto`` (the default) keeps the index where it pays: on a mirror of at least
``store.mirror_key_index_rows`` rows, while at least half of the table's batches
(judged every :data:`REVIEW_S` seconds, over at least :data:`REVIEW_BATCHES` of them)
have few enough keys to use it. A snapshot that fills a mirror past that size builds it
at once (in bulk, before the stream starts); a backlog or a high rate (large batches)
drops it, and an append-only table (batches of new keys only, which never read the
mirror) loses it. Building it costs about 0.13 s a million rows (DuckDB 2.0.1, 2
threads), a stall of the writer once per switch, and a checkpoint right after: DuckDB
logs a new index whole in its WAL (40 MB for 5M keys).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Literal

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from headrace.engine.tables import TableModel
from headrace.pipeline.model import quote_ident
from headrace.store.duckdb.schema import META, MIRROR, key_index_label

log = logging.getLogger(__name__)

MAX_KEYS = 4000
"""Most touched keys a batch looks up through the index, whatever the mirror's size; a
larger batch scans."""

ROWS_PER_KEY = 2_500
"""Mirror rows whose scan costs what one key taken through the index does: DuckDB 2.0.1
spends ~15-20 µs a key of an ``IN`` list (binding and optimizing the constants, more
than the lookups), and scans a mirror's key column at ~6-8 ns a row. Measured (one
thread, rows in random key order, the whole ``DELETE … RETURNING``): the index is
cheaper up to ~770 keys over 2M rows (1,000 keys: 20.5 against 16.3 ms) and up to
~1,900 over 5M (2,000 keys: 36.2 against 33.7 ms). So a batch takes the index for at
most ``rows // ROWS_PER_KEY`` keys (:func:`max_keys`)."""

REVIEW_S = 10.0
"""Seconds between ``auto``'s reviews of the tables' batches."""

REVIEW_BATCHES = 10
"""Fewest batches of a table ``auto`` judges by; a table with fewer counted goes on
counting until a later review."""

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
    """The index's name (in the mirror schema), quoted."""
    return quote_ident(key_index_label(model.ref))


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


def max_keys(rows: int) -> int:
    """Most touched keys a batch takes through the index of a mirror of ``rows`` rows:
    more cost more than a scan (:data:`ROWS_PER_KEY`), and never above :data:`MAX_KEYS`."""
    return min(MAX_KEYS, rows // ROWS_PER_KEY)


def keys_in_list(model: TableModel, keys: pa.Array | pa.ChunkedArray) -> str | None:
    """``key IN (…)`` over ``keys`` (the batch's touched keys) when the index can serve
    them, else None (no index, none or too many keys for the mirror's size, or keys that
    are not integers)."""
    if not model.key_index or not 0 < len(keys) <= model.key_index_keys:
        return None
    if not pa.types.is_integer(keys.type):
        return None  # never a literal that is not an integer
    values = pc.drop_null(keys).to_pylist()
    if not values:
        return None
    return f"{quote_ident(model.key[0])} IN ({', '.join(map(str, values))})"


def count_lookup(model: TableModel, keys: int | None) -> None:
    """Count a batch's lookup of ``model``'s start rows for ``auto``: one of ``keys``
    touched keys the index would serve, or (None, too many keys) one it would not: the
    keys of an insert-only batch or a truncate are never looked up."""
    if keys is not None and 0 < keys <= model.key_index_keys:
        model.key_lookups[0] += 1
    else:
        model.key_lookups[1] += 1


def index_exists(con: duckdb.DuckDBPyConnection, model: TableModel) -> bool:
    """The store holds ``model``'s key index (from an earlier run)."""
    found = con.execute(
        "SELECT count(*) FROM duckdb_indexes() WHERE schema_name = ? AND index_name = ?",
        [MIRROR, key_index_label(model.ref)],
    ).fetchall()
    return bool(found[0][0])


class KeyIndexKeeper:
    """Which mirrors have the key index (``store.mirror_key_index``): set at start, at a
    table's first sight (:meth:`at_load`) and after a snapshot (:meth:`after_snapshot`),
    reviewed between batches (:meth:`review`)."""

    def __init__(self, mode: bool | Literal["auto"], min_rows: int) -> None:
        self.mode = mode
        self.min_rows = min_rows
        self.review_s = REVIEW_S
        """Seconds between ``auto``'s reviews (tests shorten it)."""
        self._reviewed = time.monotonic()

    @staticmethod
    def measure(con: duckdb.DuckDBPyConnection, models: Iterable[TableModel]) -> dict[str, int]:
        """The mirrors' rows (``headrace.tables``), and from them each model's
        :attr:`~headrace.engine.tables.TableModel.key_index_keys`."""
        rows = {
            str(name): int(count or 0)
            for name, count in con.execute(f"SELECT table_name, rows FROM {META}.tables").fetchall()
        }
        for model in models:
            model.key_index_keys = max_keys(rows.get(model.name, 0))
        return rows

    def at_load(self, con: duckdb.DuckDBPyConnection, model: TableModel) -> None:
        """``true`` and ``false`` build or drop the index now; ``auto`` keeps what the
        store holds (its reviews decide from the batches that follow). The key bound
        comes from :meth:`measure`, once for all loaded tables (a new table has none)."""
        if self.mode == "auto":
            keep = indexable(model) and index_exists(con, model)
            sync_key_index(con, model, enabled=keep)
        else:
            sync_key_index(con, model, enabled=self.mode)

    def after_snapshot(
        self, con: duckdb.DuckDBPyConnection, models: Iterable[TableModel], rows: dict[str, int]
    ) -> bool:
        """Index the mirrors a snapshot just filled (their index, if any, was dropped for
        the bulk load): with ``true`` all of them, with ``auto`` those of at least
        ``min_rows`` ``rows`` (a bulk build costs less now than during the stream; the
        reviews drop it if the batches turn out too large to use it). Whether any was
        built."""
        built = False
        for model in models:
            loaded = rows.get(model.name, 0)
            model.key_index_keys = max_keys(loaded)
            if indexable(model) and (
                self.mode is True or (self.mode == "auto" and loaded >= self.min_rows)
            ):
                sync_key_index(con, model, enabled=True)
                built = True
        return built

    def due(self, models: Iterable[TableModel], now: float) -> bool:
        """A :meth:`review` would have something to do (no transaction otherwise)."""
        if self.mode is False:
            return False
        if self.mode is True and any(not m.key_index and indexable(m) for m in models):
            return True
        return now - self._reviewed >= self.review_s  # the mirrors' sizes, at least

    def review(
        self, con: duckdb.DuckDBPyConnection, models: Iterable[TableModel], now: float
    ) -> list[tuple[TableModel, bool]]:
        """Build or drop indexes as the mode says, in ``con``'s transaction, after
        reading the mirrors' sizes (:meth:`measure`). With ``true``, build the indexes
        a type change or a batch in pieces dropped. With ``auto``, judge each table by
        its rows and the batches counted since its last judgement (at least
        :data:`REVIEW_BATCHES`): the index is wanted on a mirror of ``min_rows`` rows or
        more when at least half of them could use it. The tables changed, and whether
        they now have the index."""
        changed: list[tuple[TableModel, bool]] = []
        if self.mode is False:
            return changed
        models = [model for model in models if indexable(model)]
        self._reviewed = now
        rows = self.measure(con, models)
        if self.mode is True:
            for model in models:
                if not model.key_index:
                    sync_key_index(con, model, enabled=True)
                    changed.append((model, True))
            return changed
        for model in models:
            if sum(model.key_lookups) < REVIEW_BATCHES:
                continue
            served, other = model.key_lookups
            model.key_lookups[:] = [0, 0]
            mirror_rows = rows.get(model.name, 0)
            want = mirror_rows >= self.min_rows and served >= other
            if want == model.key_index:
                continue
            sync_key_index(con, model, enabled=want)
            log.info(
                "index on the key of %s %s: %d rows, %d of %d batches could use it",
                model.mirror,
                "built" if want else "dropped",
                mirror_rows,
                served,
                served + other,
            )
            changed.append((model, want))
        return changed

"""One table's changes in a batch → full row versions, and the batch's net effect.

Everything runs as DuckDB SQL over the batch's Arrow table (no per-row
Python); :mod:`headrace.engine.batch_changes` loads the changes (and, from
Arrow, the touched keys when it can), this module's steps build the rest. For
table number ``i`` of a batch:

``_hr_c_i`` (changes; ``_hr_cv_i`` when a view over the Arrow table, see
:data:`~headrace.engine.batch_changes.VIEW_CHANGES`)
    one row per change in batch order: meta columns, the old key
    (``_hr_ok_<j>``: the key the change removes or modifies), every known
    column (for deletes: the old values the source sent), and the engine's
    hidden columns. Unchanged TOAST values and the commit-time event time
    are *inherited* from the row's previous version (:mod:`.inherit`).

``_hr_k_i`` (touched keys)
    every key a change inserted, modified or removed after the batch's last
    truncate, with its last touch.

``_hr_s_i`` / ``_hr_e_i`` (start / end rows)
    the mirror rows of the touched keys before the batch (all rows when the
    batch truncates the table; none, without reading the mirror, when every
    change inserts a row under a key the source keeps unique), and the row
    versions alive at the end of the batch. Every aggregate is a function of
    the table's current rows, so ``end - start`` is exactly the batch's
    effect, however many times a key changed in between (insert → update →
    delete, key-moving updates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import pyarrow as pa

from headrace.engine.key_index import count_lookup, keys_in_list
from headrace.engine.tables import TableModel
from headrace.pipeline.model import quote_ident
from headrace.source.changes import (
    OP,
    SEQ,
)
from headrace.store.duckdb.arrow_scan import hold_arrow
from headrace.store.duckdb.results import rows_written


@dataclass
class TableWork:
    """The temp tables and figures of one table in one batch (segment)."""

    model: TableModel
    index: int
    num_changes: int = 0
    last_lsn: int = 0
    last_commit_ts: datetime | None = None
    truncated_at: int | None = None
    updates: int = 0
    deletes: int = 0
    toasted: int = 0
    has_prev: bool = False
    only_new_keys: bool = False
    """Every change inserts a row and the key is one the source keeps unique (its
    replica identity, or more columns): no touched key is in the mirror, so the
    start rows are empty without a scan of the mirror (append-only tables)."""
    start_rows: int = 0
    """Rows in ``start`` / ``end`` (set by :func:`take_start_rows` / :func:`compute_net`)."""
    end_rows: int = 0
    touched_keys: pa.Table | None = None
    """The touched keys computed on the Arrow columns by :func:`load_changes`, when it
    could (held as ``keys`` instead of a CREATE TABLE AS: a statement less)."""
    keep_nothing: bool = False
    """A piece of a batch applied in pieces: its Arrow tables go in so that DuckDB does
    not keep them to the end of the long transaction (:mod:`~headrace.store.duckdb.arrow_scan`)."""
    changes_view: bool = False
    """The changes are a view over the registered Arrow table (:attr:`changes_input`)
    instead of a temp table: no statement rewrites them (no inherited values to fill),
    and copying a batch's changes costs more than the scans that read them."""

    @property
    def changes(self) -> str:
        # A view cannot replace a temp table of an earlier batch, hence two names.
        return f"_hr_cv_{self.index}" if self.changes_view else f"_hr_c_{self.index}"

    @property
    def changes_input(self) -> str:
        """The registered Arrow table :attr:`changes` reads when it is a view."""
        return f"_hr_ci_{self.index}"

    @property
    def prev(self) -> str:
        return f"_hr_p_{self.index}"

    @property
    def keys(self) -> str:
        # A registered Arrow table cannot share a name with a temp table of an
        # earlier batch, hence two names.
        prefix = "_hr_ka" if self.touched_keys is not None else "_hr_k"
        return f"{prefix}_{self.index}"

    @property
    def start(self) -> str:
        return f"_hr_s_{self.index}"

    @property
    def end(self) -> str:
        return f"_hr_e_{self.index}"


@dataclass
class LookupJoins:
    """How a fact table's end rows get their looked-up values: the value expression of
    each lookup column and the joins it needs (aliases over the changes ``c``)."""

    values: dict[str, str] = field(default_factory=dict)
    joins: list[str] = field(default_factory=list)


END = "_hr_end"
"""In ``_hr_c_i`` when the touched keys came from Arrow: whether the change is its
key's end row (the new side of the key's last touch)."""


def old_key(j: int) -> str:
    """Name of the ``j``-th old-key column in ``_hr_c_i``."""
    return f"_hr_ok_{j}"


def _touched_keys_sql(con: duckdb.DuckDBPyConnection, work: TableWork) -> None:
    """``_hr_k_i`` in SQL (see :func:`_touched_keys` for when it is needed)."""
    model, c = work.model, work.changes
    keys = [quote_ident(k) for k in model.key]
    olds = [old_key(j) for j in range(len(model.key))]
    after = f" AND {SEQ} > {work.truncated_at}" if work.truncated_at is not None else ""
    old_as_key = ", ".join(f"{o} AS {k}" for o, k in zip(olds, keys, strict=True))
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {work.keys} AS
        SELECT {", ".join(keys)}, max({SEQ} * 2 + _hr_side) AS _hr_last FROM (
            SELECT {old_as_key}, {SEQ}, 0 AS _hr_side FROM {c} WHERE {OP} IN ('U', 'D'){after}
            UNION ALL
            SELECT {", ".join(keys)}, {SEQ}, 1 AS _hr_side FROM {c} WHERE {OP} IN ('I', 'U'){after}
        ) WHERE {" AND ".join(f"{k} IS NOT NULL" for k in keys)}
        GROUP BY {", ".join(keys)}"""
    )


def compute_net(
    con: duckdb.DuckDBPyConnection, work: TableWork, lookups: LookupJoins | None = None
) -> None:
    """Create the touched keys and end rows of a mirrored table (the end rows with their
    looked-up values, see :func:`~headrace.engine.lookup.lookup_joins`); the start rows
    come after every table's end rows (:func:`take_start_rows`)."""
    model, c = work.model, work.changes
    if work.touched_keys is not None:
        hold_arrow(con, work.keys, work.touched_keys, keep_nothing=work.keep_nothing)
    else:
        _touched_keys_sql(con, work)
    joined = lookups or LookupJoins()
    columns = ", ".join(
        f"{joined.values[n]} AS {quote_ident(n)}" if n in joined.values else f"c.{quote_ident(n)}"
        for n, _ in model.mirror_columns()
    )
    ends = (
        f"c.{END}"
        if work.touched_keys is not None
        else f"c.{OP} IN ('I', 'U') AND c.{SEQ} * 2 + 1 IN (SELECT _hr_last FROM {work.keys})"
    )
    # CREATE TABLE AS returns its row count: start and end sizes come for free.
    work.end_rows = rows_written(
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE {work.end} AS
            SELECT {columns}, c.{SEQ} FROM {c} c {" ".join(joined.joins)}
            WHERE {ends}"""
        )
    )


def take_start_rows(con: duckdb.DuckDBPyConnection, work: TableWork) -> None:
    """Create the start rows of a mirrored table: its touched keys' mirror rows (after a
    truncate in the batch: all of them), taken out of the mirror.

    One ``DELETE … RETURNING`` reads and removes them in one scan of the mirror,
    where a semi join and a later ``DELETE`` scanned it twice (30,000 keys in a
    3M-row mirror: 17 against 30 ms). So this runs after every statement of the
    batch that reads the mirror as it was (inherited values, looked-up values, end
    rows), and the history reads deleted rows' values from the start rows.
    """
    model = work.model
    keys = work.touched_keys if work.truncated_at is None else None
    indexed = keys_in_list(model, keys.column(model.key[0])) if keys is not None else None
    count_lookup(model, None if keys is None or work.only_new_keys else keys.num_rows)
    if work.only_new_keys:
        # Planned as an empty result: the mirror is not read.
        source = f"SELECT * FROM {model.mirror} LIMIT 0"
    elif indexed is not None:
        # Through the key's index (see headrace.engine.key_index), not a scan.
        source = (
            f"WITH taken AS (DELETE FROM {model.mirror} WHERE {indexed} RETURNING *) "
            "SELECT * FROM taken"
        )
    else:
        on = " AND ".join(f"m.{quote_ident(k)} = k.{quote_ident(k)}" for k in model.key)
        where = "" if work.truncated_at is not None else f" USING {work.keys} k WHERE {on}"
        source = (
            f"WITH taken AS (DELETE FROM {model.mirror} m{where} RETURNING m.*) SELECT * FROM taken"
        )
    work.start_rows = rows_written(
        con.execute(f"CREATE OR REPLACE TEMP TABLE {work.start} AS {source}")
    )

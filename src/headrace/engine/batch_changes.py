"""One table's changes in a batch, prepared in Arrow and loaded into DuckDB.

:func:`load_changes` turns a table's Arrow changes into the ``_hr_c_i`` changes
(a temp table, or a view over the Arrow table from :data:`VIEW_CHANGES` changes)
and, where Arrow can tell, the touched keys and which change is each key's end
row, so that the SQL steps of :mod:`headrace.engine.resolve` start from them.
Vectorized Arrow and numpy only: no per-row Python.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from headrace.engine.op_codes import OpCodes
from headrace.engine.resolve import END, TableWork, old_key
from headrace.engine.tables import TableModel
from headrace.engine.touched_keys import LAST, KeySide, last_touches
from headrace.engine.types import duckdb_type, storable_table
from headrace.pipeline.model import quote_ident
from headrace.source.changes import (
    COMMIT_TS,
    LSN,
    META_FIELDS,
    OLD_KIND,
    OP,
    SEQ,
    TOAST,
    XID,
    TableSchema,
)
from headrace.store.duckdb.arrow_scan import create_temp_table, create_temp_view
from headrace.store.duckdb.schema import EVENT_TS


def transaction_starts(tables: list[pa.Table]) -> pa.Table:
    """Each transaction's first change in a batch (commit LSN → ``_hr_first``, the
    smallest ``_hr_seq`` over every table), for per-transaction ordinals."""
    parts = [t.select([LSN, SEQ]) for t in tables if t.num_rows]
    if not parts:
        return pa.table({LSN: pa.array([], pa.uint64()), "_hr_first": pa.array([], pa.int64())})
    runs = [_lsn_runs(part) for part in parts]
    if all(run is not None for run in runs):
        # Each table's changes in commit order (as the source hands them): a
        # transaction's first change is where its commit LSN starts, so only those
        # (a few thousand at most) are grouped, not every change (1.3 against 3.5-4.2 ms
        # for a 133,000-change batch).
        parts = [run for run in runs if run is not None]
    grouped = pa.concat_tables(parts).group_by(LSN).aggregate([(SEQ, "min")])
    return pa.table({LSN: grouped[LSN], "_hr_first": grouped[f"{SEQ}_min"]})


def _lsn_runs(part: pa.Table) -> pa.Table | None:
    """The first row of each run of equal commit LSNs in ``part`` (``LSN`` and ``SEQ``),
    or None when its rows are not in commit order (then only grouping every row is right)."""
    lsn, seq = part[LSN].to_numpy(), part[SEQ].to_numpy()
    in_order = bool(np.all(lsn[1:] >= lsn[:-1])) and bool(np.all(seq[1:] > seq[:-1]))
    if not in_order:
        return None
    firsts = np.flatnonzero(np.r_[True, lsn[1:] != lsn[:-1]])
    return part.take(pa.array(firsts))


def earliest_starts(known: pa.Table | None, tables: list[pa.Table]) -> pa.Table:
    """:func:`transaction_starts` of ``tables`` joined with those ``known`` from earlier
    pieces of the same batch: a transaction keeps the first change seen of it."""
    found = transaction_starts(tables)
    if known is None or not known.num_rows:
        return found
    if not found.num_rows:
        return known
    grouped = pa.concat_tables([known, found]).group_by(LSN).aggregate([("_hr_first", "min")])
    return pa.table({LSN: grouped[LSN], "_hr_first": grouped["_hr_first_min"]})


def positional(
    schema: TableSchema, data: pa.Table
) -> tuple[pa.Table, dict[str, str], dict[str, str]]:
    """``data`` with the row columns renamed by position (``_hr_n<i>`` new, ``_hr_o<i>`` old).

    Column names cannot collide with the change metadata that way (a source
    column named ``kind`` has its old value in a column named like
    ``_hr_oldkind``, the old-kind marker).
    """
    count = len(schema.columns)
    names = [f.name for f in META_FIELDS]
    names += [f"_hr_n{i}" for i in range(count)]
    names += [OLD_KIND, *(f"_hr_o{i}" for i in range(count)), TOAST]
    if data.num_columns != len(names):
        raise ValueError(
            f"changes of {schema.table} have {data.num_columns} columns, "
            f"the change layout of {count} table columns has {len(names)}"
        )
    new = {c.name: f"_hr_n{i}" for i, c in enumerate(schema.columns)}
    old = {c.name: f"_hr_o{i}" for i, c in enumerate(schema.columns)}
    return data.rename_columns(names), new, old


VIEW_CHANGES = 20_000
"""From this many changes of a table in a batch, its changes are a view over the Arrow
table instead of a temp table (:attr:`TableWork.changes_view`). Measured with ``bench
replay``: at 71k changes (``bench pipeline --rate 100000``) the copy is 20-25 ms of a
180 ms batch and the view reads cost no more; at a few hundred (the fintech
deployment, whose lookups and jobs read a table's changes up to 4 times) each view read
costs 1-2 ms more than a temp table's, more than the copy saves. Between the two it was
not measured, so the fintech deployment's largest batches (a backlog after a checkpoint
at 5,000 transactions/s: ~15k ledger entries, estimated) stay below; the same size as
``store.parallel_batch_changes``."""


def load_changes(
    con: duckdb.DuckDBPyConnection,
    model: TableModel,
    schema: TableSchema,
    data: pa.Table,
    index: int,
    *,
    transactions: pa.Table,
    keep_nothing: bool = False,
) -> TableWork:
    """Create ``_hr_c_<index>`` from a table's Arrow changes and measure the batch
    (``transactions``: the batch's :func:`transaction_starts`; ``keep_nothing``: inside
    a long store transaction, see :func:`~headrace.store.duckdb.arrow_scan.create_temp_table`).

    The per-row choices (a delete's values are its old ones; the old key of an
    update or delete) are made on the Arrow columns: planning a SQL statement
    costs about 0.1 ms per expression, and a CASE per column per batch adds up.
    """
    work = TableWork(model, index, keep_nothing=keep_nothing)
    data = in_sequence(data)
    ops = OpCodes(data[OP])
    _measure(work, data, ops)
    work.only_new_keys = _only_new_keys(work, schema)
    data, new_names, old_names = positional(schema, storable_table(data))
    columns: dict[str, pa.ChunkedArray] = {
        name: data[name] for name in (SEQ, OP, LSN, COMMIT_TS, XID)
    }
    columns["_hr_txseq"] = _transaction_ordinals(transactions, data)
    parts = [SEQ, OP, LSN, COMMIT_TS, XID, "CAST(_hr_txseq AS INTEGER) AS _hr_txseq"]
    parts += _old_keys(work, data, ops, (new_names, old_names), columns)
    parts += _row_values(work, data, ops, (new_names, old_names), columns)
    columns[TOAST] = data[TOAST]
    parts.append(TOAST)
    if model.commit_time:
        no_time = pa.nulls(len(data), data.schema.field(COMMIT_TS).type)
        columns[EVENT_TS] = pc.if_else(pa.array(ops.mask("I")), data[COMMIT_TS], no_time)
        parts.append(EVENT_TS)
    for name in model.lookups:
        parts.append(f"CAST(NULL AS {model.lookup_types[name]}) AS {quote_ident(name)}")
    work.touched_keys = _touched_keys(work, data, ops, columns)
    if work.touched_keys is not None:
        columns[END] = _end_rows(data[SEQ], work.touched_keys[LAST])
        parts.append(END)
    work.changes_view = (
        work.num_changes >= VIEW_CHANGES and not keep_nothing and not _fills_inherited(work)
    )
    if work.changes_view:
        create_temp_view(con, work.changes, ", ".join(parts), pa.table(columns), work.changes_input)
    else:
        create_temp_table(
            con, work.changes, ", ".join(parts), pa.table(columns), keep_nothing=keep_nothing
        )
    return work


def _fills_inherited(work: TableWork) -> bool:
    """Whether :func:`~headrace.engine.inherit.fill_inherited` will rewrite the changes
    (``_measure`` has run)."""
    model = work.model
    return model.config.mirror and (work.toasted > 0 or (model.commit_time and work.updates > 0))


def in_sequence(data: pa.Table) -> pa.Table:
    """``data`` ordered by ``_hr_seq``.

    A :class:`~headrace.source.changes.TableChanges` is in commit order already (the
    source sorts what it concatenates, merged batches are concatenated in order), so
    this only guards batches built otherwise: checking is a pass over one integer
    column, where reordering takes every column (about 8% of the writer's time at
    100,000 changes/s).
    """
    if data.num_rows <= 1:
        return data
    seq = data[SEQ].to_numpy()
    if bool(np.all(seq[1:] >= seq[:-1])):
        return data
    return data.sort_by(SEQ)


def _old_keys(
    work: TableWork,
    data: pa.Table,
    ops: OpCodes,
    names: tuple[dict[str, str], dict[str, str]],
    columns: dict[str, pa.ChunkedArray],
) -> list[str]:
    """The old-key columns (added to ``columns``); their SQL select parts."""
    model = work.model
    new_names, old_names = names
    # The old key is sent (for updates) only when it changed; key columns are
    # never NULL, so "all old key values present" is the test (it does not
    # depend on the old-kind marker).
    present = [pc.is_valid(data[old_names[k]]) for k in model.key if k in old_names]
    sent = _all(present) if present else None
    changed = work.updates or work.deletes
    updated_or_deleted = pa.array(ops.mask("U", "D")) if changed else None
    parts = []
    for j, key in enumerate(model.key):
        name = old_key(j)
        key_column = model.column(key)
        key_type = key_column.duck_type if key_column is not None else "VARCHAR"
        if key in new_names and updated_or_deleted is not None:
            old, new = data[old_names[key]], data[new_names[key]]
            chosen = pc.if_else(sent, old, new) if sent is not None else new
            columns[name] = pc.if_else(updated_or_deleted, chosen, pa.nulls(len(data), old.type))
            parts.append(_typed(name, duckdb_type(old.type), key_type))
        else:
            parts.append(f"CAST(NULL AS {key_type}) AS {name}")
    return parts


def _row_values(
    work: TableWork,
    data: pa.Table,
    ops: OpCodes,
    names: tuple[dict[str, str], dict[str, str]],
    columns: dict[str, pa.ChunkedArray],
) -> list[str]:
    """Each table column's value per change (added to ``columns``); the select parts."""
    model = work.model
    new_names, old_names = names
    deleted = pa.array(ops.mask("D")) if work.deletes else None
    # Without a mirror, an unchanged TOAST value can only come from a whole old
    # row (REPLICA IDENTITY FULL); otherwise it stays NULL.
    whole_old = pc.equal(data[OLD_KIND], "O") if work.toasted and not model.config.mirror else None
    parts = []
    for number, column in enumerate(model.columns):
        name, target = column.name, column.duck_type
        if name not in new_names:
            parts.append(f"CAST(NULL AS {target}) AS {quote_ident(name)}")
            continue
        new, old = data[new_names[name]], data[old_names[name]]
        if whole_old is not None:
            kept = pc.fill_null(pc.and_(whole_old, _lists_contain(data[TOAST], name)), False)
            new = pc.if_else(kept, old, new)
        # A delete's new values are NULL (the change model's contract), so where no old
        # value came (a column outside the replica identity) the new column is already
        # right: no copy (6 of a 133,000-change batch's ~37 ms here went to copies).
        if deleted is None or old.null_count == len(old):
            value = new
        else:
            value = pc.if_else(deleted, old, new)
        slot = f"_hr_v{number}"
        columns[slot] = value
        parts.append(_typed(slot, duckdb_type(value.type), target, quote_ident(name)))
    return parts


def _touched_keys(
    work: TableWork, data: pa.Table, ops: OpCodes, columns: dict[str, pa.ChunkedArray]
) -> pa.Table | None:
    """Every key a change inserted, modified or removed (after the batch's last
    truncate), with its last touch ``_hr_last`` (``seq * 2``, + 1 for the new key),
    from the Arrow columns; None when SQL must do it (a key value to inherit from an
    unchanged TOAST value, or a key column whose Arrow type needs a cast)."""
    model = work.model
    if work.toasted or not model.config.mirror:
        return None
    positions = {column.name: number for number, column in enumerate(model.columns)}
    new_slots, old_slots = [], []
    for j, key in enumerate(model.key):
        column = model.column(key)
        slot = f"_hr_v{positions[key]}" if key in positions else None
        if column is None or slot is None or slot not in columns:
            return None
        for array in (columns[slot], columns.get(old_key(j))):
            if array is not None and duckdb_type(array.type) != column.duck_type:
                return None
        new_slots.append(slot)
        old_slots.append(old_key(j))
    seqs = data[SEQ]
    after = pc.greater(seqs, work.truncated_at) if work.truncated_at is not None else None
    sides = []
    for side, slots, kinds in ((0, old_slots, ["U", "D"]), (1, new_slots, ["I", "U"])):
        if side == 0 and not (work.updates or work.deletes):
            continue
        keep = pa.array(ops.mask(*kinds))
        if after is not None:
            keep = pc.and_(keep, after)
        for slot in slots:
            keep = pc.and_(keep, pc.is_valid(columns[slot]))
        sides.append(KeySide(side, [columns[slot] for slot in slots], keep))
    return last_touches(list(model.key), seqs, sides)


def _end_rows(seqs: pa.ChunkedArray, last_touches: pa.ChunkedArray) -> pa.Array:
    """Per change (``seqs`` ascending, as :func:`in_sequence` leaves them): whether it is
    its key's end row, i.e. its key's last touch is this change's new side
    (``_hr_last = seq * 2 + 1``). Set by position in numpy: an ``is_in`` of every
    change against every key hashes both (0.11 against 0.57 ms for 41,590 changes)."""
    seq = seqs.to_numpy()
    last = last_touches.to_numpy()
    ends = (last[(last & 1) == 1] - 1) // 2
    mask = np.zeros(len(seq), dtype=np.bool_)
    if len(seq) and seq[-1] - seq[0] == len(seq) - 1:
        mask[ends - seq[0]] = True  # consecutive numbers (one table's batch): direct
    else:
        mask[np.searchsorted(seq, ends)] = True
    return pa.array(mask)


def _typed(column: str, duck_type: str, target: str, alias: str | None = None) -> str:
    """``column`` as ``target`` (cast only when its Arrow column is another type)."""
    name = alias or column
    return f"{column} AS {name}" if duck_type == target else f"CAST({column} AS {target}) AS {name}"


def _lists_contain(lists: pa.ChunkedArray, value: str) -> pa.Array:
    """Per row: whether its list (NULL: empty) holds ``value``."""
    combined = lists.combine_chunks()
    hits = pc.filter(pc.list_parent_indices(combined), pc.equal(pc.list_flatten(combined), value))
    mask = np.zeros(len(combined), dtype=bool)
    mask[hits.to_numpy()] = True
    return pa.array(mask)


def _all(conditions: list[pa.ChunkedArray]) -> pa.ChunkedArray:
    result = conditions[0]
    for condition in conditions[1:]:
        result = pc.and_(result, condition)
    return result


def _transaction_ordinals(transactions: pa.Table, data: pa.Table) -> pa.ChunkedArray:
    """Each change's position in its transaction (across the batch's tables)."""
    positions = pc.index_in(data[LSN], value_set=transactions[LSN])
    starts = pc.take(transactions["_hr_first"], positions)
    return pc.subtract(data[SEQ], starts)


def _measure(work: TableWork, data: pa.Table, ops: OpCodes) -> None:
    """Counts and extremes of a table's changes, from the Arrow columns."""
    work.num_changes = data.num_rows
    work.last_lsn = int(pc.max(data[LSN]).as_py() or 0)
    work.last_commit_ts = pc.max(data[COMMIT_TS]).as_py()
    truncates = ops.mask("T")
    work.truncated_at = int(data[SEQ].to_numpy()[truncates].max()) if truncates.any() else None
    work.updates = ops.count("U")
    work.deletes = ops.count("D")
    toast = pc.list_value_length(data[TOAST])
    work.toasted = int(pc.sum(pc.greater(pc.fill_null(toast, 0), 0)).as_py() or 0)


def _only_new_keys(work: TableWork, schema: TableSchema) -> bool:
    """See :attr:`TableWork.only_new_keys` (``_measure`` has run)."""
    if work.updates or work.deletes or work.truncated_at is not None or work.toasted:
        return False
    source_key = set(schema.key_columns)
    # All columns flagged: REPLICA IDENTITY FULL, which promises no uniqueness.
    if not source_key or len(source_key) == len(schema.columns):
        return False
    # A key made of the source's unique key (and perhaps more columns) is unique too;
    # a configured key without it is not, and a row under it may already exist.
    return source_key <= set(work.model.key)

"""A batch's net change of one table, per key, as the lane's evaluators read it.

The engine's ``TableDelta`` in memory: per key touched by the batch, its *end* row
(after the batch; ``None`` when deleted). An update changing the key ends the old
key (``_hr_old_<key>`` when it was sent, else the new key) and writes the new one;
a truncate forgets every earlier change and says so (``truncated``).

The lane's evaluators keep per-key state, which nothing vectorized holds, so their
loops are per row in Python; this module keeps that loop as cheap as it can be. A
batch's table is decoded once for all evaluators (``to_pylist`` once per column and
condition, the touched keys and their last rows once), and :class:`NetChange` hands
the shared lists out as they are: an evaluator reads ``columns[name][i]`` and builds
nothing per row it does not keep (a dict and a frozen dataclass per row per evaluator
were a quarter of the lane's time at 2,500 transactions/s). The watermark's step is
computed in Arrow.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from headrace.rules.lane.condition import RowCondition
from headrace.source.changes import (
    COMMIT_TS,
    LSN,
    OP,
    SEQ,
    ChangeBatch,
    TableRef,
    commit_micros,
    old_name,
)
from headrace.store.duckdb.schema import META


@dataclass(frozen=True, slots=True)
class End:
    """One key's end row in the batch (``values`` None: deleted), for the paths that
    are not per row (building an alert); the per-row paths read :class:`NetChange`'s
    columns."""

    values: dict[str, object] | None
    commit_us: int
    lsn: int


@dataclass(frozen=True, slots=True)
class NetChange:
    """Per touched key its end row, in change order; whether a truncate came first.

    Columnar, so that an evaluator's loop reads lists and builds nothing per row: the
    ``j``-th touched key ``keys[j]`` last changed in row ``rows[j]`` of the batch and
    exists after it when ``live[j]`` (False: deleted). Row ``i``'s values are
    ``columns[name][i]`` (the columns and conditions the caller asked for), its commit
    time and LSN ``commits[i]`` and ``lsns[i]``.
    """

    keys: list[Hashable]
    rows: list[int]
    live: list[bool]
    columns: dict[str, list[Any]]
    commits: list[int]
    lsns: list[int]
    truncated: bool
    newest_mark: int | None
    """``max(least(t, commit_ts))`` over the live end rows (NULL ``t``: the commit time),
    the rule watermark's step (``RuleJob.advance``); None when no row is live or no
    ``mark`` column was named."""

    def end(self, j: int) -> End:
        """The ``j``-th touched key's end row as a dict (not for per-row paths)."""
        i = self.rows[j]
        values = (
            {name: column[i] for name, column in self.columns.items()} if self.live[j] else None
        )
        return End(values, self.commits[i], self.lsns[i])


def first_column(key: Hashable) -> Hashable:
    """A key's first column (``_k0``: what the SQL rules name a row by)."""
    return key[0] if isinstance(key, tuple) else key


def keys_of(data: pa.Table, columns: Sequence[str]) -> list[Hashable]:
    """Each row's key: the value for a one-column key, else a tuple."""
    values = [data.column(c).to_pylist() for c in columns]
    if len(values) == 1:
        return list(values[0])
    return list(zip(*values, strict=True))


Convert = Callable[[pa.ChunkedArray], pa.ChunkedArray]
"""A column as the caller wants it (e.g. :func:`micros`, :func:`integers`)."""


@dataclass
class _Decoded:
    """One batch's changes of one table, decoded once for every evaluator of the lane."""

    data: pa.Table
    commits: list[int]
    lsns: list[int]
    keys: list[Hashable]
    """The touched keys, in order of their first change (after a truncate)."""
    rows: list[int]
    """Per touched key: the index of its last change."""
    live: list[bool]
    """Per touched key: whether it exists after the batch (its last change did not
    delete it)."""
    truncated: bool
    lists: dict[tuple[str, Convert | None], list[object]] = field(default_factory=dict)
    met: dict[RowCondition, list[bool]] = field(default_factory=dict)
    marks: dict[str, int | None] = field(default_factory=dict)

    def column(self, name: str, convert: Convert | None) -> list[object]:
        found = self.lists.get((name, convert))
        if found is None:
            column = self.data.column(name)
            found = python_values(column if convert is None else convert(column))
            self.lists[(name, convert)] = found
        return found

    def condition(self, condition: RowCondition) -> list[bool]:
        found = self.met.get(condition)
        if found is None:
            met = condition(self.data)
            if isinstance(met, pa.Scalar):
                found = [bool(met.as_py())] * self.data.num_rows
            else:
                found = pc.fill_null(met, False).to_pylist()
            self.met[condition] = found
        return found

    def newest_mark(self, time: str) -> int | None:
        """``max(least(time, commit_ts))`` over the live end rows, in Arrow."""
        if time not in self.marks:
            live = pa.array(
                [i for i, alive in zip(self.rows, self.live, strict=True) if alive], pa.int64()
            )
            mark: int | None = None
            if len(live):
                t = micros(self.data.column(time).take(live))
                commits = self.data.column(COMMIT_TS).take(live).cast(pa.int64())
                newest = pc.max(pc.min_element_wise(t, commits)).as_py()
                mark = None if newest is None else int(newest)
            self.marks[time] = mark
        return self.marks[time]


def python_values(column: pa.ChunkedArray) -> list[Any]:
    """``column.to_pylist()``, decimals four times faster: through their text, as
    ``to_pylist`` itself makes them (the same values and exponents; ~0.33 µs a value
    instead of ~1.4 µs, and amounts are in most of the lane's rows)."""
    kind = column.type
    if pa.types.is_decimal(kind) and kind.scale >= 0:
        texts = column.cast(pa.string()).to_pylist()
        return [None if text is None else Decimal(text) for text in texts]
    values: list[Any] = column.to_pylist()
    return values


_cache = threading.local()
"""The last batch decoded on this thread: (batch, {table: decoded})."""


def _decoded(batch: ChangeBatch, ref: TableRef) -> _Decoded | None:
    held = getattr(_cache, "held", None)
    if held is None or held[0] is not batch:
        held = (batch, {})
        _cache.held = held
    tables: dict[TableRef, _Decoded | None] = held[1]
    if ref not in tables:
        tables[ref] = _decode(batch, ref)
    return tables[ref]


def _decode(batch: ChangeBatch, ref: TableRef) -> _Decoded | None:
    parts = [c for c in batch.tables if c.table == ref]
    if not parts:
        return None
    data = pa.concat_tables([p.data for p in parts], promote_options="default")
    if len(parts) > 1:
        data = data.sort_by(SEQ)
    key = parts[0].schema.key_columns
    ops = data.column(OP).to_pylist()
    new_keys = keys_of(data, key)
    # The old key is sent (updates) only when it changed: all its columns present.
    old_present = functools.reduce(
        pc.and_kleene, [pc.is_valid(data.column(old_name(k))) for k in key]
    )
    old_keys = keys_of(data, [old_name(k) for k in key])
    old_sent = old_present.to_pylist()
    last: dict[Hashable, tuple[int, bool]] = {}
    truncated = False
    for i, op in enumerate(ops):
        if op == "T":
            last.clear()
            truncated = True
            continue
        if op in ("U", "D"):
            last[old_keys[i] if old_sent[i] else new_keys[i]] = (i, True)
        if op != "D":
            last[new_keys[i]] = (i, False)
    commits = commit_micros(data.column(COMMIT_TS)).tolist()
    lsns = data.column(LSN).to_pylist()  # uint64: Python ints already
    rows = [i for i, _ in last.values()]
    live = [not deleted for _, deleted in last.values()]
    return _Decoded(data, commits, lsns, list(last), rows, live, truncated)


def net_change(
    batch: ChangeBatch,
    ref: TableRef,
    columns: Mapping[str, Convert | None],
    conditions: Mapping[str, RowCondition] | None = None,
    mark: str | None = None,
) -> NetChange | None:
    """The batch's net change of ``ref`` (None: the batch has no change of it).

    ``columns`` maps each source column the caller reads to how it wants it (``None``:
    as it comes); ``conditions`` (name -> compiled row condition) are evaluated over
    the rows and given as booleans (NULL: false) under their names; ``mark`` names the
    event-time column of :attr:`NetChange.newest_mark`. The batch is decoded once per
    table for every caller (the lane's evaluators read the same batch), and each
    column, condition and mark once.
    """
    decoded = _decoded(batch, ref)
    if decoded is None:
        return None
    read: dict[str, list[Any]] = {
        name: decoded.column(name, convert) for name, convert in columns.items()
    }
    for name, condition in (conditions or {}).items():
        read[name] = decoded.condition(condition)
    return NetChange(
        keys=decoded.keys,
        rows=decoded.rows,
        live=decoded.live,
        columns=read,
        commits=decoded.commits,
        lsns=decoded.lsns,
        truncated=decoded.truncated,
        newest_mark=None if mark is None else decoded.newest_mark(mark),
    )


def micros(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A timestamp column as µs since the epoch (int64)."""
    return column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())


def integers(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as int64 (account ids of any integer type)."""
    return column.cast(pa.int64())


def key_columns(con: duckdb.DuckDBPyConnection, ref: TableRef) -> list[str]:
    """The table's key as the engine recorded it (the mirror has no constraint)."""
    rows = con.execute(
        f"SELECT key_columns FROM {META}.tables WHERE table_name = ?", [ref.qualified]
    ).fetchall()
    if not rows or rows[0][0] is None:
        raise ValueError(f"the store knows no key of {ref.qualified}")
    return [str(c) for c in json.loads(rows[0][0])]

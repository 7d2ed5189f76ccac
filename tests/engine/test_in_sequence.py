"""A table's changes reach the engine in sequence; reordering is kept for the rest; each
transaction's first change is found whichever order the rows come in."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.engine.batch_changes import in_sequence, transaction_starts


def _changes(seqs: list[int], chunks: int = 1) -> pa.Table:
    table = pa.table({"_hr_seq": seqs, "v": [f"row {s}" for s in seqs]})
    size = max(1, len(seqs) // chunks)
    return pa.concat_tables(table.slice(i, size) for i in range(0, len(seqs), size))


def test_changes_in_sequence_are_kept_as_they_are() -> None:
    data = _changes([1, 2, 5, 9, 10, 11], chunks=3)
    assert in_sequence(data) is data


def test_changes_out_of_sequence_are_ordered() -> None:
    data = _changes([4, 5, 6, 1, 2, 3], chunks=2)
    ordered = in_sequence(data)
    assert ordered["_hr_seq"].to_pylist() == [1, 2, 3, 4, 5, 6]
    assert ordered["v"].to_pylist() == [f"row {s}" for s in range(1, 7)]


def test_empty_and_single_row_tables() -> None:
    for seqs in ([], [7]):
        data = pa.table({"_hr_seq": pa.array(seqs, pa.int64())})
        assert in_sequence(data) is data


def _transactions(lsns: list[int], seqs: list[int]) -> pa.Table:
    return pa.table({"_hr_lsn": pa.array(lsns, pa.uint64()), "_hr_seq": pa.array(seqs, pa.int64())})


def _firsts(starts: pa.Table) -> dict[int, int]:
    return dict(zip(starts["_hr_lsn"].to_pylist(), starts["_hr_first"].to_pylist(), strict=True))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 6)), max_size=30), st.booleans())
def test_transaction_starts_are_each_transactions_first_change(
    changes: list[tuple[int, int]], shuffle: bool
) -> None:
    """Per transaction (commit LSN), its smallest sequence number over every table: read
    from where each table's LSN runs start when its rows are in commit order, grouped
    over every row when they are not."""
    tables: list[list[tuple[int, int]]] = [[], [], []]
    lsn = 100
    for seq, (table, step) in enumerate(changes):
        lsn += step // 3  # several changes of one transaction, in one or more tables
        tables[table].append((lsn, seq))
    if shuffle:
        tables = [list(reversed(rows)) for rows in tables]
    data = [_transactions([r[0] for r in rows], [r[1] for r in rows]) for rows in tables]
    expected: dict[int, int] = {}
    for rows in tables:
        for lsn_, seq in rows:
            expected[lsn_] = min(seq, expected.get(lsn_, seq))
    assert _firsts(transaction_starts(data)) == expected

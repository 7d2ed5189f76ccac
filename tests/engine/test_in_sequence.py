"""A table's changes reach the engine in sequence; reordering is kept for the rest."""

from __future__ import annotations

import pyarrow as pa

from headrace.engine.batch_changes import in_sequence


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

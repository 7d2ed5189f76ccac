"""A batch's touched keys: the sorted path for integer keys equals Arrow's group-by
and a plain reading of the changes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.engine.touched_keys import (
    KeySide,
    grouped_last_touches,
    last_touches,
    sorted_last_touches,
)

Change = tuple[str, int | None, int | None]
"""(op, new key, old key): the key a change writes and the key it modifies or removes."""

_changes = st.lists(
    st.tuples(
        st.sampled_from("IUD"),
        st.one_of(st.none(), st.integers(-(2**62), 2**62), st.integers(0, 20)),
        st.one_of(st.none(), st.integers(0, 20)),
    ),
    max_size=60,
)


def _sides(changes: list[Change], key_type: pa.DataType) -> tuple[pa.ChunkedArray, list[KeySide]]:
    ops = pa.chunked_array([pa.array([c[0] for c in changes], pa.string())])
    new = pa.chunked_array([pa.array([c[1] for c in changes], key_type)])
    old = pa.chunked_array([pa.array([c[2] for c in changes], key_type)])
    seqs = pa.chunked_array([pa.array(range(100, 100 + len(changes)), pa.int64())])
    old_keep = pc.and_(pc.is_in(ops, pa.array(["U", "D"])), pc.is_valid(old))
    new_keep = pc.and_(pc.is_in(ops, pa.array(["I", "U"])), pc.is_valid(new))
    return seqs, [KeySide(0, [old], old_keep), KeySide(1, [new], new_keep)]


def _expected(changes: list[Change]) -> dict[int, int]:
    last: dict[int, int] = {}
    for seq, (op, new, old) in enumerate(changes, start=100):
        if op in "UD" and old is not None:
            last[old] = seq * 2
        if op in "IU" and new is not None:
            last[new] = seq * 2 + 1
    return last


def _as_dict(table: pa.Table) -> dict[int, int]:
    return dict(zip(table["id"].to_pylist(), table["_hr_last"].to_pylist(), strict=True))


@settings(max_examples=200, deadline=None)
@given(_changes)
def test_sorted_and_grouped_touches_equal_a_plain_reading(changes: list[Change]) -> None:
    seqs, sides = _sides(changes, pa.int64())
    by_sort = sorted_last_touches("id", seqs, sides)
    assert _as_dict(by_sort) == _expected(changes)
    assert _as_dict(grouped_last_touches(["id"], seqs, sides)) == _expected(changes)
    assert by_sort.schema == pa.schema([("id", pa.int64()), ("_hr_last", pa.int64())])
    assert by_sort["id"].to_pylist() == sorted(_expected(changes))  # each key once


def test_integer_keys_keep_their_type_and_other_keys_are_grouped() -> None:
    changes: list[Change] = [("I", 3, None), ("U", 4, 3), ("D", None, 4), ("I", 4, None)]
    seqs, sides = _sides(changes, pa.int32())
    touched = last_touches(["id"], seqs, sides)
    assert touched.schema.field("id").type == pa.int32()
    assert _as_dict(touched) == {3: 101 * 2, 4: 103 * 2 + 1}
    texts = [KeySide(s.side, [pc.cast(s.keys[0], pa.string())], s.keep) for s in sides]
    grouped = last_touches(["id"], seqs, texts)
    assert dict(zip(grouped["id"].to_pylist(), grouped["_hr_last"].to_pylist(), strict=True)) == {
        "3": 101 * 2,
        "4": 103 * 2 + 1,
    }


def test_no_sides_and_no_changes() -> None:
    seqs = pa.chunked_array([pa.array([], pa.int64())])
    assert sorted_last_touches("id", seqs, []).num_rows == 0
    empty, sides = _sides([], pa.int64())
    assert last_touches(["id"], empty, sides).num_rows == 0


@settings(max_examples=200, deadline=None)
@given(_changes, st.integers(0, 2**40))
def test_unsigned_and_shifted_keys_either_path(changes: list[Change], shift: int) -> None:
    """Keys whose spread fits beside the touch numbers are sorted packed into one integer
    each; wider ones (here up to 2**64) by argsort. Both give the plain reading."""
    moved = [
        (op, None if new is None else new + 2**62 + shift, None if old is None else old + shift)
        for op, new, old in changes
    ]
    seqs, sides = _sides(moved, pa.uint64())
    by_sort = sorted_last_touches("id", seqs, sides)
    assert _as_dict(by_sort) == _expected(moved)
    assert by_sort.schema.field("id").type == pa.uint64()

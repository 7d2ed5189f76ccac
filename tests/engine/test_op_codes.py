"""Change kinds read as bytes answer what Arrow's string kernels answer, for every
layout a kind column can have (slices, several chunks, NULLs, other text)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.engine.op_codes import OpCodes

_values = st.one_of(st.sampled_from("IUDT"), st.sampled_from(["X", "", "Update"]), st.none())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(_values, max_size=12), max_size=4),
    st.integers(0, 3),
    st.booleans(),
)
def test_masks_and_counts_equal_arrow_string_kernels(
    chunks: list[list[str | None]], cut: int, large: bool
) -> None:
    string_type = pa.large_string() if large else pa.string()
    arrays = [pa.array(["I"] * cut + chunk, string_type).slice(cut) for chunk in chunks]
    ops = pa.chunked_array(arrays, string_type)
    codes = OpCodes(ops)
    for kinds in (("I",), ("U", "D"), ("I", "U"), ("T",), ()):
        expected = pc.fill_null(pc.is_in(ops, pa.array(list(kinds), pa.string())), False)
        assert codes.mask(*kinds).tolist() == expected.to_pylist()
    for kind in "IUDT":
        assert codes.count(kind) == sum(1 for chunk in chunks for v in chunk if v == kind)


def test_one_letter_kinds_are_read_in_place() -> None:
    ops = pa.chunked_array([pa.array(["I", "U", "D", "T", "U"]).slice(1, 3)])
    codes = OpCodes(ops)
    assert bytes(codes.codes) == b"UDT"
    assert codes.mask("U", "D").tolist() == [True, True, False]

"""The lane's column lists: decimals through their text equal ``to_pylist``'s exactly."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from headrace.rules.lane.changes import python_values


def _same(a: list[Any], b: list[Any]) -> bool:
    """Equal values with equal exponents (``Decimal('1.0') == Decimal('1.00')``)."""
    return [None if v is None else v.as_tuple() for v in a] == [
        None if v is None else v.as_tuple() for v in b
    ]


@given(
    st.integers(min_value=0, max_value=10),
    st.lists(st.none() | st.integers(min_value=-(10**17), max_value=10**17), max_size=40),
    st.integers(min_value=0, max_value=40),
)
def test_decimals_equal_to_pylist(scale: int, units: list[int | None], cut: int) -> None:
    kind = pa.decimal128(18, scale)
    values = [None if u is None else Decimal(u).scaleb(-scale) for u in units]
    whole = pa.array(values, kind)
    cut = min(cut, len(whole))
    column = pa.chunked_array([whole.slice(0, cut), whole.slice(cut)], kind)
    assert _same(python_values(column), column.to_pylist())


def test_edge_values() -> None:
    texts = ["0.00", "-0.01", "9999999999999999.99", "-9999999999999999.99", "1.10", None]
    column = pa.chunked_array(
        [pa.array([None if t is None else Decimal(t) for t in texts], pa.decimal128(18, 2))]
    )
    assert _same(python_values(column), column.to_pylist())
    assert [str(v) for v in python_values(column)] == [str(t) for t in texts]


def test_other_types_are_to_pylist() -> None:
    column = pa.chunked_array([pa.array([1, None, 3], pa.int64())])
    assert python_values(column) == [1, None, 3]

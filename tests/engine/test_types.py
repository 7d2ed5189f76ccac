"""The DuckDB type names the engine gives Arrow types without asking DuckDB are DuckDB's own."""

from __future__ import annotations

import pyarrow as pa
import pytest

from headrace.engine import types
from headrace.engine.types import duckdb_type


@pytest.mark.parametrize(
    "arrow_type",
    [
        *types._KNOWN_NAMES,
        pa.decimal128(18, 2),
        pa.decimal128(38, 0),
        pa.decimal128(1, 1),
        pa.decimal128(5, 0),
    ],
    ids=str,
)
def test_known_name_is_duckdbs(arrow_type: pa.DataType) -> None:
    assert duckdb_type(arrow_type) == types._probed_type(arrow_type)


def test_other_types_are_asked_of_duckdb() -> None:
    assert duckdb_type(pa.list_(pa.int32())) == "INTEGER[]"
    assert duckdb_type(pa.decimal256(50, 2)) == "VARCHAR"

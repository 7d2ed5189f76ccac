"""Arrow types as DuckDB stores them, and which type changes widen a column in place."""

from __future__ import annotations

import re
import threading
from functools import lru_cache

import duckdb
import pyarrow as pa

_INTEGER_RANK = {"TINYINT": 0, "SMALLINT": 1, "INTEGER": 2, "BIGINT": 3, "HUGEINT": 4}
_FLOAT_RANK = {"FLOAT": 0, "DOUBLE": 1}
_DECIMAL = re.compile(r"^DECIMAL\((\d+),\s*(\d+)\)$")


def storable(arrow_type: pa.DataType) -> pa.DataType:
    """The Arrow type a column is converted to before DuckDB sees it.

    DuckDB reads every Arrow type the source produces except 256-bit
    decimals (``numeric`` wider than 38 digits): those are kept exact as text.
    """
    if pa.types.is_decimal256(arrow_type):
        return pa.string()
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        inner = storable(arrow_type.value_type)
        if inner != arrow_type.value_type:
            return pa.list_(inner)
    return arrow_type


def storable_table(table: pa.Table) -> pa.Table:
    """``table`` with its columns converted to :func:`storable` types (as is when none need it)."""
    schema = table.schema
    target = pa.schema([f.with_type(storable(f.type)) for f in schema])
    if target.equals(schema):
        return table
    return table.cast(target)


_probe_lock = threading.Lock()
_probe: duckdb.DuckDBPyConnection | None = None


# The types the change source and the snapshot produce most, named as DuckDB
# names them (tests/engine/test_types.py checks each against DuckDB). Asking
# DuckDB instead costs a connection of its own (~20-80 ms, on the first
# snapshot chunk's path) and ~1 ms per type.
_KNOWN_NAMES: dict[pa.DataType, str] = {
    pa.bool_(): "BOOLEAN",
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.string(): "VARCHAR",
    pa.large_string(): "VARCHAR",
    pa.binary(): "BLOB",
    pa.large_binary(): "BLOB",
    pa.date32(): "DATE",
    pa.time64("us"): "TIME",
    pa.timestamp("us"): "TIMESTAMP",
    pa.timestamp("us", tz="UTC"): "TIMESTAMP WITH TIME ZONE",
}


@lru_cache(maxsize=512)
def duckdb_type(arrow_type: pa.DataType) -> str:
    """The DuckDB type name DuckDB gives an Arrow column of ``arrow_type``."""
    known = _KNOWN_NAMES.get(arrow_type)
    if known is not None:
        return known
    if pa.types.is_decimal128(arrow_type):
        return f"DECIMAL({arrow_type.precision},{arrow_type.scale})"
    return _probed_type(arrow_type)


def _probed_type(arrow_type: pa.DataType) -> str:
    """What DuckDB itself names ``arrow_type`` (an empty column of it, described)."""
    global _probe  # noqa: PLW0603 (one in-memory connection for every probe, made on first use)
    empty = pa.table({"c": pa.array([], type=storable(arrow_type))})
    with _probe_lock:
        if _probe is None:
            _probe = duckdb.connect()
        _probe.register("empty_column", empty)
        try:
            rows = _probe.execute("DESCRIBE SELECT * FROM empty_column").fetchall()
        finally:
            _probe.unregister("empty_column")
    return str(rows[0][1])


def is_widening(old: str, new: str) -> bool:
    """True when a column of DuckDB type ``old`` can become ``new`` in place without loss.

    Widening is: a larger integer, FLOAT → DOUBLE, a DECIMAL with more
    precision and the same scale, or the same type (``varchar(n)`` → ``text``
    are both VARCHAR here).
    """
    if old == new:
        return True
    if old in _INTEGER_RANK and new in _INTEGER_RANK:
        return _INTEGER_RANK[new] >= _INTEGER_RANK[old]
    if old in _FLOAT_RANK and new in _FLOAT_RANK:
        return _FLOAT_RANK[new] >= _FLOAT_RANK[old]
    old_decimal, new_decimal = _DECIMAL.match(old), _DECIMAL.match(new)
    if old_decimal and new_decimal:
        return int(new_decimal.group(1)) >= int(old_decimal.group(1)) and new_decimal.group(
            2
        ) == old_decimal.group(2)
    return False


def is_integer(duck_type: str) -> bool:
    """An integer type (whose sums are kept as HUGEINT)."""
    return duck_type in _INTEGER_RANK or (
        duck_type.startswith("U") and duck_type[1:] in _INTEGER_RANK
    )

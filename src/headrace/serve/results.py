"""Arrow query results as JSON tables, CSV and Parquet."""

from __future__ import annotations

import base64
import io
import math
import uuid
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

_CONVERTERS: tuple[tuple[type | tuple[type, ...], Any], ...] = (
    ((bool, int, str), lambda v: v),
    (float, lambda v: v if math.isfinite(v) else None),
    (Decimal, float),
    ((datetime, date, time), lambda v: v.isoformat()),
    (timedelta, lambda v: v.total_seconds()),
    (bytes, lambda v: base64.b64encode(v).decode()),
    (uuid.UUID, str),
    (dict, lambda v: {str(k): json_value(x) for k, x in v.items()}),
    ((list, tuple), lambda v: [json_value(x) for x in v]),
)


def json_value(value: Any) -> Any:
    """A JSON-safe rendering of one cell (floats that are not finite become null)."""
    if value is None:
        return None
    for kinds, convert in _CONVERTERS:
        if isinstance(value, kinds):
            return convert(value)
    return str(value)


def table_to_json(table: pa.Table) -> dict[str, Any]:
    """``{"columns": [{"name", "type"}], "rows": [[...], ...]}``."""
    columns = [{"name": f.name, "type": str(f.type)} for f in table.schema]
    pylists = [table.column(i).to_pylist() for i in range(table.num_columns)]
    rows = [[json_value(col[r]) for col in pylists] for r in range(table.num_rows)]
    return {"columns": columns, "rows": rows}


def rows_to_json(columns: list[tuple[str, str]], rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """``{"columns": [{"name", "type"}], "rows": [[...], ...]}`` from ``(name, type)``
    columns and Python rows (DuckDB's ``fetchall``)."""
    return {
        "columns": [{"name": name, "type": dtype} for name, dtype in columns],
        "rows": [[json_value(value) for value in row] for row in rows],
    }


def table_to_csv(table: pa.Table) -> bytes:
    """CSV with a header row."""
    sink = io.BytesIO()
    pa_csv.write_csv(_csv_safe(table), sink)
    return sink.getvalue()


def _csv_safe(table: pa.Table) -> pa.Table:
    # Arrow's CSV writer refuses nested types; render them as their JSON-ish text.
    arrays = []
    for column in table.columns:
        if pa.types.is_nested(column.type) or pa.types.is_dictionary(column.type):
            arrays.append(pa.array([None if v is None else str(v) for v in column.to_pylist()]))
        else:
            arrays.append(column)
    return pa.table(arrays, names=table.column_names)


def table_to_parquet(table: pa.Table) -> bytes:
    """A Parquet file in memory."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()

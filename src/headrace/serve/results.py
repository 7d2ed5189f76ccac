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


def json_value(value: Any) -> Any:
    """A JSON-safe rendering of one cell."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return str(value)


def table_to_json(table: pa.Table) -> dict[str, Any]:
    """``{"columns": [{"name", "type"}], "rows": [[...], ...]}``."""
    columns = [{"name": f.name, "type": str(f.type)} for f in table.schema]
    pylists = [table.column(i).to_pylist() for i in range(table.num_columns)]
    rows = [[json_value(col[r]) for col in pylists] for r in range(table.num_rows)]
    return {"columns": columns, "rows": rows}


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

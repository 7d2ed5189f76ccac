"""Property: random rows written in PostgreSQL come out of the stream as SELECT returns them."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, timedelta, timezone
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from headrace.source.postgres.batcher import Batcher
from tests.conftest import PgDatabase
from tests.source.pgoutput_slot import LogicalSlot, rows_of, select

_TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40
)
_INT32 = st.integers(-(2**31), 2**31 - 1)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | _TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=8,
)
_OFFSETS = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


def _float_key(value: Any) -> Any:
    if value is None:
        return None
    return "nan" if math.isnan(value) else (value, math.copysign(1.0, value))


def _float4(value: Any) -> Any:
    return _float_key(None if value is None else float(np.float32(value)))


def _interval(value: Any) -> Any:
    return None if value is None else (value.months, value.days, value.nanoseconds // 1000)


def _json_text(value: Any) -> Any:
    return None if value is None else json.loads(value)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Col:
    ddl: str
    values: st.SearchStrategy[Any]
    param: Callable[[Any], Any] = _same  # Python value -> query parameter
    select: str = "{c}"
    ours: Callable[[Any], Any] = _same
    theirs: Callable[[Any], Any] = _same


COLUMNS: tuple[Col, ...] = (
    Col("int2", st.integers(-32768, 32767)),
    Col("int4", _INT32),
    Col("int8", st.integers(-(2**63), 2**63 - 1)),
    Col("numeric(12,3)", st.decimals(-(10**9) + 1, 10**9 - 1, places=3, allow_nan=False)),
    Col(
        "numeric",
        st.decimals(-(10**30), 10**30, allow_nan=False) | st.just(Decimal("NaN")),
        select="{c}::text",
        # NaN compares unequal to itself; the text form is what is kept.
        theirs=lambda v: v,
    ),
    Col("float8", st.floats(), ours=_float_key, theirs=_float_key),
    Col("float4", st.floats(width=32), ours=_float_key, theirs=_float4),
    Col("bool", st.booleans()),
    Col("text", _TEXT),
    Col("varchar(20)", _TEXT.map(lambda s: s[:20])),
    Col("date", st.dates()),
    Col("timestamp", st.datetimes()),
    Col("timestamptz", st.datetimes(timezones=_OFFSETS)),
    Col("time", st.times()),
    Col(
        "interval",
        st.timedeltas(min_value=timedelta(days=-(10**6)), max_value=timedelta(days=10**6)),
        select=(
            "CASE WHEN {c} IS NULL THEN NULL ELSE ARRAY["
            "(extract(year FROM {c}) * 12 + extract(month FROM {c}))::int8, "
            "extract(day FROM {c})::int8, "
            "((extract(hour FROM {c}) * 3600 + extract(minute FROM {c}) * 60) * 1000000 "
            "+ extract(microseconds FROM {c}))::int8] END"
        ),
        ours=_interval,
        theirs=lambda v: None if v is None else tuple(v),
    ),
    Col("uuid", st.uuids(), theirs=lambda v: None if v is None else str(v)),
    Col("bytea", st.binary(max_size=40)),
    Col("jsonb", _JSON, param=Jsonb, select="{c}::text", ours=_json_text, theirs=_json_text),
    Col("int4[]", st.lists(st.none() | _INT32, max_size=5)),
    Col("text[]", st.lists(st.none() | _TEXT, max_size=5)),
    Col(
        "float8[]",
        st.lists(st.floats(), max_size=4),
        ours=lambda v: None if v is None else [_float_key(x) for x in v],
        theirs=lambda v: None if v is None else [_float_key(x) for x in v],
    ),
)

_ROW = st.tuples(*(st.none() | c.values for c in COLUMNS))


class _Stream:
    """A table, a slot, and a batcher that keeps its relation state across examples."""

    def __init__(self, db: PgDatabase) -> None:
        columns = ", ".join(f"c{i} {c.ddl}" for i, c in enumerate(COLUMNS))
        db.execute(f"CREATE TABLE r (id int8 PRIMARY KEY, {columns})")
        self.db = db
        self.slot = LogicalSlot(db).create()
        self.batcher = Batcher(self.slot.registry())
        self.ids = itertools.count()

    def write(self, rows: list[tuple[Any, ...]]) -> list[int]:
        ids = [next(self.ids) for _ in rows]
        casts = ", ".join(f"%s::{c.ddl}" for c in COLUMNS)
        with self.db.connect(autocommit=False) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            for row_id, row in zip(ids, rows, strict=True):
                params = [
                    None if v is None else c.param(v) for c, v in zip(COLUMNS, row, strict=True)
                ]
                conn.execute(f"INSERT INTO r VALUES (%s, {casts})", (row_id, *params))
            conn.commit()
        return ids

    def read(self) -> list[dict[str, Any]]:
        for lsn, payload in self.slot.changes():
            self.batcher.feed(lsn, payload)
        batch = self.batcher.take()
        return [] if batch is None else rows_of(batch, "r")


@pytest.fixture
def stream(pg_db: PgDatabase) -> _Stream:
    return _Stream(pg_db)


@settings(
    max_examples=int(os.environ.get("HEADRACE_PROPERTY_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=st.lists(_ROW, min_size=1, max_size=6))
def test_random_rows_round_trip(stream: _Stream, rows: list[tuple[Any, ...]]) -> None:
    ids = stream.write(rows)
    got = stream.read()
    assert [r["id"] for r in got] == ids
    exprs = ", ".join(c.select.format(c=f"c{i}") for i, c in enumerate(COLUMNS))
    expected = select(
        stream.db, f"SELECT {exprs} FROM r WHERE id >= {ids[0]} AND id <= {ids[-1]} ORDER BY id"
    )
    for ours, theirs in zip(got, expected, strict=True):
        for i, column in enumerate(COLUMNS):
            assert column.ours(ours[f"c{i}"]) == column.theirs(theirs[i]), (
                column.ddl,
                ours[f"c{i}"],
                theirs[i],
            )


def test_timestamptz_in_other_zones_comes_out_as_utc(stream: _Stream) -> None:
    stream.db.execute(
        "INSERT INTO r (id, c12) VALUES (1000000, '2024-03-10 02:30:00 America/New_York'), "
        "(1000001, '2024-01-01 00:00:00+14')"
    )
    rows = stream.read()
    assert [r["c12"].isoformat() for r in rows] == [
        "2024-03-10T07:30:00+00:00",
        "2023-12-31T10:00:00+00:00",
    ]
    assert all(r["c12"].utcoffset() == timedelta(0) for r in rows)
    assert rows[0]["c12"].tzinfo is not None
    assert str(rows[0]["c12"].tzinfo) in ("UTC", str(UTC))

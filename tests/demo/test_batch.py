"""Array literals round-trip through PostgreSQL exactly, whatever the strings hold."""

from __future__ import annotations

import pytest

from headrace.demo.batch import bool_array, int_array, text_array
from tests.conftest import PgDatabase

TEXTS: list[list[str | None]] = [
    [],
    [None],
    ["plain", "pos-12", "10.0.0.1"],
    ["a,b", "{brace}", "", " spaced ", "NULL", "null"],
    ['quo"te', "back\\slash", 'both\\"', None, "ünïcødé", "tab\there"],
]


@pytest.mark.parametrize("values", TEXTS)
def test_text_arrays(pg_db: PgDatabase, values: list[str | None]) -> None:
    assert pg_db.fetchall("SELECT %s::text[]", (text_array(values),)) == [(values,)]


def test_int_and_bool_arrays(pg_db: PgDatabase) -> None:
    ints: list[int | None] = [0, -5, None, 2**62]
    assert pg_db.fetchall("SELECT %s::int8[]", (int_array(ints),)) == [(ints,)]
    assert pg_db.fetchall("SELECT %s::int8[]", (int_array([]),)) == [([],)]
    assert pg_db.fetchall("SELECT %s::bool[]", (bool_array([True, False]),)) == [([True, False],)]

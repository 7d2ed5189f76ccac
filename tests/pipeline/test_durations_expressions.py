"""Durations and per-row expressions."""

from __future__ import annotations

from datetime import timedelta

import pytest

from headrace.pipeline.durations import format_duration, parse_duration
from headrace.pipeline.expressions import (
    ExpressionError,
    expression_columns,
    parse_row_expression,
    unknown_columns,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("1d", 86400), ("2w", 1209600), (" 15 m ", 900)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["5", "5 minutes", "1.5h", "-1m", "", "m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(timedelta(minutes=5)) == "5m"
    assert format_duration(timedelta(minutes=90)) == "90m"
    assert format_duration(timedelta(days=7)) == "7d"
    assert format_duration(timedelta(seconds=45)) == "45s"


def test_expression_columns() -> None:
    assert expression_columns("CASE WHEN amount > 10 THEN 'big' ELSE kind END") == {
        "amount",
        "kind",
    }
    assert expression_columns("date_part('hour', created_at)") == {"created_at"}
    assert unknown_columns('"Amount" + amount + AMOUNT', {"amount"}) == ["Amount"]


@pytest.mark.parametrize(
    "sql",
    ["", "SELECT 1", "x IN (SELECT 1)", "count(*)", "gen_random_uuid()", "current_date", "?", "*"],
)
def test_rejected(sql: str) -> None:
    with pytest.raises(ExpressionError):
        parse_row_expression(sql)

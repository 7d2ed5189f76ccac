"""The rules lane evaluates the batches drained together as one, never across a schema
change or the position up to which a restarted lane only rebuilds its windows."""

from __future__ import annotations

import pyarrow as pa

from headrace.rules.lane.lane import evaluation_groups, merged_record
from headrace.rules.lane.saved import RuleSaved
from headrace.source.changes import ChangeBatch, Column, TableChanges, TableRef, TableSchema

ACCOUNTS = TableRef("public", "accounts")


def _batch(position: int, version: int = 1) -> ChangeBatch:
    columns: tuple[Column, ...] = (Column("id", 20, -1, "int8", pa.int64(), is_key=True),)
    if version > 1:
        columns += (Column("tier", 25, -1, "text", pa.string()),)
    schema = TableSchema(ACCOUNTS, version, columns)
    return ChangeBatch((TableChanges(schema, schema.arrow_schema().empty_table()),), position)


def _positions(groups: list[list[ChangeBatch]]) -> list[list[int]]:
    return [[batch.position for batch in group] for group in groups]


def test_batches_drained_together_are_one_evaluation() -> None:
    batches = [_batch(10), _batch(20), _batch(30)]
    assert _positions(evaluation_groups(batches, replay_until=0)) == [[10, 20, 30]]


def test_replayed_batches_are_not_merged_with_new_ones() -> None:
    batches = [_batch(10), _batch(20), _batch(30), _batch(40)]
    assert _positions(evaluation_groups(batches, replay_until=20)) == [[10, 20], [30, 40]]


def test_a_schema_change_starts_a_new_evaluation() -> None:
    batches = [_batch(10), _batch(20, version=2), _batch(30, version=2)]
    assert _positions(evaluation_groups(batches, replay_until=0)) == [[10], [20, 30]]


def test_a_records_state_is_built_when_written_and_the_newest_wins() -> None:
    """Account takeover's marks are recorded as a function building their rows: the lane
    takes a record after every evaluation but writes one every few, so the rows are built
    only for the write, from the state as it is then; an unchanged state (None) keeps
    the builder held."""
    marks: list[list[object]] = [[1, 10, "failed_logins"]]
    held = merged_record(None, RuleSaved(5, {"a": 1}, lambda: [list(m) for m in marks]))
    marks.append([2, 20, "new_device"])
    merged = merged_record(held, RuleSaved(7, {"b": 2}, None))
    assert merged.watermark_us == 7
    assert merged.last_seen == {"a": 1, "b": 2}
    assert merged.state_rows() == [[1, 10, "failed_logins"], [2, 20, "new_device"]]
    assert RuleSaved(7, {}, [[3]]).state_rows() == [[3]]
    assert RuleSaved(7).state_rows() is None

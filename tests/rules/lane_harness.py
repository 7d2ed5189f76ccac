"""Test harness of the rules lane: the same batches to the engine and to a lane evaluator.

Every batch the engine applies (real PostgreSQL → pgoutput → batcher) is also given to
the evaluator; :meth:`Both.assert_equal` then checks that the evaluator's alerts are
the SQL rule's ``headrace.alerts`` rows: account, dedup key, event and start times,
severity, summary, the payload's numbers, trigger and evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

import duckdb

from headrace.rules.config import RulesConfig
from headrace.rules.lane.alert import LaneAlert, from_us
from headrace.rules.lane.saved import RuleSaved
from headrace.source.changes import ChangeBatch
from headrace.source.postgres.batcher import PIECE_CHANGES, Batcher
from tests.conftest import PgDatabase
from tests.rules.bank import Bank


class Evaluator(Protocol):
    name: str

    def seed(self, con: duckdb.DuckDBPyConnection, saved: RuleSaved | None = None) -> None: ...

    def apply(self, batch: ChangeBatch) -> list[LaneAlert]: ...

    def take_saved(self) -> RuleSaved: ...


Normal = tuple[Any, ...]


class Both:
    """The bank's pipeline and one lane evaluator, fed the same batches."""

    def __init__(
        self,
        bank: Bank,
        make: Callable[[RulesConfig], Evaluator],
        *,
        piece: int = PIECE_CHANGES,
    ) -> None:
        self.bank = bank
        self.make = make
        self.piece = piece
        bank.harness.batcher = Batcher(bank.harness.slot.registry(), piece_changes=piece)
        self.lane_alerts: list[LaneAlert] = []
        self.saved: RuleSaved | None = None
        self.start_lane()

    def start_lane(self, *, from_saved: bool = False) -> None:
        """A new evaluator seeded from the store (and from what the last one saved)."""
        rules = self.bank.harness.config.rules
        assert rules is not None
        self.evaluator = self.make(rules)
        cursor = self.bank.store.cursor()
        try:
            self.evaluator.seed(cursor, self.saved if from_saved else None)
        finally:
            cursor.close()

    def sync(self, cut: Callable[[], bool] | None = None) -> None:
        harness = self.bank.harness
        for batch in harness.batches(cut):
            harness.applied.append(harness.engine.apply(batch))
            for piece in batch.piece_batches(again=True):  # as the rules lane does
                self.lane_alerts.extend(self.evaluator.apply(piece))
            taken = self.evaluator.take_saved()
            seen = dict(self.saved.last_seen) if self.saved is not None else {}
            seen.update(taken.last_seen)
            state = taken.state_rows()  # the rows now: the next batch changes the state
            if state is None and self.saved is not None:
                state = self.saved.state_rows()  # unchanged since the last record
            self.saved = RuleSaved(taken.watermark_us, seen, state)

    def restart(self) -> None:
        """The engine restarts (the evaluator keeps its memory)."""
        self.bank.restart()
        self.bank.harness.batcher = Batcher(
            self.bank.harness.slot.registry(), piece_changes=self.piece
        )

    def sql(self) -> list[Normal]:
        return sorted((normal_sql(a) for a in self.bank.alerts(self.evaluator.name)), key=_order)

    def lane(self) -> list[Normal]:
        return sorted((normal_lane(a) for a in self.lane_alerts), key=_order)

    def assert_equal(self) -> None:
        """The same alerts, payload included: candidates of one key, time and commit are
        ordered by their trigger's text in both (the first opens the incident)."""
        sql, lane = self.sql(), self.lane()
        assert lane == sql, f"lane: {lane}\nSQL: {sql}"


def _order(alert: Normal) -> tuple[Any, ...]:
    return (alert[1], alert[2])


def number(value: Any) -> Any:
    """Numbers compared as floats rounded to 6 places (JSON has no decimals)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float | Decimal):
        return round(float(value), 6)
    return value


def time_value(value: Any) -> Any:
    """A JSON timestamp (DuckDB writes ``2026-01-01 00:00:05+00``) as a datetime."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        text = value.replace(" ", "T")
        if len(text) >= 3 and text[-3] in "+-" and text[-3:].lstrip("+-").isdigit():
            text += ":00"
        return datetime.fromisoformat(text)
    return value


def evidence(rows: Sequence[Mapping[str, Any]]) -> tuple[tuple[tuple[str, Any], ...], ...]:
    out = []
    for row in rows:
        out.append(
            tuple(sorted((k, time_value(v) if k == "at" else number(v)) for k, v in row.items()))
        )
    return tuple(out)


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def normal_sql(alert: Mapping[str, Any]) -> Normal:
    payload = alert["payload"]
    numbers = tuple(sorted((k, number(v)) for k, v in payload["numbers"].items()))
    return (
        alert["account_id"],
        alert["key"],
        alert["event_at"],
        alert["started_at"],
        alert["severity"],
        alert["summary"],
        numbers,
        _hashable(payload.get("trigger")),
        evidence(payload.get("evidence", [])),
    )


def normal_lane(alert: LaneAlert) -> Normal:
    numbers = tuple(sorted((k, number(v)) for k, v in alert.numbers.items()))
    return (
        alert.account,
        alert.key,
        from_us(alert.event_us),
        None if alert.started_us is None else from_us(alert.started_us),
        alert.severity,
        alert.summary,
        numbers,
        _hashable(alert.trigger),
        evidence(alert.evidence),
    )


def reset_database(db: PgDatabase) -> None:
    """An empty database again (slots, publication, tables): one hypothesis example each."""
    with db.connect() as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute("DROP PUBLICATION IF EXISTS p")
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")

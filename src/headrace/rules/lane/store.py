"""The rules lane's record in the store: its position, the rules' watermarks, incidents.

Written by the lane's own connection, in the same small transaction as the alerts it
opens (``headrace.alerts`` and the delivery outbox, as the engine writes them), so its
alerts, incidents and position always agree. Only the lane writes these tables, so its
transactions never conflict with the engine's:

``headrace.lane_rules``
    per rule in memory: the source position of the last batch the lane evaluated and
    the rule's watermark (the restart point: batches at or below the position only
    rebuild state);
``headrace.lane_incidents``
    per rule and dedup key: the incident's last candidate time (what re-arming reads).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa

from headrace.alerts import ids as alert_ids
from headrace.alerts.config import SinkConfig
from headrace.alerts.store import setup_alerts, write_new_alerts
from headrace.rules.lane.alert import LaneAlert, from_us, to_us
from headrace.rules.lane.saved import RuleSaved
from headrace.store.duckdb.schema import META

RULES_TABLE = f"{META}.lane_rules"
INCIDENTS_TABLE = f"{META}.lane_incidents"

_DDL = (
    f"""CREATE TABLE IF NOT EXISTS {RULES_TABLE} (
        rule TEXT PRIMARY KEY, position UBIGINT NOT NULL, watermark TIMESTAMPTZ,
        updated_at TIMESTAMPTZ NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS {INCIDENTS_TABLE} (
        rule TEXT NOT NULL, key TEXT NOT NULL, last_seen_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (rule, key))""",
)

_ALERT_SCHEMA = pa.schema(
    [
        ("rule", pa.string()),
        ("severity", pa.string()),
        ("account_id", pa.int64()),
        ("key", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("detected_at", pa.timestamp("us", tz="UTC")),
        ("payload", pa.string()),
        ("kind", pa.string()),
        ("status", pa.string()),
        ("summary", pa.string()),
        ("event_at", pa.timestamp("us", tz="UTC")),
        ("commit_ts", pa.timestamp("us", tz="UTC")),
        ("lsn", pa.uint64()),
        ("latency_ms", pa.float64()),
    ]
)


@dataclass
class LaneSaved:
    """What the lane recorded: its position and each rule's watermark and incidents."""

    position: int | None = None
    rules: dict[str, RuleSaved] = field(default_factory=dict)


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    raise TypeError(f"not JSON: {type(value).__name__}")


def payload_json(alert: LaneAlert) -> str:
    """The alert's payload as the SQL rules write it (numbers, trigger, evidence)."""
    return json.dumps(alert.payload(), default=_json_value, separators=(",", ":"))


class LaneStore:
    """The lane's tables on its own cursor of the store (module docstring)."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        sinks: Sequence[SinkConfig],
        ids: alert_ids.AlertIds,
    ) -> None:
        self.con = con
        self.sinks = tuple(sinks)
        self.ids = ids
        setup_alerts(con)
        for statement in _DDL:
            con.execute(statement)

    def load(self, rules: Sequence[str]) -> LaneSaved:
        """The lane's record for ``rules`` (rules it never evaluated are absent)."""
        saved = LaneSaved()
        positions = []
        for rule, position, watermark in self.con.execute(
            f"SELECT rule, position, watermark FROM {RULES_TABLE}"
        ).fetchall():
            if rule not in rules:
                continue
            seen = {
                str(key): to_us(at)
                for key, at in self.con.execute(
                    f"SELECT key, last_seen_at FROM {INCIDENTS_TABLE} WHERE rule = ?", [rule]
                ).fetchall()
            }
            saved.rules[rule] = RuleSaved(None if watermark is None else to_us(watermark), seen)
            positions.append(int(position))
        # A rule added to the lane later has no record: the lane restarts from the oldest.
        if positions and len(saved.rules) == len(rules):
            saved.position = min(positions)
        return saved

    def commit(
        self,
        alerts: Sequence[LaneAlert],
        rules: Mapping[str, RuleSaved],
        position: int,
        now: datetime,
    ) -> None:
        """One transaction: the alerts (and their outbox rows), incidents, position."""
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            if alerts:
                self._insert_alerts(alerts, now)
            seen = [
                (rule, key, from_us(at))
                for rule, record in rules.items()
                for key, at in record.last_seen.items()
            ]
            if seen:
                con.executemany(f"INSERT OR REPLACE INTO {INCIDENTS_TABLE} VALUES (?, ?, ?)", seen)
            con.executemany(
                f"INSERT OR REPLACE INTO {RULES_TABLE} VALUES (?, ?, ?, ?)",
                [
                    (
                        rule,
                        position,
                        None if record.watermark_us is None else from_us(record.watermark_us),
                        now,
                    )
                    for rule, record in rules.items()
                ],
            )
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def _insert_alerts(self, alerts: Sequence[LaneAlert], now: datetime) -> None:
        detected_us = to_us(now)
        rows: dict[str, list[Any]] = {name: [] for name in _ALERT_SCHEMA.names}
        for alert in sorted(alerts, key=lambda a: (a.event_us, a.rule, a.key)):
            rows["rule"].append(alert.rule)
            rows["severity"].append(alert.severity)
            rows["account_id"].append(alert.account)
            rows["key"].append(alert.key)
            rows["started_at"].append(
                None if alert.started_us is None else from_us(alert.started_us)
            )
            rows["detected_at"].append(now)
            rows["payload"].append(payload_json(alert))
            rows["kind"].append("fraud")
            rows["status"].append("firing")
            rows["summary"].append(alert.summary)
            rows["event_at"].append(from_us(alert.event_us))
            rows["commit_ts"].append(from_us(alert.commit_us))
            rows["lsn"].append(alert.lsn)
            rows["latency_ms"].append(max(0.0, (detected_us - alert.commit_us) / 1000.0))
        table = pa.table(rows, schema=_ALERT_SCHEMA)
        first = self.ids.reserve(self.con, len(alerts))
        self.con.register("_lane_alerts", table)
        try:
            self.con.execute(
                """CREATE OR REPLACE TEMP TABLE _job_new_alerts AS
                SELECT CAST(? AS BIGINT) + row_number() OVER () - 1 AS id,
                       * REPLACE (CAST(payload AS JSON) AS payload)
                FROM _lane_alerts""",
                [first],
            )
        finally:
            self.con.unregister("_lane_alerts")
        write_new_alerts(self.con, self.sinks, now)
        self.con.execute("DROP TABLE _job_new_alerts")

"""The rules lane's record: a DuckDB file of its own, ATTACHed to the store's database.

A commit into the store's file waits for a running CHECKPOINT of it (0.4-1 s in
``bench fraud``, a few times a minute); the lane's commits must not. So the lane
writes into ``<store>.lane.duckdb`` (own WAL, own checkpoints), attached as
:data:`LANE_DB` to the store's DuckDB instance (every cursor of the store sees it).
One transaction per lane commit writes:

``alerts``, ``alert_deliveries``
    the alerts it opens and their delivery outbox, the columns of the store's
    (:class:`~headrace.alerts.store.Outbox`); the lane's delivery threads drain this
    outbox. The engine copies the alerts into ``headrace.alerts`` in its next batch
    (:meth:`LaneStore.copy_alerts`), so the store holds every alert for SQL and
    dashboards, a batch later; ids come from one allocator for both.
``rules``
    per rule: the source position of the last batch evaluated and the rule's watermark
    (the restart point: batches at or below it only rebuild state);
``incidents``
    per rule and dedup key: the incident's last candidate time (re-arming).
``link``
    the id of the store the file belongs to (``headrace.lane_link`` in the store): a
    lane file left from another store is emptied, not trusted.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from headrace.alerts import ids as alert_ids
from headrace.alerts.config import SinkConfig
from headrace.alerts.delivery import prune_delivered
from headrace.alerts.store import (
    ALERT_COLUMNS,
    ALERT_SCHEMA,
    ALERTS,
    LANE_DB,
    LANE_OUTBOX,
    NEW_ALERTS,
    setup_alerts,
    write_new_alerts,
)
from headrace.rules.lane.alert import LaneAlert, from_us, to_us
from headrace.rules.lane.saved import RuleSaved
from headrace.store.duckdb.schema import META

log = logging.getLogger("headrace.rules.lane")

RULES_TABLE = f"{LANE_DB}.main.rules"
INCIDENTS_TABLE = f"{LANE_DB}.main.incidents"
LINK_TABLE = f"{LANE_DB}.main.link"
STORE_LINK = f"{META}.lane_link"

_DDL = (
    *LANE_OUTBOX.ddl(),
    f"""CREATE TABLE IF NOT EXISTS {RULES_TABLE} (
        rule TEXT PRIMARY KEY, position UBIGINT NOT NULL, watermark TIMESTAMPTZ,
        updated_at TIMESTAMPTZ NOT NULL, state JSON)""",
    f"ALTER TABLE {RULES_TABLE} ADD COLUMN IF NOT EXISTS state JSON",
    f"""CREATE TABLE IF NOT EXISTS {INCIDENTS_TABLE} (
        rule TEXT NOT NULL, key TEXT NOT NULL, last_seen_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (rule, key))""",
    f"CREATE TABLE IF NOT EXISTS {LINK_TABLE} (store_id TEXT NOT NULL)",
)


def lane_file(store_path: str | Path) -> Path:
    """The lane's file beside the store's: ``x.duckdb`` -> ``x.lane.duckdb``."""
    path = Path(store_path)
    return path.with_name(f"{path.stem}.lane{path.suffix or '.duckdb'}")


def attach_lane_file(con: duckdb.DuckDBPyConnection, store_path: str | Path) -> Path:
    """ATTACH the lane's file to the store's instance (every cursor sees it), unless it is
    already. Must come before the dashboard hardens the instance (no file access after)."""
    path = lane_file(store_path)
    attached = con.execute(
        "SELECT count(*) FROM duckdb_databases() WHERE database_name = ?", [LANE_DB]
    ).fetchall()[0][0]
    if not attached:
        con.execute(f"ATTACH '{str(path).replace(chr(39), chr(39) * 2)}' AS {LANE_DB}")
    return path


_SEEN = "_lane_seen"
_SEEN_SCHEMA = pa.schema(
    [("rule", pa.string()), ("key", pa.string()), ("last_seen_at", pa.timestamp("us", tz="UTC"))]
)
"""The incidents' last-seen times a commit writes (as :data:`INCIDENTS_TABLE`'s columns)."""


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
    """The lane's file on its own cursor of the store (module docstring)."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        store_path: str | Path,
        sinks: Sequence[SinkConfig],
        ids: alert_ids.AlertIds,
    ) -> None:
        self.con = con
        self.sinks = tuple(sinks)
        self.ids = ids
        self.path = attach_lane_file(con, store_path)
        for statement in _DDL:
            con.execute(statement)
        setup_alerts(con)  # the store's tables the alerts are copied into
        self._link()
        self._known = {
            str(row[0]) for row in con.execute(f"SELECT rule FROM {RULES_TABLE}").fetchall()
        }
        """Rules that have a row in the rules table."""
        self.copied = 0
        """Highest lane alert id known to be in ``headrace.alerts``."""
        self.newest = 0
        """Highest lane alert id committed."""

    def _link(self) -> None:
        """Tie the file to the store; empty a file left from another store."""
        con = self.con
        con.execute(f"CREATE TABLE IF NOT EXISTS {STORE_LINK} (store_id TEXT NOT NULL)")
        rows = con.execute(f"SELECT store_id FROM {STORE_LINK}").fetchall()
        if rows:
            store_id = str(rows[0][0])
        else:
            store_id = uuid.uuid4().hex
            con.execute(f"INSERT INTO {STORE_LINK} VALUES (?)", [store_id])
        linked = con.execute(f"SELECT store_id FROM {LINK_TABLE}").fetchall()
        if linked and str(linked[0][0]) == store_id:
            return
        if linked:
            log.warning(
                "%s belongs to another store: its rules-lane record is discarded", self.path
            )
        con.execute("BEGIN TRANSACTION")
        for table in (
            LANE_OUTBOX.alerts,
            LANE_OUTBOX.deliveries,
            RULES_TABLE,
            INCIDENTS_TABLE,
            LINK_TABLE,
        ):
            con.execute(f"DELETE FROM {table}")
        con.execute(f"INSERT INTO {LINK_TABLE} VALUES (?)", [store_id])
        con.execute("COMMIT")

    def load(self, rules: Sequence[str]) -> LaneSaved:
        """The lane's record for ``rules`` (rules it never evaluated are absent)."""
        saved = LaneSaved()
        positions = []
        for rule, position, watermark, state in self.con.execute(
            f"SELECT rule, position, watermark, state FROM {RULES_TABLE}"
        ).fetchall():
            if rule not in rules:
                continue
            seen = {
                str(key): to_us(at)
                for key, at in self.con.execute(
                    f"SELECT key, last_seen_at FROM {INCIDENTS_TABLE} WHERE rule = ?", [rule]
                ).fetchall()
            }
            saved.rules[rule] = RuleSaved(
                None if watermark is None else to_us(watermark),
                seen,
                None if state is None else json.loads(state),
            )
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
            newest = self._insert_alerts(alerts, now) if alerts else 0
            seen: dict[str, list[Any]] = {"rule": [], "key": [], "last_seen_at": []}
            for rule, record in rules.items():
                seen["rule"] += [rule] * len(record.last_seen)
                seen["key"] += record.last_seen.keys()
                seen["last_seen_at"] += record.last_seen.values()
            if seen["rule"]:
                # One statement from an Arrow table (executemany runs one per row, ~4 ms
                # each on DuckDB; a VALUES list binds three parameters per row).
                con.register(_SEEN, pa.table(seen, schema=_SEEN_SCHEMA))
                try:
                    con.execute(f"INSERT OR REPLACE INTO {INCIDENTS_TABLE} SELECT * FROM {_SEEN}")
                finally:
                    con.unregister(_SEEN)
            self._record_rules(rules, position, now)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        self.newest = max(self.newest, newest)

    def _record_rules(self, rules: Mapping[str, RuleSaved], position: int, now: datetime) -> None:
        """Position and watermarks in one statement; a rule's state only when it changed."""
        con = self.con
        new = [rule for rule in rules if rule not in self._known]
        if new:
            con.execute(
                f"INSERT OR IGNORE INTO {RULES_TABLE} (rule, position, updated_at) VALUES "
                + ", ".join("(?, ?, ?)" for _ in new),
                [value for rule in new for value in (rule, position, now)],
            )
            self._known.update(new)
        cases = " ".join("WHEN ? THEN CAST(? AS TIMESTAMPTZ)" for _ in rules)
        params: list[object] = [position, now]
        for rule, record in rules.items():
            params += [rule, None if record.watermark_us is None else from_us(record.watermark_us)]
        params += list(rules)
        con.execute(
            f"""UPDATE {RULES_TABLE} SET position = ?, updated_at = ?,
                   watermark = CASE rule {cases} END
                WHERE rule IN ({", ".join("?" for _ in rules)})""",
            params,
        )
        for rule, record in rules.items():
            rows = record.state_rows()
            if rows is not None:
                con.execute(
                    f"UPDATE {RULES_TABLE} SET state = ? WHERE rule = ?",
                    [json.dumps(rows, default=str), rule],
                )

    def _insert_alerts(self, alerts: Sequence[LaneAlert], now: datetime) -> int:
        """Write the alerts and their outbox rows; the highest id."""
        detected_us = to_us(now)
        first = self.ids.reserve(self.con, len(alerts))
        rows: dict[str, list[Any]] = {name: [] for name in ALERT_SCHEMA.names}
        rows["id"] = list(range(first, first + len(alerts)))
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
        # The Arrow table itself is the new-alerts relation (no temp table to create and
        # drop: two statements less per commit); its payload text becomes JSON on insert.
        self.con.register(NEW_ALERTS, pa.table(rows, schema=ALERT_SCHEMA))
        try:
            write_new_alerts(self.con, self.sinks, now, LANE_OUTBOX)
        finally:
            self.con.unregister(NEW_ALERTS)
        return first + len(alerts) - 1

    # ------------------------------------------------------------ into the store

    def start_copies(self) -> None:
        """Find what the store already holds, and copy the rest (at start, on the lane's
        cursor: nothing else writes the store yet)."""
        rows = self.con.execute(
            f"""SELECT coalesce(max(l.id), 0),
                       coalesce(max(l.id) FILTER (WHERE a.id IS NOT NULL), 0)
                FROM {LANE_OUTBOX.alerts} l LEFT JOIN {ALERTS} a ON a.id = l.id"""
        ).fetchall()
        self.newest, self.copied = int(rows[0][0]), int(rows[0][1])
        if self.newest > self.copied:
            self.con.execute("BEGIN TRANSACTION")
            self.copy_alerts(self.con)
            self.con.execute("COMMIT")

    def copy_alerts(self, con: duckdb.DuckDBPyConnection) -> None:
        """Copy the lane's alerts the store lacks into ``headrace.alerts``, in the caller's
        transaction of the store (the engine's, before its commit)."""
        if self.newest <= self.copied:
            return
        columns = ", ".join(ALERT_COLUMNS)
        # Only what the caller's snapshot sees: a lane commit after its BEGIN waits for
        # the next copy (the lane's ids grow with its commits, so what is seen is a prefix).
        rows = con.execute(
            f"""INSERT INTO {ALERTS} ({columns})
                SELECT {columns} FROM {LANE_OUTBOX.alerts} WHERE id > ? RETURNING id""",
            [self.copied],
        ).fetchall()
        if rows:
            self.copied = max(self.copied, *(int(row[0]) for row in rows))

    def prune(self, now: datetime) -> int:
        """Delete the lane outbox's delivered rows past their sink's ``keep_delivered``."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            pruned = prune_delivered(self.con, self.sinks, now, LANE_OUTBOX)
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")
        return pruned

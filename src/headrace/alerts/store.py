"""Alerts in the store: the alerts table, incidents (dedup), and the delivery outbox.

Tables (schema ``headrace``), written in the batch's transaction:

``alerts``
    one row per alert: ``id, rule, severity, account_id, key, started_at,
    detected_at, payload`` (the columns serving relies on), then ``kind``
    (``fraud`` | ``metric``), ``status`` (``firing``, or ``resolved`` for a
    metric alert's all-clear), ``summary`` (one readable line), ``event_at``
    (event time of the evidence that completed the pattern), ``commit_ts``
    and ``lsn`` (commit of the change that completed it) and ``latency_ms``
    (``detected_at - commit_ts``: the detection latency).
``alert_incidents``
    one row per (rule, dedup key): the open incident's alert and the last
    time its condition held. A new alert is written only when the condition
    holds again after ``rearm_after`` of quiet: one alert per incident.
``alert_deliveries``
    the outbox: one row per (alert, sink) the alert must go to, inserted
    with the alert (so an alert and its pending deliveries commit together),
    then updated by the delivery threads: ``state`` (``pending``,
    ``delivered``, ``failed``), ``attempts``, ``last_error``, times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb
import pyarrow as pa

from headrace.alerts import handoff
from headrace.alerts import ids as alert_ids
from headrace.alerts.config import SEVERITY_RANK, SinkConfig
from headrace.pipeline.model import quote_literal
from headrace.store.duckdb.results import rows_written
from headrace.store.duckdb.schema import META

ALERTS = f"{META}.alerts"
INCIDENTS = f"{META}.alert_incidents"
DELIVERIES = f"{META}.alert_deliveries"


@dataclass(frozen=True)
class Outbox:
    """Where alerts and their deliveries are written: the engine's tables in the store, or
    the rules lane's in a file of its own (:mod:`headrace.rules.lane.store`)."""

    alerts: str = ALERTS
    deliveries: str = DELIVERIES

    def ddl(self) -> tuple[str, str]:
        """CREATE statements of the two tables (the columns of the store's)."""
        return (
            ALERTS_DDL[0].replace(ALERTS, self.alerts, 1),
            ALERTS_DDL[2].replace(DELIVERIES, self.deliveries, 1),
        )


STORE_OUTBOX = Outbox()

LANE_DB = "hr_lane"
"""Alias of the rules lane's file in the store's DuckDB instance (headrace.rules.lane.store)."""
LANE_OUTBOX = Outbox(alerts=f"{LANE_DB}.main.alerts", deliveries=f"{LANE_DB}.main.alert_deliveries")
"""The rules lane's alerts and outbox."""


def deliveries_seen(cursor: duckdb.DuckDBPyConnection) -> str:
    """SQL: every outbox row ``cursor`` can see (the store's, and the rules lane's when its
    file is attached), as one relation."""
    attached = cursor.execute(
        "SELECT count(*) FROM duckdb_databases() WHERE database_name = ?", [LANE_DB]
    ).fetchall()[0][0]
    if not attached:
        return DELIVERIES
    return f"(SELECT * FROM {DELIVERIES} UNION ALL SELECT * FROM {LANE_OUTBOX.deliveries})"


ALERT_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
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
"""The ``alerts`` table's columns as Arrow types (alerts built in Arrow are written
through it)."""

ALERT_COLUMNS: tuple[str, ...] = tuple(ALERT_SCHEMA.names)

ALERTS_DDL: tuple[str, ...] = (
    f"""CREATE TABLE IF NOT EXISTS {ALERTS} (
        id BIGINT PRIMARY KEY,
        rule TEXT NOT NULL,
        severity TEXT NOT NULL,
        account_id BIGINT,
        key TEXT NOT NULL,
        started_at TIMESTAMPTZ,
        detected_at TIMESTAMPTZ NOT NULL,
        payload JSON,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        summary TEXT,
        event_at TIMESTAMPTZ,
        commit_ts TIMESTAMPTZ,
        lsn UBIGINT,
        latency_ms DOUBLE
    )""",
    f"""CREATE TABLE IF NOT EXISTS {INCIDENTS} (
        rule TEXT NOT NULL,
        key TEXT NOT NULL,
        alert_id BIGINT,
        started_at TIMESTAMPTZ,
        last_seen_at TIMESTAMPTZ,
        triggers BIGINT NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (rule, key)
    )""",
    # No index: the delivery threads update rows while the writer appends new
    # ones; the table is scanned by state, which stays small per sink.
    f"""CREATE TABLE IF NOT EXISTS {DELIVERIES} (
        alert_id BIGINT NOT NULL,
        sink TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        next_attempt_at TIMESTAMPTZ,
        last_attempt_at TIMESTAMPTZ,
        delivered_at TIMESTAMPTZ,
        last_error TEXT,
        idempotency_key TEXT NOT NULL
    )""",
)

CANDIDATE_COLUMNS = (
    "account_id, dedup_key, event_at, started_at, commit_ts, lsn, severity, summary, payload"
)
"""Columns of a rule's candidates (one row per evidence that crossed the threshold)."""


def setup_alerts(con: duckdb.DuckDBPyConnection) -> None:
    for statement in ALERTS_DDL:
        con.execute(statement)


def _sinks_values(sinks: Sequence[SinkConfig]) -> str:
    """A VALUES list of (sink, min rank, rules, kinds) for the outbox insert."""
    rows = []
    for sink in sinks:
        rules = "NULL" if sink.rules is None else _list_literal(sink.rules)
        kinds = "NULL" if sink.kinds is None else _list_literal([k.value for k in sink.kinds])
        rows.append(
            f"({quote_literal(sink.name)}, {SEVERITY_RANK[sink.min_severity.value]}, "
            f"CAST({rules} AS VARCHAR[]), CAST({kinds} AS VARCHAR[]))"
        )
    return ", ".join(rows)


def _list_literal(items: Sequence[str]) -> str:
    return "[" + ", ".join(quote_literal(i) for i in items) + "]"


NEW_ALERTS = "_job_new_alerts"
"""The relation of the alerts being written (a temp table, or the rules lane's Arrow
table): every column of ``alerts``; read by :func:`write_new_alerts`."""


def insert_alerts(
    con: duckdb.DuckDBPyConnection, source: str, sinks: Sequence[SinkConfig], now: datetime
) -> int:
    """Insert the alerts ``source`` (SQL with every column of ``alerts`` but ``id``) selects,
    numbered after the last alert, and their pending deliveries; returns how many.

    The inserted rows stay in the temp table :data:`NEW_ALERTS` until the next call.
    """
    ids = alert_ids.registered(con)
    # One writer numbers after the table's maximum in the same statement; beside the
    # rules lane the ids come from the shared allocator (headrace.alerts.ids).
    base = "0" if ids is not None else f"(SELECT coalesce(max(id), 0) FROM {ALERTS})"
    created = con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {NEW_ALERTS} AS
        SELECT {base} + row_number() OVER (ORDER BY s.event_at, s.rule, s.key) AS id, s.*
        FROM ({source}) s"""
    )
    count = rows_written(created)
    if count and ids is not None:
        con.execute(f"UPDATE {NEW_ALERTS} SET id = id + ?", [ids.reserve(con, count) - 1])
    if count:
        write_new_alerts(con, sinks, now)
    return count


def write_new_alerts(
    con: duckdb.DuckDBPyConnection,
    sinks: Sequence[SinkConfig],
    now: datetime,
    outbox: Outbox = STORE_OUTBOX,
) -> None:
    """Insert the rows of :data:`NEW_ALERTS` (every column of ``alerts``)
    and their pending deliveries into ``outbox``; hand them to the connection's watcher,
    if any."""
    columns = ", ".join(ALERT_COLUMNS)
    # A watched writer hands the rows to the delivery threads (handoff module):
    # RETURNING gives them back without another statement.
    watched = bool(sinks) and handoff.watching(con)
    returning = f" RETURNING {columns}" if watched else ""
    inserted = con.execute(
        f"INSERT INTO {outbox.alerts} ({columns}) SELECT {columns} FROM {NEW_ALERTS}{returning}"
    )
    alert_rows = inserted.fetchall() if watched else []
    if sinks:
        returning = " RETURNING alert_id, sink, idempotency_key" if watched else ""
        pending = con.execute(
            f"""INSERT INTO {outbox.deliveries}
            SELECT a.id, k.sink, 'pending', 0, ?, ?, NULL, NULL, NULL,
                   'hr-' || substr(sha256(a.id || '|' || a.rule || '|' || a.key || '|'
                                          || CAST(a.detected_at AS VARCHAR)), 1, 32)
            FROM {NEW_ALERTS} a
            JOIN (VALUES {_sinks_values(sinks)}) k(sink, min_rank, rules, kinds)
              ON (CASE a.severity WHEN 'low' THEN 1 WHEN 'medium' THEN 2 WHEN 'high' THEN 3
                  ELSE 4 END) >= k.min_rank
             AND (k.rules IS NULL OR list_contains(k.rules, a.rule))
             AND (k.kinds IS NULL OR list_contains(k.kinds, a.kind)){returning}""",
            [now, now],
        )
        if watched:
            handoff.offer(con, handoff.NewAlerts(alert_rows, pending.fetchall()))


def emit_incidents(
    con: duckdb.DuckDBPyConnection,
    candidates: str,
    *,
    rearms: Mapping[str, timedelta],
    now: datetime,
    sinks: Sequence[SinkConfig],
) -> int:
    """Turn rules' candidates into alerts, one per incident; returns the alerts written.

    ``candidates`` is a table, or a parenthesized query (then it is computed
    by the first statement here: one statement less than a table of them),
    with a ``rule`` column (a key of ``rearms``) and
    :data:`CANDIDATE_COLUMNS`; when it has no rows, nothing more runs. Per
    rule and dedup key, candidates are
    taken in event-time order: one opens a new incident (and an alert) when
    the key has no incident, or when it comes more than the rule's rearm
    time after the previous candidate of the key (stored or in this batch);
    every other candidate extends the open incident. The alert shows the
    first candidate of its incident (of candidates with the same event time and
    commit, the one whose trigger is first as text). All rules are handled by
    the same few statements (each costs milliseconds on DuckDB, whatever its size).
    """
    rearm_values = ", ".join(
        f"({quote_literal(rule)}, {rearm.total_seconds()})" for rule, rearm in rearms.items()
    )
    flagged = con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _job_flagged AS
        SELECT c.*, i.last_seen_at AS stored_last,
               CASE WHEN lag(c.event_at) OVER w IS NULL
                    THEN i.last_seen_at IS NULL
                         OR c.event_at > i.last_seen_at + to_seconds(r.seconds)
                    -- The stored incident counts too: late candidates earlier in the
                    -- batch must not make a later one look like a new incident
                    -- (greatest skips a NULL: no stored incident).
                    ELSE c.event_at > greatest(lag(c.event_at) OVER w, i.last_seen_at)
                                      + to_seconds(r.seconds)
               END AS opens
        FROM {candidates} c
        JOIN (VALUES {rearm_values}) r(rule, seconds) ON r.rule = c.rule
        LEFT JOIN {INCIDENTS} i ON i.rule = c.rule AND i.key = c.dedup_key
        -- Candidates of one key, time and commit are taken in the order of their
        -- trigger's text, as the rules lane does: the same one opens the incident.
        WINDOW w AS (PARTITION BY c.rule, c.dedup_key
                     ORDER BY c.event_at, c.lsn, json_extract_string(c.payload, '$.trigger'))"""
    )
    if not rows_written(flagged):
        return 0
    written = _insert_opening(con, now, sinks)
    # MERGE: the upsert INSERT ... ON CONFLICT would do, with less CPU on DuckDB.
    con.execute(
        f"""MERGE INTO {INCIDENTS} _old
        USING (SELECT f.rule, f.dedup_key AS key, a.id AS alert_id, a.started_at,
                      max(f.event_at) AS last_seen_at, count(*) AS triggers,
                      CAST(? AS TIMESTAMPTZ) AS updated_at
               FROM _job_flagged f
               LEFT JOIN (SELECT rule, key, arg_max(id, event_at) AS id,
                                 arg_max(started_at, event_at) AS started_at
                          FROM {NEW_ALERTS} GROUP BY rule, key) a
                 ON a.rule = f.rule AND a.key = f.dedup_key
               GROUP BY f.rule, f.dedup_key, a.id, a.started_at) _new
        ON _old.rule = _new.rule AND _old.key = _new.key
        WHEN MATCHED THEN UPDATE SET
            alert_id = coalesce(_new.alert_id, _old.alert_id),
            started_at = coalesce(_new.started_at, _old.started_at),
            last_seen_at = greatest(_new.last_seen_at, _old.last_seen_at),
            triggers = _old.triggers + _new.triggers,
            updated_at = _new.updated_at
        WHEN NOT MATCHED THEN INSERT
            (rule, key, alert_id, started_at, last_seen_at, triggers, updated_at)
            VALUES (_new.rule, _new.key, _new.alert_id, _new.started_at, _new.last_seen_at,
                    _new.triggers, _new.updated_at)""",
        [now],
    )
    con.execute(f"DROP TABLE _job_flagged; DROP TABLE {NEW_ALERTS}")
    return written


def _insert_opening(
    con: duckdb.DuckDBPyConnection, now: datetime, sinks: Sequence[SinkConfig]
) -> int:
    stamp = quote_literal(now.isoformat())
    return insert_alerts(
        con,
        f"""SELECT rule, severity, TRY_CAST(account_id AS BIGINT) AS account_id,
                   dedup_key AS key, started_at, CAST({stamp} AS TIMESTAMPTZ) AS detected_at,
                   payload, 'fraud' AS kind, 'firing' AS status, summary, event_at,
                   commit_ts, lsn,
                   greatest(0, (epoch_us(CAST({stamp} AS TIMESTAMPTZ))
                                - epoch_us(commit_ts)) / 1000.0) AS latency_ms
            FROM _job_flagged WHERE opens""",
        sinks,
        now,
    )

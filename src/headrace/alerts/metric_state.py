"""A metric alert's state machine per group, its table, and the alert rows it writes.

Per alert and ``group_by`` combination, ``headrace.metric_alert_state`` holds whether
the group is firing: *ok* → *firing* when a reading's number :func:`crosses` a
threshold, *firing* → *ok* when it :func:`clears` them by the hysteresis margin.
:func:`transition` applies it to one evaluation's readings, and writes the alert rows
(through :func:`headrace.alerts.store.insert_alerts`) and the new state. Kept apart
from the job (:mod:`headrace.alerts.metric`: when an alert is evaluated) and from the
reading of the numbers (:mod:`headrace.alerts.metric_reading`).
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

import pyarrow as pa

from headrace.alerts.config import MetricAlertConfig, MetricCondition, SinkConfig
from headrace.alerts.metric_reading import Reading, Watched
from headrace.alerts.store import ALERT_SCHEMA, insert_alerts
from headrace.jobs.base import JobContext
from headrace.store.duckdb.schema import META, grain_label

STATE = f"{META}.metric_alert_state"

STATE_DDL = f"""CREATE TABLE IF NOT EXISTS {STATE} (
    name TEXT NOT NULL,
    group_key TEXT NOT NULL,
    firing BOOLEAN NOT NULL,
    since TIMESTAMPTZ,
    number DOUBLE,
    alert_id BIGINT,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (name, group_key)
)"""

_INPUT_SCHEMA = ALERT_SCHEMA.remove(ALERT_SCHEMA.get_field_index("id"))
"""The alerts' columns but ``id`` (:func:`insert_alerts` numbers them)."""


def crosses(config: MetricAlertConfig, number: float) -> bool:
    """The number is at or beyond a threshold (fires)."""
    return (config.above is not None and number >= config.above) or (
        config.below is not None and number <= config.below
    )


def clears(config: MetricAlertConfig, number: float) -> bool:
    """The number is back inside every threshold by the hysteresis margin (resolves)."""
    h = config.hysteresis
    if config.above is not None and number >= config.above - abs(config.above) * h:
        return False
    return not (config.below is not None and number <= config.below + abs(config.below) * h)


def transition(
    ctx: JobContext,
    watched: Watched,
    target: datetime,
    readings: list[Reading],
    *,
    sinks: tuple[SinkConfig, ...],
    commit_ts: datetime | None,
    lsn: int | None,
) -> int:
    """Apply the state machine to each group; write alerts and state."""
    con, config = ctx.con, watched.config
    state = {
        str(r[0]): (bool(r[1]), r[2])
        for r in con.execute(
            f"SELECT group_key, firing, since FROM {STATE} WHERE name = ?", [config.name]
        ).fetchall()
    }
    evaluated = {json.dumps(r.group, sort_keys=True, default=str): r for r in readings}
    if config.measure is not None and config.condition is MetricCondition.THRESHOLD:
        for group_key, (firing, _) in state.items():
            if firing and group_key not in evaluated:  # no rows at all: the sum is 0
                evaluated[group_key] = Reading(json.loads(group_key), 0.0, None, None, None, 0)
    alerts: list[dict[str, Any]] = []
    updates: list[list[Any]] = []
    for group_key, reading in evaluated.items():
        _step(
            ctx,
            watched,
            target,
            reading,
            group_key=group_key,
            state=state,
            alerts=alerts,
            updates=updates,
        )
    for update in updates:
        con.execute(
            f"""INSERT INTO {STATE} VALUES (?, ?, ?, ?, ?, NULL, ?)
            ON CONFLICT (name, group_key) DO UPDATE SET firing = excluded.firing,
                since = excluded.since, number = excluded.number,
                updated_at = excluded.updated_at""",
            update,
        )
    if not alerts:
        return 0
    for alert in alerts:
        alert.update(commit_ts=commit_ts, lsn=lsn, latency_ms=_latency(ctx.now, commit_ts))
    table = pa.Table.from_pylist(alerts, schema=_INPUT_SCHEMA)
    con.register("_job_ma_in", table)
    try:
        written = insert_alerts(con, "SELECT * FROM _job_ma_in", sinks, ctx.now)
        con.execute(
            f"""UPDATE {STATE} s SET alert_id = a.id FROM _job_new_alerts a
            WHERE s.name = a.rule AND a.status = 'firing'
              AND a.key = s.name || CASE WHEN s.group_key = '{{}}' THEN ''
                                         ELSE ' ' || s.group_key END"""
        )
    finally:
        con.unregister("_job_ma_in")
    return written


def _step(
    ctx: JobContext,
    watched: Watched,
    target: datetime,
    reading: Reading,
    *,
    group_key: str,
    state: dict[str, tuple[bool, Any]],
    alerts: list[dict[str, Any]],
    updates: list[list[Any]],
) -> None:
    config = watched.config
    number = reading.number(config.condition)
    if number is None or math.isnan(number):
        return
    firing, since = state.get(group_key, (False, None))
    if not firing and crosses(config, number):
        alerts.append(
            _alert(
                ctx,
                watched,
                target,
                reading,
                group_key=group_key,
                number=number,
                status="firing",
            )
        )
        updates.append([config.name, group_key, True, target, number, ctx.now])
    elif firing and clears(config, number):
        if config.notify_resolved:
            alert = _alert(
                ctx,
                watched,
                target,
                reading,
                group_key=group_key,
                number=number,
                status="resolved",
            )
            alert["started_at"] = since
            alerts.append(alert)
        updates.append([config.name, group_key, False, None, number, ctx.now])


def _alert(
    ctx: JobContext,
    watched: Watched,
    target: datetime,
    reading: Reading,
    *,
    group_key: str,
    number: float,
    status: str,
) -> dict[str, Any]:
    config = watched.config
    key = config.name if group_key == "{}" else f"{config.name} {group_key}"
    where = "".join(f" {k}={v}" for k, v in reading.group.items())
    label = {"threshold": "value", "change": "change %", "zscore": "z-score"}[
        config.condition.value
    ]
    limits = " / ".join(
        f"{word} {limit:g}"
        for word, limit in (("above", config.above), ("below", config.below))
        if limit is not None
    )
    summary = (
        f"{config.name}{where}: {label} {number:.4g} ({limits}) in the "
        f"{grain_label(watched.grain)} bucket of {target:%Y-%m-%d %H:%M} UTC"
        + (" — resolved" if status == "resolved" else "")
    )
    payload = {
        "numbers": {
            "number": number,
            "condition": config.condition.value,
            "value": reading.value,
            "previous": reading.previous,
            "mean": reading.mean,
            "stddev": reading.stddev,
            "baseline_buckets": reading.baseline,
            "above": config.above,
            "below": config.below,
            "hysteresis": config.hysteresis,
        },
        "rollup": watched.rollup.name,
        "grain": grain_label(watched.grain),
        "bucket": target.isoformat(),
        "group": reading.group,
    }
    return {
        "rule": config.name,
        "severity": config.severity.value,
        "account_id": None,
        "key": key,
        "started_at": target,
        "detected_at": ctx.now,
        "payload": json.dumps(payload, default=str),
        "kind": "metric",
        "status": status,
        "summary": summary,
        "event_at": target,
    }


def _latency(now: datetime, commit_ts: datetime | None) -> float | None:
    return None if commit_ts is None else max(0.0, (now - commit_ts).total_seconds() * 1000)

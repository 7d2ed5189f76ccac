"""Metric alerts: thresholds, % change and z-scores on any rollup, with hysteresis.

A stream job evaluated after the rollups of every batch that touched the
watched rollup's table, inside the batch's transaction. For each alert:

1. the *evaluated bucket*: the bucket of ``rollup.<rollup>_<grain>`` holding
   the alert's watermark (the newest ``least(time, commit time)`` of the
   watched table's rows; ``current``), or the one before it (``previous``,
   the default: the last complete bucket);
2. per ``group_by`` combination, the value (``sum(measure)`` or the
   ``value`` expression) of that bucket, of the bucket before it, and the
   mean and sample standard deviation of the ``baseline`` buckets before it
   (a bucket without rows counts as 0 for a ``measure``, and is left out for
   a ``value`` expression);
3. the compared number: the value (``threshold``), the percent change
   ``100 * (value - previous) / |previous|`` (``change``; undefined when the
   previous bucket is 0), or ``(value - mean) / stddev`` (``zscore``;
   undefined with fewer than 3 baseline buckets or no spread);
4. a state machine per group in ``headrace.metric_alert_state``: *ok* →
   *firing* when the number is at or beyond ``above``/``below`` (one alert
   row, delivered once); *firing* → *ok* only when the number is back inside
   by the ``hysteresis`` margin (``above - |above| * hysteresis``), with a
   ``resolved`` alert row when ``notify_resolved``. While firing nothing more
   is written: notify once until resolved. An undefined number changes
   nothing.

The groups evaluated each batch are few (dimension values), so the state
machine itself runs in Python over a handful of rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa

from headrace.alerts.config import MetricAlertConfig, MetricCondition, SinkConfig
from headrace.alerts.store import insert_alerts
from headrace.errors import ConfigError
from headrace.jobs.base import EARLIEST_CHANGE, LATEST, JobContext, StreamJob, TimeRequest
from headrace.jobs.state import latest
from headrace.pipeline.model import (
    COMMIT_TIME,
    MeasureConfig,
    MeasureFn,
    PipelineConfig,
    RollupConfig,
    quote_ident,
)
from headrace.source.changes import COMMIT_TS, LSN, TableRef
from headrace.store.duckdb.schema import EVENT_TS, META, ROLLUP, grain_label, rollup_view

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

_INPUT_SCHEMA = pa.schema(
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


@dataclass(frozen=True)
class _Watched:
    config: MetricAlertConfig
    rollup: RollupConfig
    table: TableRef
    grain: timedelta
    time: str
    """SQL over the table's rows: the rollup's time column (the hidden event time for
    ``commit``)."""

    @property
    def span(self) -> timedelta:
        """The buckets an evaluation reads: the evaluated one and those before it."""
        back = self.config.baseline if self.config.condition is MetricCondition.ZSCORE else 1
        return self.grain * (back + 1)

    @property
    def skippable(self) -> bool:
        """An evaluation may be skipped when the batch changed no bucket it reads.

        Only rows of the watched table move its rollup (lookups are resolved when a
        row is applied), at their own time; a commit-time rollup's rows are always
        recent, and a retention shorter than the buckets read could drop some of
        them between batches, so neither is skipped.
        """
        retention = self.rollup.retention
        return self.time != EVENT_TS and (retention is None or retention > 2 * self.span)


@dataclass(frozen=True)
class Reading:
    """The numbers of one group in one evaluation."""

    group: dict[str, Any]
    value: float | None
    previous: float | None
    mean: float | None
    stddev: float | None
    baseline: int

    def number(self, condition: MetricCondition) -> float | None:
        """The number compared with the thresholds (None when undefined)."""
        if condition is MetricCondition.THRESHOLD:
            return self.value
        if condition is MetricCondition.CHANGE:
            if self.value is None or not self.previous:
                return None
            return 100.0 * (self.value - self.previous) / abs(self.previous)
        if self.value is None or self.mean is None or not self.stddev or self.baseline < 3:
            return None
        return (self.value - self.mean) / self.stddev


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


_ADDITIVE = frozenset({MeasureFn.COUNT, MeasureFn.SUM})
"""Measures whose values per group add up to the value of the groups together."""

_WHOLE_GROUPS = "group_by every dimension, or a rollup with only the dimensions wanted"
_INSTEAD = {
    MeasureFn.MIN: 'value: min("{name}")',
    MeasureFn.MAX: 'value: max("{name}")',
    MeasureFn.AVG: 'value: a sum measure over a count measure, e.g. sum("total") / sum("n")',
    MeasureFn.COUNT_DISTINCT: _WHOLE_GROUPS,
    MeasureFn.APPROX_COUNT_DISTINCT: _WHOLE_GROUPS,
}


def _unsummable(
    alert: MetricAlertConfig, measure: MeasureConfig, dimensions: set[str]
) -> str | None:
    """Why ``measure:`` cannot give the alert's value, or None. The value is the
    measure's sum over the bucket's view rows of a group: right for counts and sums,
    and for any measure when the group is one row (``group_by`` names every dimension
    of the rollup); wrong for a min, max, average or distinct count over several rows."""
    if measure.fn in _ADDITIVE or dimensions <= set(alert.group_by):
        return None
    instead = _INSTEAD[measure.fn].format(name=measure.name)
    return (
        f"metric alert {alert.name}: {measure.name} is a {measure.fn} measure, so its values "
        f"per {', '.join(sorted(dimensions - set(alert.group_by)))} do not add up to the "
        f"bucket's (the alert sums them); use {instead}"
    )


class MetricAlerts(StreamJob):
    """Every configured metric alert (module docstring)."""

    name = "metric_alerts"

    def __init__(
        self,
        pipeline: PipelineConfig,
        alerts: Sequence[MetricAlertConfig],
        sinks: tuple[SinkConfig, ...],
    ) -> None:
        self.sinks = sinks
        self.watched: list[_Watched] = []
        self._evaluated: dict[str, tuple[datetime, int]] = {}
        """Per alert, the bucket evaluated last and the oid of the view read (in this
        process, since the last setup or rebuild): the same bucket of the same view
        need not be evaluated again while no batch changes a bucket the evaluation
        reads (same readings, same state, nothing new to write)."""
        problems = []
        for alert in alerts:
            try:
                rollup = pipeline.rollup(alert.rollup)
            except KeyError:
                problems.append(f"metric alert {alert.name}: no rollup named {alert.rollup!r}")
                continue
            grain = alert.grain or rollup.grain
            if grain not in rollup.grains:
                problems.append(f"metric alert {alert.name}: {rollup.name} has no grain {grain}")
            dimensions = {d.name for d in rollup.dimensions}
            for name in alert.group_by:
                if name not in dimensions:
                    problems.append(
                        f"metric alert {alert.name}: {rollup.name} has no dimension {name}"
                    )
            measures = {m.name: m for m in rollup.measures}
            if alert.measure is not None and alert.measure not in measures:
                problems.append(
                    f"metric alert {alert.name}: {rollup.name} has no measure {alert.measure}"
                )
            elif alert.measure is not None:
                problem = _unsummable(alert, measures[alert.measure], dimensions)
                if problem is not None:
                    problems.append(problem)
            ref = TableRef.parse(rollup.table)
            table = pipeline.table_refs.get(ref)
            column = rollup.time or (table.event_time if table is not None else COMMIT_TIME)
            time = EVENT_TS if column == COMMIT_TIME else quote_ident(column)
            self.watched.append(_Watched(alert, rollup, ref, grain, time))
        names = [a.name for a in alerts]
        if len(set(names)) != len(names):
            problems.append("two metric alerts have the same name")
        if problems:
            raise ConfigError(
                "; ".join(problems),
                "fix metric_alerts in the pipeline file (names of rollups, "
                "their grains, dimensions and measures)",
            )

    def definition(self) -> dict[str, object]:
        """The metric alerts' configurations (their state is kept across definitions)."""
        return {"alerts": [w.config.model_dump(mode="json") for w in self.watched]}

    def inputs(self) -> tuple[TableRef, ...]:
        return tuple(dict.fromkeys(w.table for w in self.watched))

    def times(self) -> tuple[TimeRequest, ...]:
        requests = []
        for watched in self.watched:
            requests.append(TimeRequest(LATEST, watched.table, watched.time))
            if watched.skippable:
                requests.append(TimeRequest(EARLIEST_CHANGE, watched.table, watched.time))
        return tuple(dict.fromkeys(requests))

    def setup(self, con: duckdb.DuckDBPyConnection) -> None:
        # Also after a rolled-back transaction: what was evaluated in it is forgotten.
        self._evaluated.clear()
        con.execute(STATE_DDL)

    def rebuild(self, ctx: JobContext) -> None:
        """Nothing to rebuild: the rollups are rebuilt by the engine; the state stays."""
        self._evaluated.clear()

    def apply(self, ctx: JobContext) -> None:
        views: dict[str, int] | None = None
        for watched in self.watched:
            delta = ctx.delta(watched.table)
            if delta is None:
                continue
            if views is None:
                views = {
                    str(r[0]): int(r[1])
                    for r in ctx.con.execute(
                        "SELECT view_name, view_oid FROM duckdb_views() WHERE schema_name = ?",
                        [ROLLUP],
                    ).fetchall()
                }
            view = views.get(f"{watched.rollup.name}_{grain_label(watched.grain)}")
            if view is None:
                continue  # the rollup is not built (yet), or paused without views
            # A rebuilt rollup has new views: its numbers may have changed.
            target = self._target(ctx, watched)
            if target is None:
                continue
            if (target, view) == self._evaluated.get(watched.config.name) and self._unchanged(
                ctx, watched, target
            ):
                continue
            commit_ts, lsn = ctx.con.execute(
                f"SELECT max({COMMIT_TS}), max({LSN}) FROM {delta.changes}"
            ).fetchall()[0]
            self.evaluate(ctx, watched, commit_ts, lsn)
            self._evaluated[watched.config.name] = (target, view)

    def _target(self, ctx: JobContext, watched: _Watched) -> datetime | None:
        """Advance the alert's watermark with the batch; the bucket it evaluates."""
        job = f"{self.name}:{watched.config.name}"
        watermark = latest(ctx.watermark(job)[0], ctx.batch_time(watched.table, watched.time))
        if watermark is None:
            return None
        ctx.set_watermark(job, watermark, None)
        seconds = int(watched.grain.total_seconds())
        target = datetime.fromtimestamp(int(watermark.timestamp()) // seconds * seconds, UTC)
        if watched.config.bucket == "previous":
            target -= watched.grain
        return target

    def _unchanged(self, ctx: JobContext, watched: _Watched, target: datetime) -> bool:
        """The batch changed no row in the buckets an evaluation of ``target`` reads (its
        rows all lie in later buckets), so evaluating ``target`` again changes nothing."""
        delta = ctx.delta(watched.table)
        if delta is None or delta.truncated or not watched.skippable:
            return False
        earliest = ctx.earliest_change(watched.table, watched.time)
        return earliest is None or earliest >= target + watched.grain

    def evaluate(
        self, ctx: JobContext, watched: _Watched, commit_ts: datetime | None, lsn: int | None
    ) -> int:
        """Evaluate one alert; returns the alert rows written.

        The current bucket is the one holding the alert's watermark (the newest
        ``least(time, commit time)`` of the watched table's rows seen so far).
        """
        target = self._target(ctx, watched)
        if target is None:
            return 0
        view = rollup_view(watched.rollup.name, watched.grain)
        readings = self.read(ctx.con, watched, view, target)
        return self.transition(ctx, watched, target, readings, commit_ts=commit_ts, lsn=lsn)

    def read(
        self, con: duckdb.DuckDBPyConnection, watched: _Watched, view: str, target: datetime
    ) -> list[Reading]:
        """The numbers of every group at ``target`` (SQL over the rollup view)."""
        config, grain = watched.config, watched.grain
        back = config.baseline if config.condition is MetricCondition.ZSCORE else 1
        low = target - grain * back
        groups = [quote_ident(g) for g in config.group_by]
        group_list = ", ".join(groups)
        select_groups = f"{group_list}, " if groups else ""
        join_groups = " AND ".join(f"a.{g} IS NOT DISTINCT FROM g.{g}" for g in groups) or "true"
        missing = "0" if config.measure is not None else "NULL"
        where = config.where or "true"
        seconds = grain.total_seconds()
        rows = con.execute(
            f"""WITH agg AS (
                SELECT {select_groups}bucket, CAST({config.value_sql} AS DOUBLE) AS v
                FROM {view} WHERE bucket >= ? AND bucket <= ? AND ({where})
                GROUP BY ALL
            ), g AS (SELECT DISTINCT {group_list or "1 AS _all"} FROM agg),
            s AS (SELECT unnest(generate_series(CAST(? AS TIMESTAMPTZ), CAST(? AS TIMESTAMPTZ),
                                                to_seconds({seconds}))) AS bucket),
            grid AS (
                SELECT g.*, s.bucket, coalesce(a.v, {missing}) AS v
                FROM g CROSS JOIN s LEFT JOIN agg a ON a.bucket = s.bucket AND {join_groups}
            )
            SELECT {select_groups}
                   max(v) FILTER (WHERE bucket = ?) AS value,
                   max(v) FILTER (WHERE bucket = ?) AS previous,
                   avg(v) FILTER (WHERE bucket < ?) AS mean,
                   stddev_samp(v) FILTER (WHERE bucket < ?) AS stddev,
                   count(v) FILTER (WHERE bucket < ?) AS baseline
            FROM grid GROUP BY ALL""",
            [low, target, low, target, target, target - grain, target, target, target],
        ).fetchall()
        readings = []
        for row in rows:
            values = row[len(groups) :]
            group = dict(zip(config.group_by, row[: len(groups)], strict=True))
            readings.append(
                Reading(
                    group={k: _plain(v) for k, v in group.items()},
                    value=_float(values[0]),
                    previous=_float(values[1]),
                    mean=_float(values[2]),
                    stddev=_float(values[3]),
                    baseline=int(values[4] or 0),
                )
            )
        return readings

    def transition(
        self,
        ctx: JobContext,
        watched: _Watched,
        target: datetime,
        readings: list[Reading],
        *,
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
        seen = set()
        alerts: list[dict[str, Any]] = []
        updates: list[list[Any]] = []
        for reading in readings:
            group_key = json.dumps(reading.group, sort_keys=True, default=str)
            seen.add(group_key)
            self._step(
                ctx,
                watched,
                target,
                reading,
                group_key=group_key,
                state=state,
                alerts=alerts,
                updates=updates,
            )
        if config.measure is not None and config.condition is MetricCondition.THRESHOLD:
            for group_key, (firing, _) in state.items():
                if firing and group_key not in seen:  # no rows at all: the sum is 0
                    reading = Reading(json.loads(group_key), 0.0, None, None, None, 0)
                    self._step(
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
            written = insert_alerts(con, "SELECT * FROM _job_ma_in", self.sinks, ctx.now)
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
        self,
        ctx: JobContext,
        watched: _Watched,
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
                self._alert(
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
                alert = self._alert(
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
        self,
        ctx: JobContext,
        watched: _Watched,
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


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _plain(value: object) -> object:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _latency(now: datetime, commit_ts: datetime | None) -> float | None:
    return None if commit_ts is None else max(0.0, (now - commit_ts).total_seconds() * 1000)

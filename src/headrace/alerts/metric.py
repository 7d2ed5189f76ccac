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

This module is the job: it checks the alerts against the pipeline and decides when
each is evaluated, and which bucket. What an evaluation reads (2, 3) is
:mod:`headrace.alerts.metric_reading`; the state machine and the alert rows it writes
(4), :mod:`headrace.alerts.metric_state`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import duckdb

from headrace.alerts.config import MetricAlertConfig, SinkConfig
from headrace.alerts.metric_reading import Watched, read
from headrace.alerts.metric_state import STATE_DDL, transition
from headrace.errors import ConfigError
from headrace.jobs.base import EARLIEST_CHANGE, LATEST, JobContext, StreamJob, TimeRequest
from headrace.jobs.state import latest
from headrace.pipeline.model import (
    COMMIT_TIME,
    MeasureConfig,
    MeasureFn,
    PipelineConfig,
    quote_ident,
)
from headrace.source.changes import COMMIT_TS, LSN, TableRef
from headrace.store.duckdb.schema import EVENT_TS, ROLLUP, grain_label, rollup_view

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
        self.watched: list[Watched] = []
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
            self.watched.append(Watched(alert, rollup, ref, grain, time))
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

    def _target(self, ctx: JobContext, watched: Watched) -> datetime | None:
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

    def _unchanged(self, ctx: JobContext, watched: Watched, target: datetime) -> bool:
        """The batch changed no row in the buckets an evaluation of ``target`` reads (its
        rows all lie in later buckets), so evaluating ``target`` again changes nothing."""
        delta = ctx.delta(watched.table)
        if delta is None or delta.truncated or not watched.skippable:
            return False
        earliest = ctx.earliest_change(watched.table, watched.time)
        return earliest is None or earliest >= target + watched.grain

    def evaluate(
        self, ctx: JobContext, watched: Watched, commit_ts: datetime | None, lsn: int | None
    ) -> int:
        """Evaluate one alert; returns the alert rows written.

        The current bucket is the one holding the alert's watermark (the newest
        ``least(time, commit time)`` of the watched table's rows seen so far).
        """
        target = self._target(ctx, watched)
        if target is None:
            return 0
        view = rollup_view(watched.rollup.name, watched.grain)
        readings = read(ctx.con, watched, view, target)
        return transition(
            ctx, watched, target, readings, sinks=self.sinks, commit_ts=commit_ts, lsn=lsn
        )

"""What a metric alert's evaluation reads: the watched rollup, and each group's numbers.

:class:`Watched` is one configured alert resolved against the pipeline (its rollup,
table, grain and time column, and the buckets an evaluation reads); :func:`read` turns
the buckets of its rollup view up to the evaluated one into a :class:`Reading` per
group, whose :meth:`Reading.number` is the number compared with the thresholds. Kept
apart from the job (:mod:`headrace.alerts.metric`: when an alert is evaluated) and the
state machine (:mod:`headrace.alerts.metric_state`: what a reading changes): this is
the read-only SQL over the rollup view.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import duckdb

from headrace.alerts.config import MetricAlertConfig, MetricCondition
from headrace.pipeline.model import RollupConfig, quote_ident
from headrace.source.changes import TableRef
from headrace.store.duckdb.schema import EVENT_TS


@dataclass(frozen=True)
class Watched:
    """One metric alert resolved against the pipeline: its rollup, table and grain."""

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


def read(
    con: duckdb.DuckDBPyConnection, watched: Watched, view: str, target: datetime
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


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _plain(value: object) -> object:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)

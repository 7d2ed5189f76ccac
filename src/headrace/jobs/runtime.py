"""The engine's hook for stream jobs: build them from the pipeline, run them per batch.

The engine calls, from its writer thread and inside its open transaction:

- :meth:`StreamJobs.setup` when it opens the store,
- :meth:`StreamJobs.apply` after each batch segment's mirrors and rollups
  are written (so the jobs' state commits with the batch and its position),
- :meth:`StreamJobs.after_snapshot` after a snapshot loaded the mirrors
  (each job rebuilds its state from them; nothing is alerted for the past),
- :meth:`StreamJobs.rebuild_redefined` when it opens a store that holds a
  snapshot: a job whose definition changed since its state was built (a longer
  window, another table) is rebuilt the same way, as a changed rollup is.

A job runs only when every table it reads is a known, mirrored table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import duckdb

from headrace.alerts.metric import MetricAlerts
from headrace.alerts.store import setup_alerts
from headrace.errors import ConfigError
from headrace.jobs.base import JobContext, MirroredTable, StreamJob, TableDelta
from headrace.jobs.state import (
    SETUP_DDL,
    read_definitions,
    read_watermarks,
    write_definitions,
    write_watermarks,
)
from headrace.rules.registry import build_rules
from headrace.rules.ruleset import RuleSet
from headrace.scores.health import HealthScore
from headrace.source.changes import TableRef

if TYPE_CHECKING:
    from headrace.engine.resolve import TableWork
    from headrace.pipeline.model import PipelineConfig

log = logging.getLogger(__name__)


class StreamJobs:
    """The configured stream jobs of one pipeline (empty when none are configured)."""

    def __init__(self, jobs: Sequence[StreamJob], *, alerts: bool = False) -> None:
        self.jobs = list(jobs)
        self.alerts = alerts or bool(self.jobs)
        """Create the alerts tables (jobs write them; sinks read them)."""
        self.seconds: dict[str, float] = {job.name: 0.0 for job in self.jobs}
        """Time spent in each job since the engine started (for status and benchmarks)."""
        self._watermarks: dict[str, tuple[datetime | None, datetime | None]] | None = None
        """The stored watermarks as of the last batch (read once; cleared by :meth:`setup`,
        which the engine calls again after a rolled-back transaction)."""

    @classmethod
    def from_config(cls, config: PipelineConfig) -> StreamJobs:
        """The jobs ``config`` asks for: rules, health score, metric alerts."""
        sinks = tuple(config.sinks)
        jobs: list[StreamJob] = []
        if config.rules is not None:
            rules = build_rules(config.rules)
            if rules:
                jobs.append(RuleSet(rules, sinks))
        if config.scores is not None and config.scores.health is not None:
            jobs.append(HealthScore(config.scores, config.rules))
        if config.metric_alerts:
            jobs.append(MetricAlerts(config, config.metric_alerts, sinks))
        problems = check_jobs(config, jobs)
        if problems:
            raise ConfigError(
                "the stream jobs cannot run: " + "; ".join(problems),
                "list the tables they read under source.tables (with mirror: true), "
                "or fix the names under rules.tables / scores / metric_alerts",
            )
        return cls(jobs, alerts=bool(sinks))

    def __bool__(self) -> bool:
        return bool(self.jobs)

    # ------------------------------------------------------------- engine hook

    def setup(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create the jobs' fixed tables (inside the engine's opening transaction)."""
        if not self.alerts:
            return
        self._watermarks = None
        for statement in SETUP_DDL:
            con.execute(statement)
        setup_alerts(con)
        for job in self.jobs:
            job.ready = False
            job.setup(con)

    def apply(
        self,
        con: duckdb.DuckDBPyConnection,
        works: Iterable[TableWork],
        tables: Mapping[TableRef, Any],
    ) -> None:
        """Run every job whose input tables changed in this batch segment."""
        if not self.jobs:
            return
        deltas = {}
        for work in works:
            model = work.model
            if not model.config.mirror or not (work.start_rows or work.end_rows):
                continue
            deltas[model.ref] = TableDelta(
                table=model.ref,
                mirror=model.mirror,
                key=tuple(model.key),
                start=work.start,
                end=work.end,
                changes=work.changes,
                keys=work.keys,
                truncated=work.truncated_at is not None,
                start_count=work.start_rows,
                deletes=work.deletes,
                end_count=work.end_rows,
            )
        if not deltas:
            return
        if self._watermarks is None:
            self._watermarks = read_watermarks(con)
        ctx = JobContext(
            con, deltas, datetime.now(UTC), mirrored(tables), watermarks=dict(self._watermarks)
        )
        runnable = [
            job
            for job in self.jobs
            if ctx.touched(job.inputs()) and all(r in ctx.tables for r in job.reads())
        ]
        ctx.prefetch(request for job in runnable for request in job.times())
        for job in runnable:
            started = time.perf_counter()
            job.apply(ctx)
            self.seconds[job.name] += time.perf_counter() - started
        ctx.run_deferred()
        write_watermarks(con, {job: ctx.watermarks[job] for job in ctx.changed})
        self._watermarks = ctx.watermarks

    def after_snapshot(
        self,
        con: duckdb.DuckDBPyConnection,
        loaded: Iterable[TableRef],
        tables: Mapping[TableRef, Any],
    ) -> None:
        """Rebuild every job reading a table the snapshot loaded."""
        refs = set(loaded)
        self._rebuild(con, [job for job in self.jobs if not refs.isdisjoint(job.reads())], tables)

    def rebuild_redefined(
        self, con: duckdb.DuckDBPyConnection, tables: Mapping[TableRef, Any]
    ) -> list[str]:
        """Rebuild, from the mirrors, every job whose definition differs from the one its
        state was built for (a window, table or condition changed in the configuration, or
        its :attr:`~headrace.jobs.base.StreamJob.state_version`), and return their names.

        Call once the store holds a snapshot: before it, :meth:`after_snapshot` builds
        every job. Nothing is alerted for the past; incidents already open stay open.
        """
        if not self.jobs:
            return []
        stored = read_definitions(con)
        redefined = [job for job in self.jobs if stored.get(job.name) != job_definition(job)]
        for job in redefined:
            reason = "is new to this store" if job.name not in stored else "changed"
            log.info("stream job %s %s: rebuilding its state from the mirrors", job.name, reason)
        return self._rebuild(con, redefined, tables)

    def _rebuild(
        self,
        con: duckdb.DuckDBPyConnection,
        jobs: Sequence[StreamJob],
        tables: Mapping[TableRef, Any],
    ) -> list[str]:
        """Rebuild ``jobs`` whose tables are all mirrored; record their definitions."""
        if not jobs:
            return []
        ctx = JobContext(
            con, {}, datetime.now(UTC), mirrored(tables), watermarks=read_watermarks(con)
        )
        built = {}
        for job in jobs:
            if not all(r in ctx.tables for r in job.reads()):
                continue
            started = time.perf_counter()
            job.rebuild(ctx)
            built[job.name] = job_definition(job)
            log.info("stream job %s rebuilt in %.2f s", job.name, time.perf_counter() - started)
        write_watermarks(con, {job: ctx.watermarks[job] for job in ctx.changed})
        write_definitions(con, built)
        self._watermarks = None
        return list(built)


def job_definition(job: StreamJob) -> str:
    """``job``'s definition as stored: canonical JSON with its state version."""
    return json.dumps(
        {"state_version": job.state_version, **job.definition()}, sort_keys=True, default=str
    )


def mirrored(tables: Mapping[TableRef, Any]) -> dict[TableRef, MirroredTable]:
    """The engine's table models reduced to what jobs read (mirrored, live tables only)."""
    out = {}
    for ref, model in tables.items():
        if model.config.mirror and model.state == "active" and model.key:
            out[ref] = MirroredTable(ref, model.mirror, tuple(model.key))
    return out


def check_jobs(config: PipelineConfig, jobs: Sequence[StreamJob]) -> list[str]:
    """Problems that stop the jobs from running: tables not captured or not mirrored."""
    problems = []
    refs = config.table_refs
    for job in jobs:
        for ref in job.reads():
            table = refs.get(ref)
            if table is None:
                problems.append(f"{job.name} reads {ref}, which is not under source.tables")
            elif not table.mirror:
                problems.append(f"{job.name} reads {ref}, which has mirror: false")
    return problems

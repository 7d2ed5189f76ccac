"""Keyed stream jobs: what a job is, and what it sees of a batch.

A stream job (a fraud rule, the health score, the metric alerts) keeps its
own state in DuckDB tables and updates it from each batch **inside the
batch's transaction**, after the engine has written the mirrors and the
rollups. Its state therefore commits or rolls back together with the batch
and the source position: after a crash, the store holds the job's state as
of the position it resumes from, and the batch is applied again, once.

What a job sees of one table in one batch is a :class:`TableDelta`: the
names of the engine's temp tables for that batch (see
:mod:`headrace.engine.resolve`):

``start``
    the rows of every key the batch touched, as they were before the batch
``end``
    the same keys' rows after the batch (absent when deleted), plus ``_hr_seq``
``changes``
    every change in order, with ``_hr_commit_ts`` and ``_hr_lsn``
``keys``
    the touched keys

So ``end - start`` is exactly the batch's net effect on the table, however
many times a row changed in between: a job keeping sums adds the end rows
and subtracts the start rows (an update that declines or reverses a
transaction retracts its old version), and a job looking for new evidence
compares end rows with start rows. The mirror (``TableDelta.mirror``)
already holds the end state.

Jobs evaluate with DuckDB SQL over these tables and their state; there is no
per-row Python on the hot path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import duckdb

from headrace.pipeline.model import quote_ident
from headrace.source.changes import COMMIT_TS, SEQ, TableRef
from headrace.store.duckdb.prepared import execute_cached

JOBS_SCHEMA = "jobs"
"""Schema of the jobs' state tables (``jobs.<job>__<part>``), engine-owned like rollup state."""


def state_table(job: str, part: str) -> str:
    """Quoted ``jobs.<job>__<part>``."""
    return f"{JOBS_SCHEMA}.{quote_ident(f'{job}__{part}')}"


@dataclass(frozen=True)
class TableDelta:
    """One table's net change in one batch (segment), as temp tables of the open transaction."""

    table: TableRef
    mirror: str
    key: tuple[str, ...]
    start: str
    end: str
    changes: str
    keys: str
    truncated: bool = False
    start_count: int = 0
    end_count: int = 0
    deletes: int = 0

    def key_match(self, left: str, right: str) -> str:
        """SQL: ``left`` and ``right`` rows have the same key."""
        return " AND ".join(f"{left}.{quote_ident(k)} = {right}.{quote_ident(k)}" for k in self.key)

    def end_rows(self) -> str:
        """SQL: the end rows with the commit time of the change that produced them."""
        return (
            f"(SELECT e.*, c.{COMMIT_TS} FROM {self.end} e "
            f"JOIN {self.changes} c ON c.{SEQ} = e.{SEQ})"
        )

    def before(self) -> str:
        """SQL: the whole table as it was before the batch (mirror rows not touched + start)."""
        if self.truncated:
            return f"(SELECT * FROM {self.start})"
        match = self.key_match("m", "k")
        return (
            f"(SELECT m.* FROM {self.mirror} m ANTI JOIN {self.keys} k ON {match} "
            f"UNION ALL BY NAME SELECT * FROM {self.start})"
        )


@dataclass(frozen=True)
class MirroredTable:
    """A source table as jobs read it: its mirror (current rows) and key columns."""

    ref: TableRef
    mirror: str
    key: tuple[str, ...]


LATEST = "latest"
"""Kind of :class:`TimeRequest`: :meth:`JobContext.batch_time`."""
EARLIEST_CHANGE = "earliest_change"
"""Kind of :class:`TimeRequest`: :meth:`JobContext.earliest_change`."""


@dataclass(frozen=True)
class TimeRequest:
    """A time a job reads of one table's batch: ``kind`` (:data:`LATEST` or
    :data:`EARLIEST_CHANGE`) of the SQL ``time`` over its rows."""

    kind: str
    table: TableRef
    time: str


@dataclass
class JobContext:
    """What a job gets for one batch: the open transaction and the batch's table deltas."""

    con: duckdb.DuckDBPyConnection
    deltas: Mapping[TableRef, TableDelta]
    now: datetime
    """Wall-clock time the jobs started on this batch (detection time of its alerts)."""
    tables: Mapping[TableRef, MirroredTable] = field(default_factory=dict)
    """Every mirrored table the engine knows (a job runs only when all it reads are here)."""
    watermarks: dict[str, tuple[datetime | None, datetime | None]] = field(default_factory=dict)
    """Each job's (watermark, horizon) as stored; the runtime writes back the changed ones."""
    changed: set[str] = field(default_factory=set)
    deferred: dict[str, Callable[[], object]] = field(default_factory=dict)
    """State updates to run once every job has read the batch (see :meth:`after_jobs`)."""
    _times: dict[TimeRequest, datetime | None] = field(default_factory=dict)

    def watermark(self, job: str) -> tuple[datetime | None, datetime | None]:
        """The job's (event-time watermark, horizon), ``(None, None)`` before its first batch."""
        return self.watermarks.get(job, (None, None))

    def set_watermark(self, job: str, watermark: datetime | None, horizon: datetime | None) -> None:
        if self.watermarks.get(job) != (watermark, horizon):
            self.watermarks[job] = (watermark, horizon)
            self.changed.add(job)

    def batch_time(self, ref: TableRef, time: str) -> datetime | None:
        """Largest ``least(time, commit time)`` among the end rows of ``ref`` in this batch."""
        return self._time(TimeRequest(LATEST, ref, time))

    def earliest_change(self, ref: TableRef, time: str) -> datetime | None:
        """Smallest ``time`` among the start and end rows of ``ref`` in this batch (the
        oldest event time the batch touched, before or after its change)."""
        return self._time(TimeRequest(EARLIEST_CHANGE, ref, time))

    def prefetch(self, requests: Iterable[TimeRequest]) -> None:
        """Compute every requested batch time not known yet, in one statement (on DuckDB
        each statement costs milliseconds, so the jobs' times are read together)."""
        wanted = [r for r in dict.fromkeys(requests) if r not in self._times]
        missing = [r for r in wanted if r.table in self.deltas]
        for request in wanted:
            if request.table not in self.deltas:
                self._times[request] = None
        if not missing:
            return
        row = execute_cached(
            self.con, "SELECT " + ", ".join(f"({self._time_sql(r)})" for r in missing)
        ).fetchall()[0]
        for request, value in zip(missing, row, strict=True):
            self._times[request] = value

    def _time(self, request: TimeRequest) -> datetime | None:
        if request not in self._times:
            self.prefetch((request,))
        return self._times[request]

    def _time_sql(self, request: TimeRequest) -> str:
        delta = self.deltas[request.table]
        time = f"CAST({request.time} AS TIMESTAMPTZ)"
        if request.kind == LATEST:
            return f"SELECT max(least({time}, {COMMIT_TS})) FROM {delta.end_rows()}"
        return (
            f"SELECT least((SELECT min({time}) FROM {delta.start}), "
            f"(SELECT min({time}) FROM {delta.end}))"
        )

    def after_jobs(self, key: str, update: Callable[[], object]) -> None:
        """Run ``update`` once every job has run on the batch; once per ``key``.

        For state several jobs share (e.g. the devices seen): each reads it as it
        was before the batch, and the first job to ask updates it, once.
        """
        self.deferred.setdefault(key, update)

    def run_deferred(self) -> None:
        """Run the updates :meth:`after_jobs` collected (the runtime calls this)."""
        updates, self.deferred = list(self.deferred.values()), {}
        for update in updates:
            update()

    def delta(self, ref: TableRef) -> TableDelta | None:
        return self.deltas.get(ref)

    def mirror(self, ref: TableRef) -> str:
        return self.tables[ref].mirror

    def key(self, ref: TableRef) -> tuple[str, ...]:
        return self.tables[ref].key

    def touched(self, refs: Sequence[TableRef]) -> bool:
        return any(ref in self.deltas for ref in refs)


class StreamJob(ABC):
    """A keyed job updated from each batch inside the batch's transaction (module docstring)."""

    name: str
    """Identifier; names its state tables ``jobs.<name>__*``."""
    ready: bool = False
    """Its state tables exist (set by the job after creating them; the runtime clears it
    whenever the engine reloads, e.g. after a rolled-back transaction)."""
    state_version: int = 1
    """Version of the layout and meaning of the job's state tables: bump it when a code
    change makes state built by older code wrong, so stores are rebuilt once on upgrade."""

    @abstractmethod
    def definition(self) -> dict[str, object]:
        """What the job's state is built for (JSON-able: windows, tables, columns,
        conditions). When it differs from what the store recorded at the last build, the
        state is rebuilt from the mirrors when the engine opens the store."""

    @abstractmethod
    def inputs(self) -> tuple[TableRef, ...]:
        """Tables whose changes the job reads (their deltas trigger :meth:`apply`)."""

    def reads(self) -> tuple[TableRef, ...]:
        """Every table whose mirror the job reads (inputs and lookups); all must be mirrored."""
        return self.inputs()

    def setup(self, con: duckdb.DuckDBPyConnection) -> None:  # noqa: B027 - optional hook
        """Create the job's fixed tables (idempotent; runs when the engine opens the store)."""

    def times(self) -> tuple[TimeRequest, ...]:
        """The batch times :meth:`apply` reads (the runtime reads every job's together)."""
        return ()

    @abstractmethod
    def apply(self, ctx: JobContext) -> None:
        """Update state from the batch, and emit what it detects."""

    @abstractmethod
    def rebuild(self, ctx: JobContext) -> None:
        """Recompute the state from the mirrors (after a snapshot replaced them); no alerts."""

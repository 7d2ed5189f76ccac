"""The run loop's shared state: what the writer did, what waits, where the snapshot stands.

Written by the source thread (batches received) and the writer thread
(batches applied, snapshot progress); read about once a second by the status
thread. Every access goes through :attr:`RunState.lock`; the work under it
is a few assignments.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from headrace.engine.results import AppliedBatch
from headrace.run.metrics import FreshnessHistogram
from headrace.source.changes import COMMIT_TS, LSN, ChangeBatch
from headrace.source.postgres.snapshot_progress import TableProgress

STARTING = "starting"
SNAPSHOT = "snapshot"
STREAMING = "streaming"
STOPPING = "stopping"
STOPPED = "stopped"
FAILED = "failed"


@dataclass(frozen=True)
class Waiting:
    """The oldest change of one table among the batches received and not yet applied."""

    commit_unix: float
    lsn: int


@dataclass
class SnapshotState:
    """The initial snapshot's progress (or its result once loaded)."""

    started: float
    tables: dict[str, TableProgress] = field(default_factory=dict)
    finished_at: float | None = None
    rows: int = 0

    @property
    def copied_rows(self) -> int:
        return sum(p.rows for p in self.tables.values())

    @property
    def seconds(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started


def waiting_of(batch: ChangeBatch) -> dict[str, Waiting]:
    """Per table, the oldest change of ``batch`` (commit time and LSN)."""
    out: dict[str, Waiting] = {}
    for table_changes in batch.tables:
        data = table_changes.data
        if not data.num_rows:
            continue
        # A table's rows are in commit order: the first is the oldest (no scan per batch).
        oldest = data.column(COMMIT_TS)[0].value  # µs: the change schema's timestamp[us]
        lsn = data.column(LSN)[0].as_py()
        name = table_changes.table.qualified
        waiting = Waiting(oldest / 1_000_000 if oldest is not None else time.time(), int(lsn or 0))
        known = out.get(name)
        if known is None or waiting.commit_unix < known.commit_unix:
            out[name] = waiting
    return out


class RunState:
    """Counters and progress of one ``headrace run`` process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.phase = STARTING
        self.error: str | None = None
        self.started_at = time.time()
        self.snapshot: SnapshotState | None = None
        self.position: int | None = None
        self.position_commit_ts: datetime | None = None
        self.changes = 0
        self.batches = 0
        self.applies = 0
        self.transactions = 0
        self.empty_batches = 0
        self.skipped = 0
        self.dead_letters = 0
        self.table_changes: dict[str, int] = {}
        self.table_batches: dict[str, int] = {}
        self.freshness = FreshnessHistogram()
        self.last_apply_s = 0.0
        self.apply_seconds = 0.0
        self.first_visible_unix: float | None = None
        """When the first batch with changes became visible in the store (UNIX seconds)."""
        self.first_visible_changes = 0
        """How many changes that first batch held."""
        self.last_visible_unix: float | None = None
        """When the latest batch with changes became visible in the store (UNIX seconds)."""
        self._waiting: dict[int, dict[str, Waiting]] = {}
        self._next_id = 0

    def set_phase(self, phase: str, error: str | None = None) -> None:
        with self.lock:
            self.phase = phase
            if error is not None:
                self.error = error

    # -- snapshot ------------------------------------------------------------

    def snapshot_started(self) -> None:
        with self.lock:
            self.phase = SNAPSHOT
            self.snapshot = SnapshotState(started=time.monotonic())

    def snapshot_progress(self, progress: TableProgress) -> None:
        with self.lock:
            if self.snapshot is not None:
                self.snapshot.tables[progress.table.qualified] = progress

    def snapshot_finished(self, rows: int, position: int) -> None:
        with self.lock:
            if self.snapshot is not None:
                self.snapshot.finished_at = time.monotonic()
                self.snapshot.rows = rows
            self.position = position

    # -- streaming -----------------------------------------------------------

    def received(self, batch: ChangeBatch) -> int:
        """Note a batch handed to the writer; returns its ticket for :meth:`applied`."""
        waiting = waiting_of(batch)
        with self.lock:
            self._next_id += 1
            self._waiting[self._next_id] = waiting
            return self._next_id

    def applied(
        self, tickets: list[int], batch: ChangeBatch, applied: AppliedBatch, visible_at: float
    ) -> None:
        """Note a batch (possibly several merged) committed to the store."""
        with self.lock:
            if not batch.is_empty:
                self.freshness.add_batch(batch, visible_at)
                if self.first_visible_unix is None:
                    self.first_visible_unix = visible_at
                    self.first_visible_changes = applied.changes
                self.last_visible_unix = visible_at
            for ticket in tickets:
                self._waiting.pop(ticket, None)
            self.position = applied.position
            if applied.commit_ts is not None:
                self.position_commit_ts = applied.commit_ts
            self.changes += applied.changes
            self.batches += len(tickets)
            self.applies += 1
            self.transactions += batch.transactions
            self.empty_batches += 1 if batch.is_empty else 0
            self.skipped += applied.skipped
            self.dead_letters += applied.dead_letters
            self.last_apply_s = applied.seconds
            self.apply_seconds += applied.seconds
            for name, count in applied.tables.items():
                self.table_changes[name] = self.table_changes.get(name, 0) + count
                self.table_batches[name] = self.table_batches.get(name, 0) + 1

    def forget_waiting(self) -> None:
        """Batches received but dropped unapplied (stopping): the slot sends them again."""
        with self.lock:
            self._waiting.clear()

    def waiting(self) -> dict[str, Waiting]:
        """Per table, the oldest change received and not yet visible."""
        with self.lock:
            batches = list(self._waiting.values())
        out: dict[str, Waiting] = {}
        for per_table in batches:
            for name, waiting in per_table.items():
                known = out.get(name)
                if known is None or waiting.commit_unix < known.commit_unix:
                    out[name] = waiting
        return out

    @property
    def waiting_batches(self) -> int:
        with self.lock:
            return len(self._waiting)

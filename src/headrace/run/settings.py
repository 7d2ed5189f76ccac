"""How ``headrace run`` runs: batching, buffering, status, snapshot parallelism.

The pipeline file says *what* to maintain; these settings say *how fast and
how much at once*. Defaults suit a 2-core machine; the CLI exposes the ones
worth changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from headrace.errors import ConfigError


@dataclass(frozen=True)
class RunSettings:
    """Knobs of the run loop (every field has a sensible default)."""

    batch_max_changes: int = 50_000
    """A micro-batch is handed to the store once it holds this many changes
    (it still ends on a transaction boundary)..."""

    piece_max_changes: int = 100_000
    """A transaction with more changes than this (a backfill, a bulk ``UPDATE``) is
    decoded and applied a piece of this many changes at a time, still in one store
    transaction: memory holds one piece (about 1.5 KB a change, decoded and in
    DuckDB) plus the transaction's raw messages (about 200 bytes a change), instead
    of the whole transaction decoded."""

    batch_max_wait_s: float = 0.03
    """...or once this many seconds passed since its first complete
    transaction, whichever comes first: the latency batching adds. Short,
    because it only matters while the store is idle: while a batch is being
    applied the next ones wait in the queue and are merged into one store
    transaction anyway. An idle writer does not wait for it (it takes what was
    received at once), and without the in-memory rules lane a busy writer's next
    batch keeps up to 2,000 changes past it (``runner.HOLD_WHILE_WRITER_BUSY``),
    so that none is cut off just before the writer takes the queue."""

    queue_batches: int = 4
    """Decoded batches waiting for the store at most, unless they are small:
    more may wait while their changes together fit into ``merge_max_changes``
    (so a backlog of micro-batches is merged into few large transactions).
    When the store is slower than the source, the source waits here
    (backpressure) and the replication slot keeps the rest on the server, so
    memory stays bounded by about ``max(queue_batches * batch_max_changes,
    merge_max_changes)`` changes plus two batches (a larger transaction: one
    ``piece_max_changes`` piece at a time, and its raw messages)."""

    merge_max_changes: int = 200_000
    """When several batches wait, the writer applies them as one store
    transaction of up to this many changes (fewer, larger transactions catch
    up faster). 0 applies every batch on its own."""

    heartbeat_interval_s: float = 10.0
    """Seconds without any change after which the source writes a heartbeat
    into the WAL, so the stored position (and the slot) advance on an idle
    database. 0 turns heartbeats off."""

    status_interval_s: float = 1.0
    """How often the status file beside the store is rewritten, and the
    terminal summary refreshed."""

    maintain_interval_s: float = 1.0
    """How often, between batches, rebuild requests are picked up, retention
    is enforced and a checkpoint is considered."""

    snapshot_workers: int = 2
    """Parallel COPY connections of the initial snapshot."""

    slot_lag_interval_s: float = 2.0
    """How often the slot's WAL lag is read from the server for the status."""

    switch_interval_s: float = 0.0005
    """Python's thread switch interval (``sys.setswitchinterval``) while the pipeline
    runs. The writer hands every statement to DuckDB, which releases the GIL, and
    must take it back afterwards; while the decoder or the web server runs Python,
    that waits up to the interval. At Python's default (5 ms) and ~50 statements per
    batch, that wait alone can add a few hundred ms to a batch."""

    record_dir: Path | None = None
    """Record every applied batch (and a copy of the store before the first) into
    this directory for ``headrace bench replay`` (:mod:`headrace.run.recorder`).
    None records nothing."""

    def __post_init__(self) -> None:
        problems = []
        if self.batch_max_changes < 1:
            problems.append("batch_max_changes must be >= 1")
        if self.piece_max_changes < 1:
            problems.append("piece_max_changes must be >= 1")
        if self.batch_max_wait_s < 0:
            problems.append("batch_max_wait_s must be >= 0")
        if self.queue_batches < 1:
            problems.append("queue_batches must be >= 1")
        if self.merge_max_changes < 0:
            problems.append("merge_max_changes must be >= 0")
        if not 0 < self.switch_interval_s <= 0.1:
            problems.append("switch_interval_s must be > 0 and <= 0.1")
        if self.status_interval_s <= 0 or self.maintain_interval_s <= 0:
            problems.append("status_interval_s and maintain_interval_s must be > 0")
        if self.snapshot_workers < 1:
            problems.append("snapshot_workers must be >= 1")
        if problems:
            raise ConfigError("; ".join(problems), "fix the run settings (see headrace run --help)")

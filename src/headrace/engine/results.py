"""What the engine reports back: an applied batch, a loaded snapshot, its status."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from headrace.store.base import RollupStatus, TableStatus


@dataclass(frozen=True)
class AppliedBatch:
    """One batch committed to the store, with the position it brought the store to."""

    position: int
    commit_ts: datetime | None
    version: int
    changes: int
    tables: Mapping[str, int] = field(default_factory=dict)
    """Changes applied per table (qualified name)."""
    dead_letters: int = 0
    skipped: int = 0
    """Changes of transactions already applied (commit LSN below the stored position)."""
    seconds: float = 0.0
    visible_at: float = 0.0
    """UNIX time at which the batch became visible to readers (committed and
    published), before any checkpoint that :meth:`Engine.apply` then runs;
    0.0 when unknown."""


@dataclass(frozen=True)
class SnapshotLoaded:
    """A snapshot committed to the store."""

    position: int
    rows: Mapping[str, int]
    seconds: float
    version: int

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def rows_per_second(self) -> float:
        return self.total_rows / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RetentionApplied:
    """Rows dropped by one retention pass."""

    history_rows: Mapping[str, int]
    rollup_groups: Mapping[str, int]


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot of the engine's state for ``headrace status`` and the serving layer."""

    position: int | None
    version: int
    tables: list[TableStatus]
    rollups: list[RollupStatus]
    dead_letters: int
    wal_bytes: int


@dataclass(frozen=True)
class PiecesProgress:
    """A batch being applied a piece at a time (a huge transaction), for the status."""

    changes: int
    """Changes of the batch."""
    applied: int
    """Changes of the pieces applied so far (not visible before the batch commits)."""
    pieces: int
    """Pieces applied so far."""
    started: float
    """``time.monotonic()`` when the batch began."""

    def document(self, now: float) -> dict[str, int | float]:
        return {
            "changes": self.changes,
            "applied": self.applied,
            "pieces": self.pieces,
            "seconds": round(now - self.started, 1),
        }

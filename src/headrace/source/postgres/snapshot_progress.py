"""Progress of a snapshot copy, and a rich display of it.

The snapshotter reports :class:`TableProgress` to an optional callback, from
the thread that consumes the chunks (so a callback needs no locking). With no
callback nothing is shown, which keeps tests quiet. :class:`RichSnapshotProgress`
is the callback the CLI uses: one line per table with rows, rows/s and ETA.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from headrace.source.changes import TableRef


@dataclass(frozen=True)
class TableProgress:
    """Where the copy of one table stands."""

    table: TableRef
    rows: int
    """Rows copied and handed to the consumer so far."""
    estimated_rows: int | None
    """The planner's row estimate (``reltuples``); None before the first ANALYZE."""
    pages_done: int
    """Heap pages whose CTID ranges are fully copied."""
    pages: int
    """Heap pages of the table when the copy started."""
    started: float
    """``time.monotonic()`` when the table's first range started."""
    finished: bool

    @property
    def rows_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0

    @property
    def expected_rows(self) -> int | None:
        """Best guess of the table's total rows: the estimate, else extrapolated by pages."""
        if self.finished:
            return self.rows
        if self.estimated_rows is not None and self.estimated_rows > 0:
            return max(self.estimated_rows, self.rows)
        if self.pages_done and self.pages:
            return max(self.rows, round(self.rows * self.pages / self.pages_done))
        return None


ProgressCallback = Callable[[TableProgress], None]


class _RowsPerSecondColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed or 0:,.0f} rows/s", style="progress.data.speed")


class RichSnapshotProgress:
    """A live rich display of a snapshot copy; use it as the progress callback.

    ``with RichSnapshotProgress() as show: Snapshotter(settings, progress=show)``
    """

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            _RowsPerSecondColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[TableRef, TaskID] = {}

    def __call__(self, update: TableProgress) -> None:
        task = self._tasks.get(update.table)
        if task is None:
            task = self._progress.add_task(update.table.qualified, total=update.expected_rows)
            self._tasks[update.table] = task
        self._progress.update(task, completed=update.rows, total=update.expected_rows)

    def __enter__(self) -> RichSnapshotProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

"""What ``headrace run`` shows: a progress display and a live line on a terminal, logs elsewhere.

On a terminal the snapshot shows one progress bar per table and streaming a
one-line summary (changes/s, freshness, lag) refreshed every second. Not on
a terminal (a service, a pipe, CI), the same summary goes to the log once a
minute, and nothing else but events (snapshot done, streaming from, stopped).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from headrace.run.status_render import summary_line
from headrace.source.postgres.snapshot_progress import RichSnapshotProgress, TableProgress

log = logging.getLogger("headrace.run")

LOG_SUMMARY_EVERY_S = 60.0


class RunDisplay:
    """Snapshot progress and the streaming summary, on a terminal or in the log."""

    def __init__(self, console: Console | None, *, live: bool) -> None:
        self.console = console or Console(stderr=True)
        self.live = live
        self._progress: RichSnapshotProgress | None = None
        self._line: Live | None = None
        self._logged_at = time.monotonic()

    # -- snapshot --------------------------------------------------------------

    def snapshot_started(self) -> None:
        if self.live:
            self._progress = RichSnapshotProgress(self.console).__enter__()
        else:
            log.info("snapshot: copying every table")

    def snapshot_progress(self, progress: TableProgress) -> None:
        if self._progress is not None:
            self._progress(progress)

    def snapshot_ended(self) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None

    # -- streaming -------------------------------------------------------------

    def streaming_started(self) -> None:
        if self.live and self._line is None:
            self._line = Live(
                Text("streaming ..."),
                console=self.console,
                refresh_per_second=2,
                transient=True,
            )
            self._line.start()

    def update(self, document: dict[str, Any]) -> None:
        """Show the latest status (called by the status thread about once a second)."""
        if document.get("phase") != "streaming":
            return
        if self._line is not None:
            self._line.update(Text(summary_line(document)))
        elif not self.live and time.monotonic() - self._logged_at >= LOG_SUMMARY_EVERY_S:
            self._logged_at = time.monotonic()
            log.info("%s", summary_line(document))

    def close(self) -> None:
        self.snapshot_ended()
        if self._line is not None:
            self._line.stop()
            self._line = None

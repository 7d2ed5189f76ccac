"""SIGINT / SIGTERM → a stop request the run loop honours at the next batch boundary."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger("headrace.run")


class StopOnSignals:
    """While active, SIGINT and SIGTERM set :attr:`stop` instead of killing the process.

    A second signal while stopping restores the default handlers, so a third
    one (or the second SIGINT's KeyboardInterrupt) ends a stuck process.
    Only the main thread may install handlers; elsewhere this does nothing
    but still offers :attr:`stop`.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            log.warning("%s again: no longer waiting for a clean stop", name)
            self._restore()
            return
        log.info("%s: finishing the current batch, then stopping", name)
        self.stop.set()

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if threading.current_thread() is threading.main_thread():
            self._restore()

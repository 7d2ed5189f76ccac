"""``headrace run`` as a benchmark's child process, observed through its status file and /proc.

Every end-to-end benchmark (pipeline, fraud, serve) runs the pipeline the way
a user does: ``headrace run --config FILE`` in its own process, stopped with
SIGTERM (finish the batch, confirm the slot). This is that process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from headrace.bench.process_cpu import thread_wait_seconds
from headrace.run.control import RunFiles, read_json


class RunProcess:
    """``headrace run --config CONFIG --heartbeat-s 1 [extra_args]``, started at once."""

    def __init__(
        self, config: Path, store: Path, log_path: Path, extra_args: Sequence[str] = ()
    ) -> None:
        self.files = RunFiles(store)
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from headrace.cli.entry import main; main()",
                "run",
                "--config",
                str(config),
                "--heartbeat-s",
                "1",
                *extra_args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.process.pid)
        self.max_rss = 0
        """Largest RSS seen by :meth:`status` (reset it to measure a phase)."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        """The run's status document (empty before the first); raises if the run exited."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"headrace run exited with {self.process.returncode}:\n{self.log_tail()}"
            )
        self.max_rss = max(self.max_rss, self.ps.memory_info().rss)
        return read_json(self.files.status) or {}

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
    ) -> dict[str, Any]:
        """Poll the status until ``predicate`` holds for it; that status."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            document = self.status()
            if document and predicate(document):
                return document
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def wait_seconds(self) -> float:
        """Seconds its threads spent runnable but waiting for a CPU, so far."""
        return thread_wait_seconds(self.process.pid)

    def peak_rss(self) -> int:
        """The process's high-water RSS (``VmHWM``), in bytes."""
        with open(f"/proc/{self.process.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int:
        """SIGTERM, then wait (a kill after 60 s); the exit code."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        finally:
            self._log.close()

    def stop_cleanly(self) -> None:
        """:meth:`stop`, raising unless the run exited 0 (a clean shutdown on SIGTERM)."""
        code = self.stop()
        if code != 0:
            raise RuntimeError(f"headrace run exited with {code} on SIGTERM")


def checkpoints_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The store's checkpoints between two status documents: how many, their seconds in
    all, and the longest since the run started (each stops the writer meanwhile)."""
    first = before.get("store_checkpoints") or {}
    last = after.get("store_checkpoints") or {}
    return {
        "count": int(last.get("count", 0)) - int(first.get("count", 0)),
        "seconds": round(float(last.get("seconds", 0.0)) - float(first.get("seconds", 0.0)), 3),
        "longest_s": float(last.get("longest_s", 0.0)),
    }


def describe_checkpoints(figures: dict[str, float]) -> str:
    """One line for a benchmark's output."""
    return (
        f"store checkpoints meanwhile: {figures['count']:.0f}, {figures['seconds']:.2f} s in "
        f"all, longest {figures['longest_s']:.2f} s (the writer waits for each)"
    )


class MidpointStatus:
    """A generator-wait tick that keeps polling a run's status (so its RSS is watched)
    and keeps the first status document read at or after ``at`` (a ``time.monotonic()``):
    the freshness of what was made visible after it is the late part of a load."""

    def __init__(self, status: Callable[[], dict[str, Any]], at: float) -> None:
        self._status = status
        self._at = at
        self._document: dict[str, Any] | None = None

    def tick(self) -> None:
        document = self._status()
        if self._document is None and document and time.monotonic() >= self._at:
            self._document = document

    @property
    def seen(self) -> bool:
        """Whether the midpoint was reached while the load ran."""
        return self._document is not None

    def histogram(self) -> list[int] | None:
        """The freshness histogram's counts at the midpoint."""
        if self._document is None:
            return None
        counts = self._document.get("freshness_histogram")
        return list(counts) if counts is not None else None

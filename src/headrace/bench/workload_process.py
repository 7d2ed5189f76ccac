"""A benchmark's workload generator run as a child process, waited for with a deadline.

The generators (``python -m headrace.bench.<name>_workload '<json>'``) print one
JSON line with what they wrote. A generator that stops making progress must
not leave the benchmark waiting forever with nothing on the screen (and its
throwaway PostgreSQL running after an outer ``timeout`` kills it): past its
deadline the generator is asked for the stacks of its threads (``SIGUSR1``,
see :func:`dump_stacks_on_signal`, printed on its stderr, i.e. the
benchmark's output), then killed, and the benchmark fails saying so.

The output is read on a thread of its own, so a generator printing more than
a pipe holds cannot block on it.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

STACKS_SIGNAL = signal.SIGUSR1
"""Asks a generator for the Python stacks of all its threads."""

STACKS_GRACE_S = 2.0
"""Time a late generator gets to print its stacks before it is killed."""


def workload_deadline_s(seconds: float) -> float:
    """How long a generator asked for ``seconds`` of load may take in all: the load,
    then its drain (changes it scheduled, e.g. transactions settling later), with a
    margin for a loaded machine."""
    return 2 * seconds + 120.0


def dump_stacks_on_signal() -> None:
    """In a generator process: print every thread's stack on :data:`STACKS_SIGNAL`."""
    faulthandler.register(STACKS_SIGNAL, all_threads=True)


class WorkloadFailedError(RuntimeError):
    """The generator failed, printed nothing, or did not finish in time."""


class WorkloadProcess:
    """``python -m module '<options as JSON>'``, started at once."""

    def __init__(self, module: str, options: dict[str, Any]) -> None:
        self.module = module
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(options)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._output: list[str] = []
        self._reader = threading.Thread(
            target=self._read, name=f"bench-{module.rsplit('.', 1)[-1]}-output", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        stdout = self.process.stdout
        if stdout is not None:
            with stdout:
                self._output.append(stdout.read())

    def wait(self, deadline_s: float, tick: Callable[[], object] | None = None) -> dict[str, Any]:
        """Wait for the generator (calling ``tick`` every 0.25 s meanwhile) at most
        ``deadline_s`` seconds from now; its JSON line.

        Raises :class:`WorkloadFailedError` when it exits with an error or without
        output, or is still running at the deadline (then it is killed, after its
        stacks were asked for).
        """
        deadline = time.monotonic() + deadline_s
        while self.process.poll() is None:
            if time.monotonic() >= deadline:
                self._stop_late()
                raise WorkloadFailedError(
                    f"the workload generator ({self.module}) did not finish within "
                    f"{deadline_s:.0f} s: it was stopped; the Python stacks of its threads "
                    "are printed above (a generator waiting on PostgreSQL, or a bug in it)"
                )
            if tick is not None:
                tick()
            time.sleep(0.25)
        self._reader.join(10)
        lines = "".join(self._output).strip().splitlines()
        if self.process.returncode != 0 or not lines:
            raise WorkloadFailedError(
                f"the workload generator ({self.module}) failed (exit code "
                f"{self.process.returncode}); its error is printed above"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def _stop_late(self) -> None:
        """Ask for the stacks, give them time to be printed, then :meth:`stop`."""
        try:
            self.process.send_signal(STACKS_SIGNAL)
            self.process.wait(STACKS_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Kill the generator if it still runs (on the benchmark's own failure)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

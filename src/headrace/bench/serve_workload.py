"""The write load of ``headrace bench serve``: the fintech generator, paced, until told to stop.

Run as ``python -m headrace.bench.serve_workload '<json options>'``. It runs
the demo's :class:`~headrace.demo.generator.Workload` (the reference
deployment's tables, whose dashboard the benchmark's viewers watch) paced
to the wall clock, until SIGTERM or ``max_seconds``. About once a second it
prints a progress line, ``{"t": <time.monotonic()>, "changes": N,
"transactions": N, "behind_s": S}``, so the benchmark can count what was
written inside its own measuring window (``time.monotonic`` is one clock
for every process of the machine). The last line is the same object with
``"done": true``.

Options: ``dsn``, ``seed``, ``rate`` (transactions per second), ``tick_ms``
(one commit per tick), ``fraud_every``, ``customers``, ``max_seconds``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from headrace.demo.config import PopulationSettings, WorkloadSettings
from headrace.demo.generator import Workload

CHANGES_PER_TRANSACTION = 4.0
"""Row changes the fintech workload writes per new transaction in its steady state
(measured: 4.0-4.2 with its default ratios: the insert, ledger entries, the later
settlement, logins), reached about 10 s after it starts (settlements lag their
transactions); turns a changes/s target into transactions/s."""

PROGRESS_EVERY_S = 1.0


def settings_from(options: dict[str, Any]) -> WorkloadSettings:
    """The generator's settings from the JSON options (a flat rate: no daily rhythm)."""
    return WorkloadSettings(
        dsn=str(options["dsn"]),
        seed=int(options.get("seed", 1)),
        rate=float(options["rate"]),
        tick_ms=int(options.get("tick_ms", 50)),
        fraud_every=int(options.get("fraud_every", 1000)),
        diurnal_amplitude=0.0,
        population=PopulationSettings(customers=int(options.get("customers", 10_000))),
    )


def _progress(workload: Workload, *, done: bool = False) -> None:
    stats = workload.stats
    line: dict[str, Any] = {
        "t": time.monotonic(),
        "changes": stats.changes,
        "transactions": stats.transactions,
        "commits": stats.commits,
        "behind_s": round(stats.behind_s, 3),
    }
    if done:
        line["done"] = True
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def run(options: dict[str, Any]) -> None:
    """Write the workload until SIGTERM or ``max_seconds``, printing progress lines."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    last = [0.0]

    def on_tick(workload: Workload) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            _progress(workload)

    with Workload(settings_from(options)) as workload:
        _progress(workload)
        workload.run(stop, duration=float(options.get("max_seconds", 3600)), on_tick=on_tick)
        _progress(workload, done=True)


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))

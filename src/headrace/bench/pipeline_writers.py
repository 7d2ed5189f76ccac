"""The writers of ``headrace bench pipeline``: several connections sharing one rate.

Each writer is a :class:`.pipeline_workload.Workload` on a connection of its own
(its own ids, so the writers never collide). One thread drives them all: it sends
each writer's next transaction when it is due and waits in ``select`` for the
responses. The work is PostgreSQL's, and the generator shares the cores with it and
with headrace: a thread per writer cost about twice the CPU a transaction of
one thread doing the same (measured; the threads' wake-ups hand the GIL
around), CPU taken from the two cores the benchmark shares.

Run as a process: ``python -m headrace.bench.pipeline_writers '{"dsn": ..., "rate": ...}'``;
it prints one JSON line with what it wrote, including the WAL position after
its last commit (``end_lsn``).
"""

from __future__ import annotations

import contextlib
import json
import select
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from typing import Any

import psycopg

from headrace.bench.pipeline_workload import (
    DEFAULT_MIX,
    Mix,
    Workload,
    WorkloadResult,
    current_wal_lsn,
    tx_rows_for,
)
from headrace.bench.workload_process import dump_stacks_on_signal

ID_STRIDE = 1 << 40
"""Writer ``i`` inserts ids from ``first_id + i * ID_STRIDE``: the writers never collide."""


def _drive(workloads: list[Workload], rate: float, seconds: float, quota: int | None) -> float:
    """Run the writers from now, each at ``rate`` changes/s (0: back to back), until
    each wrote ``quota`` changes or the time is up; returns the common start.

    With a quota, a writer's last transaction is due just before the end, so the
    rate achieved is the rate asked for; a writer behind its pace still stops at
    the end (plus a quarter second for the last transaction due), and its rate
    shows it. ``idle`` writers wait for their next transaction to be due, ``busy``
    ones (by socket) for their last one's response."""
    started = time.monotonic()
    deadline = started + seconds + (0.25 if quota is not None else 0.0)
    idle = list(workloads)
    busy: dict[int, Workload] = {}
    try:
        while idle or busy:
            now = time.monotonic()
            wake = deadline
            for workload in list(idle):
                written = workload.result.changes
                if now >= deadline or (quota is not None and written >= quota):
                    idle.remove(workload)  # done: not sent again
                    continue
                due = started + written / rate if rate > 0 else now
                if due <= now:
                    workload.begin()
                    idle.remove(workload)
                    busy[workload.socket] = workload
                else:
                    wake = min(wake, due)
            if not busy and not idle:
                break
            timeout = max(0.0, wake - time.monotonic()) if idle else None
            readable, _, _ = select.select(list(busy), [], [], timeout)
            for socket in readable:
                workload = busy[socket]
                if workload.received():
                    del busy[socket]  # first: its own error leaves it nothing to wait for
                    workload.finish()
                    workload.result.ended_at = time.monotonic()
                    idle.append(workload)
    finally:
        for workload in busy.values():  # after an error: the others' last transactions
            with contextlib.suppress(psycopg.Error):
                workload.finish()
    return started


def run_writers(options: dict[str, Any]) -> WorkloadResult:
    """``writers`` connections sharing ``rate``, driven by one thread.

    The writers connect first and then start together, each writing its share
    of ``rate * seconds`` changes on its own pace (with ``rate`` 0: as many as
    they can in ``seconds``); the result's rate is all their changes over the
    time from that common start to the last commit."""
    writers = max(1, int(options.get("writers", 1)))
    rate = float(options["rate"])
    seconds = float(options["seconds"])
    rows = int(options.get("tx_rows") or tx_rows_for(rate))
    # Each writer updates among its own ids: the window is shared between them.
    window = int(options.get("update_window", 0))
    window = max(1, window // writers) if window > 0 else 0
    mix = Mix.parse(str(options.get("mix", DEFAULT_MIX)))
    quota = round(rate * seconds / writers) if rate > 0 else None
    with ExitStack() as connections:
        workloads = []
        for index in range(writers):
            conn = connections.enter_context(psycopg.connect(options["dsn"], autocommit=True))
            first = int(options["first_id"]) + index * ID_STRIDE
            workloads.append(
                Workload(
                    conn,
                    first_id=first,
                    tx_rows=rows,
                    seed=index + 1,
                    update_window=window,
                    mix=mix,
                    low_id=first if index else 1,
                )
            )
        started = _drive(workloads, rate / writers, seconds, quota)
        total = WorkloadResult(started_at=started, ended_at=started)
        for workload in workloads:
            result = workload.result
            total.changes += result.changes
            total.inserts += result.inserts
            total.updates += result.updates
            total.deletes += result.deletes
            total.transactions += result.transactions
            total.ended_at = max(total.ended_at, result.ended_at)
        total.end_lsn = current_wal_lsn(workloads[0].conn)  # after every writer's commit
    total.seconds = total.ended_at - total.started_at
    total.rate = total.changes / total.seconds if total.seconds else 0.0
    return total


def main(argv: list[str]) -> None:
    """Process entry point (see module docstring)."""
    dump_stacks_on_signal()  # the benchmark asks for the stacks if this runs late
    print(json.dumps(asdict(run_writers(json.loads(argv[0])))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

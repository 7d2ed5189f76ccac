"""``headrace bench pipeline --backlog``: how fast headrace drains changes it did not see live.

The live benchmark shares the machine's cores between PostgreSQL executing
the workload, the generator and headrace; on a 2-core machine that sharing,
not headrace alone, sets the rate it can keep up with. This mode measures
headrace's own capacity, the figure that matters after downtime or where
PostgreSQL runs on another machine:

1. after the snapshot, ``headrace run`` stops (SIGTERM: the slot is
   confirmed where it stood);
2. the generator writes the same mixed workload (``--rate``, ``--seconds``)
   while nothing consumes the slot;
3. the peer: ``pg_recvlogical`` (PostgreSQL's own client, writing to
   /dev/null) drains a copy of the slot to the generator's last commit,
   timed: the floor that receiving the changes costs, whatever is done with
   them;
4. ``headrace run`` starts again and drains the slot into the store, timed
   from its launch (start-up and resume included) to the moment its last
   batch became visible, with the CPU of headrace and of PostgreSQL (now only
   the walsender decoding) over that window.

The same exactness check and ``REFRESH MATERIALIZED VIEW`` comparison follow
(:mod:`headrace.bench.pipeline`). There is no freshness here (every change
waited for the restart), so no verdict on the live target either.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console

from headrace.bench.pipeline_workload import changes_by_kind
from headrace.bench.process_cpu import CpuShare, ProcessCpu, cpu_per_change_us
from headrace.bench.recvlogical import drain_with_pg_recvlogical
from headrace.bench.run_process import RunProcess, checkpoints_between
from headrace.bench.workload_process import WorkloadProcess, workload_deadline_s
from headrace.errors import format_lsn
from headrace.source.postgres.replication import StreamOptions


@dataclass
class BacklogFigures:
    """What one backlog drain measured (``backlog`` in the JSON)."""

    changes: int = 0
    """Changes written while headrace was stopped (the backlog)."""
    written_rate: float = 0.0
    written_by_kind: dict[str, int] = field(default_factory=dict)
    """Rows the backlog inserted, updated and deleted."""
    drain_s: float = 0.0
    """``headrace run`` launched → its last batch visible in the store."""
    changes_per_s: float = 0.0
    """changes / drain_s: the capacity, start-up and resume included."""
    applying_changes_per_s: float = 0.0
    """Changes after the first batch / (first batch visible → last visible): the
    capacity once streaming, without the process's start-up."""
    start_s: float = 0.0
    """``headrace run`` launched → its first batch visible (imports, store, resume)."""
    cpu_cores: dict[str, float] = field(default_factory=dict)
    """Cores used over the drain by headrace and by PostgreSQL (its walsender)."""
    cpu_us_per_change: dict[str, float] = field(default_factory=dict)
    """The same CPU per change drained, in microseconds: headrace's cost of a change
    with no workload beside it, comparable with the live mode's figure."""
    store_transactions: int = 0
    store_checkpoints: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peer_drain_s: float = 0.0
    """``pg_recvlogical`` to /dev/null, the same backlog from a copy of the slot."""
    peer_changes_per_s: float = 0.0
    peer_cpu_cores: dict[str, float] = field(default_factory=dict)
    """Cores over the peer's drain: pg_recvlogical itself and PostgreSQL."""
    ratio_vs_pg_recvlogical: float = 0.0
    """drain_s / peer_drain_s: how much longer storing every change exactly takes than
    only receiving it."""
    capacity_vs_target: float = 0.0
    """changes_per_s / the 100,000 changes/s target."""


def measure_backlog(
    figures: BacklogFigures,
    headrace: RunProcess,
    restart: Callable[[], RunProcess],
    *,
    postgres: ProcessCpu | None,
    bindir: Path,
    dsn: str,
    options: dict[str, Any],
    slot: str,
    publication: str,
    target: float,
    out: Console,
) -> None:
    """Steps 1-4 of the module docstring, ``headrace`` streaming after its snapshot;
    ``restart()`` launches ``headrace run`` again (the same pipeline file). ``options``:
    the generator's; ``slot`` and ``publication``: the pipeline's (the peer asks for what
    headrace's source asks for). Both runs are stopped on return."""
    headrace.stop_cleanly()
    out.print("headrace stopped after its snapshot; writing the backlog while nothing reads it")
    generator = WorkloadProcess("headrace.bench.pipeline_writers", options)
    try:
        written = generator.wait(workload_deadline_s(float(options["seconds"])), lambda: None)
    finally:
        generator.stop()
    figures.changes = int(written["changes"])
    figures.written_rate = round(float(written["rate"]))
    figures.written_by_kind = changes_by_kind(written)
    end_lsn = int(written["end_lsn"])
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in figures.written_by_kind.items())
    out.print(
        f"backlog: {figures.changes:,} changes written at {figures.written_rate:,.0f}/s "
        f"({kinds}), up to {format_lsn(end_lsn)}"
    )
    _peer(
        figures,
        postgres=postgres,
        bindir=bindir,
        dsn=dsn,
        slot=slot,
        publication=publication,
        end_lsn=end_lsn,
        out=out,
    )
    launched_unix = time.time()
    drained = restart()
    meters = {"headrace": drained.cpu_seconds}
    if postgres is not None:  # None: on another machine (--server), not measured
        meters = {"postgres": postgres.cpu_seconds, **meters}
    share = CpuShare(meters)
    share.start()
    done = drained.wait_for(
        lambda d: int(d["totals"]["changes"]) >= figures.changes,
        3600,
        "headrace to drain the backlog",
    )
    figures.cpu_cores = share.stop()
    figures.cpu_us_per_change = cpu_per_change_us(share.seconds, figures.changes)
    totals = done["totals"]
    first, last = float(totals["first_visible_unix"]), float(totals["last_visible_unix"])
    figures.drain_s = round(last - launched_unix, 3)
    figures.start_s = round(first - launched_unix, 3)
    figures.changes_per_s = round(figures.changes / max(last - launched_unix, 1e-9))
    first_batch = int(totals["first_visible_changes"])
    if last > first:
        figures.applying_changes_per_s = round((figures.changes - first_batch) / (last - first))
    figures.store_transactions = int(totals["store_transactions"])
    figures.store_checkpoints = checkpoints_between({}, done)
    figures.peak_rss_mb = round(drained.peak_rss() / 2**20, 1)
    if figures.peer_drain_s > 0:
        figures.ratio_vs_pg_recvlogical = round(figures.drain_s / figures.peer_drain_s, 2)
    figures.capacity_vs_target = round(figures.changes_per_s / target, 2)
    drained.wait_for(lambda d: (d.get("position") or 0) >= end_lsn, 120, "the last commit")
    drained.stop_cleanly()
    _print(figures, target, out)


def _peer(
    figures: BacklogFigures,
    *,
    postgres: ProcessCpu | None,
    bindir: Path,
    dsn: str,
    slot: str,
    publication: str,
    end_lsn: int,
    out: Console,
) -> None:
    """pg_recvlogical drains a copy of headrace's ``slot`` to ``end_lsn`` into /dev/null."""
    # Named after headrace's: slot names are the server's, and with --server another
    # run's may be there (its own database, its own slot names).
    peer_slot = f"{slot}_peer"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", (slot, peer_slot))
    try:
        pg = postgres.cpu_seconds() if postgres is not None else 0.0
        drain = drain_with_pg_recvlogical(
            bindir, dsn, peer_slot, end_lsn, StreamOptions(publications=(publication,))
        )
        seconds = drain.seconds
        figures.peer_cpu_cores = {"pg_recvlogical": round(drain.cpu_seconds / seconds, 2)}
        if postgres is not None:
            figures.peer_cpu_cores["postgres"] = round((postgres.cpu_seconds() - pg) / seconds, 2)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (peer_slot,))
    figures.peer_drain_s = round(seconds, 3)
    figures.peer_changes_per_s = round(figures.changes / seconds)
    out.print(
        f"peer: pg_recvlogical to /dev/null drains it in {seconds:.2f} s "
        f"= {figures.peer_changes_per_s:,}/s (cores: {figures.peer_cpu_cores})"
    )


def _print(figures: BacklogFigures, target: float, out: Console) -> None:
    out.print(
        f"headrace drains it in {figures.drain_s:.2f} s from its launch "
        f"= {figures.changes_per_s:,.0f} changes/s (first batch visible after "
        f"{figures.start_s:.2f} s; {figures.applying_changes_per_s:,.0f}/s from then on), "
        f"in {figures.store_transactions:,} store transactions; "
        f"{figures.ratio_vs_pg_recvlogical}x pg_recvlogical's time"
    )
    cores = ", ".join(f"{name} {value:.2f}" for name, value in figures.cpu_cores.items())
    costs = ", ".join(f"{name} {value:.1f}" for name, value in figures.cpu_us_per_change.items())
    out.print(
        f"CPU over the drain, in cores: {cores} (per change, in µs: {costs}); "
        f"headrace RSS peak {figures.peak_rss_mb} MB; "
        f"store checkpoints {figures.store_checkpoints.get('count', 0):.0f} "
        f"({figures.store_checkpoints.get('seconds', 0.0):.2f} s)"
    )
    out.print(
        f"capacity: {figures.changes_per_s:,.0f} changes/s = {figures.capacity_vs_target}x "
        f"the {target:,.0f}/s target, with no workload running beside it"
    )

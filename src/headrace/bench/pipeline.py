"""``headrace bench pipeline``: the whole pipeline under a live write load, checked exactly.

On a throwaway cluster:

1. ``accounts`` and ``transactions`` (``--base-rows`` rows) are created, and
   the pipeline file gets several rollups (bucketed counts and sums with a
   filtered measure, min/max/avg per merchant, exact and approximate
   distinct counts per looked-up account tier).
2. ``headrace run`` starts as its own process: it snapshots (its end-to-end
   snapshot rate is reported) and streams.
3. A generator *process* writes the mixed workload of
   :mod:`.pipeline_workload` at ``--rate`` changes/s (0: as fast as it can)
   for ``--seconds``.
4. When the generator stops, the benchmark waits until the store's position
   reaches the generator's last commit, then stops headrace (SIGTERM).
   Reported: sustained changes/s (the written rate when headrace kept up
   with it: the freshness p99 of what it made visible after the load's
   midpoint stayed under the rate's target, so its lag did not grow;
   otherwise changes written / time from the first write until the store
   held all of them), the rate headrace applied while the load ran,
   freshness p50/p99 of every change (commit → visible in the store, from
   the runner's histogram), CPU (cores) and peak RSS of the headrace
   process, and ``mismatches``: rollup views differing from the same GROUP BY
   on PostgreSQL at the same LSN (the source is quiet and fully applied).
5. The old way: ``REFRESH MATERIALIZED VIEW`` of an equivalent view per
   rollup on PostgreSQL, timed on the same final data; the ratio is the
   refresh time over headrace's freshness p99 (time to a fresh result).

The last line is one JSON object with every figure.

``--backlog`` (:mod:`.pipeline_backlog`) writes the same load while headrace
is stopped and times how fast it drains it, against ``pg_recvlogical``: its
capacity with no workload beside it.

headrace and ``pg_recvlogical`` reach PostgreSQL over its Unix socket, or with
``--tcp`` over TCP to 127.0.0.1 as to a server on another machine. The choice
matters for a backlog: over the socket every message the walsender sends is a
buffer of its own and the socket holds only a few hundred, so the walsender
waits whenever headrace's source pauses; TCP merges them and buffers
megabytes. The generator always uses the socket.

``--server DSN`` runs against a PostgreSQL elsewhere instead of the throwaway
cluster (:mod:`.server`): in a database of its own there, dropped after the
run. So PostgreSQL's CPU is not on headrace's machine, as in production, and
is not measured.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console

from headrace.bench.calibration import autogroup_enabled, describe_scheduling, python_loop_seconds
from headrace.bench.pipeline_backlog import BacklogFigures, measure_backlog
from headrace.bench.pipeline_checks import time_old_way, verify_exactness
from headrace.bench.pipeline_workload import (
    DEFAULT_MIX,
    Mix,
    changes_by_kind,
    create_schema,
    tx_rows_for,
)
from headrace.bench.process_cpu import (
    ProcessCpu,
    cpu_per_change_us,
    describe_cores,
    describe_cost_per_change,
    describe_waits,
    describe_writer_thread,
    load_cpu_share,
    load_wait_share,
    postgres_cpu,
    writer_thread_share,
)
from headrace.bench.run_process import (
    MidpointStatus,
    RunProcess,
    checkpoints_between,
    describe_checkpoints,
)
from headrace.bench.server import ExternalPostgres, bench_cluster
from headrace.bench.workload_process import WorkloadProcess, workload_deadline_s
from headrace.pipeline.load import load_pipeline
from headrace.run.metrics import FreshnessHistogram
from headrace.run.preload import allocator_in_use
from headrace.sandbox.postgres import ThrowawayPostgres

TARGET_HIGH_RATE = 100_000
TARGET_HIGH_P99_MS = 1_000.0
TARGET_LOW_RATE = 10_000
TARGET_LOW_P99_MS = 300.0
GENERATOR_TOLERANCE = 0.005
"""How far under its rate the generator may end (a fraction): on a busy machine its last
commits lag their schedule by milliseconds, which a 20 s run shows as ~0.05%."""

PIPELINE_YAML = """
source:
  dsn: "{dsn}"
  slot: {slot}
  publication: {slot}
  tables:
    accounts: {{}}
    transactions:
      event_time: created_at
store:
  path: "{store}"
  mirror_key_index: {key_index}
rollups:
  - name: tx_volume
    table: transactions
    grain: 5m
    coarser: [1h, 1d]
    dimensions: [status]
    measures:
      - {{name: tx_count, fn: count}}
      - {{name: volume, fn: sum, column: amount}}
      - {{name: declined, fn: count, where: "status = 'declined'"}}
  - name: tx_merchant
    table: transactions
    grain: 1h
    dimensions: [merchant]
    measures:
      - {{name: n, fn: count}}
      - {{name: smallest, fn: min, column: amount}}
      - {{name: largest, fn: max, column: amount}}
      - {{name: mean, fn: avg, column: amount}}
  - name: tx_tier
    table: transactions
    grain: 1h
    dimensions:
      - name: tier
        lookup: {{table: accounts, on: account_id, column: tier}}
    measures:
      - {{name: accounts, fn: count_distinct, column: account_id}}
      - {{name: approx_accounts, fn: approx_count_distinct, column: account_id}}
      - {{name: total, fn: sum, column: amount}}
"""


@dataclass
class PipelineBenchResult:
    """Figures of one ``bench pipeline`` run (the last JSON line)."""

    rate_target: float
    seconds: float
    base_rows: int
    update_window: int = 0
    """Updates and deletes drew among the newest this many ids (0: the whole table)."""
    mix: str = str(DEFAULT_MIX)
    """Shares of inserts, updates and deletes among the transactions (``INSERTS:UPDATES:DELETES``
    in percent)."""
    snapshot_rows_per_s: float | None = None
    written_changes: int = 0
    written_rate: float = 0.0
    written_by_kind: dict[str, int] = field(default_factory=dict)
    """Rows the generator inserted, updated and deleted (a delete of an id deleted before
    changes nothing, so with many deletes their share is below the mix's)."""
    applied_rate_under_load: float = 0.0
    sustained_changes_per_s: float = 0.0
    """The written rate when headrace kept up with it (``kept_up``); otherwise the changes
    written over the time from the first write until the store held the last one."""
    kept_up: bool = False
    """Freshness stayed under the rate's target to the end: the p99 of the changes made
    visible after the load's midpoint (``freshness_p99_late_ms``) is under it. A pipeline
    falling behind shows it there first, since its lag grows through the run."""
    changes_per_s_to_last_visible: float = 0.0
    """Changes written / (first write → the store holding the last change, as the status
    file shows it, written once a second): the final lag and the status interval count
    against it, so it stays under the written rate even for a pipeline that keeps up."""
    catch_up_s: float = 0.0
    freshness_p50_ms: float | None = None
    freshness_p99_ms: float | None = None
    freshness_max_ms: float | None = None
    freshness_p99_late_ms: float | None = None
    """Freshness p99 of the changes made visible after the load's midpoint."""
    headrace_cpu_cores: float = 0.0
    """``cpu_cores["headrace"]`` (kept under its earlier name for readers of the JSON)."""
    cpu_cores: dict[str, float] = field(default_factory=dict)
    """Cores used over the load and the catch-up, by PostgreSQL (server, backends,
    walsender), the generator process and headrace: the machine's budget."""
    cpu_us_per_change: dict[str, float] = field(default_factory=dict)
    """The same CPU per change written, in microseconds (see ``cpu_per_change_us`` in
    :mod:`.process_cpu`): what each party costs a change whatever the rate reached. Their sum
    against the cores' budget per change at the target rate (2 cores at 100,000 changes/s:
    20 µs) says whether this machine can carry that rate at all."""
    cpu_waits: dict[str, float] = field(default_factory=dict)
    """Seconds per second that PostgreSQL's and headrace's threads were runnable but waited
    for a CPU over the same window (more than the cores they used: every core was busy)."""
    writer_thread: dict[str, float] = field(default_factory=dict)
    """Shares of the load's time headrace's writer thread ran on a core (``on_cpu``) and
    waited for one (``waiting``); see :func:`~headrace.bench.process_cpu.writer_thread_share`."""
    headrace_peak_rss_mb: float = 0.0
    headrace_streaming_rss_mb: float = 0.0
    store_transactions: int = 0
    store_checkpoints: dict[str, float] = field(default_factory=dict)
    """The store's checkpoints over the load and the catch-up (count, seconds in all,
    longest since the run started)."""
    min_max_mirror_reads: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per min/max rollup, over the streaming run: batches that recomputed groups from the
    mirror and groups refilled from it between batches (``headrace status``'s figures)."""
    mismatches: int = 0
    mismatch_detail: str = ""
    checked_views: int = 0
    mirror_rows_end: int = 0
    """Rows in the transactions mirror after the run: with the default mix the mirror grows
    by about a third of the changes (inserts less deletes), and every batch's key lookups
    and deletes scan it, so a longer run applies each batch more slowly than a short one."""
    refresh_seconds: dict[str, float] = field(default_factory=dict)
    refresh_total_s: float = 0.0
    ratio_time_to_fresh: float | None = None
    meets_target: bool | None = None
    """The issue's target at the rate (live mode only: a backlog has no freshness)."""
    load_reached: bool | None = None
    """Whether the generator wrote the rate asked for (live mode, a rate given). When it
    did not, the machine could not produce the load beside headrace, and the run says
    nothing about the target at that rate."""
    python_loop_s: float = 0.0
    """Seconds a pure-Python loop of 10M additions took before the load
    (:mod:`.calibration`): the machine's speed that day, to compare runs across days."""
    sched_autogroup: bool | None = None
    """Whether the kernel's autogroup scheduling was on (:mod:`.calibration`): it decides
    how much of the cores headrace gets beside PostgreSQL's backends."""
    headrace_allocator: str = ""
    """The C allocator ``headrace run`` ran on (:mod:`headrace.run.preload`): ``jemalloc``
    when the machine has it, else ``system``; compare runs on the same one."""
    connection: str = "unix"
    """How ``headrace run`` (and the backlog mode's ``pg_recvlogical``) reach PostgreSQL:
    ``unix`` (its socket) or ``tcp`` (127.0.0.1), or ``server`` (the ``--server`` DSN's
    way). The generator always uses the socket (the DSN with ``--server``)."""
    mirror_key_index: str = "auto"
    """``store.mirror_key_index`` of the run's pipeline (``auto``, ``true`` or ``false``;
    :mod:`headrace.engine.key_index`)."""
    mirror_key_indexed_end: bool = False
    """Whether the transactions mirror had its key index after the run."""
    server: str = "throwaway"
    """``throwaway``: a cluster of the benchmark's own on this machine, sharing its cores
    with headrace; ``external``: the server named with ``--server`` (its CPU not in
    ``cpu_cores``)."""
    mode: str = "live"
    """``live`` (headrace streams while the load is written) or ``backlog`` (the load is
    written while headrace is stopped, then drained: :mod:`.pipeline_backlog`)."""
    backlog: BacklogFigures | None = None
    """The backlog mode's figures."""


def run(
    rate: float = 10_000,
    seconds: float = 20.0,
    base_rows: int = 1_000_000,
    *,
    writers: int = 4,
    update_window: int = 0,
    mix: Mix = DEFAULT_MIX,
    backlog: bool = False,
    tcp: bool = False,
    record: Path | None = None,
    server: str | None = None,
    mirror_key_index: str = "auto",
    console: Console | None = None,
) -> PipelineBenchResult:
    """Run the benchmark (see module docstring; with ``backlog``,
    :mod:`headrace.bench.pipeline_backlog`; with ``server``, a libpq DSN, against that
    server instead of a throwaway cluster) and print its lines."""
    out = console or Console(highlight=False)
    result = PipelineBenchResult(
        rate_target=rate,
        seconds=seconds,
        base_rows=base_rows,
        update_window=update_window,
        mix=str(mix),
        mode="backlog" if backlog else "live",
        connection="server" if server is not None else "tcp" if tcp else "unix",
        server="throwaway" if server is None else "external",
        mirror_key_index=mirror_key_index,
    )
    result.python_loop_s = python_loop_seconds()
    out.print(f"machine: a Python loop of 10M additions takes {result.python_loop_s:.2f} s")
    result.sched_autogroup = autogroup_enabled()
    out.print(describe_scheduling(result.sched_autogroup))
    cluster = bench_cluster(server, tcp=tcp)
    with cluster, tempfile.TemporaryDirectory(prefix="hr-bench-") as tmp:
        dsn, stream_dsn, over, slot = _connections(cluster, tcp=tcp)
        out.print(f"headrace connects over {over}; loading {base_rows:,} transactions ...")
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_schema(conn, base_rows)
            conn.execute(b"VACUUM (FREEZE, ANALYZE)")
        config_path = Path(tmp) / "headrace.yaml"
        store_path = Path(tmp) / "bench.duckdb"
        config_path.write_text(
            PIPELINE_YAML.format(
                dsn=stream_dsn,
                store=store_path,
                slot=slot,
                key_index=mirror_key_index,
            )
        )
        config = load_pipeline(config_path)
        runs: list[RunProcess] = []

        def launch(recorded: bool) -> RunProcess:
            # --record goes to the run that streams the load (in the backlog mode, the
            # restarted one: its batches are the drain's).
            extra = ("--record", str(record.resolve())) if record and recorded else ()
            log = Path(tmp) / f"headrace-{len(runs) + 1}.log"
            runs.append(RunProcess(config_path, Path(config.store.path), log, extra))
            return runs[-1]

        options = _workload_options(result, dsn, writers)
        postgres = postgres_cpu(cluster.datadir) if isinstance(cluster, ThrowawayPostgres) else None
        try:
            first = launch(recorded=not backlog)
            _snapshot(result, first, out)
            if backlog:
                result.backlog = BacklogFigures()
                measure_backlog(
                    result.backlog,
                    first,
                    lambda: launch(recorded=True),
                    postgres=postgres,
                    bindir=cluster.bindir,
                    dsn=stream_dsn,
                    options=options,
                    slot=config.source.slot,
                    publication=config.source.publication,
                    target=TARGET_HIGH_RATE,
                    out=out,
                )
                result.written_changes = result.backlog.changes
                result.written_rate = result.backlog.written_rate
                result.written_by_kind = result.backlog.written_by_kind
                result.headrace_peak_rss_mb = result.backlog.peak_rss_mb
            else:
                _measure(result, first, postgres=postgres, options=options, out=out)
        except BaseException:
            if runs:
                out.print(runs[-1].log_tail(), markup=False)
            raise
        finally:
            for each in runs:
                if each.process.poll() is None:
                    each.stop()
        verify_exactness(result, config, dsn, out)
        time_old_way(result, config, dsn, out)
    _judge(result)
    out.print(json.dumps(asdict(result)), markup=False, soft_wrap=True)
    return result


def _connections(
    cluster: ThrowawayPostgres | ExternalPostgres, *, tcp: bool
) -> tuple[str, str, str, str]:
    """The benchmark's DSN (the generator's and the checks'), headrace's, how headrace
    connects (for the printout) and the pipeline's slot and publication name."""
    if isinstance(cluster, ExternalPostgres):
        # Slot names are the server's, not a database's: one per run's database.
        where = f"the --server DSN ({cluster.where}), in database {cluster.database}"
        return cluster.dsn(), cluster.dsn(), where, cluster.database
    dsn = cluster.dsn("postgres", unix=True)
    # headrace's own connections (see the module docstring).
    if tcp:
        return dsn, cluster.dsn("postgres"), "TCP (127.0.0.1)", "headrace_bench"
    return dsn, dsn, "the Unix socket", "headrace_bench"


def _snapshot(result: PipelineBenchResult, headrace: RunProcess, out: Console) -> None:
    """Wait for the first run's snapshot to finish; note and print its rate."""
    streaming = headrace.wait_for(
        lambda d: d.get("phase") == "streaming", 600, "the snapshot to finish"
    )
    snapshot = streaming.get("snapshot") or {}
    result.snapshot_rows_per_s = snapshot.get("rows_per_s")
    result.headrace_allocator = allocator_in_use(headrace.pid)
    out.print(
        f"snapshot: {snapshot.get('rows', 0):,} rows in {snapshot.get('seconds', 0):.2f} s "
        f"= {snapshot.get('rows_per_s', 0):,} rows/s end to end (copy + load + rollup builds); "
        f"headrace allocates with {result.headrace_allocator}"
    )


def _workload_options(result: PipelineBenchResult, dsn: str, writers: int) -> dict[str, Any]:
    """The generator process's options (:func:`.pipeline_writers.run_writers`)."""
    return {
        "dsn": dsn,
        "rate": result.rate_target,
        "seconds": result.seconds,
        "first_id": result.base_rows + 1,
        "tx_rows": tx_rows_for(result.rate_target),
        "writers": writers,
        "update_window": result.update_window,
        "mix": result.mix,
    }


def _measure(
    result: PipelineBenchResult,
    headrace: RunProcess,
    *,
    postgres: ProcessCpu | None,
    options: dict[str, Any],
    out: Console,
) -> None:
    """The live mode: the load written while ``headrace`` streams, then its figures."""
    rate, seconds = result.rate_target, result.seconds
    time.sleep(1.5)  # let the first status of the streaming phase settle
    before = headrace.status()
    before_hist = FreshnessHistogram(before.get("freshness_histogram"))
    headrace.max_rss = 0
    mode = f"{rate:,.0f} changes/s" if rate > 0 else "as fast as possible"
    touched = (
        f"the newest {result.update_window:,} ids" if result.update_window else "the whole table"
    )
    out.print(
        f"writing {mode} for {seconds:.0f} s ({options['tx_rows']} rows per transaction, "
        f"{options['writers']} connections; inserts:updates:deletes {result.mix}; "
        f"updates and deletes over {touched})"
    )
    share = load_cpu_share(postgres, headrace.cpu_seconds)
    waits = load_wait_share(postgres, headrace.wait_seconds)
    writer = writer_thread_share(headrace.pid)
    started = time.monotonic()
    generator = WorkloadProcess("headrace.bench.pipeline_writers", options)
    midpoint = MidpointStatus(headrace.status, started + seconds / 2)
    try:
        written = generator.wait(workload_deadline_s(seconds), midpoint.tick)
    finally:
        generator.stop()
    load_end = time.monotonic()
    at_load_end = headrace.status()
    result.written_changes = int(written["changes"])
    result.written_rate = round(float(written["rate"]))
    result.written_by_kind = changes_by_kind(written)
    end_lsn = int(written["end_lsn"])
    applied_before = int(before["totals"]["changes"])
    done = headrace.wait_for(
        lambda d: int(d["totals"]["changes"]) - applied_before >= result.written_changes,
        600,
        "the store to hold every change written",
    )
    caught_up = time.monotonic()
    result.cpu_cores = share.stop()
    result.cpu_us_per_change = cpu_per_change_us(share.seconds, result.written_changes)
    result.cpu_waits = waits.stop()
    result.writer_thread = writer.stop()
    # The exactness check needs the very position of the last commit (a heartbeat may be
    # needed to pass WAL records written after it).
    headrace.wait_for(lambda d: (d.get("position") or 0) >= end_lsn, 120, "the last commit")
    applied_under_load = int(at_load_end["totals"]["changes"]) - int(before["totals"]["changes"])
    # The generator's own clock (time.monotonic is the machine's): its start-up before
    # the first write is not the pipeline's time.
    first_write = float(written.get("started_at") or started)
    result.applied_rate_under_load = round(applied_under_load / (load_end - first_write))
    result.catch_up_s = round(caught_up - load_end, 3)
    result.changes_per_s_to_last_visible = round(result.written_changes / (caught_up - first_write))
    _freshness(result, before_hist, FreshnessHistogram(done.get("freshness_histogram")), midpoint)
    result.headrace_cpu_cores = result.cpu_cores["headrace"]
    result.headrace_streaming_rss_mb = round(headrace.max_rss / 2**20, 1)
    result.headrace_peak_rss_mb = round(headrace.peak_rss() / 2**20, 1)
    result.store_transactions = int(done["totals"]["store_transactions"]) - int(
        before["totals"]["store_transactions"]
    )
    result.store_checkpoints = checkpoints_between(before, done)
    result.min_max_mirror_reads = {
        str(rollup["name"]): dict(rollup["min_max_mirror_reads"])
        for rollup in done.get("rollups") or []
        if "min_max_mirror_reads" in rollup
    }
    headrace.stop_cleanly()
    _print_load(result, out)


def _freshness(
    result: PipelineBenchResult,
    before: FreshnessHistogram,
    done: FreshnessHistogram,
    midpoint: MidpointStatus,
) -> None:
    """Freshness over the load (``before`` → ``done``), over its late part (the load's
    midpoint → ``done``), and from them whether the pipeline kept up and what it sustained."""
    freshness = done.since(before)
    result.freshness_p50_ms = freshness.percentile(0.5)
    result.freshness_p99_ms = freshness.percentile(0.99)
    result.freshness_max_ms = freshness.percentile(1.0)
    if midpoint.seen:
        late = done.since(FreshnessHistogram(midpoint.histogram()))
        result.freshness_p99_late_ms = late.percentile(0.99)
    result.kept_up = kept_up(result)
    if result.rate_target > 0:
        reached = result.rate_target * (1 - GENERATOR_TOLERANCE)
        result.load_reached = result.written_rate >= reached
    result.sustained_changes_per_s = (
        result.written_rate if result.kept_up else result.changes_per_s_to_last_visible
    )


def _print_load(result: PipelineBenchResult, out: Console) -> None:
    """The load's figures: what was written and applied, freshness, CPU."""
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in result.written_by_kind.items())
    out.print(
        f"written {result.written_changes:,} changes at {result.written_rate:,.0f}/s "
        f"({kinds}); "
        f"headrace applied {result.applied_rate_under_load:,.0f}/s under load, caught up "
        f"{result.catch_up_s:.2f} s after the load ended, in "
        f"{result.store_transactions:,} store transactions"
    )
    late = result.freshness_p99_late_ms
    out.print(
        f"sustained {result.sustained_changes_per_s:,.0f} changes/s: "
        + (
            f"kept up (freshness p99 after the load's midpoint {late} ms)"
            if result.kept_up
            else f"fell behind (freshness p99 after the load's midpoint {late} ms), so the "
            "changes written over the time to the last one visible"
        )
        + f"; first write to last visible: {result.changes_per_s_to_last_visible:,.0f}/s"
    )
    out.print(
        f"freshness (commit -> visible): p50 {result.freshness_p50_ms} ms, "
        f"p99 {result.freshness_p99_ms} ms, max {result.freshness_max_ms} ms; "
        f"headrace CPU {result.headrace_cpu_cores} cores, RSS peak "
        f"{result.headrace_peak_rss_mb} MB (streaming {result.headrace_streaming_rss_mb} MB)"
    )
    out.print(describe_cores(result.cpu_cores))
    if result.cpu_us_per_change:
        target = result.rate_target if result.rate_target > 0 else TARGET_HIGH_RATE
        out.print(describe_cost_per_change(result.cpu_us_per_change, target))
    if result.load_reached is False:
        out.print(
            f"[yellow]the generator wrote {result.written_rate:,.0f} of the "
            f"{result.rate_target:,.0f} changes/s asked for[/yellow]: this machine could not "
            "produce the load beside headrace, so the run does not test the target at that "
            "rate (see the CPU above; `--backlog` measures headrace's capacity alone)"
        )
    if result.cpu_waits:
        out.print(describe_waits(result.cpu_waits))
    if result.writer_thread:
        out.print(describe_writer_thread(result.writer_thread))
    out.print(describe_checkpoints(result.store_checkpoints))
    for name, reads in result.min_max_mirror_reads.items():
        out.print(
            f"min/max of {name} read the mirror in {reads['batches']:,} batches and refilled "
            f"{reads['groups_refilled']:,} groups from it between batches"
        )


def target_p99_ms(rate: float) -> float:
    """The freshness p99 the issue asks for at ``rate`` (0: as fast as possible)."""
    if rate <= 0 or rate >= TARGET_HIGH_RATE:
        return TARGET_HIGH_P99_MS
    return TARGET_LOW_P99_MS if rate >= TARGET_LOW_RATE else TARGET_HIGH_P99_MS


def kept_up(result: PipelineBenchResult) -> bool:
    """Whether the pipeline sustained the written rate: the freshness of the changes
    made visible in the load's second half (and the catch-up) stayed under the
    rate's target. A sustainable rate is one whose latency does not keep growing;
    a pipeline slower than the load piles up a lag that grows through the run."""
    late = result.freshness_p99_late_ms
    return late is not None and late < target_p99_ms(result.rate_target)


def _judge(result: PipelineBenchResult) -> None:
    p99 = result.freshness_p99_ms
    if p99 is None:
        return
    if result.rate_target >= TARGET_HIGH_RATE or result.rate_target <= 0:
        result.meets_target = (
            result.kept_up
            and result.sustained_changes_per_s >= TARGET_HIGH_RATE * (1 - GENERATOR_TOLERANCE)
            and p99 < TARGET_HIGH_P99_MS
        )
    elif result.rate_target >= TARGET_LOW_RATE:
        result.meets_target = p99 < TARGET_LOW_P99_MS and result.mismatches == 0
    result.meets_target = bool(result.meets_target) and result.mismatches == 0

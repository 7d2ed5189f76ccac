"""``headrace bench ...``: benchmarks that print ratios against peers and limits.

One command per benchmark. To add one: write ``headrace/bench/<name>.py``
with a ``run(...)`` function that prints its lines and a last JSON line, then
add a command below that imports it lazily (so ``headrace --help`` stays fast).
"""

from __future__ import annotations

import signal
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from headrace.cli.problems import fail
from headrace.errors import HeadraceError

RecordOption = Annotated[
    Path | None,
    typer.Option(
        "--record",
        help="Also record every batch headrace applies into this new directory "
        "(for `headrace bench replay`).",
    ),
]

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="HEADRACE_BENCH_SERVER",
        help="Run against this PostgreSQL (a libpq DSN of a role that may create databases "
        "and replication slots; wal_level=logical) instead of a throwaway cluster on this "
        "machine: PostgreSQL on a machine of its own, as in production. The benchmark "
        "works in a database it creates there and drops after the run; the server's CPU "
        "is not measured.",
    ),
]


class KeyIndexChoice(StrEnum):
    """``bench pipeline --mirror-key-index``'s values (``store.mirror_key_index``)."""

    AUTO = "auto"
    TRUE = "true"
    FALSE = "false"


bench_app = typer.Typer(
    name="bench",
    help="Benchmarks on a throwaway PostgreSQL (cdc, snapshot and pipeline: or on one named "
    "with --server): each prints rates, ratios against its peers, and one JSON line last.",
    no_args_is_help=True,
)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@bench_app.callback()
def _every_benchmark() -> None:
    # SIGTERM (e.g. from `timeout`) unwinds the benchmark like Ctrl-C does, so its
    # throwaway PostgreSQL, headrace run and generators are stopped, not left running.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)


@bench_app.command("cdc")
def cdc(
    rows: int = typer.Option(
        1_000_000, "--rows", min=100, help="Rows to insert (in 100 transactions) and stream."
    ),
    unix: bool = typer.Option(
        True,
        "--unix/--tcp",
        help="Connect through the Unix socket (default) or TCP on 127.0.0.1.",
    ),
    repeat: int = typer.Option(
        1, "--repeat", min=1, help="Runs per consumer, interleaved; the best one counts."
    ),
    server: ServerOption = None,
) -> None:
    """Stream N inserted rows: pg_recvlogical, a do-nothing consumer, headrace decoding.

    Prints each one's seconds and rows/s, then one JSON line with them and the
    ratios decode_vs_noop (target >= 0.9) and decode_vs_pg_recvlogical. With
    --server DSN: against that PostgreSQL instead of one on this machine's cores.
    """
    from headrace.bench.cdc import run  # noqa: PLC0415 - keeps `headrace --help` fast

    try:
        run(rows, unix=unix, repeat=repeat, server=server)
    except HeadraceError as exc:  # a --server that cannot carry the benchmark, say
        fail(exc)


@bench_app.command("cdc-fintech")
def cdc_fintech(
    rate: float = typer.Option(
        500.0, "--rate", min=1, help="Transactions/s (wall clock) the generator writes."
    ),
    seconds: float = typer.Option(20.0, "--seconds", min=5, help="Seconds of load."),
    customers: int = typer.Option(20_000, "--customers", min=100, help="Customers of the bank."),
    commits_per_batch: int = typer.Option(
        1,
        "--commits-per-batch",
        min=1,
        help="Cut a batch every N commits (1: as the live source cuts them at --rate 500).",
    ),
    repeat: int = typer.Option(5, "--repeat", min=1, help="Timed decodings; the median counts."),
) -> None:
    """CPU of the change source per change on the fintech workload (as `bench fraud` writes it).

    Records the workload's pgoutput stream once, then decodes it into batches
    cut as the live source cuts them, and in backlog-sized batches; prints
    microseconds of CPU per change and milliseconds per batch, then one JSON line.
    """
    from headrace.bench.cdc_fintech import run  # noqa: PLC0415 - keeps `headrace --help` fast

    run(rate, seconds, customers=customers, commits_per_batch=commits_per_batch, repeat=repeat)


@bench_app.command("snapshot")
def snapshot(
    rows: int = typer.Option(1_000_000, "--rows", min=100, help="Rows in the table to snapshot."),
    workers: int = typer.Option(
        2, "--workers", min=1, help="Parallel copy connections (the raw COPY uses as many)."
    ),
    unix: bool = typer.Option(
        True,
        "--unix/--tcp",
        help="Connect through the Unix socket (default) or TCP on 127.0.0.1.",
    ),
    server: ServerOption = None,
) -> None:
    """Snapshot N rows into Arrow and end to end into DuckDB (the first run's path),
    against a raw binary COPY to a null sink.

    Prints each one's seconds, rows/s and CPU, then one JSON line with them and the
    ratios (against the raw COPY, same parallelism and one connection; end to end
    against into Arrow). Target: >= 1M rows/s end to end. With --server DSN: against
    that PostgreSQL instead of one on this machine's cores.
    """
    from headrace.bench.snapshot import run  # noqa: PLC0415 - keeps `headrace --help` fast

    try:
        run(rows, workers, unix=unix, server=server)
    except HeadraceError as exc:  # a --server that cannot carry the benchmark, say
        fail(exc)


@bench_app.command("serve")
def serve(
    viewers: int = typer.Option(250, "--viewers", min=1, help="Concurrent live (SSE) viewers."),
    rate: float = typer.Option(
        2000, "--rate", min=10, help="Row changes/s written into PostgreSQL."
    ),
    sql_rate: float = typer.Option(2.0, "--sql-rate", min=0, help="SQL queries/s."),
    seconds: float = typer.Option(30.0, "--seconds", "--duration", min=5, help="Seconds measured."),
    customers: int = typer.Option(
        10_000, "--customers", min=100, help="Customers of the bank (a month of history)."
    ),
) -> None:
    """Live viewers, dashboard loads and SQL on `headrace run --serve` while PostgreSQL is
    written at RATE changes/s (the fintech deployment and its dashboard).

    Prints dashboard load p50/p99 (target < 300 ms), commit-to-viewer p50/p99
    (target < 1 s), viewers held (target 1,000 on 2 cores), server RSS, the
    ingest rate achieved, and the store queries/s against per-viewer polling as
    a ratio; one JSON line last.
    """
    from headrace.bench.serve import ServeBenchSettings, run  # noqa: PLC0415 - fast --help

    run(
        ServeBenchSettings(
            viewers=viewers, rate=rate, sql_rate=sql_rate, seconds=seconds, customers=customers
        )
    )


@bench_app.command("pipeline")
def pipeline(  # noqa: PLR0917 - typer maps parameters to options, not positions
    rate: float = typer.Option(
        10_000, "--rate", min=0, help="Changes/s the generator writes (0: as fast as it can)."
    ),
    seconds: float = typer.Option(20.0, "--seconds", min=1, help="Seconds of write load."),
    base_rows: int = typer.Option(
        1_000_000, "--base-rows", min=0, help="Rows in the table before the run (snapshotted)."
    ),
    writers: int = typer.Option(
        4, "--writers", min=1, help="Generator connections sharing the rate."
    ),
    update_window: int = typer.Option(
        0,
        "--update-window",
        min=0,
        help="Updates and deletes pick among the newest this many ids (the OLTP pattern); "
        "0: uniformly over the whole table, the hardest case for the mirror.",
    ),
    mix: str = typer.Option(
        "50:35:15",
        "--mix",
        help="Shares of inserts, updates and deletes among the transactions, "
        "INSERTS:UPDATES:DELETES (e.g. 40:20:40: the table stops growing and rollup groups "
        "lose values as often as they gain them).",
    ),
    backlog: bool = typer.Option(
        False,
        "--backlog",
        help="Write the load while headrace is stopped, then time how fast it drains it "
        "(its capacity with no workload beside it), against pg_recvlogical.",
    ),
    tcp: bool = typer.Option(
        False,
        "--tcp",
        help="headrace (and the backlog's pg_recvlogical) connect over TCP to 127.0.0.1 "
        "instead of the Unix socket, as to a PostgreSQL on another machine.",
    ),
    record: RecordOption = None,
    repeat: int = typer.Option(
        1,
        "--repeat",
        min=1,
        help="Runs, one after the other (each on its own cluster); a summary line with "
        "the medians and one JSON line of them and every run come last.",
    ),
    server: ServerOption = None,
    mirror_key_index: Annotated[
        KeyIndexChoice,
        typer.Option(
            "--mirror-key-index",
            help="store.mirror_key_index of the run's pipeline: the mirror's rows of a small "
            "batch found through an index on its key instead of a scan. auto (the default) "
            "indexes mirrors of 2M rows or more while their batches are small (pair with "
            "--base-rows); true always; false never.",
        ),
    ] = KeyIndexChoice.AUTO,
) -> None:
    """The whole pipeline (snapshot, then streaming) under a mixed write load, checked exactly.

    Prints sustained changes/s, freshness p50/p99 (commit -> visible in the store),
    CPU and peak RSS of `headrace run`, mismatches against the same GROUP BY on
    PostgreSQL (must be 0) and the time of REFRESH MATERIALIZED VIEW as a ratio;
    one JSON line last. Targets on 2 cores: >= 100,000 changes/s with p99 < 1 s;
    at 10,000/s p99 < 300 ms. With --backlog: the drain's changes/s and its time
    against pg_recvlogical's for the same changes. With --repeat N: N runs, then a
    line of their medians (p99, applied rate, CPU per change) and how many kept up.
    With --server DSN: against that PostgreSQL instead of one on this machine's cores.
    """
    from headrace.bench.pipeline import (  # noqa: PLC0415 - keeps `headrace --help` fast
        PipelineBenchResult,
        run,
    )
    from headrace.bench.pipeline_repeat import run_repeated  # noqa: PLC0415 - as above
    from headrace.bench.pipeline_workload import Mix  # noqa: PLC0415 - as above

    try:
        shares = Mix.parse(mix)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mix") from exc
    if record is not None and repeat > 1:
        raise typer.BadParameter(
            "a recording holds one run: record with --repeat 1", param_hint="--record"
        )

    def run_once() -> PipelineBenchResult:
        return run(
            rate,
            seconds,
            base_rows,
            writers=writers,
            update_window=update_window,
            mix=shares,
            backlog=backlog,
            tcp=tcp,
            record=record,
            server=server,
            mirror_key_index=mirror_key_index.value,
        )

    try:
        if repeat == 1:
            run_once()
        else:
            run_repeated(repeat, run_once)
    except HeadraceError as exc:  # a --server that cannot carry the benchmark, say
        fail(exc)


@bench_app.command("fraud")
def fraud(  # noqa: PLR0917 - typer maps parameters to options, not positions
    rate: float = typer.Option(
        5_000, "--rate", min=1, help="Transactions/s (wall clock) the generator writes."
    ),
    seconds: float = typer.Option(60.0, "--seconds", min=5, help="Seconds of load."),
    speed: float = typer.Option(
        60.0,
        "--speed",
        min=1,
        help="Simulated seconds per wall second (multi-minute scenarios complete in the run).",
    ),
    customers: int = typer.Option(20_000, "--customers", min=100, help="Customers of the bank."),
    fraud_every: int = typer.Option(
        1_000, "--fraud-every", min=10, help="One labelled fraud scenario per N transactions."
    ),
    record: RecordOption = None,
) -> None:
    """The six fraud rules on the live fintech workload, scored against the ground truth.

    Alerts go to a local webhook receiver. Prints per rule precision and recall
    (target >= 0.95 each), detection latency from commit to webhook received
    p50/p99 (target p99 < 200 ms) and the rollups' freshness meanwhile; one JSON
    line last.
    """
    from headrace.bench.fraud import run  # noqa: PLC0415 - keeps `headrace --help` fast

    run(
        rate,
        seconds,
        speed=speed,
        customers=customers,
        fraud_every=fraud_every,
        record=record,
    )


@bench_app.command("replay")
def replay(
    recording: Annotated[
        Path,
        typer.Argument(
            help="A directory written by `--record` (headrace run, bench pipeline/fraud)."
        ),
    ],
    repeat: int = typer.Option(
        3, "--repeat", min=1, help="Replays, each on a fresh copy of the store; medians count."
    ),
    top: int = typer.Option(15, "--top", min=0, help="Statements to list, costliest first."),
    skip: int = typer.Option(
        2, "--skip", min=0, help="First batches of each replay not counted (warm-up)."
    ),
) -> None:
    """Apply recorded batches again, in-process, timing every store statement.

    Each replay starts from a copy of the recorded store, so every replay runs
    the same statements on the same data with no PostgreSQL or generator
    competing for the CPU: the way to compare engine changes on a noisy
    machine. Prints ms per apply (median over replays), statements per apply,
    the costliest statements; one JSON line last.
    """
    from headrace.bench.replay import run  # noqa: PLC0415 - keeps `headrace --help` fast

    run(recording, repeat=repeat, top=top, skip=skip)

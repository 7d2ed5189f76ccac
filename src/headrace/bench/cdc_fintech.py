"""``headrace bench cdc-fintech``: CPU of the change source per change on the fintech workload.

In a live pipeline the source thread (receive, decode, cut batches) shares
the CPU with the writer, PostgreSQL and the workload. Under the reference
deployment's load (``bench fraud --rate 500``: ~50 commits of ~40 row changes
per second across several tables) batches are small, so what they cost is
mostly a fixed cost per batch, not per change. This benchmark measures that
cost in isolation, reproducibly:

1. A throwaway cluster gets the fintech schema and a month of history; a
   pgoutput slot is created; the fintech workload (labelled fraud scenarios
   included) writes ``--rate`` transactions/s for ``--seconds``, paced as in
   ``bench fraud``.
2. The slot is drained once into memory (the pgoutput messages as received).
3. The messages are decoded into ChangeBatches ``--repeat`` times, cut every
   ``--commits-per-batch`` commits (1: as the live source cuts them at this
   rate), then once more in batches of about 10,000 changes (a backlog).
   Reported: CPU microseconds per change and milliseconds per batch (median
   of the repeats), and the CPU of receiving the stream with a consumer that
   does nothing (per change).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import psycopg
from psycopg import sql
from rich.console import Console

from headrace.bench import fraud_workload
from headrace.demo.schema import ALL_TABLES
from headrace.errors import HeadraceError
from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.source.postgres.batcher import Batcher
from headrace.source.postgres.replication import ReplicationConnection, StreamOptions
from headrace.source.postgres.types import TypeRegistry

PUBLICATION = "headrace_bench_cdc_fintech"
SLOT = "headrace_bench_cdc_fintech"
TABLES = ALL_TABLES
BACKLOG_BATCH_CHANGES = 10_000
_COMMIT = 0x43  # 'C', a pgoutput Commit message
_SPEED = 60.0  # simulated seconds per wall second, as bench fraud runs it

Message = tuple[int, bytes]


@dataclass(frozen=True)
class DecodeTiming:
    """CPU of decoding a message list into batches (median of the repeats)."""

    changes: int
    batches: int
    cpu_s: float
    us_per_change: float
    ms_per_batch: float


@dataclass(frozen=True)
class CdcFintechResult:
    """Figures of one ``bench cdc-fintech`` run."""

    rate: float
    seconds: float
    customers: int
    transactions: int
    messages: int
    stream_bytes: int
    commits_per_batch: int
    repeat: int
    live: DecodeTiming
    backlog: DecodeTiming
    receive_cpu_s: float
    receive_us_per_change: float


def run(
    rate: float = 500.0,
    seconds: float = 20.0,
    *,
    customers: int = 20_000,
    commits_per_batch: int = 1,
    repeat: int = 5,
    console: Console | None = None,
) -> CdcFintechResult:
    """Run the benchmark (see module docstring) and print its lines."""
    out = console or Console(highlight=False)
    with ThrowawayPostgres() as cluster:
        out.print(f"loading a month of history for {customers:,} customers ...")
        dsn, anchor, _ = fraud_workload.bank_with_history(
            cluster, customers=customers, seed=1, seconds=seconds, speed=_SPEED
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            tables = sql.SQL(", ").join(sql.Identifier(t) for t in TABLES)
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    sql.Identifier(PUBLICATION), tables
                )
            )
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))
        out.print(f"writing {rate:,.0f} transactions/s for {seconds:g} s ...")
        written = fraud_workload.run(
            fraud_workload.options_for(
                dsn=dsn,
                rate=rate,
                speed=_SPEED,
                seconds=seconds,
                anchor=anchor,
                customers=customers,
            )
        )
        messages, receive_cpu = _drain(dsn, int(written["end_lsn"]))
    out.print(
        f"stream: {len(messages):,} messages, {sum(len(p) for _, p in messages) / 1e6:,.1f} MB "
        f"of pgoutput, {written['transactions']:,} transactions"
    )
    live = time_decoding(messages, commits_per_batch=commits_per_batch, repeat=repeat)
    out.print(_line(f"decoded, {commits_per_batch} commit(s) per batch", live))
    backlog = time_decoding(messages, max_changes=BACKLOG_BATCH_CHANGES, repeat=repeat)
    out.print(_line(f"decoded, ~{BACKLOG_BATCH_CHANGES:,} changes per batch", backlog))
    receive_us = 1e6 * receive_cpu / live.changes if live.changes else 0.0
    out.print(f"received (consumer doing nothing): {receive_us:.1f} us CPU per change")
    result = CdcFintechResult(
        rate=rate,
        seconds=seconds,
        customers=customers,
        transactions=int(written["transactions"]),
        messages=len(messages),
        stream_bytes=sum(len(p) for _, p in messages),
        commits_per_batch=commits_per_batch,
        repeat=repeat,
        live=live,
        backlog=backlog,
        receive_cpu_s=round(receive_cpu, 3),
        receive_us_per_change=round(receive_us, 1),
    )
    out.print(json.dumps(asdict(result)), markup=False, soft_wrap=True)
    return result


def _drain(dsn: str, end_lsn: int) -> tuple[list[Message], float]:
    """Every message of the slot up to ``end_lsn``, and the CPU seconds receiving took."""
    messages: list[Message] = []

    def keep(start: int, payload: bytes | memoryview) -> None:
        messages.append((start, bytes(payload)))

    with ReplicationConnection(dsn) as conn:
        conn.start(SLOT, 0, StreamOptions(publications=(PUBLICATION,)))
        cpu = time.process_time()
        deadline = time.monotonic() + 600
        # The server's keepalives say how far it has sent: done once that is
        # past the workload's end and nothing more arrives.
        while conn.drain(keep, 1.0) or conn.server_wal_end < end_lsn:
            if time.monotonic() > deadline:
                raise HeadraceError("draining the slot stalled", "see the server log")
        cpu = time.process_time() - cpu
    return messages, cpu


def time_decoding(
    messages: Sequence[Message],
    *,
    commits_per_batch: int = 0,
    max_changes: int = 0,
    repeat: int = 3,
) -> DecodeTiming:
    """Decode ``messages`` into batches ``repeat`` times (after one untimed pass).

    A batch is taken every ``commits_per_batch`` commits, or once at least
    ``max_changes`` changes are pending (whichever is set), and at the end.
    """
    if commits_per_batch <= 0 and max_changes <= 0:
        raise HeadraceError(
            "no batch size", "give commits_per_batch or max_changes (this is a bug)"
        )
    _decode(messages, commits_per_batch, max_changes)
    runs = []
    for _ in range(repeat):
        cpu = time.process_time()
        changes, batches = _decode(messages, commits_per_batch, max_changes)
        runs.append(time.process_time() - cpu)
    cpu_s = statistics.median(runs)
    return DecodeTiming(
        changes=changes,
        batches=batches,
        # To the microsecond: a small decode takes a few ms, and 0.1 ms steps would
        # make cpu_s disagree with us_per_change by over 1%.
        cpu_s=round(cpu_s, 6),
        us_per_change=round(1e6 * cpu_s / changes, 2) if changes else 0.0,
        ms_per_batch=round(1e3 * cpu_s / batches, 3) if batches else 0.0,
    )


def _decode(
    messages: Sequence[Message], commits_per_batch: int, max_changes: int
) -> tuple[int, int]:
    batcher = Batcher(TypeRegistry())
    changes = batches = commits = 0
    for start, payload in messages:
        batcher.feed(start, payload)
        if payload[0] != _COMMIT:
            continue
        commits += 1
        if (commits_per_batch > 0 and commits % commits_per_batch == 0) or (
            0 < max_changes <= batcher.pending_changes
        ):
            batch = batcher.take()
            if batch is not None:
                changes += batch.decoded_changes()
                batches += 1
    batch = batcher.take()
    if batch is not None:
        changes += batch.decoded_changes()
        batches += 1
    return changes, batches


def _line(what: str, timing: DecodeTiming) -> str:
    return (
        f"{what:<40} {timing.us_per_change:8.1f} us CPU per change, "
        f"{timing.ms_per_batch:6.2f} ms per batch ({timing.batches:,} batches, "
        f"{timing.changes:,} changes)"
    )

"""``headrace bench cdc``: streaming changes, decoded, against consumers that do nothing.

A throwaway cluster gets N rows in a typical table (int8 key, numeric(18,2),
text, timestamptz, bool), inserted by 100 transactions of N/100 rows while a
pgoutput slot records them. Copies of that slot
(``pg_copy_logical_replication_slot``) are then drained, one after the
other, over the same connection kind (Unix socket unless ``--tcp``), by:

1. ``pg_recvlogical`` writing to /dev/null (PostgreSQL's own C client),
   stopped by ``--endpos`` at the last commit;
2. a replication consumer that does nothing with the bytes (headrace's
   receive loop with an empty handler: the ceiling for any Python consumer);
3. headrace's :class:`PostgresSource` producing ChangeBatches with every
   value decoded into Arrow.

A first, untimed drain (a "noop" pass) warms the caches and finds the last
commit's end LSN. The headline ratio is ``decode_vs_noop`` (3 against 2):
at >= 0.9 decoding is not what limits the stream, the walsender is. The last
line printed is one JSON object with every figure.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psycopg
from rich.console import Console

from headrace.errors import HeadraceError, format_lsn
from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.source.changes import TableRef
from headrace.source.postgres.replication import ReplicationConnection, StreamOptions
from headrace.source.postgres.source import PostgresSource, SourceSettings

TARGET_DECODE_VS_NOOP = 0.9
TABLE = TableRef("public", "bench_cdc")
PUBLICATION = "headrace_bench_cdc"
ORIGIN_SLOT = "headrace_bench_cdc"
TRANSACTIONS = 100

_CREATE = """
CREATE TABLE bench_cdc (
    id         int8 PRIMARY KEY,
    amount     numeric(18,2) NOT NULL,
    note       text,
    created_at timestamptz NOT NULL,
    settled    bool NOT NULL
)
"""
_LOAD = """
INSERT INTO bench_cdc
SELECT g, round((random() * 100000)::numeric, 2), 'payment #' || g || ' to merchant ' || (g %% 977),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '37 seconds', g %% 3 = 0
FROM generate_series(%s::int8, %s::int8) AS g
"""
_COMMIT = 0x43  # 'C', a pgoutput Commit message


@dataclass(frozen=True)
class CdcBenchResult:
    """Timings of one ``bench cdc`` run (rates are rows/s)."""

    rows: int
    transactions: int
    connection: str
    stream_bytes: int
    pg_recvlogical_s: float
    pg_recvlogical_rows_per_s: float
    noop_s: float
    noop_rows_per_s: float
    decode_s: float
    decode_rows_per_s: float
    decode_vs_noop: float
    decode_vs_pg_recvlogical: float
    target_decode_vs_noop: float
    meets_target: bool


@dataclass(frozen=True)
class _Stream:
    """What the warm-up drain learnt about the stream."""

    end_lsn: int
    messages: int
    payload_bytes: int


def run(
    rows: int = 1_000_000, *, unix: bool = True, console: Console | None = None
) -> CdcBenchResult:
    """Run the benchmark on a fresh throwaway cluster and print its lines."""
    if rows < TRANSACTIONS:
        raise HeadraceError(
            f"--rows {rows} is too small", f"use at least {TRANSACTIONS} (one per transaction)"
        )
    out = console or Console(highlight=False)
    with ThrowawayPostgres() as cluster:
        dsn = cluster.dsn("postgres", unix=unix)
        out.print(f"loading {rows:,} rows into {TABLE} in {TRANSACTIONS} transactions ...")
        _load(dsn, rows)
        stream = _warm_up(dsn)
        out.print(
            f"stream: {stream.messages:,} messages, {stream.payload_bytes / 1e6:,.1f} MB of "
            f"pgoutput, ends at {format_lsn(stream.end_lsn)}"
        )
        recvlogical = _timed(lambda: _pg_recvlogical(cluster, dsn, stream.end_lsn))
        out.print(_line("pg_recvlogical to /dev/null", rows, recvlogical))
        noop = _timed(lambda: _noop(dsn, stream.end_lsn))
        out.print(_line("replication consumer doing nothing", rows, noop))
        decoded_rows = 0

        def decode() -> None:
            nonlocal decoded_rows
            decoded_rows = _decode(dsn, stream.end_lsn)

        decode_s = _timed(decode)
        out.print(_line("headrace source, ChangeBatches decoded", rows, decode_s))
    if decoded_rows != rows:
        raise HeadraceError(
            f"the source delivered {decoded_rows:,} changes, expected {rows:,}",
            "this is a bug in headrace; report it",
        )
    decode_vs_noop = noop / decode_s
    result = CdcBenchResult(
        rows=rows,
        transactions=TRANSACTIONS,
        connection="unix" if unix else "tcp",
        stream_bytes=stream.payload_bytes,
        pg_recvlogical_s=round(recvlogical, 3),
        pg_recvlogical_rows_per_s=round(rows / recvlogical),
        noop_s=round(noop, 3),
        noop_rows_per_s=round(rows / noop),
        decode_s=round(decode_s, 3),
        decode_rows_per_s=round(rows / decode_s),
        decode_vs_noop=round(decode_vs_noop, 3),
        decode_vs_pg_recvlogical=round(recvlogical / decode_s, 3),
        target_decode_vs_noop=TARGET_DECODE_VS_NOOP,
        meets_target=decode_vs_noop >= TARGET_DECODE_VS_NOOP,
    )
    out.print(
        f"decode vs noop: {result.decode_vs_noop:.2f}, decode vs pg_recvlogical: "
        f"{result.decode_vs_pg_recvlogical:.2f}; target decode_vs_noop >= "
        f"{TARGET_DECODE_VS_NOOP} " + ("met" if result.meets_target else "NOT met")
    )
    out.print(json.dumps(asdict(result)), markup=False, soft_wrap=True)
    return result


def _load(dsn: str, rows: int) -> None:
    """Table, publication, the origin slot, then the rows in 100 transactions."""
    per = rows // TRANSACTIONS
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_CREATE.encode())
        conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}".encode())
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (ORIGIN_SLOT,))
        first = 1
        for txn in range(TRANSACTIONS):
            last = rows if txn == TRANSACTIONS - 1 else first + per - 1
            conn.execute(_LOAD.encode(), (first, last))
            first = last + 1


def _copy_slot(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", (ORIGIN_SLOT, name))
    return name


def _options() -> StreamOptions:
    return StreamOptions(publications=(PUBLICATION,))


def _warm_up(dsn: str) -> _Stream:
    """Drain a copy once (untimed): warm caches, find the last commit's end LSN."""
    slot = _copy_slot(dsn, "headrace_bench_warmup")
    commits = messages = size = 0
    end_lsn = 0

    def count(start: int, payload: memoryview) -> None:
        nonlocal commits, messages, size, end_lsn
        messages += 1
        size += len(payload)
        if payload[0] == _COMMIT:
            commits += 1
            end_lsn = start  # a Commit's XLogData starts at the commit's end LSN

    with ReplicationConnection(dsn) as conn:
        conn.start(slot, 0, _options())
        deadline = time.monotonic() + 600
        while commits < TRANSACTIONS:
            if time.monotonic() > deadline:
                raise HeadraceError("the warm-up drain stalled", "see the server log")
            conn.drain(count, 1.0)
    return _Stream(end_lsn=end_lsn, messages=messages, payload_bytes=size)


def _pg_recvlogical(cluster: ThrowawayPostgres, dsn: str, end_lsn: int) -> None:
    slot = _copy_slot(dsn, "headrace_bench_recvlogical")
    options = ("proto_version=2", f"publication_names={PUBLICATION}", "messages=true")
    command = [
        str(cluster.bindir / "pg_recvlogical"),
        *("--dbname", dsn, "--slot", slot, "--start", "--no-loop"),
        *("--endpos", format_lsn(end_lsn), "--file", "/dev/null"),
        *(arg for option in (*options, "streaming=true") for arg in ("--option", option)),
    ]
    subprocess.run(command, check=True, capture_output=True)


def _noop(dsn: str, end_lsn: int) -> None:
    slot = _copy_slot(dsn, "headrace_bench_noop")

    def nothing(start: int, payload: memoryview) -> None:
        return None

    with ReplicationConnection(dsn) as conn:
        conn.start(slot, 0, _options())
        while conn.last_data_start < end_lsn:
            conn.drain(nothing, 1.0)


def _decode(dsn: str, end_lsn: int) -> int:
    slot = _copy_slot(dsn, "headrace_bench_decode")
    settings = SourceSettings(
        dsn=dsn,
        tables=(TABLE,),
        publication=PUBLICATION,
        slot=slot,
        create_publication=False,
        heartbeat_interval_s=0,
    )
    changes = 0
    with PostgresSource(settings) as source:
        for batch in source.batches():
            changes += batch.num_changes
            if batch.position >= end_lsn:
                break
    return changes


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _line(what: str, rows: int, seconds: float) -> str:
    return f"{what:<44} {seconds:7.3f} s  {rows / seconds:>12,.0f} rows/s"

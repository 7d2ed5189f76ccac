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

``--server DSN`` runs against a PostgreSQL elsewhere instead (:mod:`.server`): in a
database of its own there, its slots named after it, the walsender's CPU not measured.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg
from rich.console import Console

from headrace.bench.recvlogical import drain_with_pg_recvlogical
from headrace.bench.server import ExternalPostgres, bench_cluster
from headrace.errors import HeadraceError, format_lsn
from headrace.source.changes import TableRef
from headrace.source.postgres.replication import ReplicationConnection, StreamOptions
from headrace.source.postgres.replication_stream import Payload
from headrace.source.postgres.source import PostgresSource
from headrace.source.postgres.source_settings import SourceSettings

TARGET_DECODE_VS_NOOP = 0.9
TABLE = TableRef("public", "bench_cdc")
PUBLICATION = "headrace_bench_cdc"
TRANSACTIONS = 100


@dataclass(frozen=True)
class _Slots:
    """The run's replication slots (names are the server's, not a database's) and whether
    the walsenders' CPU can be read here (a server on this machine)."""

    prefix: str
    local: bool

    @property
    def origin(self) -> str:
        """The slot that records the load; the consumers drain copies of it."""
        return f"{self.prefix}_cdc"


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
    """Timings of one ``bench cdc`` run: the best of ``repeat`` runs per consumer.

    ``*_cpu_s`` is the CPU time of the consumer process; ``*_walsender_cpu_s``
    that of the walsender serving it (Linux, else None): a walsender busy for
    nearly the whole run is the limit; a consumer busy for it is.
    """

    rows: int
    transactions: int
    connection: str
    repeat: int
    stream_bytes: int
    pg_recvlogical_s: float
    pg_recvlogical_rows_per_s: float
    pg_recvlogical_cpu_s: float
    noop_s: float
    noop_rows_per_s: float
    noop_cpu_s: float
    noop_walsender_cpu_s: float | None
    decode_s: float
    decode_rows_per_s: float
    decode_cpu_s: float
    decode_walsender_cpu_s: float | None
    decode_vs_noop: float
    decode_vs_pg_recvlogical: float
    target_decode_vs_noop: float
    meets_target: bool


@dataclass(frozen=True)
class _Run:
    """One timed drain."""

    seconds: float
    cpu_s: float
    walsender_cpu_s: float | None = None


@dataclass(frozen=True)
class _Stream:
    """What the warm-up drain learnt about the stream."""

    end_lsn: int
    messages: int
    payload_bytes: int


def run(
    rows: int = 1_000_000,
    *,
    unix: bool = True,
    repeat: int = 1,
    server: str | None = None,
    console: Console | None = None,
) -> CdcBenchResult:
    """Run the benchmark on a fresh throwaway cluster (``server``, a libpq DSN: in a
    database of its own on that PostgreSQL) and print its lines."""
    if rows < TRANSACTIONS:
        raise HeadraceError(
            f"--rows {rows} is too small", f"use at least {TRANSACTIONS} (one per transaction)"
        )
    cluster = bench_cluster(server, tcp=not unix)
    out = console or Console(highlight=False)
    runs: dict[str, list[_Run]] = {"pg_recvlogical": [], "noop": [], "decode": []}
    with cluster:
        if isinstance(cluster, ExternalPostgres):
            dsn, slots = cluster.dsn(), _Slots(cluster.database, local=False)
            out.print(f"against --server ({cluster.where}), in database {cluster.database}")
        else:
            dsn, slots = cluster.dsn("postgres", unix=unix), _Slots("headrace_bench", local=True)
        out.print(f"loading {rows:,} rows into {TABLE} in {TRANSACTIONS} transactions ...")
        _load(dsn, rows, slots)
        stream = _warm_up(dsn, slots)
        out.print(
            f"stream: {stream.messages:,} messages, {stream.payload_bytes / 1e6:,.1f} MB of "
            f"pgoutput, ends at {format_lsn(stream.end_lsn)}"
        )
        for _ in range(repeat):  # rounds interleave the consumers: noise hits all alike
            runs["pg_recvlogical"].append(
                _pg_recvlogical(cluster.bindir, dsn, stream.end_lsn, slots)
            )
            out.print(_line("pg_recvlogical to /dev/null", rows, runs["pg_recvlogical"][-1]))
            runs["noop"].append(_noop(dsn, stream.end_lsn, slots))
            out.print(_line("replication consumer doing nothing", rows, runs["noop"][-1]))
            decoded, decode_run = _decode(dsn, stream.end_lsn, slots)
            runs["decode"].append(decode_run)
            out.print(_line("headrace source, ChangeBatches decoded", rows, decode_run))
            if decoded != rows:
                raise HeadraceError(
                    f"the source delivered {decoded:,} changes, expected {rows:,}",
                    "this is a bug in headrace; report it",
                )
    recvlogical, noop, decode = (min(runs[k], key=lambda r: r.seconds) for k in runs)
    decode_vs_noop = noop.seconds / decode.seconds
    result = CdcBenchResult(
        rows=rows,
        transactions=TRANSACTIONS,
        connection="server" if server is not None else "unix" if unix else "tcp",
        repeat=repeat,
        stream_bytes=stream.payload_bytes,
        pg_recvlogical_s=round(recvlogical.seconds, 3),
        pg_recvlogical_rows_per_s=round(rows / recvlogical.seconds),
        pg_recvlogical_cpu_s=round(recvlogical.cpu_s, 3),
        noop_s=round(noop.seconds, 3),
        noop_rows_per_s=round(rows / noop.seconds),
        noop_cpu_s=round(noop.cpu_s, 3),
        noop_walsender_cpu_s=_rounded(noop.walsender_cpu_s),
        decode_s=round(decode.seconds, 3),
        decode_rows_per_s=round(rows / decode.seconds),
        decode_cpu_s=round(decode.cpu_s, 3),
        decode_walsender_cpu_s=_rounded(decode.walsender_cpu_s),
        decode_vs_noop=round(decode_vs_noop, 3),
        decode_vs_pg_recvlogical=round(recvlogical.seconds / decode.seconds, 3),
        target_decode_vs_noop=TARGET_DECODE_VS_NOOP,
        meets_target=decode_vs_noop >= TARGET_DECODE_VS_NOOP,
    )
    best = f"best of {repeat}: " if repeat > 1 else ""
    out.print(
        f"{best}decode vs noop: {result.decode_vs_noop:.2f}, decode vs pg_recvlogical: "
        f"{result.decode_vs_pg_recvlogical:.2f}; target decode_vs_noop >= "
        f"{TARGET_DECODE_VS_NOOP} " + ("met" if result.meets_target else "NOT met")
    )
    out.print(json.dumps(asdict(result)), markup=False, soft_wrap=True)
    return result


def _load(dsn: str, rows: int, slots: _Slots) -> None:
    """Table, publication, the origin slot, then the rows in 100 transactions."""
    per = rows // TRANSACTIONS
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_CREATE.encode())
        conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}".encode())
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slots.origin,))
        first = 1
        for txn in range(TRANSACTIONS):
            last = rows if txn == TRANSACTIONS - 1 else first + per - 1
            conn.execute(_LOAD.encode(), (first, last))
            first = last + 1


_copies = itertools.count(1)


def _copy_slot(dsn: str, name: str, slots: _Slots) -> str:
    """A fresh copy of the origin slot (same position), named ``<prefix>_name_<n>``."""
    copy = f"{slots.prefix}_{name}_{next(_copies)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Copies already drained hold WAL for nothing: drop them first (this database's
        # only: on a --server, other databases' slots are not the benchmark's).
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = current_database() AND slot_name <> %s AND NOT active",
            (slots.origin,),
        )
        conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", (slots.origin, copy))
    return copy


def _options() -> StreamOptions:
    return StreamOptions(publications=(PUBLICATION,))


def _warm_up(dsn: str, slots: _Slots) -> _Stream:
    """Drain a copy once (untimed): warm caches, find the last commit's end LSN."""
    slot = _copy_slot(dsn, "warmup", slots)
    commits = messages = size = 0
    end_lsn = 0

    def count(start: int, payload: Payload) -> None:
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


def _pg_recvlogical(bindir: Path, dsn: str, end_lsn: int, slots: _Slots) -> _Run:
    slot = _copy_slot(dsn, "recvlogical", slots)
    drain = drain_with_pg_recvlogical(bindir, dsn, slot, end_lsn, _options())
    return _Run(drain.seconds, drain.cpu_seconds)


def _noop(dsn: str, end_lsn: int, slots: _Slots) -> _Run:
    slot = _copy_slot(dsn, "noop", slots)

    def nothing(start: int, payload: Payload) -> None:
        return None

    with ReplicationConnection(dsn) as conn:
        conn.start(slot, 0, _options())
        walsender = _process_cpu(conn.backend_pid if slots.local else None)
        cpu = time.process_time()
        started = time.perf_counter()
        while conn.last_data_start < end_lsn:
            conn.drain(nothing, 1.0)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        walsender_after = _process_cpu(conn.backend_pid if slots.local else None)
    return _Run(seconds, cpu, _difference(walsender_after, walsender))


def _decode(dsn: str, end_lsn: int, slots: _Slots) -> tuple[int, _Run]:
    """Drain with PostgresSource; returns the changes delivered and the timing."""
    slot = _copy_slot(dsn, "decode", slots)
    settings = SourceSettings(
        dsn=dsn,
        tables=(TABLE,),
        publication=PUBLICATION,
        slot=slot,
        create_publication=False,
        heartbeat_interval_s=0,
    )
    changes = 0
    walsender_after: float | None = None
    with PostgresSource(settings) as source:
        source.prepare()
        cpu = time.process_time()
        started = time.perf_counter()
        for batch in source.batches():
            changes += batch.decoded_changes()
            if batch.position >= end_lsn:
                walsender_after = _process_cpu(source.backend_pid if slots.local else None)
                break
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
    # The walsender started with the stream: its whole CPU time is this drain's.
    return changes, _Run(seconds, cpu, walsender_after)


def _process_cpu(pid: int | None) -> float | None:
    """CPU seconds of a process so far (from /proc; None where there is no /proc)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat, 12 and 13 after "pid (comm) ".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _difference(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _line(what: str, rows: int, run: _Run) -> str:
    walsender = (
        f", walsender {run.walsender_cpu_s:.2f} s" if run.walsender_cpu_s is not None else ""
    )
    return (
        f"{what:<40} {run.seconds:7.3f} s {rows / run.seconds:>10,.0f} rows/s  "
        f"(CPU: consumer {run.cpu_s:.2f} s{walsender})"
    )

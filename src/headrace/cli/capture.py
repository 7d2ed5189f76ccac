"""``headrace capture``: a database's committed changes as JSON lines (pg_recvlogical, decoded).

One line per change, in commit order::

    {"table": "public.orders", "op": "U", "lsn": "0/1A2B3C8", "commit_ts": "2024-...+00:00",
     "xid": 771, "new": {...}, "old": {"id": 7}, "unchanged_toast": []}

``op`` is ``I``/``U``/``D``/``T`` (insert, update, delete, truncate), or ``S``
for a snapshot row (``--snapshot``). ``lsn`` is the commit LSN of the change's
transaction: pass the last one you processed to ``--from-lsn`` to resume
right after it. ``old`` holds the old key (or the whole old row with REPLICA
IDENTITY FULL) when PostgreSQL sends it. Values are JSON-safe: numerics as
strings (exact), bytea as hex, times in ISO 8601, NaN/Infinity as strings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from types import FrameType
from typing import Annotated, Any, TextIO

import pyarrow as pa
import typer

from headrace.errors import ConfigError, HeadraceError, format_lsn, parse_lsn
from headrace.source.changes import (
    COMMIT_TS,
    LSN,
    OLD_KIND,
    OP,
    SEQ,
    TOAST,
    XID,
    OldKind,
    Op,
    SnapshotChunk,
    TableChanges,
    TableRef,
    old_name,
)
from headrace.source.postgres.snapshot import SnapshotSettings, Snapshotter, drop_slot
from headrace.source.postgres.source import PostgresSource
from headrace.source.postgres.source_settings import SourceSettings

log = logging.getLogger("headrace.capture")


def capture(
    *,
    dsn: Annotated[
        str,
        typer.Option(
            "--dsn",
            envvar="HEADRACE_DSN",
            help="libpq connection string or URI of the source database (or $HEADRACE_DSN). "
            "The user needs the REPLICATION privilege.",
        ),
    ],
    tables: Annotated[
        list[str],
        typer.Option(
            "--table",
            "-t",
            help="A table to capture, schema-qualified or in public (repeat for several).",
        ),
    ],
    slot: Annotated[
        str | None,
        typer.Option(
            "--slot",
            help="Named replication slot: created if missing, kept at exit, and resumed from "
            "its confirmed position next time. Default: a temporary slot that vanishes at exit.",
        ),
    ] = None,
    publication: Annotated[
        str | None,
        typer.Option(
            "--publication",
            help="Publication to stream; created for the given tables when missing. "
            "Default: headrace.",
        ),
    ] = None,
    from_lsn: Annotated[
        str | None,
        typer.Option(
            "--from-lsn",
            help="With --slot: resume after this position (the 'lsn' of the last line you "
            "processed): transactions committed at or before it are not printed again. "
            "Where the slot already confirmed more, streaming starts there.",
        ),
    ] = None,
    snapshot: Annotated[
        bool,
        typer.Option(
            "--snapshot",
            help="First print every current row of the tables (op 'S', copied under an "
            "exported snapshot), then stream from that exact point: no gap, no duplicate.",
        ),
    ] = False,
    piece_changes: Annotated[
        int,
        typer.Option(
            "--piece-changes",
            min=1,
            help="A larger transaction waits on disk until it commits and is printed this "
            "many changes at a time (memory stays bounded).",
        ),
    ] = 100_000,
) -> None:
    """Print committed changes of TABLEs as JSON lines, one per change, until Ctrl-C.

    Ctrl-C (or SIGTERM) confirms what was printed to the slot and exits 0.
    """
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    try:
        refs = tuple(TableRef.parse(t) for t in tables)
        # A line's lsn is its transaction's commit LSN; resuming "after" it
        # means skipping that transaction too: its commit LSN is below lsn + 1.
        start = parse_lsn(from_lsn) + 1 if from_lsn else 0
        if snapshot and from_lsn:
            raise ConfigError(
                "--snapshot and --from-lsn exclude each other",
                "use --snapshot to start over, or --from-lsn to resume",
            )
        if from_lsn and slot is None:
            raise ConfigError(
                "--from-lsn needs --slot: a temporary slot starts at the current position",
                "name the slot you captured with before: --slot NAME --from-lsn LSN",
            )
        run_capture(
            dsn=dsn,
            tables=refs,
            slot=slot,
            publication=publication or "headrace",
            start_position=start,
            snapshot=snapshot,
            out=sys.stdout,
            piece_changes=piece_changes,
        )
    except HeadraceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def run_capture(
    *,
    dsn: str,
    tables: tuple[TableRef, ...],
    slot: str | None,
    publication: str,
    start_position: int,
    snapshot: bool,
    out: TextIO,
    piece_changes: int = 100_000,
) -> None:
    """Stream (after an optional snapshot) to ``out`` until SIGINT/SIGTERM."""
    named = slot is not None
    slot_name = slot or f"headrace_capture_{os.getpid()}"
    settings = SourceSettings(
        dsn=dsn,
        tables=tables,
        publication=publication,
        slot=slot_name,
        # A snapshot needs a slot that outlives its exporting connection.
        temporary_slot=not named and not snapshot,
        allow_slot_ahead=True,
        application_name="headrace-capture",
        piece_max_changes=piece_changes,
    )
    with PostgresSource(settings) as source, _stop_on_signals(source) as stopped:
        source.prepare(start_position, create_slot=not snapshot)
        drop_at_exit = snapshot and not named
        try:
            if snapshot:
                start_position = _print_snapshot(settings, stopped, out)
                if stopped.is_set():
                    log.warning("interrupted during the snapshot: nothing was confirmed")
                    return
            _stream(source, start_position, out)
        finally:
            if drop_at_exit:
                source.close()
                with contextlib.suppress(HeadraceError, Exception):
                    drop_slot(settings.dsn, slot_name)


@contextlib.contextmanager
def _stop_on_signals(source: PostgresSource) -> Iterator[threading.Event]:
    """SIGINT/SIGTERM stop the source cleanly instead of killing the process mid-batch."""
    stopped = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopped.set()
        source.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _print_snapshot(settings: SourceSettings, stopped: threading.Event, out: TextIO) -> int:
    snapshotter = Snapshotter(
        SnapshotSettings(
            dsn=settings.dsn,
            tables=settings.tables,
            slot=settings.slot,
            publication=settings.publication,
        )
    )
    with contextlib.closing(snapshotter.chunks()) as chunks:
        for chunk in chunks:
            out.write("".join(snapshot_lines(chunk)))
            out.flush()
            if stopped.is_set():
                return 0  # closing the chunks drops the half-made slot
    return snapshotter.result.consistent_point


def _stream(source: PostgresSource, start_position: int, out: TextIO) -> None:
    """Print batches and confirm each once flushed (stopped by :func:`_stop_on_signals`)."""
    for batch in source.batches(start_position):
        # A huge transaction comes in pieces: each is printed as it is decoded, and the
        # position confirmed after the last.
        for tables in batch.pieces():
            text = _piece_text(tables)
            if not text:
                continue
            try:
                out.write(text)
                out.flush()
            except BrokenPipeError:
                # The reader left (e.g. `| head`): what it did not read is not confirmed.
                with contextlib.suppress(OSError):
                    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences exit flush
                return
        source.confirm(batch.position)


def _piece_text(tables: tuple[TableChanges, ...]) -> str:
    """The JSON lines of a batch's changes (of one piece), in commit order across tables."""
    rows: list[tuple[int, str]] = []
    for changes in tables:
        table = str(changes.table)
        columns = [c.name for c in changes.schema.columns]
        keys = set(changes.schema.key_columns)
        for row in changes.data.to_pylist():
            op = row[OP]
            kind = row[OLD_KIND]
            old: dict[str, Any] | None = None
            if kind is not None:
                names = columns if kind == OldKind.ROW else [c for c in columns if c in keys]
                old = {c: json_safe(row[old_name(c)]) for c in names}
            new = {c: json_safe(row[c]) for c in columns} if op in (Op.INSERT, Op.UPDATE) else None
            record: dict[str, Any] = {
                "table": table,
                "op": op,
                "lsn": format_lsn(row[LSN]),
                "commit_ts": json_safe(row[COMMIT_TS]),
                "xid": row[XID],
                "new": new,
                "old": old,
                "unchanged_toast": row[TOAST] or [],
            }
            rows.append((row[SEQ], json.dumps(record, ensure_ascii=False) + "\n"))
    rows.sort(key=lambda item: item[0])
    return "".join(line for _, line in rows)


def snapshot_lines(chunk: SnapshotChunk) -> Iterator[str]:
    """The JSON lines (op ``S``) of a snapshot chunk's rows."""
    table = str(chunk.schema.table)
    lsn = format_lsn(chunk.consistent_point)
    for row in chunk.rows.to_pylist():
        record: dict[str, Any] = {
            "table": table,
            "op": "S",
            "lsn": lsn,
            "commit_ts": None,
            "xid": None,
            "new": {name: json_safe(value) for name, value in row.items()},
            "old": None,
            "unchanged_toast": [],
        }
        yield json.dumps(record, ensure_ascii=False) + "\n"


def json_safe(value: object) -> Any:  # noqa: PLR0911 - one branch per value kind
    """A decoded value as plain JSON: exact numerics as strings, bytes as hex, ISO times."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, pa.MonthDayNano):  # an interval
        return _iso_duration(int(value.months), int(value.days), int(value.nanoseconds))
    if isinstance(value, timedelta):
        micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
        return _iso_duration(0, 0, micros * 1000)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return str(value)


def _iso_duration(months: int, days: int, nanos: int) -> str:
    """An interval as ISO 8601 (``P1Y2M3DT4H5M6.5S``), signs kept per part like PostgreSQL."""
    years = int(months / 12)  # toward zero, as PostgreSQL splits '-14 mons' = -1 year -2 mons
    months -= years * 12
    date_part = "".join(f"{n}{unit}" for n, unit in ((years, "Y"), (months, "M"), (days, "D")) if n)
    sign = "-" if nanos < 0 else ""
    seconds_total, frac = divmod(abs(nanos), 1_000_000_000)
    hours, rest = divmod(seconds_total, 3600)
    minutes, seconds = divmod(rest, 60)
    time_part = ""
    if hours:
        time_part += f"{sign}{hours}H"
    if minutes:
        time_part += f"{sign}{minutes}M"
    if seconds or frac:
        text = f"{seconds}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(seconds)
        time_part += f"{sign}{text}S"
    if not date_part and not time_part:
        return "PT0S"
    return "P" + date_part + ("T" + time_part if time_part else "")

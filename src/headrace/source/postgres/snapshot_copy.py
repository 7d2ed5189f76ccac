"""Copy one CTID range under an exported snapshot, in bulk, into Arrow.

The hot path of the snapshot. Per row, Python does only one thing: append
the CopyData message libpq hands over to a block (PostgreSQL sends one
message per row, so a block always ends on a row boundary, even when values
hold newlines). Each block of rows is then parsed by pyarrow's CSV reader
(C++, without the GIL) with every column as a string, and each column is
converted by the same text converter the stream uses, so snapshot and
stream values are identical.

CSV, not the text format: COPY text escapes (``\\n``, ``\\N``, octal) have no
bulk parser, while CSV needs only quoting, which pyarrow handles. In CSV a
NULL is an unquoted empty field and an empty string is ``""``; the reader is
set up so that only the first becomes null.
"""

from __future__ import annotations

import selectors
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv
from psycopg import pq, sql

from headrace.errors import SourceError, first_line
from headrace.source.changes import TableSchema
from headrace.source.postgres.snapshot_binary import (
    BINARY_TRAILER,
    PADDING,
    BinaryBlock,
    header_length,
)
from headrace.source.postgres.types import TypeRegistry, text_column_to_arrow

# Session settings that fix the text form of every value, the same as the
# replication connection's (pgoutput renders values with the walsender's
# output functions): UTC timestamps, ISO dates, postgres intervals, floats
# that round-trip exactly, hex bytea, UTF-8 text.
SESSION_SETTINGS: dict[str, str] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "client_encoding": "UTF8",
}

# How long a blocked read waits before checking whether the copy was cancelled.
_POLL_SECONDS = 0.25


class CopyCancelled(Exception):  # noqa: N818 - a signal between threads, not an error
    """The snapshot was stopped while this copy was running."""


@dataclass(frozen=True)
class CsvBlock:
    """Whole CSV rows as COPY sent them."""

    data: pa.Buffer
    rows: int


def open_snapshot_connection(
    dsn: str, snapshot_name: str, *, application_name: str = "headrace-snapshot"
) -> psycopg.Connection[tuple[object, ...]]:
    """A connection inside a read-only REPEATABLE READ transaction on ``snapshot_name``.

    The exporting replication connection must still be idle when this runs.
    """
    try:
        conn = psycopg.connect(dsn, autocommit=True, application_name=application_name)
    except psycopg.OperationalError as exc:
        raise SourceError(
            f"could not connect to copy the snapshot: {first_line(exc)}",
            "check that the server is up and the DSN is right",
        ) from exc
    try:
        for name, value in SESSION_SETTINGS.items():
            conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
    except psycopg.Error as exc:
        conn.close()
        raise SourceError(
            f"could not import the exported snapshot {snapshot_name!r}: {first_line(exc)}",
            "the replication connection that exported it must stay open and idle "
            "until the copy ends; restart the snapshot",
        ) from exc
    return conn


def read_copy_blocks(
    conn: psycopg.Connection[tuple[object, ...]],
    statement: sql.Composed,
    *,
    block_rows: int,
    block_bytes: int,
    stop: threading.Event,
) -> Iterator[CsvBlock]:
    """Run a ``COPY ... TO STDOUT (FORMAT csv)`` and yield its output in blocks of whole rows.

    A block closes at ``block_rows`` rows or ``block_bytes`` bytes, whichever
    comes first. Raises :class:`CopyCancelled` soon after ``stop`` is set (the
    connection is then unusable and must be closed).
    """
    pgconn = conn.pgconn
    _start_copy(conn, statement)
    get_copy_data = pgconn.get_copy_data
    buffer = bytearray()
    rows = 0
    # A selector, not select(): socket numbers may exceed FD_SETSIZE.
    with selectors.DefaultSelector() as readable:
        readable.register(pgconn.socket, selectors.EVENT_READ)
        while True:
            nbytes, data = get_copy_data(1)
            if nbytes > 0:
                buffer += data
                rows += 1
                if rows >= block_rows or len(buffer) >= block_bytes:
                    yield CsvBlock(pa.py_buffer(buffer), rows)
                    buffer = bytearray()
                    rows = 0
            elif nbytes == 0:
                _wait_for_data(pgconn, readable, stop)
            else:
                break
    if rows:
        yield CsvBlock(pa.py_buffer(buffer), rows)
    _finish_copy(pgconn)


def read_binary_copy_blocks(
    conn: psycopg.Connection[tuple[object, ...]],
    statement: sql.Composed,
    *,
    block_rows: int,
    block_bytes: int,
    stop: threading.Event,
) -> Iterator[BinaryBlock]:
    """Run a ``COPY ... TO STDOUT (FORMAT binary)`` and yield its rows in blocks,
    with where each row starts (header and trailer are left out).

    A block closes at ``block_rows`` rows, or once it holds ``block_bytes``
    bytes when the receive loop next runs out of buffered messages (so it may
    exceed ``block_bytes`` by what one read of the socket brought). Raises
    :class:`CopyCancelled` soon after ``stop`` is set (the connection is then
    unusable and must be closed).

    The per-row loop is the snapshot's costliest Python: per message it only
    records the message's length and appends its bytes (row starts are
    summed up per block, in numpy).
    """
    pgconn = conn.pgconn
    _start_copy(conn, statement)
    get_copy_data = pgconn.get_copy_data
    buffer = bytearray()
    lengths = array("q")
    add_length = lengths.append
    with selectors.DefaultSelector() as readable:
        readable.register(pgconn.socket, selectors.EVENT_READ)
        # The header comes first, in the first row's message (or the
        # trailer's, when there is no row).
        while (first := get_copy_data(1))[0] == 0:
            _wait_for_data(pgconn, readable, stop)
        if first[0] > 0:
            message = bytes(first[1])
            row = message[header_length(message) :]
            if len(row) > len(BINARY_TRAILER):
                add_length(len(row))
                buffer += row
                if block_rows <= 1:
                    yield _binary_block(buffer, lengths)
                    buffer = bytearray()
                    lengths = array("q")
                    add_length = lengths.append
        # A row of at least one field is at least 6 bytes; the trailer is 2.
        while True:
            nbytes, data = get_copy_data(1)
            if nbytes > 2:
                add_length(nbytes)
                buffer += data
                if len(lengths) >= block_rows:
                    yield _binary_block(buffer, lengths)
                    buffer = bytearray()
                    lengths = array("q")
                    add_length = lengths.append
            elif nbytes == 0:
                if len(buffer) >= block_bytes:
                    yield _binary_block(buffer, lengths)
                    buffer = bytearray()
                    lengths = array("q")
                    add_length = lengths.append
                _wait_for_data(pgconn, readable, stop)
            elif nbytes < 0:
                break
            elif bytes(data) != BINARY_TRAILER:
                raise SourceError(
                    "the binary COPY output holds a message that is neither a row nor its end",
                    "this is a bug in headrace; report it with the server version",
                )
    if lengths:
        yield _binary_block(buffer, lengths)
    _finish_copy(pgconn)


def _binary_block(buffer: bytearray, lengths: array[int]) -> BinaryBlock:
    size = len(buffer)
    buffer += bytes(PADDING)
    row_lengths = np.frombuffer(lengths, dtype=np.int64)
    starts = np.zeros(len(row_lengths), dtype=np.int64)
    np.cumsum(row_lengths[:-1], out=starts[1:])
    return BinaryBlock(buffer, size, starts)


def _start_copy(conn: psycopg.Connection[tuple[object, ...]], statement: sql.Composed) -> None:
    pgconn = conn.pgconn
    pgconn.send_query(statement.as_bytes(conn))
    result = pgconn.get_result()
    if result is None or result.status != pq.ExecStatus.COPY_OUT:
        _finish_copy(pgconn, _result_error(pgconn, result))


def _wait_for_data(
    pgconn: pq.abc.PGconn, readable: selectors.BaseSelector, stop: threading.Event
) -> None:
    """Block (without the GIL) until the server sent more; honour ``stop``."""
    while not readable.select(_POLL_SECONDS):
        if stop.is_set():
            raise CopyCancelled
    pgconn.consume_input()
    if stop.is_set():
        raise CopyCancelled


def _finish_copy(pgconn: pq.abc.PGconn, error: str | None = None) -> None:
    """Collect the results that end a COPY; raise the first error."""
    while (result := pgconn.get_result()) is not None:
        if error is None and result.status != pq.ExecStatus.COMMAND_OK:
            error = _result_error(pgconn, result)
    if error is not None:
        raise SourceError(f"COPY failed: {error}", "see the server's message above")


def csv_block_to_arrow(block: CsvBlock, schema: TableSchema, registry: TypeRegistry) -> pa.Table:
    """Parse a block of COPY CSV rows into a table of ``schema.arrow_schema()``."""
    names = [f"c{i}" for i in range(len(schema.columns))]
    strings = pa_csv.read_csv(
        pa.BufferReader(block.data),
        read_options=pa_csv.ReadOptions(
            column_names=names,
            # The block is small next to the work around it; the workers
            # already run in parallel.
            use_threads=False,
            block_size=max(1 << 20, block.data.size + 1),
        ),
        parse_options=pa_csv.ParseOptions(
            newlines_in_values=True,
            # A one-column row holding NULL is an empty line.
            ignore_empty_lines=False,
        ),
        convert_options=pa_csv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()),
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    if strings.num_rows != block.rows:
        raise SourceError(
            f"COPY of {schema.table} sent {block.rows} rows but {strings.num_rows} were parsed",
            "this is a bug in headrace; report it with the table's definition",
        )
    arrays = [
        text_column_to_arrow(
            strings.column(i).combine_chunks(), column.arrow_type, registry=registry, column=column
        )
        for i, column in enumerate(schema.columns)
    ]
    return pa.Table.from_arrays(arrays, schema=schema.arrow_schema())


def _result_error(pgconn: pq.abc.PGconn, result: pq.abc.PGresult | None) -> str:
    raw = result.error_message if result is not None else pgconn.error_message
    return raw.decode("utf-8", "replace").strip() or "unknown error"

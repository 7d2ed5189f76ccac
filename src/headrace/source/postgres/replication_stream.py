"""The streaming half of a replication connection: COPY BOTH after ``START_REPLICATION``.

:class:`ReplicationStream` is the base of
:class:`~headrace.source.postgres.replication.ReplicationConnection`, which opens
the connection and sends the replication commands; this half, apart because it is
the protocol and the source's hot path rather than the commands, speaks:

* server → client: ``XLogData`` (``w``: WAL start, WAL end, send time,
  payload: one pgoutput message) and primary keepalives (``k``);
* client → server: standby status updates (``r``) whose write, flush and
  apply positions are the position the caller declared durable with
  :meth:`ReplicationConnection.confirm`, never ahead of it, never backwards.

The receive loop (:meth:`ReplicationConnection.drain`) is the hot path of the
whole source: it hands each payload to a callback (or, with ``drain_into``, appends
it to a list the caller takes in bulk) without building an object per message
beyond the payload, and it returns when no data arrives within a timeout, so an
idle stream never blocks the caller.
"""

from __future__ import annotations

import contextlib
import math
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
from psycopg import pq
from psycopg.pq.abc import PGconn

from headrace.errors import SourceError, first_line
from headrace.source.postgres.connect_errors import ConnectionLostError

# PostgreSQL timestamps count microseconds since 2000-01-01 00:00:00 UTC.
_PG_EPOCH_UNIX_US = 946_684_800_000_000

# Read-ahead (see ReplicationConnection.reading_ahead): wait for data this
# long at a time, and pause this long after reading. A walsender streaming
# small changes fills a Unix socket's buffer in about a millisecond (it
# sends each message on its own, and the buffer counts every send's
# overhead), so a longer pause stalls it: `bench cdc` decode_vs_noop median
# 0.92 with 0.5 ms (9 runs) against 0.86 with 2 ms (6) and 0.88 with none
# (2; the reader then takes the GIL from the decoder too often).
_READ_AHEAD_POLL_MS = 5
_READ_AHEAD_PAUSE_S = 0.0005

_XLOG_DATA = 0x77  # 'w'
_KEEPALIVE = 0x6B  # 'k'
_XLOG_HEADER = 25  # 'w' + wal_start(8) + wal_end(8) + send_time(8)

_unpack_start_end = struct.Struct(">QQ").unpack_from
_unpack_keepalive = struct.Struct(">QQB").unpack_from
_pack_status = struct.Struct(">cQQQqB").pack

Payload = bytes | memoryview

# What the drain callback receives: the XLogData's WAL start and its payload:
# a memoryview over libpq's buffer of the message, or with ``copy`` a bytes copy.
DataHandler = Callable[[int, Payload], object]


def _ignore(wal_start: int, payload: Payload) -> None:
    """The handler of :meth:`ReplicationStream.drain_into`, which calls none."""


def now_pg_us() -> int:
    """Now as a PostgreSQL timestamp (microseconds since 2000-01-01 UTC)."""
    return time.time_ns() // 1000 - _PG_EPOCH_UNIX_US


def pg_us_to_unix(value: int) -> float:
    """A PostgreSQL timestamp (µs since 2000) as UNIX seconds."""
    return (value + _PG_EPOCH_UNIX_US) / 1_000_000


class ReplicationStream:
    """The COPY BOTH stream of a replication connection (see the module's docstring).

    ``pgconn`` is the connection's libpq connection; the subclass starts the
    stream (``START_REPLICATION``) and closes it.
    """

    def __init__(self, pgconn: PGconn, *, status_interval_s: float) -> None:
        self.status_interval_s = status_interval_s
        self._pgconn = pgconn
        self._read_poller = None
        if hasattr(select, "poll"):
            self._read_poller = select.poll()
            self._read_poller.register(self._pgconn.socket, select.POLLIN)
        self._lock = threading.Lock()
        self._streaming = False
        self._confirmed = 0
        self._sent_confirmed = -1
        self._last_status = 0.0
        self._received = 0
        self._last_data_start = 0
        self._server_wal_end = 0
        self._server_waiting = False
        self._last_server_time = 0

    @property
    def confirmed(self) -> int:
        """The durable position last declared by :meth:`confirm`."""
        return self._confirmed

    @property
    def received(self) -> int:
        """The end of the WAL received so far (XLogData or keepalive)."""
        return self._received

    @property
    def last_data_start(self) -> int:
        """WAL start of the last XLogData received (for a Commit: the commit's end LSN)."""
        return self._last_data_start

    @property
    def server_wal_end(self) -> int:
        """Where the server's decoding stands (its last keepalive's WAL end): it sent
        every change committed before this position."""
        return self._server_wal_end

    @property
    def server_waiting(self) -> bool:
        """The server asked for a reply and has not yet seen a newer confirmed position."""
        return self._server_waiting

    @property
    def last_server_time(self) -> float:
        """Send time (UNIX seconds) of the last message from the server, 0 if none."""
        return pg_us_to_unix(self._last_server_time) if self._last_server_time else 0.0

    def confirm(self, position: int) -> None:
        """Declare ``position`` durable: the slot may move up to it, not beyond.

        Lower positions than one already confirmed are ignored (the slot never
        moves backwards). The position reaches the server with the next
        status update, within ``status_interval_s``.
        """
        if position <= self._confirmed:
            return
        self._confirmed = position
        if self._streaming and self._lock.acquire(blocking=False):
            try:
                self._send_status_if_due(time.monotonic())
            finally:
                self._lock.release()

    def send_status(self, *, reply_requested: bool = False) -> None:
        """Send a standby status update now (write = flush = apply = confirmed)."""
        with self._lock:
            self._send_status(reply_requested=reply_requested)

    @contextlib.contextmanager
    def reading_ahead(self) -> Iterator[None]:
        """While the caller is busy elsewhere (decoding a batch), keep reading.

        A thread moves whatever arrives from the socket into libpq's buffer,
        so the server keeps sending instead of blocking on a full socket: its
        work overlaps the caller's. :meth:`drain` hands the messages on later.
        """
        if not self._streaming or not hasattr(select, "poll"):
            yield
            return
        done = threading.Event()
        pgconn = self._pgconn
        poller = select.poll()  # its own: drain's may not be polled from two threads
        poller.register(pgconn.socket, select.POLLIN)

        def pump() -> None:
            while not done.is_set():
                if not poller.poll(_READ_AHEAD_POLL_MS):
                    continue
                with self._lock:
                    if done.is_set():
                        return
                    try:
                        pgconn.consume_input()
                    except psycopg.OperationalError:
                        return  # the next drain reports it
                # The socket buffer takes a few ms to fill: let the caller run.
                done.wait(_READ_AHEAD_PAUSE_S)

        thread = threading.Thread(target=pump, name="headrace-read-ahead", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def drain(
        self,
        on_data: DataHandler,
        timeout: float,
        max_messages: int = 8192,
        *,
        copy: bool = False,
    ) -> int:
        """Hand available XLogData payloads to ``on_data(wal_start, payload)``.

        Waits up to ``timeout`` seconds for the first message; returns as soon
        as the connection has no complete message buffered, or after
        ``max_messages``, so the caller can act on time. Answers keepalives
        and sends due status updates. Returns the number of payloads handled.

        ``copy`` hands each payload as ``bytes`` instead of a memoryview: a
        consumer that keeps payloads for a while (the batcher keeps a batch's
        worth) should ask for it. A copy costs about as much as the view, but
        bytes are not tracked by the garbage collector, whose passes over tens
        of thousands of live memoryviews cost more than the decoding itself.

        Raises :class:`ConnectionLostError` when the stream breaks or ends.
        """
        with self._lock:
            return self._drain(on_data, timeout, max_messages, copy, None)

    def drain_into(
        self, lsns: list[int], payloads: list[bytes], timeout: float, max_messages: int = 8192
    ) -> int:
        """:meth:`drain` appending each XLogData's WAL start to ``lsns`` and a bytes copy
        of its payload to ``payloads``, instead of calling a handler per message.

        For a consumer that takes messages in bulk (the change source's batcher): a
        Python call per message was a third of what receiving a message costs it.
        """
        with self._lock:
            return self._drain(_ignore, timeout, max_messages, True, (lsns, payloads))

    def _drain(  # noqa: PLR0912 - the hot loop stays in one frame, on purpose
        self,
        on_data: DataHandler,
        timeout: float,
        max_messages: int,
        copy: bool,
        into: tuple[list[int], list[bytes]] | None,
    ) -> int:
        pgconn = self._pgconn
        get = pgconn.get_copy_data
        collect = into is not None
        lsns, payloads = into if into is not None else ([], [])
        add_lsn, add_payload = lsns.append, payloads.append
        handled = 0
        waited = False
        socket_read = False  # consume_input() ran since the last complete message
        start = last_end = 0
        try:
            while handled < max_messages:
                nbytes, data = get(1)
                if nbytes > 0:
                    socket_read = False
                    kind = data[0]
                    if kind == _XLOG_DATA:
                        start, last_end = _unpack_start_end(data, 1)
                        if collect:
                            add_lsn(start)
                            add_payload(data[_XLOG_HEADER:].tobytes())
                        elif copy:
                            on_data(start, data[_XLOG_HEADER:].tobytes())
                        else:
                            on_data(start, data[_XLOG_HEADER:])
                        handled += 1
                    elif kind == _KEEPALIVE:
                        self._on_keepalive(data)
                    else:
                        raise SourceError(
                            f"unexpected replication message type {bytes(data[:1])!r}",
                            "this is a bug in headrace or an unsupported server version",
                        )
                    continue
                if nbytes < 0:
                    self._stream_ended()
                if socket_read:
                    # Nothing buffered and nothing more on the socket: return
                    # what came, or wait (once) when nothing came yet.
                    if handled or waited:
                        break
                    waited = True
                    if not self._wait_readable(timeout):
                        break
                pgconn.consume_input()
                socket_read = True
        except psycopg.OperationalError as exc:
            self._streaming = False
            raise ConnectionLostError(
                f"replication connection lost: {first_line(exc)}",
                "headrace reconnects by itself; if it keeps failing, check the server",
            ) from exc
        if handled:
            self._received = max(self._received, last_end)
            self._last_data_start = start
        self._send_status_if_due(time.monotonic())
        return handled

    def _on_keepalive(self, data: memoryview) -> None:
        wal_end, send_time, reply = _unpack_keepalive(data, 1)
        self._server_wal_end = wal_end
        self._last_server_time = send_time
        if reply:
            self._send_status()
            # The server waits for a newer flush position (e.g. to shut down):
            # send the next confirmed position without the usual delay.
            self._server_waiting = True

    def _stream_ended(self) -> None:
        """The server ended COPY BOTH (shutdown, termination): report why."""
        self._streaming = False
        message = ""
        while (result := self._pgconn.get_result()) is not None:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                message = (result.error_message or b"").decode(errors="replace").strip()
        raise ConnectionLostError(
            f"the server ended the replication stream{': ' + message if message else ''}",
            "headrace reconnects by itself; if it keeps failing, check the server log",
        )

    def _wait_readable(self, timeout: float) -> bool:
        if timeout <= 0:
            return False
        poller = self._read_poller
        if poller is None:  # pragma: no cover - Windows
            return wait_socket(self._pgconn.socket, timeout)
        return bool(poller.poll(math.ceil(timeout * 1000)))

    def _send_status_if_due(self, now: float) -> None:
        if now - self._last_status >= self.status_interval_s or (
            self._sent_confirmed != self._confirmed
            and (self._server_waiting or now - self._last_status >= 0.1)
        ):
            self._send_status()

    def _send_status(self, *, reply_requested: bool = False) -> None:
        if not self._streaming:
            return
        position = self._confirmed
        message = _pack_status(
            b"r", position, position, position, now_pg_us(), 1 if reply_requested else 0
        )
        pgconn = self._pgconn
        try:
            while pgconn.put_copy_data(message) == 0:
                self._wait_writable()
            while pgconn.flush() == 1:
                self._wait_writable()
        except psycopg.OperationalError as exc:
            self._streaming = False
            raise ConnectionLostError(
                f"replication connection lost while sending status: {first_line(exc)}",
                "headrace reconnects by itself; if it keeps failing, check the server",
            ) from exc
        if position != self._sent_confirmed:
            self._server_waiting = False
        self._sent_confirmed = position
        self._last_status = time.monotonic()

    def _wait_writable(self) -> None:
        wait_socket(self._pgconn.socket, 1.0, write=True)

    def _end_copy(self, timeout: float) -> None:
        """End COPY BOTH the protocol's way: send CopyDone and read until the server's.

        Closing the socket while the server's WAL data is still unread makes the
        kernel reset the connection, and the server can then lose the status update
        sent just before (the slot would stay behind the store's position). The
        server answers CopyDone only after reading everything sent before it.
        """
        pgconn = self._pgconn
        while pgconn.put_copy_end() == 0:
            self._wait_writable()
        while pgconn.flush() == 1:
            self._wait_writable()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            nbytes, _ = pgconn.get_copy_data(1)
            if nbytes < 0:
                return  # the server's CopyDone: it has read our status
            if nbytes == 0:
                if not wait_socket(pgconn.socket, left):
                    return
                pgconn.consume_input()


def wait_socket(fd: int, timeout: float, *, write: bool = False) -> bool:
    """Wait until ``fd`` is readable (or writable); False on timeout.

    ``poll`` rather than ``select``: a process serving many clients (the
    embedded pipeline with its HTTP server) has descriptors above 1024.
    """
    if not hasattr(select, "poll"):  # pragma: no cover - Windows
        readable, writable, _ = select.select(
            [] if write else [fd], [fd] if write else [], [], timeout
        )
        return bool(writable if write else readable)
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout * 1000))))

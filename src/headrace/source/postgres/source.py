"""The PostgreSQL change source: whole transactions as ChangeBatches, resumable exactly.

:class:`PostgresSource` checks the server (see :mod:`.preflight`), creates the
publication and slot when missing, streams pgoutput through a
:class:`~.replication.ReplicationConnection` into the decoder's
:class:`~.batcher.Batcher`, and hands on :class:`ChangeBatch`es that end on
transaction boundaries.

Positions: the caller stores each batch's effects with ``batch.position`` and
then calls :meth:`PostgresSource.confirm`; that is the only thing that moves
the slot. After a lost connection or a server restart the source reconnects
(exponential backoff), restarts the stream at the last confirmed position and
skips every transaction it already delivered, so nothing is lost and nothing
is delivered twice. A new process resumes by passing its stored position to
:meth:`PostgresSource.batches`. Its settings are :class:`~.source_settings.SourceSettings`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

import psycopg

from headrace.errors import HeadraceError, SourceError, format_lsn
from headrace.source.changes import ChangeBatch
from headrace.source.postgres import preflight
from headrace.source.postgres.batcher import Batcher
from headrace.source.postgres.connect_errors import ConnectionLostError
from headrace.source.postgres.replication import (
    SESSION_OPTIONS,
    ReplicationConnection,
    StreamOptions,
)
from headrace.source.postgres.source_settings import SourceSettings
from headrace.source.postgres.types import TypeRegistry

log = logging.getLogger("headrace.source")

HEARTBEAT_PREFIX = "headrace.heartbeat"
"""Prefix of the logical decoding messages the source writes when idle."""


@dataclass(frozen=True)
class SlotLag:
    """How far the server's WAL is ahead of the slot."""

    retained_bytes: int
    """WAL the server keeps for the slot (current WAL position - restart_lsn)."""

    unconfirmed_bytes: int
    """WAL written since the last confirmed position (current - confirmed_flush_lsn)."""

    wal_status: str | None
    """``reserved``, ``extended``, ``unreserved`` or ``lost`` (pg_replication_slots)."""


_DRAIN_MAX_MESSAGES = 8192  # messages per drain call at most: check batch limits this often
READ_AHEAD_CHANGES = 2000
"""Pending changes from which assembling a batch takes long enough to read the socket
ahead meanwhile; below it a batch is assembled in a few milliseconds."""
# While changes wait for batch_max_wait_s, look at least this often (seconds) whether the
# consumer waits for them (see PostgresSource.consumer_waiting), even when no data comes.
_CONSUMER_POLL_S = 0.002


def _never() -> bool:
    return False


def _drain_timeout(
    flush_at: float | None, now: float, idle_poll: float, consumer_waiting: Callable[[], bool]
) -> float:
    """How long the next drain may wait for data: until the pending changes are due (or
    ``idle_poll`` without any). With a consumer that may start waiting for them,
    :data:`_CONSUMER_POLL_S` at most, and as long once they are due but held for it
    (:attr:`PostgresSource.hold_while_busy`): not 0, which would spin."""
    if flush_at is None:
        return idle_poll
    left = max(0.0, flush_at - now)
    if consumer_waiting is _never:
        return left
    return min(left, _CONSUMER_POLL_S) if left > 0 else _CONSUMER_POLL_S


class PostgresSource:
    """Stream a PostgreSQL database's committed changes as :class:`ChangeBatch`es.

    Use as a context manager; iterate :meth:`batches`; call :meth:`confirm`
    with a batch's position once its effects are durable. :meth:`confirm`,
    :meth:`stop`, :meth:`slot_lag` may be called from other threads.
    """

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.batcher = Batcher(
            TypeRegistry(catalog_dsn=settings.dsn),
            piece_changes=settings.piece_max_changes,
            spill_dir=settings.spill_dir,
        )
        """The decoder state (schemas and their versions survive reconnections)."""
        self.reconnects = 0
        """How many times the stream was lost and resumed."""
        self.heartbeats = 0
        """How many heartbeats this source wrote."""
        self.consumer_waiting: Callable[[], bool] | None = None
        """Whether whoever takes the batches waits for one now (the runner's writer, idle).
        When set, the pending changes are handed on as soon as it returns True instead of
        after ``batch_max_wait_s``: waiting longer would gather more changes per batch, but
        an idle consumer would only wait too. Set it before iterating :meth:`batches`."""
        self.hold_while_busy = 0
        """With :attr:`consumer_waiting` set: up to this many pending changes are held past
        ``batch_max_wait_s`` while the consumer is busy, and handed on when it waits. A
        busy consumer would leave them queued anyway, and changes cut off just before it
        takes the queue wait for its whole next batch; held, they go with that batch.
        Above it (a large batch's assembly should overlap the consumer's work) and at 0
        (someone else needs batches on time: the rules lane) ``batch_max_wait_s`` holds."""
        self._confirmed = 0
        self._delivered = 0
        self._replication: ReplicationConnection | None = None
        self._sql: psycopg.Connection[tuple[object, ...]] | None = None
        self._sql_lock = threading.Lock()
        self._stop = threading.Event()
        self._streamed_once = False
        self._types_loaded = False

    # -- public API -------------------------------------------------------

    @property
    def confirmed_position(self) -> int:
        """The last position declared durable by :meth:`confirm`."""
        return self._confirmed

    @property
    def delivered_position(self) -> int:
        """The position of the last batch handed on."""
        return self._delivered

    @property
    def backend_pid(self) -> int | None:
        """PID of the walsender currently streaming to this source."""
        conn = self._replication
        return None if conn is None or conn.closed else conn.backend_pid

    def prepare(
        self, start_position: int = 0, *, create_slot: bool = True
    ) -> preflight.SlotState | None:
        """Run the checks; create the publication and the slot when missing.

        Changes committed after this call are streamed. Returns the slot's
        state (None for a temporary slot, created when streaming starts, and
        for a missing one when ``create_slot`` is off, e.g. because a snapshot
        will create it). Raises :class:`SourceError` saying what to do when
        something is wrong.
        """
        s = self.settings
        with self._sql_lock:
            conn = self._sql_connection()
            preflight.check_server(conn)
            preflight.ensure_publication(conn, s.publication, s.tables, create=s.create_publication)
            self._load_types(conn)
            if s.temporary_slot:
                return None
            state = preflight.check_slot(
                conn, s.slot, start_position=start_position, allow_ahead=s.allow_slot_ahead
            )
            if state is not None or not create_slot:
                return state
            try:
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (s.slot,))
            except psycopg.errors.DuplicateObject:
                pass  # created by a concurrent process: checked below
            except psycopg.errors.ConfigurationLimitExceeded as exc:
                raise preflight.slots_exhausted() from exc
            log.info("created the replication slot %s", s.slot)
            return preflight.check_slot(
                conn, s.slot, start_position=start_position, allow_ahead=s.allow_slot_ahead
            )

    def batches(self, start_position: int = 0) -> Iterator[ChangeBatch]:
        """Yield batches of the transactions committed after ``start_position``.

        ``start_position`` is the caller's last durable position (0: wherever
        the slot stands). Runs until :meth:`stop` is called or the caller
        stops iterating (the stream then closes, sending the confirmed
        position; a later call resumes after the last batch delivered).
        Reconnects by itself; raises :class:`SourceError` for what no retry
        can fix.
        """
        self._confirmed = max(self._confirmed, start_position)
        self._delivered = max(self._delivered, start_position)
        self.batcher.skip_before(self._delivered)
        try:
            yield from self._batches_with_reconnects()
        finally:
            self._stop.clear()  # a later call streams again
            self._close_replication()
            # Forget what was received but not delivered: the server sends it again.
            self.batcher.discard_incomplete()
            if self.batcher.has_pending:
                # Decoding what is dropped anyway may fail too: that must not
                # hide the error that ended the stream.
                with contextlib.suppress(HeadraceError):
                    self.batcher.take()
            self.batcher.skip_before(self._delivered)

    def _batches_with_reconnects(self) -> Iterator[ChangeBatch]:
        s = self.settings
        backoff = s.reconnect_initial_s
        failing_since: float | None = None
        while not self._stop.is_set():
            lost: ConnectionLostError | None = None
            try:
                self._open_stream()
                failing_since = None
                backoff = s.reconnect_initial_s
                yield from self._stream()
            except ConnectionLostError as exc:
                lost = exc
            if lost is None:
                continue  # stopped
            self._close_replication()
            # Hand on what is complete; the server sends the rest again.
            yield from self._take()
            self.batcher.discard_incomplete()
            self.batcher.skip_before(self._delivered)
            if s.temporary_slot and self._streamed_once:
                raise SourceError(
                    f"the connection was lost and the temporary slot {s.slot} with it "
                    f"({lost.what}); changes after {format_lsn(self._delivered)} may be missing",
                    "use a named, permanent slot (--slot NAME) to resume after connection losses",
                ) from lost
            now = time.monotonic()
            if failing_since is None:
                failing_since = now
                self.reconnects += 1
            elif s.reconnect_timeout_s is not None and now - failing_since > s.reconnect_timeout_s:
                raise SourceError(
                    f"could not reconnect for {now - failing_since:.0f} s: {lost.what}",
                    "check that the server is up and reachable, then start again; "
                    "headrace resumes from the last confirmed position",
                ) from lost
            log.warning("%s; reconnecting in %.1f s", lost.what, backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, s.reconnect_max_s)

    def confirm(self, position: int) -> None:
        """Declare everything up to ``position`` durable: the slot may advance to it.

        Never moves backwards; reaches the server within ``status_interval_s``.
        """
        if position <= self._confirmed:
            return
        self._confirmed = position
        conn = self._replication
        if conn is not None and not conn.closed:
            # On failure the stream notices too; the position is resent on reconnect.
            with contextlib.suppress(ConnectionLostError):
                conn.confirm(position)

    def stop(self) -> None:
        """Ask :meth:`batches` to return (within about half a second; at once if
        it has not started yet)."""
        self._stop.set()

    def slot_lag(self) -> SlotLag | None:
        """WAL the server retains for the slot; None when the slot does not exist."""
        with self._sql_lock:
            row = (
                self._sql_connection()
                .execute(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, "
                    "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8, wal_status "
                    "FROM pg_replication_slots WHERE slot_name = %s",
                    (self.settings.slot,),
                )
                .fetchone()
            )
        if row is None:
            return None
        return SlotLag(
            retained_bytes=int(str(row[0] or 0)),
            unconfirmed_bytes=int(str(row[1] or 0)),
            wal_status=None if row[2] is None else str(row[2]),
        )

    def retained_wal_bytes(self) -> int | None:
        """Bytes of WAL the server keeps because of the slot (None: no slot)."""
        lag = self.slot_lag()
        return None if lag is None else lag.retained_bytes

    def emit_heartbeat(self) -> None:
        """Write a heartbeat message into the WAL now (it arrives as an empty batch)."""
        with self._sql_lock:
            self._sql_connection().execute(
                "SELECT pg_logical_emit_message(false, %s, %s)",
                (HEARTBEAT_PREFIX, self.settings.slot),
            )
        self.heartbeats += 1

    def close(self) -> None:
        """Send the confirmed position to the server and close every connection."""
        self._close_replication()
        with self._sql_lock:
            if self._sql is not None:
                self._sql.close()
                self._sql = None

    def __enter__(self) -> PostgresSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- connection handling ----------------------------------------------

    def _sql_connection(self) -> psycopg.Connection[tuple[object, ...]]:
        """The ordinary connection for checks, heartbeats, slot lag (caller holds the lock)."""
        if self._sql is not None and not self._sql.broken and not self._sql.closed:
            return self._sql
        s = self.settings
        try:
            self._sql = psycopg.connect(
                s.dsn,
                autocommit=True,
                connect_timeout=max(1, round(s.connect_timeout_s)),
                application_name=s.application_name,
                options=SESSION_OPTIONS,
            )
        except psycopg.OperationalError as exc:
            raise ConnectionLostError(
                f"could not connect to the source database: {str(exc).strip()}",
                "check that the server is up and the DSN is right; headrace retries by itself",
            ) from exc
        return self._sql

    def _open_stream(self) -> None:
        """Check, create the slot if needed, and START_REPLICATION at the confirmed position."""
        s = self.settings
        deadline = time.monotonic() + s.slot_busy_wait_s
        while True:
            try:
                self._try_open_stream()
                return
            except preflight.SlotInUseError:
                self._close_replication()
                if time.monotonic() >= deadline or self._stop.is_set():
                    raise
                self._stop.wait(0.2)

    def _try_open_stream(self) -> None:
        s = self.settings
        try:
            state = self.prepare(self._confirmed)
        except psycopg.OperationalError as exc:
            self._drop_sql()
            raise ConnectionLostError(
                f"lost the connection during the checks: {str(exc).strip()}",
                "headrace retries by itself",
            ) from exc
        conn = ReplicationConnection(
            s.dsn,
            status_interval_s=s.status_interval_s,
            connect_timeout_s=s.connect_timeout_s,
            application_name=s.application_name,
        )
        self._replication = conn
        start = self._confirmed
        try:
            if state is None:  # a temporary slot lives on its streaming connection
                start = max(start, conn.create_slot(s.slot, temporary=True))
            else:
                start = max(start, state.confirmed_flush_lsn or 0)
            conn.start(
                s.slot,
                start,
                StreamOptions(publications=(s.publication,), streaming=s.streaming),
            )
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.errors.DuplicateObject):
                raise ConnectionLostError(
                    f"the slot {s.slot} was created by another process meanwhile",
                    "headrace retries by itself",
                ) from exc
            explained = preflight.explain_slot_error(s.slot, self._confirmed, exc)
            if explained is None:
                raise
            raise explained from exc
        self._streamed_once = True
        log.info("streaming slot %s from %s", s.slot, format_lsn(start))

    def _take_batch(self, conn: ReplicationConnection) -> ChangeBatch | None:
        """The pending changes as a batch; a large one read ahead while it is assembled."""
        if self.batcher.pending_changes >= READ_AHEAD_CHANGES:
            with conn.reading_ahead():  # the server keeps sending meanwhile
                return self.batcher.take()
        return self.batcher.take()

    def _stream(self) -> Iterator[ChangeBatch]:
        """Receive, decode and hand on batches until stopped or the connection breaks."""
        conn = self._replication
        if conn is None:  # pragma: no cover - _open_stream sets it
            raise ConnectionLostError("no replication connection", "headrace retries by itself")
        s = self.settings
        batcher = self.batcher
        feed_many = batcher.feed_many
        max_changes = s.batch_max_changes
        max_wait = s.batch_max_wait_s
        heartbeat_every = s.heartbeat_interval_s
        idle_poll = min(0.5, s.status_interval_s)
        consumer_waiting = self.consumer_waiting or _never
        hold = self.hold_while_busy if self.consumer_waiting is not None else 0
        flush_at: float | None = None
        last_data = last_heartbeat = last_position_only = time.monotonic()
        stop = self._stop
        while not stop.is_set():
            now = time.monotonic()
            timeout = _drain_timeout(flush_at, now, idle_poll, consumer_waiting)
            # Read no more than the batch still has room for (about: only whole
            # transactions count), so a backlog is cut near batch_max_changes.
            room = max(1, min(_DRAIN_MAX_MESSAGES, max_changes - batcher.pending_changes))
            lsns: list[int] = []
            payloads: list[bytes] = []
            if conn.drain_into(lsns, payloads, timeout, room):
                feed_many(lsns, payloads)
                last_data = time.monotonic()
                batcher.spill_large()  # a large transaction waits for its commit on disk
            if batcher.has_pending:
                now = time.monotonic()
                if flush_at is None:
                    flush_at = now + max_wait
                pending = batcher.pending_changes
                due = now >= flush_at and (hold == 0 or pending > hold)
                if pending >= max_changes or due or consumer_waiting():
                    flush_at = None
                    batch = self._take_batch(conn)
                    if batch is not None:
                        self._delivered = max(self._delivered, batch.position)
                        yield batch
                continue
            now = time.monotonic()
            caught_up = conn.server_wal_end
            if (
                caught_up > self._delivered
                and not batcher.in_transaction
                and (conn.server_waiting or now - last_position_only >= s.status_interval_s)
            ):
                # The server decoded up to here and sent nothing more for our
                # tables: hand on the position alone, so that once the caller
                # confirms it the slot advances (and a shutting-down server,
                # which waits for that, can stop).
                last_position_only = now
                batcher.skip_before(caught_up)
                self._delivered = caught_up
                yield ChangeBatch(tables=(), position=caught_up)
            if (
                heartbeat_every > 0
                and now - last_data >= heartbeat_every
                and now - last_heartbeat >= heartbeat_every
            ):
                last_heartbeat = now
                self._heartbeat_quietly()

    def _take(self) -> Iterator[ChangeBatch]:
        batch = self.batcher.take()
        if batch is not None:
            self._delivered = max(self._delivered, batch.position)
            yield batch

    def _load_types(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        """Let the decoder know the database's types (enums, domains) once."""
        if not self._types_loaded:
            self.batcher.registry.load_catalog(conn)
            self._types_loaded = True

    def _heartbeat_quietly(self) -> None:
        try:
            self.emit_heartbeat()
        except (psycopg.Error, ConnectionLostError) as exc:
            # The stream reports real connection trouble; a failed heartbeat
            # only delays the slot's advance.
            log.warning("could not write a heartbeat: %s", str(exc).strip())
            self._drop_sql()

    def _drop_sql(self) -> None:
        with self._sql_lock:
            if self._sql is not None:
                self._sql.close()
                self._sql = None

    def _close_replication(self) -> None:
        conn, self._replication = self._replication, None
        if conn is not None:
            conn.confirm(self._confirmed)
            conn.close()

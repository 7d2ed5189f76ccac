"""A PostgreSQL logical replication connection (the transport under the source).

psycopg 3 has no replication API, but a ``replication=database`` connection
accepts replication commands through ``execute()``, and after
``START_REPLICATION`` the libpq connection is in COPY BOTH mode, where
``pgconn.get_copy_data()`` / ``put_copy_data()`` carry the streaming
protocol. This module opens the connection and sends the commands; its base
class, :class:`~headrace.source.postgres.replication_stream.ReplicationStream`,
speaks the streaming protocol.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from headrace.errors import SourceError, first_line, format_lsn
from headrace.source.postgres.connect_errors import ConnectionLostError, connect_error
from headrace.source.postgres.replication_stream import ReplicationStream

# Session settings the decoder's text converter relies on: pgoutput renders
# values with the walsender's output functions, so these fix the text forms.
SESSION_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3"
)

_END_COPY_TIMEOUT_S = 2.0  # closing a stream waits this long for the server's CopyDone


@dataclass(frozen=True)
class SystemIdentity:
    """The answer to ``IDENTIFY_SYSTEM``."""

    system_id: str
    timeline: int
    wal_position: int
    dbname: str | None


@dataclass(frozen=True)
class StreamOptions:
    """pgoutput options of ``START_REPLICATION``.

    ``proto_version`` 2 is the newest on PostgreSQL 15 that supports
    ``streaming`` (large in-progress transactions sent before their commit).
    """

    publications: tuple[str, ...]
    proto_version: int = 2
    messages: bool = True
    streaming: bool = True
    binary: bool = False

    def render(self) -> str:
        """The option list, e.g. ``(proto_version '2', publication_names '"p"')``."""
        names = ",".join(quote_ident(p) for p in self.publications)
        options = [
            f"proto_version '{self.proto_version}'",
            f"publication_names {quote_literal(names)}",
        ]
        if self.messages:
            options.append("messages 'true'")
        if self.streaming:
            options.append("streaming 'true'")
        if self.binary:
            options.append("binary 'true'")
        return "(" + ", ".join(options) + ")"


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (always, so case and odd characters survive)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """Quote an SQL string literal (replication commands take no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def replication_conninfo(dsn: str, *, application_name: str = "headrace") -> str:
    """``dsn`` turned into a logical replication connection string.

    Adds ``replication=database`` and :data:`SESSION_OPTIONS` (after any
    ``options`` the DSN already has, so ours win where they overlap).
    """
    params = conninfo_to_dict(dsn)
    existing = str(params.get("options") or "")
    params["options"] = f"{existing} {SESSION_OPTIONS}".strip()
    params["replication"] = "database"
    params.setdefault("application_name", application_name)
    return make_conninfo("", **params)


class ReplicationConnection(ReplicationStream):
    """One logical replication connection: commands, then the COPY BOTH stream.

    Not thread-safe, except :meth:`confirm`, which any thread may call: it
    records the position and sends it right away only when no other thread is
    inside the connection.
    """

    def __init__(
        self,
        dsn: str,
        *,
        status_interval_s: float = 1.0,
        connect_timeout_s: float = 10.0,
        application_name: str = "headrace",
    ) -> None:
        try:
            self._conn: psycopg.Connection[tuple[object, ...]] = psycopg.connect(
                replication_conninfo(dsn, application_name=application_name),
                autocommit=True,
                connect_timeout=max(1, round(connect_timeout_s)),
            )
        except psycopg.OperationalError as exc:
            raise connect_error(exc) from exc
        super().__init__(self._conn.pgconn, status_interval_s=status_interval_s)

    # -- commands ---------------------------------------------------------

    @property
    def backend_pid(self) -> int:
        """PID of the walsender serving this connection."""
        return int(self._pgconn.backend_pid)

    def command(self, sql: str) -> list[tuple[object, ...]]:
        """Run one replication command (or SQL) and return its rows."""
        if self._streaming:
            raise SourceError(
                "replication command sent while streaming", "this is a bug in headrace"
            )
        try:
            cursor = self._conn.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []
        except psycopg.Error as exc:
            if self._conn.closed or self._pgconn.status != pq.ConnStatus.OK:
                verb = sql.split(maxsplit=1)[0]
                raise ConnectionLostError(
                    f"replication connection lost during {verb}: {first_line(exc)}",
                    "headrace reconnects by itself; if it keeps failing, check the server",
                ) from exc
            raise  # the server refused the command; the caller explains it

    def identify_system(self) -> SystemIdentity:
        """``IDENTIFY_SYSTEM``: system id, timeline, current WAL flush position."""
        (row,) = self.command("IDENTIFY_SYSTEM")
        system_id, timeline, position, dbname = row
        return SystemIdentity(
            system_id=str(system_id),
            timeline=int(str(timeline)),
            wal_position=parse_pg_lsn(str(position)),
            dbname=None if dbname is None else str(dbname),
        )

    def create_slot(self, name: str, *, temporary: bool = False) -> int:
        """Create a pgoutput slot; returns its consistent point (first LSN it streams)."""
        temp = " TEMPORARY" if temporary else ""
        (row,) = self.command(
            f"CREATE_REPLICATION_SLOT {quote_ident(name)}{temp} LOGICAL pgoutput "
            "(SNAPSHOT 'nothing')"
        )
        return parse_pg_lsn(str(row[1]))

    def create_slot_with_snapshot(self, name: str) -> tuple[int, str]:
        """Create a pgoutput slot exporting its snapshot.

        Returns ``(consistent_point, snapshot_name)``. The snapshot lives only
        while this connection stays idle: run nothing else on it until every
        reader has done ``SET TRANSACTION SNAPSHOT``-and-copy, then
        :meth:`close` it (or start streaming, which also ends the snapshot).
        """
        (row,) = self.command(
            f"CREATE_REPLICATION_SLOT {quote_ident(name)} LOGICAL pgoutput (SNAPSHOT 'export')"
        )
        return parse_pg_lsn(str(row[1])), str(row[2])

    def drop_slot(self, name: str) -> None:
        """Drop a replication slot (it must not be active)."""
        self.command(f"DROP_REPLICATION_SLOT {quote_ident(name)}")

    # -- streaming --------------------------------------------------------

    def start(self, slot: str, position: int, options: StreamOptions) -> None:
        """``START_REPLICATION SLOT slot LOGICAL position (options)``.

        ``position`` is also the first durable position reported back (the
        caller's durable position: resuming there confirms it).
        """
        sql = (
            f"START_REPLICATION SLOT {quote_ident(slot)} LOGICAL {format_lsn(position)} "
            f"{options.render()}"
        )
        self.command(sql)
        status = self._pgconn.transaction_status
        if status != pq.TransactionStatus.ACTIVE:
            state = pq.TransactionStatus(status).name
            raise SourceError(
                f"START_REPLICATION did not enter the streaming mode (status {state})",
                "this is a bug in headrace; report it with the server version",
            )
        self._streaming = True
        self._confirmed = max(self._confirmed, position)
        self._received = max(self._received, position)
        self._last_status = time.monotonic()

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Send the last durable position (when streaming), end the stream and close."""
        if self._conn.closed:
            return
        try:
            if self._streaming:
                self._send_status()
                self._end_copy(_END_COPY_TIMEOUT_S)
        except (SourceError, psycopg.OperationalError):
            pass
        finally:
            self._streaming = False
            self._conn.close()

    @property
    def closed(self) -> bool:
        return bool(self._conn.closed)

    def __enter__(self) -> ReplicationConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def parse_pg_lsn(text: str) -> int:
    """Parse a ``pg_lsn`` text value (``16/B374D848``)."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)

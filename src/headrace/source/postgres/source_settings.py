"""How :class:`~headrace.source.postgres.source.PostgresSource` reaches and reads PostgreSQL.

:class:`SourceSettings` is apart from the source because it is configuration,
validated on its own (the CLI and the pipeline build it) and documented field by
field, while the source is the streaming machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from headrace.errors import ConfigError
from headrace.source.changes import TableRef


@dataclass(frozen=True)
class SourceSettings:
    """How :class:`PostgresSource` reaches and reads PostgreSQL."""

    dsn: str
    """libpq connection string or URI of the source database. The user needs the
    REPLICATION privilege (or superuser), and pg_hba.conf must allow it
    'replication' connections."""

    tables: tuple[TableRef, ...]
    """The tables to capture; each must exist. The publication decides what is
    streamed, so give each pipeline a publication of its own."""

    publication: str = "headrace"
    """Publication that selects the tables; created for exactly :attr:`tables`
    when missing and :attr:`create_publication` is set."""

    slot: str = "headrace"
    """Logical replication slot (plugin pgoutput), created when missing. It
    holds the stream's position on the server: give each pipeline its own."""

    temporary_slot: bool = False
    """Use a temporary slot, dropped by the server when the connection closes
    (handy for ``headrace capture``). Such a stream cannot resume after a lost
    connection, so the source then fails instead of reconnecting."""

    create_publication: bool = True
    """Create the publication when it is missing (needs ownership of the tables)."""

    allow_slot_ahead: bool = False
    """When the slot's confirmed position is past the caller's start position,
    stream from the slot's position instead of failing. Off by default: the
    changes in between are gone, which a pipeline's store must not miss
    silently (``headrace capture``, which has no store, allows it)."""

    batch_max_changes: int = 50_000
    """Hand a batch on once it holds this many changes (it still ends on a
    transaction boundary: one large transaction makes one large batch)."""

    piece_max_changes: int = 100_000
    """A batch holding more changes (one huge transaction) is handed on with this
    many decoded; the rest decode a piece at a time when the consumer reads them
    (:meth:`ChangeBatch.pieces`), so memory holds one piece, not the transaction."""

    spill_dir: Path | None = None
    """Where a transaction holding more than ``piece_max_changes`` changes in memory
    while it arrives is buffered (an unlinked file per transaction). None: the system's
    temporary directory; ``headrace run`` uses the store's directory."""

    batch_max_wait_s: float = 0.1
    """...or once this many seconds passed since its first transaction was
    complete, whichever comes first: the latency the source adds."""

    heartbeat_interval_s: float = 10.0
    """After this many seconds without any change, write a heartbeat
    (``pg_logical_emit_message(false, 'headrace.heartbeat', ...)``) so the slot
    can advance on an idle or filtered database instead of pinning WAL; it
    arrives as a batch with no changes whose position the caller confirms.
    0 turns heartbeats off."""

    status_interval_s: float = 1.0
    """Seconds between standby status updates (the confirmed position sent to
    the server); keepalive requests are answered at once."""

    reconnect_initial_s: float = 0.2
    """First wait before reconnecting after a lost connection; doubles after
    each failed attempt up to :attr:`reconnect_max_s`."""

    reconnect_max_s: float = 10.0
    """Longest wait between two reconnection attempts."""

    reconnect_timeout_s: float | None = None
    """Give up (raise :class:`SourceError`) after this many seconds without a
    working connection; None retries forever."""

    slot_busy_wait_s: float = 10.0
    """How long to wait for a slot another process still holds (often the server
    has not yet noticed that the previous consumer died) before failing."""

    streaming: bool = True
    """Let the server stream large in-progress transactions (pgoutput
    ``streaming``) instead of spilling them to its disk until they commit."""

    connect_timeout_s: float = 10.0
    """Timeout for opening each connection."""

    application_name: str = "headrace"
    """``application_name`` of the connections (shown in pg_stat_replication)."""

    def __post_init__(self) -> None:
        if not self.tables:
            raise ConfigError("no table to capture", "configure at least one table")
        if self.batch_max_changes < 1 or self.batch_max_wait_s < 0 or self.piece_max_changes < 1:
            raise ConfigError(
                "batch_max_changes and piece_max_changes must be >= 1 and batch_max_wait_s >= 0",
                "fix the source settings",
            )
        if self.reconnect_initial_s <= 0 or self.reconnect_max_s < self.reconnect_initial_s:
            raise ConfigError(
                "reconnect_initial_s must be > 0 and reconnect_max_s >= reconnect_initial_s",
                "fix the source settings",
            )

"""Turn a pgoutput message stream into :class:`ChangeBatch`es of whole transactions.

Feed every message in stream order with :meth:`Batcher.feed`; take what is
ready with :meth:`Batcher.take`. The batcher

- keeps each table's schema from its Relation messages, numbering a new
  schema version whenever the columns, their types or the key change;
- buffers the open transaction, and every streamed (in-progress) transaction
  per xid, and hands a transaction on only once it committed: a streamed
  transaction at its Stream Commit, dropped at a Stream Abort (a
  subtransaction's abort drops only that subtransaction's changes); a
  two-phase transaction at its COMMIT PREPARED;
- hands on non-transactional logical messages (heartbeats) with the batch;
  they advance the position when no transaction is open;
- skips transactions whose commit LSN is below :meth:`skip_before`'s position
  (resume after a restart without duplicates).

Row messages are kept as raw bytes until :meth:`take`, which decodes and
converts them column by column for all pending transactions at once
(:mod:`headrace.source.postgres.assemble`). That keeps the per-row cost of
:meth:`feed` to an append. More pending changes than ``piece_changes`` (a huge
transaction) are decoded a piece at a time (:mod:`.pieces`): the batch comes
with its first piece, and the rest decode when the consumer reads them.

Relation messages apply as they arrive, except inside a streamed transaction:
there they apply when it commits, in commit order, as PostgreSQL's own
subscriber does (a streamed transaction's schema, which may have altered the
table, is not the schema of transactions that commit before it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from headrace.errors import ProtocolError, format_lsn
from headrace.source.changes import (
    ChangeBatch,
    Column,
    LogicalMessage,
    TableChanges,
    TableRef,
    TableSchema,
)
from headrace.source.postgres.assemble import assemble
from headrace.source.postgres.pieces import commits_of, decode_pieces, split_pieces
from headrace.source.postgres.protocol import (
    MSG_DELETE,
    MSG_INSERT,
    MSG_UPDATE,
    Begin,
    BeginPrepare,
    Commit,
    CommitPrepared,
    Message,
    Origin,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    decode_message,
    pg_micros_to_datetime,
)
from headrace.source.postgres.runs import CommittedRun, Run, TransactionMeta, TruncateRow
from headrace.source.postgres.spill import SpillFile
from headrace.source.postgres.types import TypeRegistry, arrow_type_for

log = logging.getLogger(__name__)

_ROW_MESSAGES: Final = frozenset({MSG_INSERT, MSG_UPDATE, MSG_DELETE})
PIECE_CHANGES: Final = 100_000
"""Default piece size: ~150 MB of decoded columns and DuckDB work at a time."""


@dataclass(frozen=True)
class _ResolvedTruncate:
    """A TRUNCATE whose tables' schemas were looked up when it arrived."""

    schemas: tuple[TableSchema, ...]


_Event = Run | Relation | Truncate | _ResolvedTruncate | Message


@dataclass
class _Transaction:
    """A transaction being received."""

    xid: int
    commit_ts: int = 0
    final_lsn: int = 0  # from Begin; 0 for streamed transactions (known at commit)
    skip: bool = False
    origin: str | None = None
    events: list[_Event] = field(default_factory=list)
    rows: int = 0  # row messages buffered (known for streamed transactions only)
    spill: SpillFile | None = None  # where its row messages go once it grows large
    two_phase: bool = False  # prepared: its commit LSN (and so ``skip``) comes later

    def rows_in_memory(self) -> int:
        return sum(len(e.payloads) for e in self.events if isinstance(e, Run))

    def drop_rows(self) -> None:
        """Forget the row messages received (a transaction already delivered)."""
        for event in self.events:
            if isinstance(event, Run):
                event.payloads.clear()  # the same lists: feed appends to them
                event.lsns.clear()


class Batcher:
    """Buffers decoded pgoutput messages and cuts them into ChangeBatches.

    ``registry`` resolves column types (give it a ``catalog_dsn`` or load it
    from the catalog so enums and domains are known; without that they are
    kept as text with a warning).
    """

    def __init__(
        self,
        registry: TypeRegistry | None = None,
        *,
        piece_changes: int = PIECE_CHANGES,
        spill_dir: Path | None = None,
    ) -> None:
        self.registry = registry if registry is not None else TypeRegistry()
        if piece_changes < 1:
            raise ValueError(f"piece_changes must be at least 1, not {piece_changes}")
        self.piece_changes = piece_changes
        """A batch with more changes is handed on in pieces of this many (see :meth:`take`),
        and a transaction holding more in memory goes to disk (:meth:`spill_large`)."""
        self.spill_dir = spill_dir
        """Where :meth:`spill_large` puts them (None: the system's temporary directory)."""
        # Relation OID -> schema as of the last committed transaction. Replaced,
        # never mutated: runs hold on to the map that was current for them.
        self._relations: dict[int, TableSchema] = {}
        self._versions: dict[int, int] = {}
        self._skip_before = 0
        self._position = 0
        self._taken = 0
        self._reset_receiving()
        self._reset_pending()

    # ------------------------------------------------------------ status

    @property
    def pending_changes(self) -> int:
        """Changes of committed transactions waiting for :meth:`take`."""
        return self._pending_rows

    @property
    def pending_transactions(self) -> int:
        """Committed transactions waiting for :meth:`take`."""
        return len(self._meta.xids)

    @property
    def pending_messages(self) -> int:
        """Logical messages (heartbeats among them) waiting for :meth:`take`."""
        return len(self._messages)

    @property
    def has_pending(self) -> bool:
        """Whether :meth:`take` would return a batch."""
        return bool(self._meta.xids or self._messages or self._position > self._taken)

    @property
    def in_transaction(self) -> bool:
        """Whether a (non-streamed) transaction is open."""
        return self._open is not None

    @property
    def position(self) -> int:
        """Where the pending batch ends (the last commit's end LSN or heartbeat)."""
        return self._position

    def schema(self, relation_oid: int) -> TableSchema | None:
        """The current schema of a table, by relation OID."""
        return self._relations.get(relation_oid)

    # ------------------------------------------------------------ control

    def skip_before(self, position: int) -> None:
        """Drop transactions whose commit LSN is below ``position`` (already delivered)."""
        self._skip_before = max(self._skip_before, position)
        self._position = max(self._position, position)
        self._taken = max(self._taken, position)

    def discard_incomplete(self) -> None:
        """Forget transactions not yet committed (after a lost connection the
        server sends them again). Committed, pending ones stay."""
        self._reset_receiving()

    def _reset_receiving(self) -> None:
        self._open: _Transaction | None = None
        self._run: Run | None = None
        self._in_stream = False
        self._stream: _Transaction | None = None
        self._stream_run: Run | None = None
        self._stream_run_xid = b""
        self._streams: dict[int, _Transaction] = {}
        self._prepared: dict[str, _Transaction] = {}

    def _reset_pending(self) -> None:
        self._runs: list[CommittedRun] = []
        self._truncates: list[TruncateRow] = []
        self._meta = TransactionMeta()
        self._messages: list[LogicalMessage] = []
        self._pending_rows = 0
        self._next_seq = 0
        self._taken = self._position

    def _receiving(self) -> list[_Transaction]:
        """The transactions not committed yet: open, streamed, prepared."""
        open_ = [self._open] if self._open is not None else []
        return [*open_, *self._streams.values(), *self._prepared.values()]

    @property
    def receiving_in_memory(self) -> int:
        """Row messages of transactions not committed yet, held in memory."""
        return sum(t.rows_in_memory() for t in self._receiving())

    def spill_large(self) -> int:
        """Move to disk the row messages of every transaction still being received that
        holds more than ``piece_changes`` of them in memory (:mod:`.spill`); returns how
        many moved. Call it between feeds (the source does after every read): the check
        costs a pass over the open transactions' runs."""
        current = self._open
        if current is not None and current.skip and not current.two_phase:
            # Below skip_before: delivered before a restart and sent again (its commit
            # LSN is known from Begin). Nothing of it is kept, in memory or on disk.
            current.drop_rows()
        moved = 0
        for transaction in self._receiving():
            if transaction.rows_in_memory() <= self.piece_changes:
                continue
            if transaction.spill is None:
                transaction.spill = SpillFile(self.spill_dir)
            for event in transaction.events:
                if isinstance(event, Run):
                    moved += event.spill(transaction.spill)
        return moved

    # ------------------------------------------------------------ feeding

    def feed(self, wal_start: int, payload: bytes | memoryview) -> None:
        """Take the next pgoutput message (``wal_start`` is its XLogData start LSN).

        Row messages are kept as given until :meth:`take`: a ``memoryview``
        must stay valid that long (psycopg's ``get_copy_data`` views own
        their libpq buffer, so they do). Other messages are decoded at once."""
        if payload and payload[0] in _ROW_MESSAGES:
            if self._in_stream:
                self._feed_stream_row(wal_start, payload)
                return
            run = self._run
            if run is None:
                raise ProtocolError("row change outside a transaction", lsn=wal_start, offset=0)
            run.payloads.append(payload)
            run.lsns.append(wal_start)
            return
        self._feed_other(wal_start, payload)

    def _feed_stream_row(self, wal_start: int, payload: bytes | memoryview) -> None:
        xid_bytes = payload[1:5]
        run = self._stream_run
        if run is None or xid_bytes != self._stream_run_xid:
            stream = self._stream
            if stream is None or len(xid_bytes) < 4:
                raise ProtocolError("malformed streamed row change", lsn=wal_start, offset=1)
            run = Run(header=5, subxid=int.from_bytes(xid_bytes, "big"))
            stream.events.append(run)
            self._stream_run = run
            self._stream_run_xid = bytes(xid_bytes)
        run.payloads.append(payload)
        run.lsns.append(wal_start)
        if self._stream is not None:
            self._stream.rows += 1

    def _feed_other(self, lsn: int, payload: bytes | memoryview) -> None:
        if not isinstance(payload, bytes):
            payload = bytes(payload)
        message = decode_message(payload, lsn, in_stream=self._in_stream)
        if isinstance(message, (Relation, Type, Truncate, Message)):
            self._feed_event(lsn, message)
        elif isinstance(message, Begin):
            if self._open is not None or self._in_stream:
                raise ProtocolError("Begin inside an open transaction", lsn=lsn, offset=0)
            self._begin(_Transaction(message.xid, message.commit_ts, message.final_lsn))
        elif isinstance(message, Commit):
            self._commit_open(lsn, message.commit_lsn, message.end_lsn, message.commit_ts)
        elif isinstance(message, Origin):
            if self._open is not None:  # kept for logging; the change model has no origin
                self._open.origin = message.name
        elif isinstance(message, StreamStart):
            self._stream_start(lsn, message)
        elif isinstance(message, StreamStop):
            self._stream_stop(lsn)
        elif isinstance(message, StreamCommit):
            self._stream_commit(lsn, message)
        elif isinstance(message, StreamAbort):
            self._stream_abort(message)
        else:
            self._feed_two_phase(lsn, message)

    def _begin(self, transaction: _Transaction) -> None:
        transaction.skip = transaction.final_lsn < self._skip_before
        self._open = transaction
        self._run = Run(header=1, relations=self._relations)
        transaction.events.append(self._run)

    def _feed_event(self, lsn: int, message: Relation | Type | Truncate | Message) -> None:
        if isinstance(message, Type):
            self.registry.note_type_message(message.oid, message.namespace, message.name)
            return
        if isinstance(message, Message) and not message.transactional:
            self._messages.append(
                LogicalMessage(message.lsn, message.prefix, message.content, False)
            )
            if self._open is None:
                self._position = max(self._position, message.lsn)
            return
        if self._in_stream:
            stream = self._stream
            assert stream is not None  # noqa: S101 (set together with _in_stream)
            stream.events.append(message)
            self._stream_run = None
            if isinstance(message, Truncate):
                stream.rows += len(message.relation_oids)
            return
        transaction = self._open
        if transaction is None:
            raise ProtocolError(
                f"{type(message).__name__} message outside a transaction", lsn=lsn, offset=0
            )
        # Outside a stream, schemas apply as they arrive: pgoutput sends a
        # Relation once per session, so a prepared (two-phase) transaction's
        # Relation serves the transactions that commit before it too.
        if isinstance(message, Relation):
            self._apply_relation(message)
        elif isinstance(message, Truncate):
            transaction.events.append(
                _ResolvedTruncate(self._truncate_schemas(message, self._relations, lsn))
            )
        else:
            transaction.events.append(message)
        self._run = Run(header=1, relations=self._relations)
        transaction.events.append(self._run)

    def _commit_open(self, lsn: int, commit_lsn: int, end_lsn: int, commit_ts: int) -> None:
        transaction = self._open
        if transaction is None:
            raise ProtocolError("Commit without Begin", lsn=lsn, offset=0)
        if transaction.final_lsn != commit_lsn:
            raise ProtocolError(
                f"Commit at {format_lsn(commit_lsn)} does not match its Begin's "
                f"{format_lsn(transaction.final_lsn)}",
                lsn=lsn,
                offset=2,
            )
        self._open = None
        self._run = None
        transaction.commit_ts = commit_ts
        self._commit(transaction, commit_lsn, end_lsn)

    def _stream_start(self, lsn: int, message: StreamStart) -> None:
        if self._in_stream or self._open is not None:
            raise ProtocolError("Stream Start inside a transaction or stream", lsn=lsn, offset=0)
        stream = self._streams.get(message.xid)
        if stream is None or message.first_segment:
            stream = _Transaction(message.xid)
            self._streams[message.xid] = stream
        self._in_stream = True
        self._stream = stream
        self._stream_run = None

    def _stream_stop(self, lsn: int) -> None:
        if not self._in_stream:
            raise ProtocolError("Stream Stop without Stream Start", lsn=lsn, offset=0)
        self._in_stream = False
        self._stream = None
        self._stream_run = None

    def _stream_commit(self, lsn: int, message: StreamCommit) -> None:
        stream = self._streams.pop(message.xid, None)
        if stream is None:
            raise ProtocolError(
                f"Stream Commit of transaction {message.xid}, which was never streamed",
                lsn=lsn,
                offset=1,
            )
        stream.commit_ts = message.commit_ts
        stream.skip = message.commit_lsn < self._skip_before
        self._commit(stream, message.commit_lsn, message.end_lsn)

    def _stream_abort(self, message: StreamAbort) -> None:
        stream = self._streams.get(message.xid)
        if stream is None:
            return  # nothing of it was kept (e.g. streamed before a reconnect)
        if message.subxid == message.xid:
            del self._streams[message.xid]
            return
        # A subtransaction rolled back: drop its changes, keep schemas.
        kept: list[_Event] = []
        for event in stream.events:
            if isinstance(event, Run) and event.subxid == message.subxid:
                stream.rows -= event.count
            elif isinstance(event, (Truncate, Message)) and event.xid == message.subxid:
                if isinstance(event, Truncate):
                    stream.rows -= len(event.relation_oids)
            else:
                kept.append(event)
        stream.events = kept

    def _feed_two_phase(self, lsn: int, message: object) -> None:
        if isinstance(message, BeginPrepare):
            if self._open is not None or self._in_stream:
                raise ProtocolError("Begin Prepare inside a transaction", lsn=lsn, offset=0)
            self._begin(
                _Transaction(message.xid, message.prepare_ts, message.prepare_lsn, two_phase=True)
            )
        elif isinstance(message, Prepare):
            transaction = self._open
            if transaction is None:
                raise ProtocolError("Prepare without Begin Prepare", lsn=lsn, offset=0)
            self._open = None
            self._run = None
            self._prepared[message.gid] = transaction
        elif isinstance(message, StreamPrepare):
            stream = self._streams.pop(message.xid, None)
            if stream is not None:
                self._prepared[message.gid] = stream
        elif isinstance(message, CommitPrepared):
            prepared = self._prepared.pop(message.gid, None)
            if prepared is None:
                log.warning(
                    "COMMIT PREPARED %r at %s: its changes were prepared before this "
                    "session and were not received",
                    message.gid,
                    format_lsn(message.commit_lsn),
                )
                prepared = _Transaction(message.xid)
            prepared.commit_ts = message.commit_ts
            prepared.skip = message.commit_lsn < self._skip_before
            self._commit(prepared, message.commit_lsn, message.end_lsn)
        elif isinstance(message, RollbackPrepared):
            self._prepared.pop(message.gid, None)
            if self._open is None:
                self._position = max(self._position, message.rollback_end_lsn)
        else:  # pragma: no cover - decode_message returns only the types above
            raise ProtocolError(f"unexpected message {message!r}", lsn=lsn)

    # ------------------------------------------------------------ committing

    def _commit(self, transaction: _Transaction, commit_lsn: int, end_lsn: int) -> None:
        """Apply a committed transaction's events in order and queue its changes."""
        keep = not transaction.skip
        index = len(self._meta.xids)
        for event in transaction.events:
            if isinstance(event, Run):
                rows = event.count
                if keep and rows:
                    relations = event.relations if event.relations is not None else self._relations
                    self._runs.append(CommittedRun(event, index, self._next_seq, relations))
                    self._next_seq += rows
                    self._pending_rows += rows
            elif isinstance(event, Relation):
                self._apply_relation(event)  # from a stream: applies at its commit
            elif isinstance(event, (Truncate, _ResolvedTruncate)):
                if keep:
                    schemas = (
                        self._truncate_schemas(event, self._relations, commit_lsn)
                        if isinstance(event, Truncate)
                        else event.schemas
                    )
                    self._queue_truncate(schemas, index)
            elif keep:
                self._messages.append(LogicalMessage(event.lsn, event.prefix, event.content, True))
        if keep:
            self._meta.commit_lsns.append(commit_lsn)
            self._meta.commit_ts.append(transaction.commit_ts)
            self._meta.xids.append(transaction.xid)
        self._position = max(self._position, end_lsn)

    @staticmethod
    def _truncate_schemas(
        message: Truncate, relations: Mapping[int, TableSchema], lsn: int
    ) -> tuple[TableSchema, ...]:
        schemas = []
        for oid in message.relation_oids:
            schema = relations.get(oid)
            if schema is None:
                raise ProtocolError(
                    f"TRUNCATE of relation OID {oid} before any Relation message for it", lsn=lsn
                )
            schemas.append(schema)
        return tuple(schemas)

    def _queue_truncate(self, schemas: tuple[TableSchema, ...], index: int) -> None:
        for schema in schemas:
            self._truncates.append(TruncateRow(self._next_seq, index, schema))
            self._next_seq += 1
            self._pending_rows += 1

    def _apply_relation(self, message: Relation) -> None:
        registry = self.registry
        columns = tuple(
            Column(
                name=c.name,
                type_oid=c.type_oid,
                type_modifier=c.type_modifier,
                type_name=registry.lookup(c.type_oid).name,
                arrow_type=arrow_type_for(c.type_oid, c.type_modifier, registry),
                is_key=c.is_key,
            )
            for c in message.columns
        )
        table = TableRef(message.namespace, message.name)
        current = self._relations.get(message.oid)
        if current is not None and current.columns == columns and current.table == table:
            return
        version = self._versions.get(message.oid, 0) + 1
        self._versions[message.oid] = version
        schema = TableSchema(table, version, columns, message.oid)
        self._relations = {**self._relations, message.oid: schema}

    # ------------------------------------------------------------ taking

    def take(self) -> ChangeBatch | None:
        """The pending committed transactions (and messages) as one batch, or
        ``None`` when there is nothing new."""
        if not self.has_pending:
            return None
        meta = self._meta
        rest: Callable[[bool], Iterator[tuple[TableChanges, ...]]] | None = None
        rest_changes = 0
        rest_commits: tuple[tuple[int, int], ...] = ()
        if self._pending_rows > self.piece_changes:
            # A transaction too large to decode at once: the first piece now, the
            # others when the consumer gets to them (:mod:`.pieces`).
            first, *others = split_pieces(self._runs, self._truncates, self.piece_changes)
            tables = assemble(first.runs, first.truncates, meta, self.registry)
            rest = functools.partial(decode_pieces, others, meta, self.registry)
            rest_changes = sum(p.changes for p in others)
            rest_commits = commits_of(others, meta)
        else:
            tables = assemble(self._runs, self._truncates, meta, self.registry)
        batch = ChangeBatch(
            tables=tuple(tables),
            rest=rest,
            rest_changes=rest_changes,
            rest_commits=rest_commits,
            position=self._position,
            transactions=len(meta.xids),
            first_commit_lsn=meta.commit_lsns[0] if meta.commit_lsns else None,
            last_commit_ts=pg_micros_to_datetime(meta.commit_ts[-1]) if meta.commit_ts else None,
            messages=tuple(self._messages),
        )
        self._reset_pending()
        return batch

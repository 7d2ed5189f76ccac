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

The committed side (schemas and their versions, the pending transactions,
:meth:`take`) is the Batcher's base, in :mod:`.batcher_pending`.
"""

from __future__ import annotations

import logging
import re
from operator import itemgetter
from pathlib import Path
from typing import Final

from headrace.errors import ProtocolError, format_lsn
from headrace.source.changes import LogicalMessage
from headrace.source.postgres.batcher_pending import (
    Event,
    PendingChanges,
    ResolvedTruncate,
    Transaction,
)
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
)
from headrace.source.postgres.runs import Run
from headrace.source.postgres.spill import SpillFile
from headrace.source.postgres.types import TypeRegistry

log = logging.getLogger(__name__)

_ROW_MESSAGES: Final = frozenset({MSG_INSERT, MSG_UPDATE, MSG_DELETE})
_NOT_ROW: Final = re.compile(b"[^" + bytes(sorted(_ROW_MESSAGES)) + b"]")
"""Any message type but a row change's (a byte pattern over the messages' first bytes)."""
_FIRST_BYTE: Final = itemgetter(0)
PIECE_CHANGES: Final = 100_000
"""Default piece size: ~150 MB of decoded columns and DuckDB work at a time."""


class Batcher(PendingChanges):
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
        super().__init__(registry, piece_changes)
        self.spill_dir = spill_dir
        """Where :meth:`spill_large` puts a large transaction's row messages (None: the system's
        temporary directory)."""
        self._reset_receiving()

    # ------------------------------------------------------------ status

    @property
    def in_transaction(self) -> bool:
        """Whether a (non-streamed) transaction is open."""
        return self._open is not None

    # ------------------------------------------------------------ control

    def discard_incomplete(self) -> None:
        """Forget transactions not yet committed (after a lost connection the
        server sends them again). Committed, pending ones stay."""
        self._reset_receiving()

    def _reset_receiving(self) -> None:
        self._open: Transaction | None = None
        self._run: Run | None = None
        self._in_stream = False
        self._stream: Transaction | None = None
        self._stream_run: Run | None = None
        self._stream_run_xid = b""
        self._streams: dict[int, Transaction] = {}
        self._prepared: dict[str, Transaction] = {}

    def _receiving(self) -> list[Transaction]:
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

    def feed_many(self, lsns: list[int], payloads: list[bytes]) -> None:
        """Take messages in stream order (``lsns[i]`` is ``payloads[i]``'s XLogData start
        LSN), as :meth:`feed` would one by one.

        The row messages between two other messages (a transaction's changes between
        its Begin and Commit) are appended to the open transaction in one step: a
        Python call per message was a third of what receiving a message cost.
        """
        try:
            kinds = bytes(map(_FIRST_BYTE, payloads))
        except IndexError:  # an empty message: feed reports it where it is
            for lsn, payload in zip(lsns, payloads, strict=True):
                self.feed(lsn, payload)
            return
        at = 0
        for other in [match.start() for match in _NOT_ROW.finditer(kinds)] + [len(kinds)]:
            if other > at:
                run = self._run
                if self._in_stream or run is None:
                    for index in range(at, other):
                        self.feed(lsns[index], payloads[index])
                else:
                    run.payloads += payloads[at:other]
                    run.lsns += lsns[at:other]
            if other < len(kinds):
                self._feed_other(lsns[other], payloads[other])
            at = other + 1

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
            self._begin(Transaction(message.xid, message.commit_ts, message.final_lsn))
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

    def _begin(self, transaction: Transaction) -> None:
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
                ResolvedTruncate(self._truncate_schemas(message, self._relations, lsn))
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
            stream = Transaction(message.xid)
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
        kept: list[Event] = []
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
                Transaction(message.xid, message.prepare_ts, message.prepare_lsn, two_phase=True)
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
                prepared = Transaction(message.xid)
            prepared.commit_ts = message.commit_ts
            prepared.skip = message.commit_lsn < self._skip_before
            self._commit(prepared, message.commit_lsn, message.end_lsn)
        elif isinstance(message, RollbackPrepared):
            self._prepared.pop(message.gid, None)
            if self._open is None:
                self._position = max(self._position, message.rollback_end_lsn)
        else:  # pragma: no cover - decode_message returns only the types above
            raise ProtocolError(f"unexpected message {message!r}", lsn=lsn)

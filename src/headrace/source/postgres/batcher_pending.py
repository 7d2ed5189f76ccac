"""The committed side of the :class:`~headrace.source.postgres.batcher.Batcher`.

:class:`PendingChanges`, the Batcher's base, keeps the tables' schemas and
their versions (from Relation messages), queues what each committed
transaction holds (row runs, truncates, transactional logical messages) and
cuts the pending ones into a :class:`ChangeBatch` (:meth:`~PendingChanges.take`).
Receiving the stream (open, streamed and prepared transactions until they
commit) is the Batcher's own; the two are apart because a commit is where one
hands over to the other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from headrace.errors import ProtocolError
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
    Message,
    Relation,
    Truncate,
    pg_micros_to_datetime,
)
from headrace.source.postgres.runs import CommittedRun, Run, TransactionMeta, TruncateRow
from headrace.source.postgres.spill import SpillFile
from headrace.source.postgres.types import TypeRegistry, arrow_type_for


@dataclass(frozen=True)
class ResolvedTruncate:
    """A TRUNCATE whose tables' schemas were looked up when it arrived."""

    schemas: tuple[TableSchema, ...]


Event = Run | Relation | Truncate | ResolvedTruncate | Message


@dataclass
class Transaction:
    """A transaction being received."""

    xid: int
    commit_ts: int = 0
    final_lsn: int = 0  # from Begin; 0 for streamed transactions (known at commit)
    skip: bool = False
    origin: str | None = None
    events: list[Event] = field(default_factory=list)
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


class PendingChanges:
    """Committed transactions waiting for :meth:`take`, and the schemas they decode with.

    ``registry`` resolves column types; a batch holding more than
    ``piece_changes`` changes is handed on in pieces (see :meth:`take`).
    """

    def __init__(self, registry: TypeRegistry | None, piece_changes: int) -> None:
        self.registry = registry if registry is not None else TypeRegistry()
        if piece_changes < 1:
            raise ValueError(f"piece_changes must be at least 1, not {piece_changes}")
        self.piece_changes = piece_changes
        """A batch with more changes is handed on in pieces of this many (see :meth:`take`),
        and a transaction holding more in memory goes to disk (:meth:`spill_large`)."""
        # Relation OID -> schema as of the last committed transaction. Replaced,
        # never mutated: runs hold on to the map that was current for them.
        self._relations: dict[int, TableSchema] = {}
        self._versions: dict[int, int] = {}
        self._skip_before = 0
        self._position = 0
        self._taken = 0
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

    def _reset_pending(self) -> None:
        self._runs: list[CommittedRun] = []
        self._truncates: list[TruncateRow] = []
        self._meta = TransactionMeta()
        self._messages: list[LogicalMessage] = []
        self._pending_rows = 0
        self._next_seq = 0
        self._taken = self._position

    # ------------------------------------------------------------ committing

    def _commit(self, transaction: Transaction, commit_lsn: int, end_lsn: int) -> None:
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
            elif isinstance(event, (Truncate, ResolvedTruncate)):
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

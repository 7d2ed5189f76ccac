"""The batcher's committed changes in raw form, as :func:`~.assemble.assemble` takes them.

Row messages stay undecoded bytes until a batch is taken: a :class:`Run` holds
consecutive ones of a transaction (in memory, or moved to disk by :mod:`.spill`),
a :class:`CommittedRun` places a run among the pending transactions,
:class:`TruncateRow` is one table of a TRUNCATE and :class:`TransactionMeta` the
pending transactions' commit data. They are apart from :mod:`.assemble`, which
decodes them, because the batcher and :mod:`.pieces` build and cut them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from headrace.source.changes import TableSchema
from headrace.source.postgres.spill import SpilledRows, SpillFile


@dataclass
class Run:
    """Consecutive row messages of one transaction, as received."""

    header: int  # bytes before the relation OID: 1, or 5 inside a streamed transaction
    subxid: int | None = None  # streamed transactions: the (sub)transaction they belong to
    # Relation OID -> schema for these rows, when known on arrival (None inside
    # a stream: the schemas as of the transaction's commit then).
    relations: Mapping[int, TableSchema] | None = None
    payloads: list[bytes | memoryview] = field(default_factory=list)
    lsns: list[int] = field(default_factory=list)
    spilled: list[SpilledRows] = field(default_factory=list)
    """Earlier rows of the run, moved to disk (:mod:`.spill`): they come before
    ``payloads``, which holds the rows received since."""
    spilled_rows: int = 0
    """Rows in :attr:`spilled` (counted once: :attr:`count` is read per transaction)."""

    @property
    def count(self) -> int:
        """Rows of the run, in memory and on disk."""
        return len(self.payloads) + self.spilled_rows

    def spill(self, file: SpillFile) -> int:
        """Move the rows held in memory to ``file``; returns how many moved."""
        moved = len(self.payloads)
        if moved:
            self.spilled.append(file.write(self.payloads, self.lsns))
            self.spilled_rows += moved
            self.payloads, self.lsns = [], []
        return moved

    def rows(self) -> tuple[list[bytes | memoryview], list[int]]:
        """Every row message and its LSN, in order (reading what is on disk)."""
        if not self.spilled:
            return self.payloads, self.lsns
        payloads: list[bytes | memoryview] = []
        lsns: list[int] = []
        for block in self.spilled:
            read, read_lsns = block.read()
            payloads += read
            lsns += read_lsns
        return payloads + self.payloads, lsns + self.lsns

    def part(self, start: int, end: int) -> Run:
        """Rows ``start:end`` of the run as a run of their own (nothing read from disk)."""
        spilled: list[SpilledRows] = []
        at = 0
        for block in self.spilled:
            low, high = max(start - at, 0), min(end - at, len(block))
            if low < high:
                spilled.append(block.part(low, high))
            at += len(block)
        low, high = max(start - at, 0), max(end - at, 0)
        return Run(
            header=self.header,
            subxid=self.subxid,
            relations=self.relations,
            payloads=self.payloads[low:high],
            lsns=self.lsns[low:high],
            spilled=spilled,
            spilled_rows=sum(len(block) for block in spilled),
        )


@dataclass
class CommittedRun:
    """A run of a committed transaction, with what is needed to decode it."""

    run: Run
    transaction: int  # index into the pending transactions
    first_seq: int
    relations: Mapping[int, TableSchema]  # relation OID -> schema, as of the run


@dataclass
class TruncateRow:
    """One table of a committed TRUNCATE."""

    seq: int
    transaction: int
    schema: TableSchema


@dataclass
class TransactionMeta:
    """Commit LSN, time and id of each pending transaction, in commit order."""

    commit_lsns: list[int] = field(default_factory=list)
    commit_ts: list[int] = field(default_factory=list)  # Unix-epoch microseconds
    xids: list[int] = field(default_factory=list)

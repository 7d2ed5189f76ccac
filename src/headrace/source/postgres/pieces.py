"""Cut a batch's committed runs into pieces, so a huge transaction is decoded a piece at a time.

A 1M-row ``UPDATE`` arrives as one transaction, and a batch never ends inside
a transaction. Decoded at once it took ~0.6 GB of Arrow columns and, applied
at once, ~0.9 GB more in DuckDB (measured: a 1M-change transaction took a
``headrace run`` from 0.3 to 1.6 GB), so a large enough backfill would exhaust
memory on every restart. The batcher keeps the raw messages (about 180 bytes
a change) and hands the batch on with its first piece decoded; the others are
decoded when the consumer asks (:meth:`~headrace.source.changes.ChangeBatch.pieces`).

A piece is a slice of the pending runs and truncates in ``_hr_seq`` order: a
run longer than what is left of a piece is cut, and each part keeps its rows'
sequence numbers (``first_seq`` moves with the cut), so the pieces together
are exactly the batch decoded at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from headrace.source.changes import TableChanges
from headrace.source.postgres.assemble import assemble
from headrace.source.postgres.convert_issues import conversions_not_counted
from headrace.source.postgres.runs import CommittedRun, TransactionMeta, TruncateRow
from headrace.source.postgres.types import TypeRegistry


@dataclass
class Piece:
    """The runs (or parts of runs) and truncates of one piece, in ``_hr_seq`` order."""

    runs: list[CommittedRun] = field(default_factory=list)
    truncates: list[TruncateRow] = field(default_factory=list)
    changes: int = 0
    commits: dict[int, int] = field(default_factory=dict)
    """Changes per pending transaction (index into the batch's transactions)."""

    def add(self, transaction: int, changes: int) -> None:
        self.changes += changes
        self.commits[transaction] = self.commits.get(transaction, 0) + changes


def split_pieces(runs: list[CommittedRun], truncates: list[TruncateRow], size: int) -> list[Piece]:
    """``runs`` and ``truncates`` in pieces of at most ``size`` changes each, in order."""
    if size < 1:
        raise ValueError(f"a piece holds at least one change, not {size}")
    pieces = [Piece()]
    events: list[CommittedRun | TruncateRow] = [*runs, *truncates]
    events.sort(key=lambda e: e.first_seq if isinstance(e, CommittedRun) else e.seq)
    for event in events:
        start, count = 0, 1 if isinstance(event, TruncateRow) else event.run.count
        while start < count:
            if pieces[-1].changes >= size:
                pieces.append(Piece())
            piece = pieces[-1]
            take = min(count - start, size - piece.changes)
            if isinstance(event, TruncateRow):
                piece.truncates.append(event)
            else:
                piece.runs.append(_part(event, start, start + take))
            piece.add(event.transaction, take)
            start += take
    return [p for p in pieces if p.changes]


def _part(committed: CommittedRun, start: int, end: int) -> CommittedRun:
    """Rows ``start:end`` of a committed run, keeping their sequence numbers."""
    if start == 0 and end == committed.run.count:
        return committed
    return CommittedRun(
        committed.run.part(start, end),
        committed.transaction,
        committed.first_seq + start,
        committed.relations,
    )


def decode_pieces(
    pieces: list[Piece], meta: TransactionMeta, registry: TypeRegistry, counted: bool
) -> Iterator[tuple[TableChanges, ...]]:
    """Each of ``pieces`` decoded, one at a time (``counted``: values converted lossily
    count in ``conversion_issues``; once per batch, by its first consumer)."""
    for piece in pieces:
        # Not around the yield: the flag belongs to this thread while it decodes.
        with contextlib.nullcontext() if counted else conversions_not_counted():
            tables = tuple(assemble(piece.runs, piece.truncates, meta, registry))
        yield tables


def commits_of(pieces: list[Piece], meta: TransactionMeta) -> tuple[tuple[int, int], ...]:
    """(commit time in µs since the epoch, changes) of ``pieces``, in order."""
    out: list[tuple[int, int]] = []
    for piece in pieces:
        out.extend((meta.commit_ts[index], count) for index, count in piece.commits.items())
    return tuple(out)

"""The property half of the rules lane's tests: random change streams through both sides.

Each rule's test file (``tests/rules/test_lane_<rule>.py``) draws operations of its own:
inserts with the values its rule reads, updates of the columns it reads. What is the same
for every rule is here: the operations on a row picked at random (an update, a delete, a
key change, a truncate, a removed row written again), the shape of an example (rows before
the snapshot, initial transactions, then steps of transactions each followed by a sync, an
engine restart or a new evaluator, batches cut at random commits), the :class:`Writer`
base that turns operations into SQL, and :func:`run_example`, which writes an example to
PostgreSQL and compares the evaluator's alerts with the SQL rule's after every sync.
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from headrace.rules.config import RulesConfig
from headrace.source.postgres.batcher import PIECE_CHANGES
from tests.conftest import PgDatabase
from tests.rules.bank import Bank, open_bank
from tests.rules.lane_harness import Both, Evaluator, reset_database

Op = tuple[Any, ...]
"""One random operation, ``(kind, ...)``: an insert and its values, or ``(kind, pick,
value)``, a change of the live row that ``pick`` picks."""

Transaction = list[Op]
"""Operations written in one PostgreSQL transaction."""

EXAMPLES = int(os.environ.get("HR_LANE_EXAMPLES", "25"))
"""Examples of each rule's property: more for a longer hunt. Beyond ~70 pass ``--timeout
0``: pytest-timeout's 300 s per test otherwise interrupts DuckDB mid-batch ("Query
interrupted")."""

LANE_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
"""The properties' settings: examples take seconds (a real PostgreSQL and pipeline), and
the ``fresh`` fixture is reset by each example itself."""

# ----------------------------------------------------------------- strategies


def change(kind: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Op]:
    """A change of a live row, ``(kind, pick, value)``."""
    return st.tuples(st.just(kind), st.integers(0, 1000), values)


def lifecycle(
    prefix: str = "", *, again: bool = False, truncate_one_in: int = 10
) -> list[st.SearchStrategy[Op]]:
    """The operations on a table that :meth:`Writer.write` writes: a live row given a new
    key, a live row deleted, with ``again`` a removed row written again (its old key and
    values), and a truncate that acts in one draw of ``truncate_one_in`` (the others write
    nothing: it empties the table, so it stays rare). ``prefix``: of the kinds, for a
    writer of several tables."""
    rare = st.integers(0, truncate_one_in - 1).map(lambda n: n == 0)
    return [
        change(f"{prefix}key", st.just(0)),
        change(f"{prefix}delete", st.just(0)),
        *([change(f"{prefix}again", st.just(0))] if again else []),
        st.tuples(st.just(f"{prefix}truncate"), rare, st.just(0)),
    ]


@dataclass(frozen=True)
class Then:
    """What follows a step's transactions, in this order."""

    sync: bool = False
    """Sync (batches cut at random commits) and compare the alerts."""
    restart: bool = False
    """Sync, then restart the engine (the evaluator keeps its memory)."""
    relane: bool = False
    """Sync, then start a new evaluator from the store and what the last one saved."""


SYNC_OR_RESTART = st.builds(Then, sync=st.booleans(), restart=st.booleans())
"""Sync after the transactions or not, restart the engine after syncing or not."""


@dataclass(frozen=True)
class Example:
    """One random run of a rule's property."""

    before: list[Op]
    """Inserts before the snapshot: the SQL rule rebuilds from the mirror, the lane seeds."""
    initial: list[Transaction]
    """One insert per transaction, before the steps: enough rows for patterns."""
    steps: list[tuple[list[Transaction], Then]]
    cuts: list[bool]
    """Whether to cut a batch after a commit, one commit after the other (cycled)."""
    piece: int = PIECE_CHANGES
    """Batches with more changes come in pieces of this many (as a huge transaction
    does): the engine applies them in one transaction, the lane evaluates each."""


def examples(
    first: st.SearchStrategy[Op],
    operation: st.SearchStrategy[Op],
    *,
    initial: tuple[int, int] = (4, 20),
    then: st.SearchStrategy[Then] = SYNC_OR_RESTART,
) -> st.SearchStrategy[Example]:
    """Examples whose rows before the snapshot (up to 8) and initial transactions (between
    ``initial``'s bounds) are ``first``; then 1-6 steps of 2-8 transactions of 1-4
    ``operation`` each, each step followed by ``then``."""
    transaction = st.lists(operation, min_size=1, max_size=4)
    low, high = initial
    return st.builds(
        Example,
        before=st.lists(first, max_size=8),
        initial=st.lists(first.map(lambda op: [op]), min_size=low, max_size=high),
        steps=st.lists(
            st.tuples(st.lists(transaction, min_size=2, max_size=8), then), min_size=1, max_size=6
        ),
        cuts=st.lists(st.booleans(), min_size=1, max_size=20),
        piece=st.sampled_from([PIECE_CHANGES, PIECE_CHANGES, 3]),
    )


# ----------------------------------------------------------------- writing


Row = TypeVar("Row")


class Rows(Generic[Row]):
    """The rows a writer wrote to one table: the live ones by key, each with what the
    writer needs to know of it (its values, to write it again), and the removed ones."""

    def __init__(self, table: str, truncate: str) -> None:
        self.table = table
        self.truncate_statement = truncate
        self.live: dict[int, Row] = {}
        self.removed: dict[int, Row] = {}
        self.truncated: set[int] = set()
        """Keys of the rows a truncate removed."""

    def pick(self, pick: int) -> int | None:
        """The key of the live row ``pick`` picks (None: there is none)."""
        if not self.live:
            return None
        keys = sorted(self.live)
        return keys[pick % len(keys)]

    def update(self, key: int, assignments: str) -> str:
        return f"UPDATE {self.table} SET {assignments} WHERE id = {key}"

    def delete(self, key: int) -> str:
        self.removed[key] = self.live.pop(key)
        return f"DELETE FROM {self.table} WHERE id = {key}"

    def rekey(self, key: int, new: int) -> str:
        self.live[new] = self.live.pop(key)
        return self.update(key, f"id = {new}")

    def truncate(self) -> str:
        self.removed.update(self.live)
        self.truncated.update(self.live)
        self.live.clear()
        return self.truncate_statement

    def restore(self, pick: int) -> tuple[int, Row] | None:
        """The removed row ``pick`` picks, live again (None: there is none)."""
        if not self.removed:
            return None
        key = sorted(self.removed)[pick % len(self.removed)]
        self.live[key] = self.removed.pop(key)
        return key, self.live[key]


class Writer(ABC):
    """Writes a rule's operations to PostgreSQL as SQL, tracking the rows it wrote."""

    def __init__(self) -> None:
        self.next_id = 5000
        self.transactions: Rows[Any] = Rows("transactions", "TRUNCATE transactions CASCADE")

    def new_id(self) -> int:
        """A key not used before."""
        self.next_id += 1
        return self.next_id - 1

    @abstractmethod
    def statement(self, op: Op) -> str | None:
        """One operation as SQL (None: nothing to act on)."""

    @abstractmethod
    def assignments(self, rows: Rows[Any], key: int, kind: str, value: Any) -> str:
        """The SET clause of the update ``kind`` of row ``key`` to ``value`` (for
        :meth:`write`; it may note the new value in ``rows.live``)."""

    def insert_again(self, rows: Rows[Any], key: int, row: Any) -> str:
        """The INSERT writing the removed row ``key`` again (for :meth:`write`; only a
        writer whose operations include :func:`lifecycle`'s ``again``)."""
        raise NotImplementedError(f"{type(self).__name__} writes no row again")

    def write(self, rows: Rows[Any], op: Op) -> str | None:
        """``(kind, pick, value)`` on ``rows``: a truncate (if it acts), a removed row
        written again (:meth:`insert_again`), or a delete, key change or update
        (:meth:`assignments`) of the live row ``pick`` picks."""
        kind, pick, value = op
        if kind == "truncate":
            return rows.truncate() if pick else None
        if kind == "again":
            restored = rows.restore(pick)
            return None if restored is None else self.insert_again(rows, *restored)
        key = rows.pick(pick)
        if key is None:
            return None
        if kind == "delete":
            return rows.delete(key)
        if kind == "key":
            return rows.rekey(key, self.new_id())
        return rows.update(key, self.assignments(rows, key, kind, value))

    def statements(self, ops: Iterable[Op]) -> list[str]:
        return [s for op in ops if (s := self.statement(op)) is not None]

    def run(self, bank: Bank, transactions: Iterable[Transaction]) -> None:
        """Each transaction as one PostgreSQL transaction (if it writes anything)."""
        for ops in transactions:
            statements = self.statements(ops)
            if statements:
                bank.harness.transaction(*statements)


# ----------------------------------------------------------------- running


_examples = itertools.count()


def run_example(
    fresh: tuple[PgDatabase, Path],
    example: Example,
    *,
    lane: Callable[[RulesConfig], Evaluator],
    config: str,
    writer: Writer,
    check: Callable[[Both], None] = Both.assert_equal,
    sync_initial: bool = False,
) -> Both:
    """Write ``example`` with ``writer`` to a fresh database under the pipeline ``config``
    and feed every batch to the engine and to ``lane``; ``check`` their alerts after every
    sync (and after the initial transactions if ``sync_initial``: the steps then find
    history). The pipeline is closed on return; the lane's alerts stay in
    :attr:`Both.lane_alerts`."""
    db, tmp_path = fresh
    reset_database(db)
    directory = tmp_path / f"ex{next(_examples)}"
    directory.mkdir()
    before_snapshot = tuple(writer.statements(example.before))
    both = Both(
        open_bank(db, directory, config, before_snapshot=before_snapshot),
        lane,
        piece=example.piece,
    )
    cut_points = itertools.cycle(example.cuts)

    def sync() -> None:
        both.sync(lambda: next(cut_points))

    try:
        writer.run(both.bank, example.initial)
        if sync_initial:
            sync()
            check(both)
        for transactions, then in example.steps:
            writer.run(both.bank, transactions)
            if then.sync:
                sync()
                check(both)
            if then.restart:
                sync()
                both.restart()
            if then.relane:
                sync()
                both.start_lane(from_saved=True)
        sync()
        check(both)
        count = len(both.lane_alerts)
        event(f"alerts: {min(count, 3)}{'+' if count > 3 else ''}")
    finally:
        both.bank.close()
    return both

"""The write workload of ``headrace bench pipeline`` (and the crash tests): a mixed OLTP stream.

Tables (:data:`SCHEMA`): ``accounts`` (static: looked-up dimension values do
not change, so a join on PostgreSQL is a valid reference) and
``transactions``, the fact table every rollup reads.

Each step is one transaction running one set-based statement, so the
generator's own CPU stays small and the rate is set by PostgreSQL:

- inserts (50% of the transactions by default): ``INSERT ... SELECT ... FROM
  generate_series``;
- updates (35%): random existing ids get a new status, a new amount and a
  ``created_at`` moved by minutes (rows move between buckets and between
  dimension values, retracting their old contribution);
- deletes (15%): random live ids.

Each writer keeps which of its ids are live (a bitmap), so its updates and
deletes always find their rows and the shares of the changes are the shares
asked for. The ids below ``first_id`` are taken as live (a table just
created); a row deleted by someone else makes a statement change fewer rows,
and the result counts what was changed.

:class:`Mix` sets other shares: with as many deletes as inserts the table stops
growing and the rollups' groups lose values as often as they gain them.

The ids updated and deleted are drawn uniformly from the whole table by
default: every part of the mirror is touched, the hardest case for a column
store. ``update_window`` draws them from the newest ids instead (the OLTP
pattern: a payment's status changes soon after it is created).

The writers that share a rate, and the process the benchmark runs, are
:mod:`.pipeline_writers`.
"""

from __future__ import annotations

import itertools
import select
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import pq

SCHEMA = """
CREATE TABLE accounts (
    id     int8 PRIMARY KEY,
    tier   text NOT NULL,
    region text NOT NULL
);
CREATE TABLE transactions (
    id         int8 PRIMARY KEY,
    account_id int8 NOT NULL,
    amount     numeric(12,2) NOT NULL,
    status     text NOT NULL,
    merchant   text NOT NULL,
    created_at timestamptz NOT NULL
);
"""

ACCOUNTS = 10_000
STATUSES = "(ARRAY['approved','declined','pending','refunded'])"

_INSERT_ACCOUNTS = f"""
INSERT INTO accounts
SELECT g, (ARRAY['basic','gold','platinum'])[1 + g % 3],
       (ARRAY['eu','us','apac','latam'])[1 + g % 4]
FROM generate_series(1, {ACCOUNTS}) g
"""
# Amounts are whole cents times 0.01: `round((random() * 1000)::numeric, 2)` converts a
# double to numeric through printf, 1.8% of the machine's CPU at 100,000 changes/s (perf),
# taken from the cores headrace shares. Same range (0.00 to 1,000.00), same column values.
# The statements take libpq's $n parameters: the writers run them as prepared
# statements through the connection's libpq object (see Workload._execute).
_INSERT = f"""
INSERT INTO transactions
SELECT g, 1 + (hashint8(g) & 2147483647) % {ACCOUNTS},
       floor(random() * 100001)::int8 * 0.01,
       {STATUSES}[1 + floor(random() * 4)::int],
       'm' || (hashint8(g + 7) & 2147483647) % 200,
       now() - random() * interval '6 hours'
FROM generate_series($1::int8, $2::int8) g
""".encode()
_UPDATE = f"""
UPDATE transactions
SET status = {STATUSES}[1 + floor(random() * 4)::int],
    amount = floor(random() * 100001)::int8 * 0.01,
    created_at = created_at + (random() * 20 - 10) * interval '1 minute'
WHERE id = ANY($1::int8[])
""".encode()
_DELETE = b"DELETE FROM transactions WHERE id = ANY($1::int8[])"

_NO_IDS = np.empty(0, dtype=np.int64)
MAX_LIVE_RANGE = 1 << 30
"""The most ids a writer tracks below its first insert (a byte each)."""
_statement_names = itertools.count()
"""Suffixes that keep each Workload's prepared statements apart on a shared connection."""


def _flush(pgconn: pq.abc.PGconn) -> None:
    """Send what libpq still holds of a statement (almost always nothing)."""
    while pgconn.flush():  # the parameters did not fit the socket at once
        select.select([pgconn.socket], [pgconn.socket], [])


def _collect(pgconn: pq.abc.PGconn, encoding: str) -> int:
    """Wait for the statement sent on ``pgconn``; the rows it changed, or its error
    raised as psycopg's exception. (The writers of :mod:`.pipeline_writers` wait for
    every connection at once and call this only once a response is in.)"""
    changed = 0
    error: pq.abc.PGresult | None = None
    while True:
        if pgconn.is_busy():
            select.select([pgconn.socket], [], [])
            pgconn.consume_input()
            continue
        result = pgconn.get_result()
        if result is None:
            break
        if result.status == pq.ExecStatus.COMMAND_OK:
            changed += int(result.command_tuples or 0)
        elif error is None:
            error = result
    if error is not None:
        raise psycopg.errors.error_from_result(error, encoding=encoding)
    return changed


def _id_array(ids: np.ndarray[Any, np.dtype[np.int64]]) -> bytes:
    """``ids`` as an int8[] parameter in PostgreSQL's text form."""
    return ("{" + ",".join(map(str, ids.tolist())) + "}").encode()


def changes_by_kind(written: dict[str, Any]) -> dict[str, int]:
    """Inserted, updated and deleted rows of a generator run's JSON line."""
    return {kind: int(written.get(kind, 0)) for kind in ("inserts", "updates", "deletes")}


def current_wal_lsn(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """PostgreSQL's WAL position now, as a number."""
    row = conn.execute(b"SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    return int(row[0]) if row is not None else 0


def next_free_id(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """An id above every transaction's."""
    row = conn.execute(b"SELECT coalesce(max(id), 0) + 1 FROM transactions").fetchone()
    return int(row[0]) if row is not None else 1


def create_schema(conn: psycopg.Connection[tuple[Any, ...]], base_rows: int) -> None:
    """Create the tables with ``base_rows`` transactions (ids 1..base_rows)."""
    conn.execute(SCHEMA.encode())
    conn.execute(_INSERT_ACCOUNTS.encode())
    if base_rows:
        conn.pgconn.send_query_params(_INSERT, [b"1", str(base_rows).encode()])
        _flush(conn.pgconn)
        _collect(conn.pgconn, conn.info.encoding)


@dataclass(frozen=True)
class Mix:
    """Shares of inserts, updates and deletes among the workload's transactions."""

    inserts: float = 50.0
    updates: float = 35.0
    deletes: float = 15.0

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``INSERTS:UPDATES:DELETES``, relative weights (``50:35:15``, ``1:1:1``)."""
        parts = text.split(":")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            weights = []
        if len(weights) != 3 or any(w < 0 for w in weights) or weights[0] <= 0:
            raise ValueError(
                f"mix {text!r}: expected INSERTS:UPDATES:DELETES, three weights >= 0 with "
                "inserts > 0 (for example 50:35:15 or 40:20:40)"
            )
        total = sum(weights)
        inserts, updates, deletes = (100 * w / total for w in weights)
        return cls(inserts, updates, deletes)

    def __str__(self) -> str:
        return ":".join(f"{w:g}" for w in (self.inserts, self.updates, self.deletes))


DEFAULT_MIX = Mix()
"""50% inserts, 35% updates, 15% deletes: the table grows by about a third of the changes."""


@dataclass
class WorkloadResult:
    """What one generator run wrote."""

    changes: int = 0
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    transactions: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    end_lsn: int = 0
    started_at: float = 0.0
    """``time.monotonic()`` when the writers started (the clock is the machine's, so
    another process can compare it with its own)."""
    ended_at: float = 0.0
    """``time.monotonic()`` after the last commit."""


class Workload:
    """Issues the mixed statements on one connection (ids above ``first_id`` are new).

    The statements are prepared once and run through the connection's libpq object,
    with their parameters as text: the generator shares the cores with PostgreSQL and
    headrace, and psycopg's ``execute`` cost about twice the CPU a transaction. What
    PostgreSQL runs is the same (psycopg prepares a statement run 5 times too)."""

    def __init__(
        self,
        conn: psycopg.Connection[tuple[Any, ...]],
        *,
        first_id: int,
        tx_rows: int,
        seed: int = 1,
        update_window: int = 0,
        mix: Mix = DEFAULT_MIX,
        low_id: int = 1,
    ) -> None:
        self.conn = conn
        self.next_id = first_id
        self.low_id = min(low_id, first_id)
        """The lowest id this writer updates or deletes; ids from it up to ``first_id``
        are taken as live."""
        self.tx_rows = max(1, tx_rows)
        self.update_window = max(0, update_window)
        """Updates and deletes draw among the newest this many ids (0: among all)."""
        self.insert_below = mix.inserts / 100
        self.update_below = (mix.inserts + mix.updates) / 100
        self.random = np.random.default_rng(seed)
        if first_id - self.low_id > MAX_LIVE_RANGE:
            raise ValueError(
                f"ids {self.low_id}..{first_id - 1} are too many to track ({MAX_LIVE_RANGE:,} at "
                "most): give a low_id closer to first_id"
            )
        self.live = np.ones(first_id - self.low_id + 1024, dtype=np.bool_)
        """``live[id - low_id]``: whether the id has a row (beyond ``next_id``: unused)."""
        self.live_rows = first_id - self.low_id
        self.result = WorkloadResult()
        self._sent: tuple[str, int, np.ndarray[Any, np.dtype[np.int64]]] | None = None
        """The transaction sent and not yet collected: its kind, first id (inserts)
        and ids (updates and deletes)."""
        suffix = next(_statement_names)
        self._statements: dict[bytes, bytes] = {}
        """Each statement's text -> its prepared name on ``conn``."""
        for kind, sql in (("insert", _INSERT), ("update", _UPDATE), ("delete", _DELETE)):
            name = f"hr_{kind}_{suffix}".encode()
            conn.pgconn.send_prepare(name, sql)
            _flush(conn.pgconn)
            _collect(conn.pgconn, conn.info.encoding)
            self._statements[sql] = name

    @property
    def socket(self) -> int:
        """The connection's socket, readable when a sent transaction's response arrives."""
        return self.conn.pgconn.socket

    def _send(self, sql: bytes, *params: bytes) -> None:
        pgconn = self.conn.pgconn
        pgconn.send_query_prepared(self._statements[sql], list(params))
        _flush(pgconn)

    def _inserted(self, first: int, rows: int) -> None:
        end = first + rows - self.low_id
        if end > len(self.live):
            grown = np.ones(max(end, 2 * len(self.live)), dtype=np.bool_)
            grown[: len(self.live)] = self.live
            self.live = grown
        self.live[first - self.low_id : end] = True
        self.live_rows += rows

    def _live_ids(self, count: int) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Up to ``count`` distinct live ids, uniform over the window (or all ids)."""
        high = self.next_id
        low = max(self.low_id, high - self.update_window) if self.update_window else self.low_id
        picked = np.empty(0, dtype=np.int64)
        # Rejection sampling while most ids are live; once deletes have taken most of
        # them, or sampling falls short, the live ids are listed.
        if 4 * self.live_rows >= high - self.low_id:
            for _ in range(4):
                drawn = self.random.integers(low, high, size=2 * count + 16)
                drawn = np.concatenate((picked, drawn[self.live[drawn - self.low_id]]))
                _, first = np.unique(drawn, return_index=True)
                picked = drawn[np.sort(first)]  # distinct, still in the order drawn
                if len(picked) >= count:
                    return picked[:count]
        live = np.flatnonzero(self.live[low - self.low_id : high - self.low_id]) + low
        if len(live) > count:
            live = self.random.choice(live, count, replace=False)
        return live.astype(np.int64)

    def begin(self) -> None:
        """Choose the next transaction and send it, without waiting for it."""
        draw = self.random.random()
        rows = self.tx_rows
        ids = _NO_IDS if draw < self.insert_below or self.live_rows < rows else self._live_ids(rows)
        if not len(ids):  # an insert, or nothing live to update or delete
            first = self.next_id
            self.next_id += rows
            self._send(_INSERT, str(first).encode(), str(first + rows - 1).encode())
            self._sent = ("inserts", first, ids)
        elif draw < self.update_below:
            self._send(_UPDATE, _id_array(ids))
            self._sent = ("updates", 0, ids)
        else:
            self._send(_DELETE, _id_array(ids))
            self._sent = ("deletes", 0, ids)

    def received(self) -> bool:
        """Read what arrived on the socket; whether the whole response is in."""
        self.conn.pgconn.consume_input()
        return not self.conn.pgconn.is_busy()

    def finish(self) -> int:
        """Collect the sent transaction's result (waiting for it if need be); returns the
        rows it changed."""
        if self._sent is None:
            raise RuntimeError("Workload.finish() without a transaction begun")
        kind, first, ids = self._sent
        self._sent = None
        changed = _collect(self.conn.pgconn, self.conn.info.encoding)
        result = self.result
        if kind == "inserts":
            self._inserted(first, self.tx_rows)
            result.inserts += changed
        elif kind == "updates":
            result.updates += changed
        else:
            self.live[ids - self.low_id] = False
            self.live_rows -= len(ids)
            result.deletes += changed
        result.changes += changed
        result.transactions += 1
        return changed

    def step(self) -> int:
        """One transaction; returns the rows it changed."""
        self.begin()
        return self.finish()

    def run(
        self,
        rate: float,
        seconds: float,
        *,
        started: float | None = None,
        quota: int | None = None,
    ) -> WorkloadResult:
        """Write at ``rate`` changes/s (0: as fast as possible) for ``seconds`` from
        ``started`` (a ``time.monotonic()``, default now); may be called again (the
        result adds up).

        With a ``quota`` (changes), stop as soon as it is written: paced at ``rate``,
        the last transaction is due just before the end, so the rate achieved is the
        rate asked for, not less by the partial last interval. A writer behind its
        pace still stops at the end (plus a quarter second for the last transaction
        due), and its rate shows it."""
        started = time.monotonic() if started is None else started
        deadline = started + seconds + (0.25 if quota is not None else 0.0)
        already = self.result.changes
        while quota is None or self.result.changes - already < quota:
            now = time.monotonic()
            if now >= deadline:
                break
            if rate > 0:
                due = started + (self.result.changes - already) / rate
                if due > now:
                    time.sleep(min(due - now, deadline - now))
                    continue
            self.step()
        ended = time.monotonic()
        self.result.seconds += ended - started
        self.result.rate = self.result.changes / self.result.seconds if self.result.seconds else 0
        self.result.started_at = self.result.started_at or started
        self.result.ended_at = ended
        self.result.end_lsn = current_wal_lsn(self.conn)
        return self.result


def tx_rows_for(rate: float) -> int:
    """Rows per transaction: ~1,000 transactions/s at the target rate, 1,000 rows at most."""
    if rate <= 0:
        return 1000
    return max(1, min(1000, round(rate / 1000)))

"""The live workload generator behind ``headrace demo generate``.

Time is simulated: the clock starts at an *anchor* (the wall clock when the
run begins, unless given) and advances in ticks of ``tick_ms``; each tick is
one database transaction holding every change whose simulated time falls in
it. :meth:`Workload.run` paces ticks against the wall clock (``speed``
simulated seconds per second, a token bucket that catches up after a slow
tick); :meth:`Workload.step` runs the next tick at once.

Determinism: every draw comes from generators seeded by ``seed`` and the
settings, and nothing reads the wall clock except the anchor. Given the same
seed, settings, anchor and starting database, two runs write the same
statements in the same order (the anchor shifts every timestamp and, with a
daily rhythm, decides which hour of the day the run starts at). Pass an
anchor (``--anchor``) to reproduce a run exactly.

The generator assumes it is the only writer of the demo tables while it
runs: it keeps balances and id counters in memory.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import TracebackType

import psycopg

from headrace.demo.actions import (
    Action,
    NewCustomer,
    NormalLogin,
    NormalTransaction,
    Truth,
)
from headrace.demo.batch import TickBatch
from headrace.demo.bulk import copy_table
from headrace.demo.clock import SECOND_US, from_us, to_us
from headrace.demo.config import FraudFamily, WorkloadSettings
from headrace.demo.executor import ActionExecutor, WorkloadStats
from headrace.demo.population import build_population, opening_ledger, write_population
from headrace.demo.scenarios import INJECTORS, ScenarioKit
from headrace.demo.schema import apply_schema, bulk_load_mode, sync_id_sequences
from headrace.demo.state import load_population
from headrace.demo.traffic import AccountSampler, NormalTraffic, diurnal_factor
from headrace.demo.writer import BatchWriter
from headrace.errors import ConfigError, SourceError

__all__ = ["Workload", "WorkloadSettings", "WorkloadStats"]

_NORMAL_TRANSACTION = NormalTransaction()
_NORMAL_LOGIN = NormalLogin()
_NEW_CUSTOMER = NewCustomer()


class Workload:
    """A deterministic fintech workload writing into a PostgreSQL database.

    Not thread-safe: drive it from one thread (``run`` may be that thread;
    ``stop`` events and ``stats`` may be used from others).

    >>> with Workload(WorkloadSettings(dsn=...)) as workload:  # doctest: +SKIP
    ...     workload.run(stop_event, duration=10.0)
    """

    def __init__(self, settings: WorkloadSettings) -> None:
        if settings.rate < 0 or settings.tick_ms <= 0 or settings.speed <= 0:
            raise ConfigError(
                "rate must be >= 0, tick_ms and speed > 0",
                f"got rate={settings.rate}, tick_ms={settings.tick_ms}, speed={settings.speed}",
            )
        self.settings = settings
        self.stats = WorkloadStats()
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._rng = random.Random(f"{settings.seed}:traffic")  # noqa: S311 - a seeded simulation
        self._tick_us = settings.tick_ms * 1000
        self._tick = 0
        self._anchor_us = 0
        self._floor_us = 0  # nothing may be scheduled before this (the next tick's start)
        self._heap: list[tuple[int, int, Action]] = []
        self._seq = 0
        self._accumulated: dict[str, float] = {"txn": 0.0, "login": 0.0, "customer": 0.0}
        self._since_fraud = 0
        self._family_queue: list[FraudFamily] = []
        self._family_round = 0
        self._draining = False

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> Workload:
        """Connect, apply the schema, create a population if the database has none."""
        try:
            self._conn = psycopg.connect(self.settings.dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            raise SourceError(
                f"cannot connect to the demo database: {exc}".strip(),
                "check --dsn (a libpq connection string) and that PostgreSQL is running",
            ) from exc
        try:
            self._prepare(self._conn)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise
        return self

    def _prepare(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        anchor = self.settings.anchor or datetime.now(UTC)
        if anchor.tzinfo is None:
            raise ConfigError("the anchor needs a time zone", "write it like 2026-01-01T00:00Z")
        self._anchor_us = to_us(anchor)
        self._floor_us = self._anchor_us
        apply_schema(conn)
        self._bootstrap(conn, anchor)
        population = load_population(conn)
        if not population.accounts:
            raise ConfigError("the demo database has no accounts", "load the history first")
        self.population = population
        self.sampler = AccountSampler(
            population.accounts,
            self.settings.seed,
            self.settings.zipf_exponent,
            self.settings.envelope,
        )
        self.traffic = NormalTraffic(population, self.settings.envelope, self.sampler)
        self.kit = ScenarioKit(population, self.traffic, self.settings.shapes)
        self._executor = ActionExecutor(
            self.traffic,
            rng=self._rng,
            schedule=self._schedule,
            stats=self.stats,
            quiet_us=self._quiet_us,
        )
        # settle what an earlier run left pending, in the first tick
        self._executor.adopt_pending(conn, self._floor_us)

    def _bootstrap(self, conn: psycopg.Connection[tuple[object, ...]], anchor: datetime) -> None:
        row = conn.execute("SELECT EXISTS (SELECT 1 FROM accounts)").fetchone()
        if row is not None and row[0]:
            return
        tables = build_population(
            self.settings.population, self.settings.seed, anchor - timedelta(days=1)
        )
        with conn.transaction(), bulk_load_mode(conn):
            write_population(conn, tables)
            copy_table(conn, "ledger_entries", opening_ledger(tables))
        sync_id_sequences(conn)

    def close(self) -> None:
        """Move the id sequences past the generated ids and disconnect."""
        if self._conn is None:
            return
        try:
            idle = self._conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            if idle and not self._conn.broken:
                sync_id_sequences(self._conn)
        finally:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Workload:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the clock -----------------------------------------------------------------

    @property
    def now(self) -> datetime:
        """The simulated time the next tick starts at."""
        return from_us(self._anchor_us + self._tick * self._tick_us)

    @property
    def simulated_seconds(self) -> float:
        """Simulated time elapsed since the anchor."""
        return self._tick * self._tick_us / SECOND_US

    @property
    def _quiet_us(self) -> int:
        """How long an account stays out of fraud scenarios after one (or after opening)."""
        return int(self.settings.shapes.quiet_seconds * SECOND_US)

    def _schedule(self, due_us: int, action: Action) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(due_us, self._floor_us), self._seq, action))

    def _draw_count(self, kind: str, expected: float) -> int:
        self._accumulated[kind] += expected
        count = int(self._accumulated[kind])
        self._accumulated[kind] -= count
        return count

    # -- one tick ------------------------------------------------------------------

    def step(self) -> int:
        """Run the next tick now: build its changes, commit them. Returns the row changes."""
        conn = self._connection()
        batch = self._build_tick()
        if not batch.empty():
            batch.write(conn)
        return batch.changes()

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None:
            raise ConfigError("the workload is not open", "call open() or use it as a context")
        return self._conn

    def _build_tick(self) -> TickBatch:
        """Draw the next tick's changes (and count them); the caller writes them."""
        start = self._anchor_us + self._tick * self._tick_us
        end = start + self._tick_us
        self._floor_us = end
        events: list[tuple[int, int, Action]] = []
        while self._heap and self._heap[0][0] < end:
            events.append(heapq.heappop(self._heap))
        if not self._draining:
            s = self.settings
            expected = s.rate * diurnal_factor(start, s.diurnal_amplitude) * self._tick_us / 1e6
            for kind, ratio, placeholder in (
                ("txn", 1.0, _NORMAL_TRANSACTION),
                ("login", s.login_ratio, _NORMAL_LOGIN),
                ("customer", s.new_account_ratio, _NEW_CUSTOMER),
            ):
                for _ in range(self._draw_count(kind, expected * ratio)):
                    self._seq += 1
                    events.append(
                        (start + self._rng.randrange(self._tick_us), self._seq, placeholder)
                    )
        events.sort(key=lambda event: (event[0], event[1]))
        batch = self._executor.start_tick()
        for at, _, action in events:
            self._executor.apply(at, action)
            if isinstance(action, NormalTransaction):  # fraud comes every n-th normal one
                self._count_towards_fraud()
        if not batch.empty():
            self.stats.commits += 1
        self._tick += 1
        self.stats.ticks += 1
        self.stats.changes += batch.changes()
        self.stats.envelope_breaches = self.sampler.breaches
        return batch

    # -- fraud scenarios ---------------------------------------------------------------

    def _count_towards_fraud(self) -> None:
        every = self.settings.fraud_every
        if every <= 0:
            return
        self._since_fraud += 1
        if self._since_fraud >= every:
            self._since_fraud = 0
            self.inject(self._next_family())

    def _next_family(self) -> FraudFamily:
        if not self._family_queue:
            order = list(FraudFamily)
            rng = random.Random(f"{self.settings.seed}:families:{self._family_round}")  # noqa: S311
            rng.shuffle(order)
            self._family_round += 1
            self._family_queue = order
        return self._family_queue.pop(0)

    def inject(self, family: FraudFamily) -> int | None:
        """Schedule one incident of ``family`` starting at the next tick.

        Returns its scenario id, or None when no account is eligible (counted
        in ``stats.skipped``). Its ground-truth row is written with its last
        change.
        """
        scenario_id = self._executor.peek_id("fraud_ground_truth")
        rng = random.Random(f"{self.settings.seed}:scenario:{scenario_id}")  # noqa: S311
        scenario = INJECTORS[family](self.kit, rng, self._floor_us)
        if scenario is None:
            self.stats.skipped[family] += 1
            return None
        self._executor.take_id("fraud_ground_truth")
        for when, action in scenario.events:
            self._schedule(when, action)
        scenario.account.quiet_until_us = scenario.ended_us + self._quiet_us
        self._schedule(
            scenario.ended_us,
            Truth(
                scenario_id,
                family,
                scenario.account,
                scenario.card_id,
                scenario.started_us,
                scenario.detail,
            ),
        )
        self.stats.scenarios[family] += 1
        return scenario_id

    # -- running -------------------------------------------------------------------------

    def drain(self, max_ticks: int = 1_000_000) -> None:
        """Stop new traffic and run ticks until every scheduled change is written.

        Leaves no pending transaction and no half-written scenario behind.
        """
        self._draining = True
        try:
            ticks = 0
            while self._heap and ticks < max_ticks:
                self.step()
                ticks += 1
        finally:
            self._draining = False

    def run(
        self,
        stop: threading.Event | None = None,
        duration: float | None = None,
        on_tick: Callable[[Workload], None] | None = None,
    ) -> WorkloadStats:
        """Run ticks paced to the wall clock until ``stop`` is set or ``duration`` passes.

        ``duration`` is wall-clock seconds. A tick that runs late is followed
        at once by the next (the bucket catches up); ``stats.behind_s`` says by
        how much the last one was late. ``on_tick`` is called after each tick.
        """
        stop = stop or threading.Event()
        tick_s = self._tick_us / SECOND_US / self.settings.speed
        wall0 = time.monotonic()
        first_tick = self._tick
        deadline = wall0 + duration if duration is not None else None
        writer = BatchWriter(self._connection())
        try:
            while not stop.is_set():
                slot = wall0 + (self._tick - first_tick + 1) * tick_s
                wait = slot - time.monotonic()
                if deadline is not None and (slot > deadline or time.monotonic() >= deadline):
                    break
                if wait > 0 and stop.wait(wait):
                    break
                batch = self._build_tick()
                if not batch.empty():
                    writer.submit(batch)
                self.stats.behind_s = max(0.0, time.monotonic() - slot)
                if on_tick is not None:
                    on_tick(self)
        finally:
            writer.close()
        return self.stats

"""The rules lane: the in-memory rules evaluated on every decoded batch, on a thread of
their own, committing their alerts in small transactions of their own.

The source thread hands each decoded :class:`ChangeBatch` to :meth:`RulesLane.offer`
before the engine's queue; the lane's thread takes every batch waiting, evaluates them
merged into one (:func:`evaluation_groups`) with every rule of ``rules.in_memory``
(:mod:`headrace.rules.lane.velocity`, ...), and commits once on its own connection:
the alerts (``headrace.alerts`` and the delivery outbox, as the engine writes them; ids
from the store's shared allocator), the incidents touched, and its position
(:mod:`headrace.rules.lane.store`). The alerts then go to the delivery threads at once.
Commit-to-alert is the source's cut plus the evaluation plus one small commit, not an
engine batch.

Exactly once, across crashes:

- The engine never commits a batch the lane has not committed (:meth:`wait_for`, called
  by the engine just before its COMMIT): the lane's position is always at or after the
  store's, so the slot (confirmed up to the store's position) still holds everything
  the lane has not recorded.
- On start, each rule's state is rebuilt from the store's mirrors (at the store's
  position) and its record (watermark, incidents); the batches from the store's
  position up to the lane's are evaluated again to rebuild the windows, and their
  alerts, already written, are dropped.
- An alert is written in the transaction that moves the lane's position past its
  batch: it is never written twice, and delivery is the engine's (outbox, idempotency
  keys).

Both the lane and the engine merge the batches waiting for them, each by its own
backlog: the SQL rules' semantics depend on batch boundaries in corner cases (net
change per batch, the watermark before a batch), so the lane's alerts equal the SQL
rule's given the same batches (``tests/rules/lane_harness.py``), not necessarily in a
live run.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from headrace.alerts import handoff
from headrace.alerts.config import SinkConfig
from headrace.alerts.ids import AlertIds
from headrace.errors import HeadraceError
from headrace.rules.config import RulesConfig
from headrace.rules.lane.alert import LaneAlert
from headrace.rules.lane.evaluators import Evaluator, make_evaluator
from headrace.rules.lane.saved import RuleSaved
from headrace.rules.lane.store import LaneStore
from headrace.run.merge import can_join, merge_batches
from headrace.run.metrics import FreshnessHistogram
from headrace.source.changes import ChangeBatch
from headrace.store.duckdb.store import DuckDBStore

log = logging.getLogger("headrace.rules.lane")

RECORD_INTERVAL_S = 0.5
"""Longest time between two commits of the lane's position when no alert opened (an alert
is committed at once, and the position with it; the engine asks for it before its own
commits). One commit per source batch would cost the lane more than its evaluation."""
PRUNE_INTERVAL_S = 600.0
"""How often the lane deletes its outbox's rows delivered long enough ago."""
QUEUE_BATCHES = 256
"""Batches the source may hand over ahead of the lane (then it waits: backpressure)."""
DRAIN_BATCHES = 64
"""Batches evaluated into one commit at most."""


_WAKE = object()
"""Queued by the engine's :meth:`RulesLane.wait_for`: record the position now."""


class LaneError(HeadraceError):
    """The rules lane stopped on an error (the run stops with it)."""


@dataclass
class LaneStats:
    batches: int = 0
    """Source batches evaluated."""
    evaluations: int = 0
    """Passes of the rules: batches drained together are evaluated merged, in one."""
    commits: int = 0
    alerts: int = 0
    replayed: int = 0
    evaluate_s: float = 0.0
    commit_s: float = 0.0


class RulesLane:
    """The rules of ``rules.in_memory`` beside the engine (module docstring)."""

    def __init__(
        self,
        rules: RulesConfig,
        store: DuckDBStore,
        sinks: tuple[SinkConfig, ...],
        ids: AlertIds,
    ) -> None:
        self.names = list(rules.in_memory)
        self.deliver: Callable[[list[handoff.NewAlerts]], None] | None = None
        self.con = store.cursor()
        ids.register(self.con)
        self.ids = ids
        self._collected: list[handoff.NewAlerts] = []
        self._unwatch = handoff.watch(self.con, self._collected.append) if sinks else None
        self.lane_store = LaneStore(self.con, store.path, sinks, ids)
        self.lane_store.start_copies()
        saved = self.lane_store.load(self.names)
        self.evaluators: list[Evaluator] = []
        for name in self.names:
            evaluator = make_evaluator(name, rules)
            evaluator.seed(self.con, saved.rules.get(name))
            self.evaluators.append(evaluator)
        self.replay_until = saved.position or 0
        """Batches at or below it were evaluated and recorded before a restart."""
        self.committed = saved.position or 0
        """The lane's recorded position (every batch at or below it is in the store)."""
        self.stats = LaneStats()
        self.freshness = FreshnessHistogram()
        """Per change: its source commit -> the lane evaluated it, its alerts committed (ms)."""
        self._queue: queue.Queue[ChangeBatch | object | None] = queue.Queue(QUEUE_BATCHES)
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stopped = False
        self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
        self._pending: dict[str, RuleSaved] = {}
        """Records of evaluated batches not committed yet (no alert opened in them)."""
        self._pending_position = self.committed
        self._wanted = 0
        """Position the engine waits for (commit it now)."""
        self._last_record = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="headrace-rules-lane", daemon=True)
        log.info(
            "rules lane: %s in memory%s",
            ", ".join(self.names),
            f", recorded up to {saved.position}" if saved.position else "",
        )

    def start(self, deliver: Callable[[list[handoff.NewAlerts]], None] | None = None) -> RulesLane:
        """Start evaluating; ``deliver`` gets the alerts of each commit (the lane outbox's
        delivery: :meth:`headrace.alerts.delivery.AlertDelivery.hand_over`)."""
        self.deliver = deliver
        self._thread.start()
        return self

    # ------------------------------------------------------------ the source's side

    def offer(self, batch: ChangeBatch) -> None:
        """Hand a decoded batch over (the source thread; waits when the lane is behind)."""
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(batch, timeout=0.2)
                return
            except queue.Full:
                continue

    # ------------------------------------------------------------ the engine's side

    def before_engine_commit(self, con: duckdb.DuckDBPyConnection, position: int) -> None:
        """The engine's hook before it commits ``position`` (on its transaction ``con``):
        wait until the lane recorded it, and copy the lane's new alerts into the store."""
        self.wait_for(position)
        self.lane_store.copy_alerts(con)

    def wait_for(self, position: int) -> None:
        """Return once the lane recorded every batch up to ``position``; raise if the lane
        failed."""
        with self._cond:
            if self.committed < position:
                self._wanted = max(self._wanted, position)
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(_WAKE)  # record now, not at the next interval
            while self.committed < position:
                if self._error is not None or self._stopped:
                    break
                self._cond.wait(0.5)
        self._raise_if_failed()
        if self.committed < position:
            raise LaneError(
                f"the rules lane stopped before recording position {position}",
                "see the log for why; the run resumes from the store's position",
            )

    def stop(self) -> None:
        """Evaluate and record what was handed over, then stop; raise if the lane failed."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._unwatch is not None:
            self._unwatch()
        self.ids.forget(self.con)
        self.con.close()  # the file stays attached to the store's instance until it closes
        s = self.stats
        log.info(
            "rules lane: %s batches in %s evaluations (%s batches evaluated again after a "
            "restart), %s commits, %s alerts; evaluation %.1f s, commits %.1f s",
            s.batches,
            s.evaluations,
            s.replayed,
            s.commits,
            s.alerts,
            s.evaluate_s,
            s.commit_s,
        )
        self._raise_if_failed()

    def status(self) -> dict[str, object]:
        """For ``headrace status``: the rules, the recorded position, counts, freshness."""
        s = self.stats
        return {
            "rules": list(self.names),
            "position": self.committed,
            "batches": s.batches,
            "evaluations": s.evaluations,
            "commits": s.commits,
            "alerts": s.alerts,
            "evaluate_s": round(s.evaluate_s, 3),
            "commit_s": round(s.commit_s, 3),
            "freshness_histogram": self.freshness.to_list(),
            "failed": self._error is not None,
        }

    def _raise_if_failed(self) -> None:
        error = self._error
        if error is not None:
            raise LaneError(
                f"the rules lane failed: {type(error).__name__}: {error}",
                "the run stops; it resumes from the store's position, where the lane "
                "re-evaluates what it had not recorded",
            ) from error

    # ------------------------------------------------------------ the lane's thread

    def _loop(self) -> None:
        try:
            while True:
                try:
                    first = self._queue.get(timeout=RECORD_INTERVAL_S / 2)
                except queue.Empty:
                    self._record_if_due()
                    continue
                if first is None:
                    self._record_if_due(force=True)
                    return
                batches = [first] if isinstance(first, ChangeBatch) else []
                done = False
                while len(batches) < DRAIN_BATCHES:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        done = True
                        break
                    if isinstance(more, ChangeBatch):
                        batches.append(more)
                if batches:
                    self._evaluate(batches)
                self._record_if_due(force=done)
                if time.monotonic() >= self._next_prune:
                    self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
                    self.lane_store.prune(datetime.now(UTC))
                if done:
                    return
        except BaseException as exc:
            log.exception("rules lane failed")
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def _evaluate(self, batches: list[ChangeBatch]) -> None:
        """Evaluate; commit at once when alerts opened (with the position and records)."""
        started = time.perf_counter()
        alerts: list[LaneAlert] = []
        for group in evaluation_groups(batches, self.replay_until):
            batch = merge_batches(group)
            replayed = batch.position <= self.replay_until
            # A huge transaction (alone in its group) is evaluated a piece at a time, in
            # order; its position is recorded only after the last piece.
            for piece in batch.piece_batches(again=True):
                for evaluator in self.evaluators:
                    opened = evaluator.apply(piece)
                    if not replayed:
                        alerts.extend(opened)
            self.stats.batches += len(group)
            self.stats.evaluations += 1
            if replayed:
                self.stats.replayed += len(group)
        self._pending_position = max(self._pending_position, batches[-1].position)
        for evaluator in self.evaluators:
            self._pending[evaluator.name] = merged_record(
                self._pending.get(evaluator.name), evaluator.take_saved()
            )
        self.stats.evaluate_s += time.perf_counter() - started
        if alerts:
            self._record(alerts)
        evaluated_at = time.time()
        for batch in batches:
            if batch.position > self.replay_until:
                self.freshness.add_batch(batch, evaluated_at)

    def _record_if_due(self, *, force: bool = False) -> None:
        """Commit the position and records when the engine waits for them, when
        :data:`RECORD_INTERVAL_S` passed since the last commit, or at stop."""
        if self._pending_position <= self.committed:
            return
        due = time.monotonic() - self._last_record >= RECORD_INTERVAL_S
        if force or due or self._wanted > self.committed:
            self._record([])

    def _record(self, alerts: list[LaneAlert]) -> None:
        started = time.perf_counter()
        position = max(self.committed, self._pending_position)
        self.lane_store.commit(alerts, self._pending, position, datetime.now(UTC))
        self._pending = {}
        self._last_record = time.monotonic()
        self.stats.commit_s += time.perf_counter() - started
        self.stats.commits += 1
        self.stats.alerts += len(alerts)
        with self._cond:
            self.committed = position
            self._cond.notify_all()
        if self._collected:
            collected, self._collected[:] = list(self._collected), []
            if self.deliver is not None:
                self.deliver(collected)


def evaluation_groups(batches: list[ChangeBatch], replay_until: int) -> list[list[ChangeBatch]]:
    """The drained batches in runs of consecutive ones, each run evaluated as one merged
    batch: the same changes in the same order, as if the source had cut one larger
    batch, for one pass of every rule instead of one per batch (a backlog clears
    faster). A run stops where :func:`~headrace.run.merge.can_join` refuses (a table
    changes schema) and at ``replay_until``: batches at or below it are evaluated again
    after a restart only to rebuild the windows, their alerts dropped."""
    groups: list[list[ChangeBatch]] = []
    for batch in batches:
        if groups:
            group = groups[-1]
            replayed = group[-1].position <= replay_until
            if replayed == (batch.position <= replay_until) and can_join(group, batch):
                group.append(batch)
                continue
        groups.append([batch])
    return groups


def merged_record(held: RuleSaved | None, new: RuleSaved) -> RuleSaved:
    """Records not committed yet, and newer ones: the newest watermark and state, every
    incident touched."""
    if held is None:
        return new
    seen = {**held.last_seen, **new.last_seen}
    state = new.state if new.state is not None else held.state
    return RuleSaved(new.watermark_us, seen, state)

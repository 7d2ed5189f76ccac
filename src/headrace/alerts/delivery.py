"""Alert delivery: an outbox in the store, drained by one thread per sink.

How it works
    The engine writes each alert and one ``pending`` row per matching sink
    into ``headrace.alert_deliveries`` in the batch's transaction (the
    outbox). The same rows are handed to this object as they are written
    (:mod:`headrace.alerts.handoff`) and held until the store publishes the
    commit; then each sink's thread gets its share and sends it at once,
    with no query (:mod:`headrace.alerts.worker`). Each attempt is recorded in
    its outbox row (``attempts``, ``last_attempt_at``, ``last_error``;
    ``state`` becomes ``delivered``, stays ``pending`` with
    ``next_attempt_at`` pushed back by exponential backoff, or becomes
    ``failed`` after ``retry.attempts`` attempts or an answer that will not
    change), one ``UPDATE`` per round after the sends. Retries, and whatever
    a previous process left, are read from the outbox.

Never blocks ingestion
    The writer only appends to the outbox (and hands the rows over, which is
    a list append); sending happens on other threads, and a slow or dead
    receiver only delays its own sink.

Guarantee (precisely)
    - An alert reaches each matching sink at least once, unless every
      attempt fails; then its row says ``failed`` with the last error.
    - Nothing is sent before the transaction that wrote it committed: what
      was handed over is sent only after the store published a commit, and
      all of it is dropped (the outbox is read instead) when any of the
      store's transactions failed meanwhile.
    - Once a delivery is recorded ``delivered`` (committed right after the
      round's sends), it is never sent again, by this process or after a
      restart.
    - A second copy can be sent only if the process stops between the
      receiver's success answer and that record (the end of the round of
      sends), or if the receiver answers after its timeout. That copy
      carries the same ``Idempotency-Key`` header (webhook, Slack) or
      ``Message-ID`` (email), so a receiver that remembers keys sees the
      alert once.
    - One alert per incident is the rules' job (dedup key); the outbox is
      keyed by alert, so an incident is never delivered as two alerts.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb

from headrace.alerts import handoff
from headrace.alerts.config import DEFAULT_KEEP_DELIVERED, SinkConfig
from headrace.alerts.sinks import make_sink
from headrace.alerts.store import (
    ALERT_COLUMNS,
    DELIVERIES,
    STORE_OUTBOX,
    Outbox,
    deliveries_seen,
)
from headrace.alerts.worker import Attempt, HandedOver, SinkWorker
from headrace.store.base import CommitEvent
from headrace.store.duckdb.store import DuckDBStore

log = logging.getLogger("headrace.alerts")

ALERT_ID = ALERT_COLUMNS.index("id")


class AlertDelivery:
    """Sends the alerts of the outbox through the configured sinks (module docstring)."""

    def __init__(
        self,
        store: DuckDBStore,
        sinks: Sequence[SinkConfig],
        poll_interval: float = 1.0,
        outbox: Outbox = STORE_OUTBOX,
    ) -> None:
        self.store = store
        self.outbox = outbox
        """The tables it drains: the engine's (handed over at the store's commits), or the
        rules lane's (handed over by the lane: :meth:`hand_over`)."""
        self.configs = list(sinks)
        self.poll_interval = poll_interval
        """Longest time between two reads of the outbox (retries of an earlier process,
        anything not handed over)."""
        self._stop = threading.Event()
        self._wakes = {config.name: threading.Event() for config in self.configs}
        self._threads: list[threading.Thread] = []
        self._workers: list[SinkWorker] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._unwatch: Callable[[], None] | None = None
        self.attempts: list[Attempt] = []
        """Every attempt made by this process (newest last), for tests and status."""
        self._lock = threading.Lock()
        self._held: list[handoff.NewAlerts] = []
        """Written in the writer's open transaction; sent once a commit is published."""
        self._handed: dict[str, list[HandedOver]] = {name: [] for name in self._wakes}
        self._failed_seen = 0

    @classmethod
    def from_config(cls, config: Any, store: DuckDBStore) -> AlertDelivery | None:
        """The delivery of ``config.sinks``, or None when there are none."""
        sinks = list(getattr(config, "sinks", None) or ())
        return cls(store, sinks) if sinks else None

    def start(self) -> AlertDelivery:
        self._failed_seen = self.store.failed_transactions
        if self.outbox == STORE_OUTBOX:
            self._unwatch = handoff.watch(self.store.writer, self._offered)
            self._unsubscribe = self.store.subscribe(self._on_commit)
        for config in self.configs:
            worker = SinkWorker(
                make_sink(config),
                self.store.cursor(),
                wake=self._wakes[config.name],
                stop=self._stop,
                take=functools.partial(self._take, config.name),
                poll_interval=self.poll_interval,
                on_attempt=self._attempted,
                outbox=self.outbox,
            )
            thread = threading.Thread(
                target=self._run,
                args=(worker,),
                name=f"headrace-alerts-{config.name}"
                + ("" if self.outbox == STORE_OUTBOX else "-lane"),
                daemon=True,
            )
            thread.start()
            self._workers.append(worker)
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop after the attempts in flight (each bounded by its sink's timeout)."""
        self._stop.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._unwatch is not None:
            self._unwatch()
        for wake in self._wakes.values():
            wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            log.info("%s", summary(worker))

    def __enter__(self) -> AlertDelivery:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wake(self) -> None:
        """Read the outbox now (e.g. after rows were written without a handover)."""
        for worker in self._workers:
            worker.resync()

    def after_commit_ms(self) -> dict[str, list[float]]:
        """Per sink, for each alert sent from the commit handover: milliseconds from
        the commit's publication to the sink's answer (the delivery's own latency)."""
        return {worker.sink.name: list(worker.after_commit_ms) for worker in self._workers}

    # ------------------------------------------------------------ handover

    def _offered(self, new: handoff.NewAlerts) -> None:
        """In the writer's thread, inside its transaction: hold until the commit."""
        with self._lock:
            self._held.append(new)

    def _on_commit(self, event: CommitEvent) -> None:
        """In the writer's thread, right after a commit: hand what it wrote to the sinks."""
        with self._lock:
            held, self._held = self._held, []
            failed = self.store.failed_transactions
            if failed != self._failed_seen:
                # Some of ``held`` may come from a transaction that rolled back.
                self._failed_seen = failed
                held = []
                resync = True
            else:
                resync = False
        self.hand_over(held)
        if resync:
            self.wake()

    def hand_over(self, committed: Sequence[handoff.NewAlerts]) -> None:
        """Send alerts whose transaction committed (the rules lane calls this after its
        own commits; the writer's come through :meth:`_on_commit`)."""
        committed_at = time.time()
        woken: set[str] = set()
        with self._lock:
            for new in committed:
                rows = {int(row[ALERT_ID]): row for row in new.alerts}
                for alert_id, sink, key in new.deliveries:
                    handed = self._handed.get(str(sink))
                    row = rows.get(int(alert_id))
                    if handed is not None and row is not None:
                        handed.append(HandedOver(row, str(key), committed_at))
                        woken.add(str(sink))
        for name in woken:
            self._wakes[name].set()

    def _take(self, sink: str) -> list[HandedOver]:
        with self._lock:
            handed, self._handed[sink] = self._handed[sink], []
        return handed

    def _attempted(self, attempt: Attempt) -> None:
        with self._lock:
            self.attempts.append(attempt)

    @staticmethod
    def _run(worker: SinkWorker) -> None:
        try:
            worker.run()
        finally:
            worker.sink.close()
            worker.cursor.close()


SUMMARY = re.compile(
    r"alert delivery to (?P<sink>\S+): (?P<sent>\d+) sent at commit, answered p50 "
    r"(?P<p50>[\d.]+) ms, p99 (?P<p99>[\d.]+) ms, max (?P<max>[\d.]+) ms after the commit"
)
"""Matches the latency part of :func:`summary` (benchmarks read it from the log)."""


def summary(worker: SinkWorker) -> str:
    """One line on a sink's deliveries in this process (logged at stop)."""
    name = worker.sink.name
    latencies = sorted(worker.after_commit_ms)
    outbox = f"{worker.from_outbox} attempt(s) from the outbox"
    if not latencies:
        return f"alert delivery to {name}: none sent at commit; {outbox}"

    def rank(fraction: float) -> float:
        return latencies[max(0, math.ceil(fraction * len(latencies)) - 1)]

    return (
        f"alert delivery to {name}: {len(latencies)} sent at commit, answered p50 "
        f"{rank(0.5):.1f} ms, p99 {rank(0.99):.1f} ms, max {latencies[-1]:.1f} ms after "
        f"the commit; {outbox}"
    )


def delivery_status(store: DuckDBStore) -> list[dict[str, Any]]:
    """Per sink and state: deliveries, attempts, the last error (from the outbox)."""
    cursor = store.cursor()
    try:
        source = deliveries_seen(cursor)
    finally:
        cursor.close()
    table = store.query(
        f"""SELECT sink, state, count(*) AS deliveries, sum(attempts) AS attempts,
                   max(last_attempt_at) AS last_attempt_at,
                   arg_max(last_error, last_attempt_at) AS last_error
            FROM {source} GROUP BY sink, state ORDER BY sink, state"""
    )
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


# ------------------------------------------------------------ visibility, retention

RECENT_FAILURES = 50
"""How many failed deliveries :func:`recent_failures` returns by default."""


def _iso(value: object) -> str | None:
    return value.astimezone(UTC).isoformat() if isinstance(value, datetime) else None


def sink_summaries(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Per sink, from the outbox: ``delivered``, ``pending`` and ``failed`` counts,
    ``last_attempt_at``, ``last_error`` (the newest error of any attempt, retries
    included) and ``last_failed_error`` (the newest error of a given-up delivery).

    Reads through ``cursor`` (a reader's, never the writer's: one scan of the
    outbox, which retention keeps small); empty when the store has no outbox.
    Times are ISO 8601 UTC text, ready for JSON.
    """
    try:
        rows = cursor.execute(
            f"""SELECT sink,
                       count(*) FILTER (WHERE state = 'delivered'),
                       count(*) FILTER (WHERE state = 'pending'),
                       count(*) FILTER (WHERE state = 'failed'),
                       max(last_attempt_at),
                       arg_max(last_error, last_attempt_at) FILTER (WHERE last_error IS NOT NULL),
                       arg_max(last_error, last_attempt_at) FILTER (WHERE state = 'failed')
                FROM {deliveries_seen(cursor)} GROUP BY sink ORDER BY sink"""
        ).fetchall()
    except duckdb.CatalogException:  # no alerts configured: no outbox
        return []
    return [
        {
            "sink": str(r[0]),
            "delivered": int(r[1]),
            "pending": int(r[2]),
            "failed": int(r[3]),
            "last_attempt_at": _iso(r[4]),
            "last_error": None if r[5] is None else str(r[5]),
            "last_failed_error": None if r[6] is None else str(r[6]),
        }
        for r in rows
    ]


def recent_failures(
    cursor: duckdb.DuckDBPyConnection, limit: int = RECENT_FAILURES
) -> list[dict[str, Any]]:
    """The newest given-up deliveries: ``alert_id, sink, attempts, last_error,
    last_attempt_at`` (newest first); empty when the store has no outbox."""
    try:
        rows = cursor.execute(
            f"""SELECT alert_id, sink, attempts, last_error, last_attempt_at
                FROM {deliveries_seen(cursor)} WHERE state = 'failed'
                ORDER BY last_attempt_at DESC NULLS LAST, alert_id DESC, sink LIMIT ?""",
            [limit],
        ).fetchall()
    except duckdb.CatalogException:
        return []
    return [
        {
            "alert_id": int(r[0]),
            "sink": str(r[1]),
            "attempts": int(r[2]),
            "last_error": None if r[3] is None else str(r[3]),
            "last_attempt_at": _iso(r[4]),
        }
        for r in rows
    ]


def prune_deliveries(
    con: duckdb.DuckDBPyConnection, older_than: datetime, sink: str | None = None
) -> int:
    """Delete the outbox rows delivered before ``older_than`` (of ``sink``, or of every
    sink); returns how many. Pending and failed rows are never deleted here: a
    failed delivery stays visible as long as its alert.

    Runs on the writer, inside the caller's transaction (the delivery threads only
    update pending rows, so they never touch the rows deleted).
    """
    condition = "" if sink is None else " AND sink = ?"
    params: list[object] = [older_than] if sink is None else [older_than, sink]
    rows = con.execute(
        f"DELETE FROM {DELIVERIES} WHERE state = 'delivered' AND delivered_at < ?{condition}",
        params,
    ).fetchall()
    return int(rows[0][0]) if rows else 0


def prune_delivered(
    con: duckdb.DuckDBPyConnection,
    sinks: Sequence[SinkConfig],
    now: datetime,
    outbox: Outbox = STORE_OUTBOX,
) -> int:
    """Apply every sink's ``keep_delivered`` in one statement (rows of a sink no longer
    configured keep the default); returns the rows deleted. Does nothing (and runs
    no statement) when no sink is configured, since then there may be no outbox.
    """
    if not sinks:
        return 0
    cutoffs = " ".join("WHEN ? THEN CAST(? AS TIMESTAMPTZ)" for _ in sinks)
    params: list[object] = []
    for sink in sinks:
        params += [sink.name, now - sink.keep_delivered]
    params.append(now - DEFAULT_KEEP_DELIVERED)
    rows = con.execute(
        f"""DELETE FROM {outbox.deliveries} WHERE state = 'delivered'
            AND delivered_at < CASE sink {cutoffs} ELSE CAST(? AS TIMESTAMPTZ) END""",
        params,
    ).fetchall()
    return int(rows[0][0]) if rows else 0

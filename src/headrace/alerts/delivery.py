"""Alert delivery: an outbox in the store, drained by one thread per sink.

How it works
    The engine writes each alert and one ``pending`` row per matching sink
    into ``headrace.alert_deliveries`` in the batch's transaction (the
    outbox). Here, one thread per sink, with its own DuckDB cursor, picks
    the sink's pending rows whose ``next_attempt_at`` has come, sends them
    in alert order, and records each attempt in its row right after it
    (``attempts``, ``last_attempt_at``, ``last_error``; ``state`` becomes
    ``delivered``, stays ``pending`` with ``next_attempt_at`` pushed back by
    exponential backoff, or becomes ``failed`` after ``retry.attempts``
    attempts or an answer that will not change). Threads wake up on every
    committed batch, so delivery starts within milliseconds of the commit.

Never blocks ingestion
    The writer only appends to the outbox; sending happens on other
    threads, and a slow or dead receiver only delays its own sink.

Guarantee (precisely)
    - An alert reaches each matching sink at least once, unless every
      attempt fails; then its row says ``failed`` with the last error.
    - Once a delivery is recorded ``delivered`` (committed right after the
      receiver's success answer), it is never sent again, by this process or
      after a restart.
    - A second copy can be sent only if the process stops between the
      receiver's success answer and that record (a few milliseconds), or if
      the receiver answers after its timeout. That copy carries the same
      ``Idempotency-Key`` header (webhook, Slack) or ``Message-ID`` (email),
      so a receiver that remembers keys sees the alert once.
    - One alert per incident is the rules' job (dedup key); the outbox is
      keyed by alert, so an incident is never delivered as two alerts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb

from headrace.alerts.config import DEFAULT_KEEP_DELIVERED, RetryConfig, SinkConfig
from headrace.alerts.message import Alert
from headrace.alerts.sinks import DeliveryFailed, Sink, make_sink
from headrace.alerts.store import ALERTS, DELIVERIES
from headrace.store.base import CommitEvent
from headrace.store.duckdb.store import DuckDBStore

log = logging.getLogger("headrace.alerts")

_BATCH = 50
_RECORD_TRIES = 5


@dataclass(frozen=True)
class Attempt:
    """The outcome of one delivery attempt, as recorded."""

    alert_id: int
    sink: str
    state: str
    attempts: int
    error: str | None


def backoff(retry: RetryConfig, attempts: int) -> timedelta:
    """Wait after the ``attempts``-th failed attempt: ``backoff * 2^(attempts-1)``, capped."""
    seconds = retry.backoff.total_seconds() * 2 ** max(0, attempts - 1)
    return timedelta(seconds=min(seconds, retry.max_backoff.total_seconds()))


class AlertDelivery:
    """Drains the outbox through the configured sinks (module docstring)."""

    def __init__(
        self, store: DuckDBStore, sinks: Sequence[SinkConfig], poll_interval: float = 1.0
    ) -> None:
        self.store = store
        self.configs = list(sinks)
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._wakes = {config.name: threading.Event() for config in self.configs}
        self._threads: list[threading.Thread] = []
        self._unsubscribe: Any = None
        self.attempts: list[Attempt] = []
        """Every attempt made by this process (newest last), for tests and status."""
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Any, store: DuckDBStore) -> AlertDelivery | None:
        """The delivery of ``config.sinks``, or None when there are none."""
        sinks = list(getattr(config, "sinks", None) or ())
        return cls(store, sinks) if sinks else None

    def start(self) -> AlertDelivery:
        self._unsubscribe = self.store.subscribe(self._on_commit)
        for config in self.configs:
            thread = threading.Thread(
                target=self._run,
                args=(make_sink(config),),
                name=f"headrace-alerts-{config.name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop after the attempts in flight (each bounded by its sink's timeout)."""
        self._stop.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        for wake in self._wakes.values():
            wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> AlertDelivery:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wake(self) -> None:
        """Look at the outbox now (e.g. after a commit)."""
        for wake in self._wakes.values():
            wake.set()

    def _on_commit(self, event: CommitEvent) -> None:
        self.wake()

    # -------------------------------------------------------------- workers

    def _run(self, sink: Sink) -> None:
        wake = self._wakes[sink.name]
        cursor = self.store.cursor()
        try:
            while not self._stop.is_set():
                wake.clear()
                try:
                    self._drain(cursor, sink)
                    wait = self._next_wait(cursor, sink.name)
                except duckdb.Error as exc:
                    log.warning(
                        "alert delivery to %s: reading the outbox failed: %s", sink.name, exc
                    )
                    wait = self.poll_interval
                wake.wait(wait)
        finally:
            sink.close()
            cursor.close()

    def _drain(self, cursor: duckdb.DuckDBPyConnection, sink: Sink) -> None:
        """Send every due delivery of ``sink``, oldest alert first."""
        while not self._stop.is_set():
            rows = cursor.execute(
                f"""SELECT d.alert_id, d.attempts, d.idempotency_key, a.rule, a.kind, a.status,
                           a.severity, a.account_id, a.key, a.summary, a.started_at,
                           a.detected_at, a.event_at, a.commit_ts, a.latency_ms, a.payload
                    FROM {DELIVERIES} d JOIN {ALERTS} a ON a.id = d.alert_id
                    WHERE d.sink = ? AND d.state = 'pending' AND d.next_attempt_at <= ?
                    ORDER BY d.alert_id LIMIT {_BATCH}""",
                [sink.name, datetime.now(UTC)],
            ).fetchall()
            if not rows:
                return
            for row in rows:
                if self._stop.is_set():
                    return
                self._attempt(cursor, sink, row)

    def _attempt(self, cursor: duckdb.DuckDBPyConnection, sink: Sink, row: tuple[Any, ...]) -> None:
        alert = Alert(
            id=int(row[0]),
            idempotency_key=str(row[2]),
            rule=str(row[3]),
            kind=str(row[4]),
            status=str(row[5]),
            severity=str(row[6]),
            account_id=None if row[7] is None else int(row[7]),
            key=str(row[8]),
            summary=None if row[9] is None else str(row[9]),
            started_at=row[10],
            detected_at=row[11],
            event_at=row[12],
            commit_ts=row[13],
            latency_ms=None if row[14] is None else float(row[14]),
            payload=json.loads(str(row[15])) if row[15] is not None else {},
        )
        attempts = int(row[1]) + 1
        retry = sink.config.retry
        error: str | None = None
        try:
            sink.send(alert)
            state = "delivered"
        except DeliveryFailed as exc:
            error = exc.reason
            state = "pending" if exc.retry and attempts < retry.attempts else "failed"
        except Exception as exc:  # a bug in a sink must not kill its thread
            log.exception("alert delivery to %s raised", sink.name)
            error = f"{type(exc).__name__}: {exc}"
            state = "pending" if attempts < retry.attempts else "failed"
        now = datetime.now(UTC)
        self._record(
            cursor,
            alert_id=alert.id,
            sink=sink.name,
            state=state,
            attempts=attempts,
            now=now,
            error=error,
            retry=retry,
        )
        outcome = Attempt(alert.id, sink.name, state, attempts, error)
        with self._lock:
            self.attempts.append(outcome)
        if state == "failed":
            log.error(
                "alert %d not delivered to %s after %d attempt(s): %s",
                alert.id,
                sink.name,
                attempts,
                error,
            )
        elif error is not None:
            log.warning(
                "alert %d: attempt %d to %s failed (%s); retrying",
                alert.id,
                attempts,
                sink.name,
                error,
            )

    def _record(
        self,
        cursor: duckdb.DuckDBPyConnection,
        *,
        alert_id: int,
        sink: str,
        state: str,
        attempts: int,
        now: datetime,
        error: str | None,
        retry: RetryConfig,
    ) -> None:
        next_at = now + backoff(retry, attempts) if state == "pending" else None
        delivered_at = now if state == "delivered" else None
        for tries in range(_RECORD_TRIES):
            try:
                cursor.execute(
                    f"""UPDATE {DELIVERIES} SET state = ?, attempts = ?, last_attempt_at = ?,
                           next_attempt_at = ?, delivered_at = ?, last_error = ?
                        WHERE alert_id = ? AND sink = ?""",
                    [state, attempts, now, next_at, delivered_at, error, alert_id, sink],
                )
                return
            except duckdb.Error as exc:  # e.g. a conflict with a concurrent CHECKPOINT
                if tries == _RECORD_TRIES - 1:
                    log.error(
                        "alert %d: recording its delivery to %s failed: %s", alert_id, sink, exc
                    )
                    return
                time.sleep(0.05 * (tries + 1))

    def _next_wait(self, cursor: duckdb.DuckDBPyConnection, sink: str) -> float:
        rows = cursor.execute(
            f"SELECT min(next_attempt_at) FROM {DELIVERIES} WHERE sink = ? AND state = 'pending'",
            [sink],
        ).fetchall()
        due = rows[0][0] if rows else None
        if due is None:
            return self.poll_interval
        seconds = float((due - datetime.now(UTC)).total_seconds())
        return max(0.0, min(self.poll_interval, seconds))


def delivery_status(store: DuckDBStore) -> list[dict[str, Any]]:
    """Per sink and state: deliveries, attempts, the last error (from the outbox)."""
    table = store.query(
        f"""SELECT sink, state, count(*) AS deliveries, sum(attempts) AS attempts,
                   max(last_attempt_at) AS last_attempt_at,
                   arg_max(last_error, last_attempt_at) AS last_error
            FROM {DELIVERIES} GROUP BY sink, state ORDER BY sink, state"""
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
                FROM {DELIVERIES} GROUP BY sink ORDER BY sink"""
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
                FROM {DELIVERIES} WHERE state = 'failed'
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
    con: duckdb.DuckDBPyConnection, sinks: Sequence[SinkConfig], now: datetime
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
        f"""DELETE FROM {DELIVERIES} WHERE state = 'delivered'
            AND delivered_at < CASE sink {cutoffs} ELSE CAST(? AS TIMESTAMPTZ) END""",
        params,
    ).fetchall()
    return int(rows[0][0]) if rows else 0

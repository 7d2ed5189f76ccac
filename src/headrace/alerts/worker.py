"""One sink's delivery loop: send what was handed over at commit, retry from the outbox.

Hot path
    The alerts a batch wrote come from the commit event (see
    :mod:`headrace.alerts.handoff`), already read: the thread sends them
    right away, with no query. The outcomes are recorded afterwards, all
    the round's in one ``UPDATE`` (a statement costs milliseconds whatever
    its size, and it must not stand between a commit and the sends).

The outbox, for everything else
    The thread reads the sink's due ``pending`` rows of the outbox (the
    durable truth) when it starts (what an earlier process left), when a
    retry falls due, when the store had a failed transaction (what was
    handed over may not have committed), when asked (:meth:`SinkWorker.resync`),
    and at least every ``poll_interval`` as a safety net.

Never twice in one process
    The worker remembers how many attempts it made per alert. A handed-over
    alert it already attempted is skipped, and so is an outbox row showing
    fewer attempts than it made (its record is not written yet); an outbox
    row is read in alert-id pages, so a row whose record cannot be written
    is not read again and again.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb

from headrace.alerts.config import RetryConfig
from headrace.alerts.message import Alert
from headrace.alerts.sinks import DeliveryFailed, Sink
from headrace.alerts.store import ALERT_COLUMNS, STORE_OUTBOX, Outbox

log = logging.getLogger("headrace.alerts")

PAGE = 50
"""Outbox rows read per query."""
REMEMBERED = 10_000
"""Alerts whose attempt count a worker remembers (far more than can be in flight)."""
LATENCIES_KEPT = 100_000
"""Latencies a worker keeps for its summary."""
RECORD_RETRY_S = 0.1
"""Wait before writing delivery records again after the store refused them."""

_COLUMN = {name: index for index, name in enumerate(ALERT_COLUMNS)}
_OUTBOX_SELECT = ", ".join(f"a.{name}" for name in ALERT_COLUMNS)


@dataclass(frozen=True)
class Attempt:
    """The outcome of one delivery attempt, as recorded."""

    alert_id: int
    sink: str
    state: str
    attempts: int
    error: str | None


@dataclass(frozen=True)
class HandedOver:
    """A committed alert for one sink, from the commit event: its row and outbox key."""

    row: tuple[Any, ...]
    """The ``headrace.alerts`` row, in :data:`ALERT_COLUMNS` order."""
    idempotency_key: str
    committed_at: float
    """Unix time the commit was published (for the latency in the debug log)."""


@dataclass(frozen=True)
class _Record:
    attempts: int
    state: str
    at: datetime
    next_at: datetime | None
    error: str | None


def backoff(retry: RetryConfig, attempts: int) -> timedelta:
    """Wait after the ``attempts``-th failed attempt: ``backoff * 2^(attempts-1)``, capped."""
    seconds = retry.backoff.total_seconds() * 2 ** max(0, attempts - 1)
    return timedelta(seconds=min(seconds, retry.max_backoff.total_seconds()))


def alert_from_row(row: Sequence[Any], idempotency_key: str) -> Alert:
    """The :class:`Alert` of a ``headrace.alerts`` row in :data:`ALERT_COLUMNS` order."""

    def value(name: str) -> Any:
        return row[_COLUMN[name]]

    account, summary, latency, payload = (
        value("account_id"),
        value("summary"),
        value("latency_ms"),
        value("payload"),
    )
    return Alert(
        id=int(value("id")),
        idempotency_key=idempotency_key,
        rule=str(value("rule")),
        kind=str(value("kind")),
        status=str(value("status")),
        severity=str(value("severity")),
        account_id=None if account is None else int(account),
        key=str(value("key")),
        summary=None if summary is None else str(summary),
        started_at=value("started_at"),
        detected_at=value("detected_at"),
        event_at=value("event_at"),
        commit_ts=value("commit_ts"),
        latency_ms=None if latency is None else float(latency),
        payload=json.loads(str(payload)) if payload is not None else {},
    )


class SinkWorker:
    """The loop of one sink's thread (module docstring)."""

    def __init__(
        self,
        sink: Sink,
        cursor: duckdb.DuckDBPyConnection,
        *,
        wake: threading.Event,
        stop: threading.Event,
        take: Callable[[], list[HandedOver]],
        poll_interval: float,
        on_attempt: Callable[[Attempt], None],
        outbox: Outbox = STORE_OUTBOX,
    ) -> None:
        self.sink = sink
        self.cursor = cursor
        self.outbox = outbox
        """The tables this worker reads and records in (the store's, or the rules lane's)."""
        self.wake = wake
        self.stop = stop
        self.take = take
        """Returns (and forgets) what was handed over for this sink since the last call."""
        self.poll_interval = poll_interval
        self.on_attempt = on_attempt
        self._resync = threading.Event()
        self._resync.set()  # at start: what an earlier process left pending
        self._last_read = 0.0
        self._retries: list[float] = []
        """Unix times at which a retry falls due (a heap)."""
        self._made: OrderedDict[int, int] = OrderedDict()
        """Attempts made per alert id (the newest :data:`REMEMBERED`)."""
        self._records: dict[int, _Record] = {}
        """Attempts not yet recorded in the outbox, by alert id."""
        self.after_commit_ms: deque[float] = deque(maxlen=LATENCIES_KEPT)
        """Per alert sent from the commit handover: ms from the commit's publication
        to the sink's answer (the newest :data:`LATENCIES_KEPT`)."""
        self.from_outbox = 0
        """Attempts made from rows read in the outbox (start, retries, resyncs)."""

    def resync(self) -> None:
        """Read the outbox on the next round (e.g. a transaction failed: what was
        handed over may not have committed)."""
        self._resync.set()
        self.wake.set()

    def run(self) -> None:
        """Rounds until ``stop``; records what was attempted before returning."""
        try:
            while not self.stop.is_set():
                self.wake.clear()
                self._round()
                self.wake.wait(self._wait())
        finally:
            self._record_all(tries=5)

    # ---------------------------------------------------------------- rounds

    def _round(self) -> None:
        # What was handed over committed (the delivery drops what may not have): send
        # it first, and only then read the outbox if that is due, so a read never
        # stands between a commit and its sends. The read skips what was just sent
        # (recorded first, or remembered in ``_made``).
        for item in self.take():
            if self.stop.is_set():
                return
            alert_id = int(item.row[_COLUMN["id"]])
            if alert_id not in self._made:
                self._attempt(alert_from_row(item.row, item.idempotency_key), 0)
                self.after_commit_ms.append((time.time() - item.committed_at) * 1000)
        now = time.time()
        due = bool(self._retries) and self._retries[0] <= now
        if self._resync.is_set() or due or time.monotonic() - self._last_read >= self.poll_interval:
            self._resync.clear()
            while self._retries and self._retries[0] <= now:
                heapq.heappop(self._retries)
            self._read_outbox()
        self._record_all()

    def _wait(self) -> float:
        if self._records:  # the store refused them: try again soon
            return RECORD_RETRY_S
        wait = self.poll_interval - (time.monotonic() - self._last_read)
        if self._retries:
            wait = min(wait, self._retries[0] - time.time())
        return max(0.0, wait)

    def _read_outbox(self) -> None:
        """Send the sink's due pending rows, oldest alert first (read again on the next
        round if reading fails)."""
        self._record_all()  # the outbox should show what this process did
        name = self.sink.name
        self._last_read = time.monotonic()
        now = datetime.now(UTC)
        after = -1
        while not self.stop.is_set():
            try:
                rows = self.cursor.execute(
                    f"""SELECT d.attempts, d.idempotency_key, {_OUTBOX_SELECT}
                        FROM {self.outbox.deliveries} d
                        JOIN {self.outbox.alerts} a ON a.id = d.alert_id
                        WHERE d.sink = ? AND d.state = 'pending' AND d.next_attempt_at <= ?
                          AND d.alert_id > ?
                        ORDER BY d.alert_id LIMIT {PAGE}""",
                    [name, now, after],
                ).fetchall()
            except duckdb.Error as exc:
                log.warning("alert delivery to %s: reading the outbox failed: %s", name, exc)
                self._resync.set()
                return
            for row in rows:
                if self.stop.is_set():
                    break
                attempts, key, alert_row = int(row[0]), str(row[1]), row[2:]
                after = int(alert_row[_COLUMN["id"]])
                if self._made.get(after, 0) > attempts:
                    continue  # attempted since; its record is not in the outbox yet
                self._attempt(alert_from_row(alert_row, key), attempts)
                self.from_outbox += 1
            self._record_all()
            if len(rows) < PAGE:
                break

    # -------------------------------------------------------------- attempts

    def _attempt(self, alert: Alert, attempts_before: int) -> None:
        sink = self.sink
        attempts = attempts_before + 1
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
        next_at = now + backoff(retry, attempts) if state == "pending" else None
        self._records[alert.id] = _Record(attempts, state, now, next_at, error)
        self._made[alert.id] = attempts
        self._made.move_to_end(alert.id)
        while len(self._made) > REMEMBERED:
            self._made.popitem(last=False)
        if next_at is not None:
            heapq.heappush(self._retries, next_at.timestamp())
        self.on_attempt(Attempt(alert.id, sink.name, state, attempts, error))
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

    def _record_all(self, tries: int = 1) -> None:
        """Write every pending record in one ``UPDATE``; keep them when the store refuses
        (e.g. a conflict with a concurrent CHECKPOINT) for the next round."""
        if not self._records:
            return
        deliveries = self.outbox.deliveries
        records = list(self._records.items())
        row = (
            "("
            + ", ".join(
                f"CAST(? AS {t})"
                for t in ("BIGINT", "INTEGER", "TEXT", "TIMESTAMPTZ", "TIMESTAMPTZ", "TEXT")
            )
            + ")"
        )
        params: list[object] = []
        for alert_id, r in records:
            params += [alert_id, r.attempts, r.state, r.at, r.next_at, r.error]
        params.append(self.sink.name)
        for attempt in range(tries):
            try:
                self.cursor.execute(
                    f"""UPDATE {deliveries} SET state = v.state, attempts = v.attempts,
                           last_attempt_at = v.attempted_at, next_attempt_at = v.next_at,
                           delivered_at = CASE WHEN v.state = 'delivered' THEN v.attempted_at END,
                           last_error = v.error
                        FROM (VALUES {", ".join(row for _ in records)})
                             v(alert_id, attempts, state, attempted_at, next_at, error)
                        WHERE {deliveries}.alert_id = v.alert_id AND {deliveries}.sink = ?
                          AND {deliveries}.attempts < v.attempts""",
                    params,
                ).fetchall()
            except duckdb.Error as exc:
                if attempt == tries - 1:
                    log.log(
                        logging.ERROR if self.stop.is_set() else logging.WARNING,
                        "alert delivery to %s: recording %d attempt(s) failed (%s); %s",
                        self.sink.name,
                        len(records),
                        exc,
                        "a restart sends them again (same idempotency key)"
                        if self.stop.is_set()
                        else "trying again",
                    )
                    return
                time.sleep(0.05 * (attempt + 1))
                continue
            for alert_id, record in records:
                if self._records.get(alert_id) is record:
                    del self._records[alert_id]
            return

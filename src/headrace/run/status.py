"""The status of a pipeline: built by the runner about once a second, shown by ``headrace status``.

The running process writes it to ``<store>.status.json`` (atomically); when
no process runs, ``headrace status`` builds the same document from the store
itself (:func:`status_from_store`). Fields (all times UTC ISO 8601):

``phase``          starting, snapshot, streaming, stopping, stopped, failed
``position``       the durable source position (LSN as an integer and ``position_lsn`` text)
``lag_ms``         now - commit time of the oldest change received and not yet
                   visible in the store (0 when nothing waits)
``lag_bytes``      WAL the slot holds that is not confirmed yet (server's current
                   WAL position - the slot's confirmed position); includes WAL
                   records of no interest (they are passed with the next change
                   or heartbeat)
``freshness_ms``   p50 / p99 / max of (visible in the store - commit time) over
                   the changes applied in the last ``window_s`` seconds
``tables[]``       per table: rows, last applied commit time, ``lag_ms`` (as above,
                   for that table), ``lag_bytes`` (server WAL - LSN of its oldest
                   waiting change, 0 when none), changes/s, batches/s
``writer_busy``    the share of the last ``window_s`` seconds the writer spent applying
                   batches (0-1). Near 1 the store takes all the writer has: batches
                   grow, and freshness with them, as the source speeds up
``freshness_histogram``  cumulative counts per bucket of :data:`~.metrics.EDGES_MS`
``applying``       while a batch is applied a piece at a time (a large transaction):
                   its ``changes``, those ``applied`` so far, ``pieces`` and ``seconds``;
                   null otherwise
``store_checkpoints``  the store's checkpoints since the process started: ``count``,
                   ``seconds`` in all, ``longest_s`` (each stops the writer) and
                   ``wal_bytes`` folded into the file
``dead_letters``   changes the engine set aside, every run's: ``count`` and the
                   ``newest`` (table, LSN, reason, when); read at most every
                   :data:`DELIVERIES_INTERVAL_S` seconds while running
``rollups[]``      per rollup: ``state``, ``reason`` when paused, and while running, for a
                   rollup with min/max, ``min_max_mirror_reads``: ``batches`` that
                   recomputed groups from the mirror and ``groups_refilled`` from it
                   between batches since the process started (near 0 while the
                   reserves hold)
``lossy_values[]``  source values this process could not keep as PostgreSQL had them
                   (stored as NULL, or an array flattened): ``type``, ``issue``,
                   ``count`` since the process started (each pair is also logged once)
``alert_deliveries[]``  per alert sink: ``delivered``, ``pending``, ``failed``,
                   ``last_attempt_at``, ``last_error``, ``last_failed_error``
                   (:func:`headrace.alerts.delivery.sink_summaries`), read from
                   the outbox at most every :data:`DELIVERIES_INTERVAL_S` seconds
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from headrace.alerts.delivery import sink_summaries
from headrace.engine.extremes import MirrorReads
from headrace.engine.results import PiecesProgress
from headrace.errors import format_lsn
from headrace.run.control import RunFiles, write_json_atomic
from headrace.run.metrics import FreshnessHistogram, RateWindow
from headrace.run.state import STOPPED, RunState
from headrace.source.postgres.convert_issues import conversion_issue_counts
from headrace.source.postgres.source import SlotLag
from headrace.store.base import RollupStatus, TableStatus
from headrace.store.duckdb.store import DuckDBStore

log = logging.getLogger("headrace.status")

T = TypeVar("T")

STATUS_FORMAT = 1
WINDOW_S = 5.0
DELIVERIES_INTERVAL_S = 5.0
"""How often the status reads the alert outbox (one scan of it through a reader cursor)."""


def _iso(value: datetime | float | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, float | int):
        value = datetime.fromtimestamp(value, UTC)
    return value.astimezone(UTC).isoformat()


def _freshness(histogram: FreshnessHistogram) -> dict[str, float | None]:
    return {
        "p50": histogram.percentile(0.5),
        "p99": histogram.percentile(0.99),
        "max": histogram.percentile(1.0),
        "changes": histogram.total,
    }


def _table_rows(
    tables: list[TableStatus],
    state: RunState | None,
    window: RateWindow | None,
    wal_head: int | None,
    now: float,
) -> list[dict[str, Any]]:
    waiting = state.waiting() if state is not None else {}
    out = []
    for table in tables:
        name = table.table_name
        oldest = waiting.get(name)
        lag_ms = max(0.0, (now - oldest.commit_unix) * 1000) if oldest is not None else 0.0
        lag_bytes = max(0, wal_head - oldest.lsn) if oldest is not None and wal_head else 0
        out.append(
            {
                "name": name,
                "rows": table.rows,
                "last_commit_ts": _iso(table.last_commit_ts),
                "last_lsn": table.last_lsn,
                "applied_at": _iso(table.applied_at),
                "lag_ms": round(lag_ms, 1),
                "lag_bytes": lag_bytes,
                "changes_per_s": round(window.rate(f"changes:{name}"), 1) if window else 0.0,
                "batches_per_s": round(window.rate(f"batches:{name}"), 2) if window else 0.0,
                "state": table.state,
                "reason": table.reason,
                "schema_version": table.schema_version,
                "key_indexed": table.key_indexed,
            }
        )
    return out


def _rollup_rows(
    rollups: list[RollupStatus], mirror_reads: Mapping[str, MirrorReads] | None = None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rollup in rollups:
        row: dict[str, Any] = {"name": rollup.name, "state": rollup.state, "reason": rollup.reason}
        reads = (mirror_reads or {}).get(rollup.name)
        if reads is not None:
            row["min_max_mirror_reads"] = asdict(reads)
        rows.append(row)
    return rows


def _delivery_rows(store: DuckDBStore) -> list[dict[str, Any]]:
    """Per-sink delivery figures, read through a reader cursor (never the writer's)."""
    cursor = store.cursor()
    try:
        return sink_summaries(cursor)
    finally:
        cursor.close()


class _EveryFewSeconds(Generic[T]):
    """A figure read from the store at most every so often (the last one between); a
    failed read keeps the last one: the status must not stop the run."""

    def __init__(self, read: Callable[[], T], initial: T, what: str) -> None:
        self._read = read
        self._value = initial
        self._what = what
        self._at: float | None = None

    def get(self, interval_s: float) -> T:
        now = time.monotonic()
        if self._at is None or now - self._at >= interval_s:
            self._at = now
            try:
                self._value = self._read()
            except Exception as exc:  # the last figures stay
                log.debug("status: reading %s failed: %s", self._what, exc)
        return self._value


class StatusReporter:
    """Builds the status document of a running pipeline and writes it beside the store."""

    def __init__(
        self,
        state: RunState,
        store: DuckDBStore,
        files: RunFiles,
        *,
        config_path: Path | None,
        queue_capacity: int,
    ) -> None:
        self.state = state
        self.store = store
        self.files = files
        self.config_path = config_path
        self.queue_capacity = queue_capacity
        self.window = RateWindow(WINDOW_S)
        self.slot_lag: Callable[[], SlotLag | None] | None = None
        """Set once streaming starts: reads the slot's lag from the server."""
        self.slot_name: str | None = None
        self.source_info: Callable[[], dict[str, Any]] | None = None
        self.lane_info: Callable[[], dict[str, Any]] | None = None
        """The rules lane's figures (``rules.in_memory``), while it runs."""
        self.collector_info: Callable[[], dict[str, Any]] | None = None
        """The garbage collector's figures while streaming (:mod:`headrace.run.collector`)."""
        self.applying: Callable[[], PiecesProgress | None] | None = None
        """A batch being applied a piece at a time, if any (the engine's)."""
        self.mirror_reads: Callable[[], Mapping[str, MirrorReads]] | None = None
        """Per rollup with min/max: how often it read the mirror (the engine's)."""
        self._lag: SlotLag | None = None
        self._lag_at = 0.0
        no_deliveries: list[dict[str, Any]] = []
        self._deliveries = _EveryFewSeconds(
            lambda: _delivery_rows(self.store), no_deliveries, "the alert outbox"
        )
        no_dead_letters: dict[str, Any] = {"count": 0, "newest": None}
        self._dead_letters = _EveryFewSeconds(
            lambda: dead_letter_summary(self.store), no_dead_letters, "dead letters"
        )
        self.last: dict[str, Any] = {}

    def _sample(self) -> None:
        state = self.state
        with state.lock:
            counters: dict[str, float] = {
                "changes": state.changes,
                "batches": state.batches,
                "apply_seconds": state.apply_seconds,
            }
            for name, count in state.table_changes.items():
                counters[f"changes:{name}"] = count
            for name, count in state.table_batches.items():
                counters[f"batches:{name}"] = count
            freshness = state.freshness.copy()
        self.window.sample(counters, freshness)

    def _slot(self, interval_s: float) -> SlotLag | None:
        if self.slot_lag is None:
            return None
        now = time.monotonic()
        if now - self._lag_at >= interval_s:
            self._lag_at = now
            try:
                self._lag = self.slot_lag()
            except Exception:  # status must not kill the run: shown as unknown
                self._lag = None
        return self._lag

    def build(self, slot_lag_interval_s: float = 2.0) -> dict[str, Any]:
        """The status document now (reads the store through a reader cursor)."""
        self._sample()
        state = self.state
        now = time.time()
        lag = self._slot(slot_lag_interval_s)
        wal_head = None
        if lag is not None and state.position is not None:
            wal_head = (self.source_confirmed() or state.position) + lag.unconfirmed_bytes
        tables = self.store.table_status()
        waiting = state.waiting()
        oldest = min((w.commit_unix for w in waiting.values()), default=None)
        with state.lock:
            snapshot = state.snapshot
            document: dict[str, Any] = {
                "format": STATUS_FORMAT,
                "pid": os.getpid(),
                "running": state.phase != STOPPED,
                "phase": state.phase,
                "error": state.error,
                "config": str(self.config_path) if self.config_path else None,
                "store": str(self.store.path),
                "started_at": _iso(state.started_at),
                "updated_at": _iso(now),
                "updated_unix": now,
                "position": state.position,
                "position_lsn": format_lsn(state.position) if state.position is not None else None,
                "position_commit_ts": _iso(state.position_commit_ts),
                "totals": {
                    "changes": state.changes,
                    "batches": state.batches,
                    "store_transactions": state.applies,
                    "source_transactions": state.transactions,
                    "empty_batches": state.empty_batches,
                    "skipped_changes": state.skipped,
                    "dead_letters": state.dead_letters,
                    "apply_seconds": round(state.apply_seconds, 3),
                    "first_visible_unix": state.first_visible_unix,
                    "first_visible_changes": state.first_visible_changes,
                    "last_visible_unix": state.last_visible_unix,
                },
                "freshness_histogram": state.freshness.to_list(),
            }
        document["lag_ms"] = round(max(0.0, (now - oldest) * 1000), 1) if oldest else 0.0
        document["lag_bytes"] = lag.unconfirmed_bytes if lag is not None else None
        document["slot"] = (
            {
                "name": self.slot_name,
                "retained_bytes": lag.retained_bytes,
                "unconfirmed_bytes": lag.unconfirmed_bytes,
                "wal_status": lag.wal_status,
            }
            if lag is not None
            else None
        )
        if self.source_info is not None:
            document["source"] = self.source_info()
        if self.lane_info is not None:
            lane = self.lane_info()
            lane["freshness_ms"] = _freshness(FreshnessHistogram(lane["freshness_histogram"]))
            document["rules_lane"] = lane
        if self.collector_info is not None:
            document["collector"] = self.collector_info()
        applying = self.applying() if self.applying is not None else None
        document["applying"] = applying.document(time.monotonic()) if applying else None
        document["changes_per_s"] = round(self.window.rate("changes"), 1)
        document["batches_per_s"] = round(self.window.rate("batches"), 2)
        document["writer_busy"] = round(min(1.0, self.window.rate("apply_seconds")), 3)
        document["freshness_ms"] = _freshness(self.window.freshness())
        document["window_s"] = WINDOW_S
        document["queue"] = {"batches": state.waiting_batches, "capacity": self.queue_capacity}
        document["store_wal_bytes"] = self.store.wal_bytes()
        document["store_checkpoints"] = self.store.checkpoints.document()
        if snapshot is not None:
            copied = snapshot.rows or snapshot.copied_rows
            seconds = snapshot.seconds
            document["snapshot"] = {
                "finished": snapshot.finished_at is not None,
                "rows": copied,
                "seconds": round(seconds, 3),
                "rows_per_s": round(copied / seconds) if seconds > 0 else 0,
                "tables": {
                    name: {"rows": p.rows, "expected": p.expected_rows, "finished": p.finished}
                    for name, p in snapshot.tables.items()
                },
            }
        document["tables"] = _table_rows(tables, state, self.window, wal_head, now)
        reads = self.mirror_reads() if self.mirror_reads is not None else {}
        document["rollups"] = _rollup_rows(self.store.rollup_status(), reads)
        document["alert_deliveries"] = self._deliveries.get(DELIVERIES_INTERVAL_S)
        document["dead_letters"] = self._dead_letters.get(DELIVERIES_INTERVAL_S)
        document["lossy_values"] = [
            {"type": type_name, "issue": issue, "count": count}
            for (type_name, issue), count in sorted(conversion_issue_counts().items())
        ]
        self.last = document
        return document

    def source_confirmed(self) -> int | None:
        info = self.source_info() if self.source_info is not None else {}
        value = info.get("confirmed_position")
        return int(value) if isinstance(value, int) else None

    def write(self, slot_lag_interval_s: float = 2.0) -> dict[str, Any]:
        document = self.build(slot_lag_interval_s)
        write_json_atomic(self.files.status, document)
        return document


def status_from_store(store: DuckDBStore, source: str) -> dict[str, Any]:
    """The status of a store no process is running (read-only)."""
    stored = store.read_position(source)
    return {
        "format": STATUS_FORMAT,
        "running": False,
        "phase": "idle" if stored is not None else "empty",
        "store": str(store.path),
        "position": stored.lsn if stored else None,
        "position_lsn": format_lsn(stored.lsn) if stored else None,
        "position_commit_ts": _iso(stored.commit_ts) if stored else None,
        "updated_at": _iso(stored.updated_at) if stored else None,
        "tables": _table_rows(store.table_status(), None, None, None, time.time()),
        "rollups": _rollup_rows(store.rollup_status()),
        "alert_deliveries": _delivery_rows(store),
        "dead_letters": dead_letter_summary(store),
    }


def dead_letter_summary(store: DuckDBStore) -> dict[str, Any]:
    """How many dead letters the store holds, and the newest one."""
    count = store.dead_letter_count()
    newest = store.dead_letters(limit=1) if count else []
    return {
        "count": count,
        "newest": {
            "table": newest[0].table_name,
            "lsn": format_lsn(newest[0].lsn),
            "reason": newest[0].reason,
            "at": _iso(newest[0].at),
        }
        if newest
        else None,
    }

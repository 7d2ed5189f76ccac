"""The run loop: snapshot on the first run, then stream, apply, confirm — exactly once.

Threads::

    source thread                      writer thread (the caller's)
    PostgresSource.batches() ──queue──▶ Engine.apply(batch)   (effects + position: 1 txn)
    (receive, decode, cut)  (bounded)   PostgresSource.confirm(position)  (only now)
                                        rebuild requests, retention, checkpoint
    status thread: <store>.status.json and the terminal line, about once a second

- Pipelining: decoding the next batch overlaps applying the current one.
- Backpressure: the queue holds ``queue_batches`` batches, or more small ones
  while their changes fit into ``merge_max_changes`` (see
  :mod:`headrace.run.change_queue`); when the store is slower than the
  source, the source thread waits on the queue, stops reading the replication
  socket, and the server keeps the rest in the slot. Memory stays bounded.
- Catching up: batches waiting together are applied as one transaction (up
  to ``merge_max_changes``), so a backlog is worked off with fewer commits.
- Exactly once: the slot is confirmed only up to a position already
  committed in the store; after a crash the store's position is the resume
  point and the engine skips what it already holds.
- Stopping (SIGINT/SIGTERM or :attr:`Runner.stop`): the batch being applied
  is finished, committed and confirmed; batches still queued are dropped
  (the slot sends them again next time); the stream closes after sending the
  confirmed position.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from headrace.alerts.delivery import AlertDelivery
from headrace.alerts.ids import AlertIds
from headrace.alerts.store import ALERTS, LANE_OUTBOX
from headrace.engine.engine import Engine
from headrace.errors import ConfigError, HeadraceError, format_lsn
from headrace.pipeline.load import load_pipeline
from headrace.pipeline.model import PipelineConfig, RollupConfig
from headrace.rules.lane.lane import RulesLane
from headrace.rules.lane.store import attach_lane_file
from headrace.run.allocator import arrow_allocator
from headrace.run.change_queue import ChangeQueue
from headrace.run.collector import Collector
from headrace.run.console import RunDisplay
from headrace.run.control import (
    Request,
    RunFiles,
    RunLock,
    answer_request,
    pending_requests,
)
from headrace.run.faults import Faults
from headrace.run.initial import (
    SnapshotInterruptedError,
    clear_marker,
    read_marker,
    snapshot_into_store,
)
from headrace.run.merge import can_join, merge_batches
from headrace.run.pipeline_source import source_settings
from headrace.run.preload import allocator_in_use
from headrace.run.prometheus import Registered
from headrace.run.recorder import BatchRecorder
from headrace.run.settings import RunSettings
from headrace.run.state import FAILED, STOPPED, STOPPING, STREAMING, RunState
from headrace.run.status import StatusReporter
from headrace.source.changes import ChangeBatch
from headrace.source.postgres.snapshot_progress import TableProgress
from headrace.source.postgres.source import READ_AHEAD_CHANGES, PostgresSource, SlotLag
from headrace.store.duckdb.store import DuckDBStore

log = logging.getLogger("headrace.run")

_PUT_WAIT_S = 0.2
_JOIN_SOURCE_S = 15.0
HOLD_WHILE_WRITER_BUSY = READ_AHEAD_CHANGES
"""Pending changes the source holds for a busy writer instead of cutting them into a batch
after ``batch_max_wait_s`` (PostgresSource.hold_while_busy): those it assembles in a few
milliseconds, so that the writer, taking them when it is done, waits that little."""


@dataclass(frozen=True)
class _Item:
    """What the source thread hands to the writer: a batch, or the end of the stream."""

    batch: ChangeBatch | None
    ticket: int = 0
    error: BaseException | None = None


@dataclass(frozen=True)
class RunResult:
    """How a run ended."""

    position: int | None
    changes: int
    batches: int
    snapshot_rows: int | None
    snapshot_seconds: float | None
    interrupted_snapshot: bool = False


class Runner:
    """One pipeline run (see module docstring). Call :meth:`run` from the main thread to
    get SIGINT/SIGTERM handling through :class:`~.signals.StopOnSignals` (the CLI does)."""

    def __init__(
        self,
        config: PipelineConfig,
        *,
        settings: RunSettings | None = None,
        config_path: Path | None = None,
        display: RunDisplay | None = None,
        serve: Any = None,
        replace_slot: bool = False,
        stop: threading.Event | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.config = config
        self.settings = settings or RunSettings()
        self.config_path = config_path
        self.display = display or RunDisplay(Console(stderr=True), live=False)
        self.serve = serve
        """``ServeSettings`` to run the HTTP app on the live store (``--serve``), or None."""
        self.replace_slot = replace_slot
        self.stop = stop or threading.Event()
        """Set it (from any thread or a signal handler) to stop at the next batch boundary."""
        self.faults = faults or Faults()
        self.state = RunState()
        self.files = RunFiles(Path(config.store.path))
        self.server_url: str | None = None
        self._reporter: StatusReporter | None = None
        self._status_stop = threading.Event()
        self._taken: set[str] = set()
        """Ids of requests handed to the engine and not answered yet."""

    # ------------------------------------------------------------------ run

    def run(self) -> RunResult:
        """Snapshot if needed, then stream until stopped; raises :class:`HeadraceError`."""
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(self.settings.switch_interval_s)
        try:
            with arrow_allocator() as allocator:
                log.debug("Arrow allocates with %s", allocator)
                return self._run_locked()
        finally:
            sys.setswitchinterval(switch_interval)

    def _run_locked(self) -> RunResult:
        with RunLock(self.files):
            store = DuckDBStore(
                self.config.store.path,
                checkpoint_interval=self.config.store.checkpoint_interval,
                checkpoint_wal_bytes=self.config.store.checkpoint_wal_bytes,
                memory_limit=self.config.store.memory_limit,
                row_group_size=self.config.store.row_group_size,
            )
            try:
                with Registered(self.state):  # the run's figures on /metrics
                    return self._run(store)
            finally:
                store.close()

    def _run(self, store: DuckDBStore) -> RunResult:
        # DuckDB draws its own progress bar on a terminal; ours is the only display.
        store.writer.execute("SET enable_progress_bar = false")
        engine = Engine(self.config, store)
        if self.faults.armed:
            engine.after_piece = lambda: self.faults.reached("between_pieces")
        reporter = StatusReporter(
            self.state,
            store,
            self.files,
            config_path=self.config_path,
            queue_capacity=self.settings.queue_batches,
        )
        reporter.slot_name = self.config.source.slot
        reporter.applying = lambda: engine.applying
        reporter.mirror_reads = engine.mirror_reads
        self._reporter = reporter
        self.state.position = engine.position()
        status_thread = threading.Thread(
            target=self._status_loop, name="headrace-status", daemon=True
        )
        status_thread.start()
        if self.config.rules is not None and self.config.rules.in_memory:
            # Before the dashboard hardens the instance against file access.
            attach_lane_file(store.writer, store.path)
        server = self._start_server(store) if self.serve is not None else None
        delivery = AlertDelivery.from_config(self.config, store)  # alert sinks, if any
        if delivery is not None:
            delivery.start()
        interrupted = False
        try:
            if engine.position() is None:
                interrupted = not self._snapshot(engine)
            elif read_marker(store) is not None:
                clear_marker(store)  # the snapshot committed; only the marker was left
            if not interrupted and not self.stop.is_set():
                store.set_threads(self.config.store.streaming_threads)
                self._stream(engine)
        except BaseException as exc:
            what = exc.what if isinstance(exc, HeadraceError) else f"{type(exc).__name__}: {exc}"
            self.state.set_phase(FAILED, what)
            raise
        finally:
            engine.abandon_rebuilds("the pipeline stopped first; ask again once it runs")
            self.display.close()
            if delivery is not None:
                delivery.stop()
            if server is not None:
                server.stop()
            if self.state.phase != FAILED:
                self.state.set_phase(STOPPED)
            self._status_stop.set()
            status_thread.join(5)
            with contextlib.suppress(Exception):
                reporter.write(0)
        snapshot = self.state.snapshot
        return RunResult(
            position=engine.position(),
            changes=self.state.changes,
            batches=self.state.batches,
            snapshot_rows=snapshot.rows if snapshot else None,
            snapshot_seconds=snapshot.seconds if snapshot and snapshot.finished_at else None,
            interrupted_snapshot=interrupted,
        )

    # ------------------------------------------------------------- snapshot

    def _snapshot(self, engine: Engine) -> bool:
        """The first run's snapshot; False when it was interrupted by a stop request."""
        self.state.snapshot_started()
        self.display.snapshot_started()
        reporter = self._reporter

        def progress(update: TableProgress) -> None:
            self.state.snapshot_progress(update)
            self.display.snapshot_progress(update)

        try:
            loaded = snapshot_into_store(
                engine,
                self.config,
                self.settings,
                faults=self.faults,
                stop=self.stop,
                progress=progress,
                replace_slot=self.replace_slot,
                config_file=str(self.config_path or "the pipeline file"),
            )
        except SnapshotInterruptedError:
            self.display.snapshot_ended()
            log.warning("snapshot interrupted: nothing was stored; the next run starts it over")
            return False
        self.display.snapshot_ended()
        self.state.snapshot_finished(loaded.total_rows, loaded.position)
        snapshot = self.state.snapshot
        seconds = snapshot.seconds if snapshot else loaded.seconds
        log.info(
            "snapshot loaded: %s rows in %.1f s (%s rows/s end to end), position %s",
            f"{loaded.total_rows:,}",
            seconds,
            f"{loaded.total_rows / seconds:,.0f}" if seconds > 0 else "-",
            format_lsn(loaded.position),
        )
        if reporter is not None:
            with contextlib.suppress(Exception):
                reporter.write(0)
        return True

    # ------------------------------------------------------------- streaming

    def _start_lane(self, engine: Engine) -> tuple[RulesLane, AlertDelivery | None] | None:
        """The rules lane (``rules.in_memory``) and its outbox's delivery, started on the
        store's position; None when every rule runs as SQL in the engine."""
        rules = self.config.rules
        if rules is None or not rules.in_memory:
            return None
        store = engine.store
        ids = AlertIds(ALERTS)
        ids.register(store.writer)  # the engine's alerts beside the lane's
        sinks = tuple(self.config.sinks)
        lane = RulesLane(rules, store, sinks, ids)
        delivery = AlertDelivery(store, sinks, outbox=LANE_OUTBOX).start() if sinks else None
        lane.start(delivery.hand_over if delivery is not None else None)
        engine.before_commit = lane.before_engine_commit
        return lane, delivery

    def _stop_lane(
        self, engine: Engine, started: tuple[RulesLane, AlertDelivery | None] | None
    ) -> None:
        if started is None:
            return
        lane, delivery = started
        engine.before_commit = None
        if self._reporter is not None:
            self._reporter.lane_info = None
        try:
            lane.stop()
        finally:
            lane.ids.forget(engine.store.writer)
            if delivery is not None:
                delivery.stop()

    def _stream(self, engine: Engine) -> None:
        source = PostgresSource(source_settings(self.config, self.settings))
        start = engine.position() or 0
        started_lane = self._start_lane(engine)
        lane = started_lane[0] if started_lane is not None else None
        if self._reporter is not None and lane is not None:
            self._reporter.lane_info = lane.status
        items: ChangeQueue[_Item] = ChangeQueue(
            self.settings.queue_batches, self.settings.merge_max_changes
        )
        source_stop = threading.Event()
        reporter = self._reporter
        lag_lock = threading.Lock()
        source_open = [True]

        def slot_lag() -> SlotLag | None:
            # From the status thread: never reopen the source's connection once closed.
            with lag_lock:
                return source.slot_lag() if source_open[0] else None

        if reporter is not None:
            reporter.slot_lag = slot_lag
            reporter.source_info = lambda: {
                "confirmed_position": source.confirmed_position,
                "delivered_position": source.delivered_position,
                "reconnects": source.reconnects,
                "heartbeats": source.heartbeats,
            }
        receiver = threading.Thread(
            target=self._receive,
            args=(source, start, items, source_stop, lane),
            name="headrace-source",
            daemon=True,
        )
        # The start-up heap is built (snapshot, the lane's state): out of the collector's way.
        collector = Collector().settle()
        if reporter is not None:
            reporter.collector_info = collector.document
        self.state.set_phase(STREAMING)
        self.display.streaming_started()
        log.info(
            "streaming slot %s from %s (C allocator: %s)",
            self.config.source.slot,
            format_lsn(start),
            allocator_in_use(),
        )
        receiver.start()
        try:
            self._write_loop(engine, source, items)
        finally:
            if self.state.phase != FAILED:
                self.state.set_phase(STOPPING)
            source.stop()
            source_stop.set()
            deadline = time.monotonic() + _JOIN_SOURCE_S
            while receiver.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    items.get(timeout=0.05)
            self.state.forget_waiting()
            with lag_lock:
                source_open[0] = False
            source.close()
            self._stop_lane(engine, started_lane)
            if reporter is not None:
                reporter.collector_info = None
            collector.restore()
        log.info(
            "stopped at %s (store and slot): %s changes in %s batches this run; the slot "
            "keeps the source's WAL from there for the next run (`headrace teardown` drops it "
            "when the pipeline is retired)",
            format_lsn(engine.position() or 0),
            f"{self.state.changes:,}",
            f"{self.state.batches:,}",
        )

    def _receive(
        self,
        source: PostgresSource,
        start: int,
        items: ChangeQueue[_Item],
        source_stop: threading.Event,
        lane: RulesLane | None = None,
    ) -> None:
        """Source thread: batches into the bounded queue (waiting when it is full), and
        first to the rules lane, if any."""
        error: BaseException | None = None
        # An idle writer takes the changes received so far at once, and a busy one the
        # small batches held for it (PostgresSource.consumer_waiting, .hold_while_busy).
        source.consumer_waiting = items.consumer_waiting
        source.hold_while_busy = 0 if lane is not None else HOLD_WHILE_WRITER_BUSY
        try:
            batches = source.batches(start)
            try:
                for batch in batches:
                    if lane is not None:
                        lane.offer(batch)
                    item = _Item(batch, self.state.received(batch))
                    if not _put(items, item, source_stop):
                        return
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()  # ends the stream, sending the confirmed position
        except BaseException as exc:  # handed to the writer, which raises it
            error = exc
        _put(items, _Item(None, error=error), source_stop)

    def _write_loop(
        self, engine: Engine, source: PostgresSource, items: ChangeQueue[_Item]
    ) -> None:
        settings = self.settings
        faults = self.faults
        next_maintain = time.monotonic() + settings.maintain_interval_s
        held: _Item | None = None
        recorder = BatchRecorder(settings.record_dir) if settings.record_dir else None
        while not self.stop.is_set():
            if held is not None:
                item, held = held, None
            else:
                try:
                    item = items.get(timeout=min(0.2, settings.maintain_interval_s))
                except queue.Empty:
                    next_maintain = self._maybe_maintain(engine, next_maintain)
                    continue
            if item.batch is None:
                if item.error is not None:
                    raise item.error
                return
            group = [item]
            held = self._gather(group, items)
            batch = merge_batches([i.batch for i in group if i.batch is not None])
            if recorder is not None:
                recorder.record(engine.store, self.config, batch)
            faults.reached("before_apply")
            faults.reached("during_apply")
            applied = engine.apply(batch)
            # Freshness ends when the batch became visible, not after a checkpoint.
            visible_at = applied.visible_at or time.time()
            faults.reached("after_commit")
            source.confirm(applied.position)
            faults.reached("after_confirm")
            self.state.applied([i.ticket for i in group], batch, applied, visible_at)
            next_maintain = self._maybe_maintain(engine, next_maintain)

    def _gather(self, group: list[_Item], items: ChangeQueue[_Item]) -> _Item | None:
        """Add waiting batches to ``group`` while they merge; returns one that did not."""
        limit = self.settings.merge_max_changes
        first = group[0].batch
        changes = first.num_changes if first is not None else 0
        while limit and changes < limit:
            try:
                candidate = items.get_nowait()
            except queue.Empty:
                return None
            batch = candidate.batch
            batches = [i.batch for i in group if i.batch is not None]
            if batch is None or changes + batch.num_changes > limit or not can_join(batches, batch):
                return candidate
            group.append(candidate)
            changes += batch.num_changes
        return None

    # ---------------------------------------------------------- maintenance

    def _maybe_maintain(self, engine: Engine, due: float) -> float:
        """Between batches, once per ``maintain_interval_s``: requests, retention, checkpoint."""
        now = time.monotonic()
        if now < due:
            return due
        self._handle_requests(engine)
        engine.maintain()
        return now + self.settings.maintain_interval_s

    def _handle_requests(self, engine: Engine) -> None:
        for request in pending_requests(self.files):
            if request.id in self._taken:
                continue  # a rebuild in progress answers when it ends
            if request.kind != "rebuild":
                answer_request(self.files, request, ok=False, message=f"unknown {request.kind!r}")
                continue
            try:
                definition = self._current_definition(request.name)
            except HeadraceError as exc:
                log.error("rebuild of %s failed: %s", request.name, exc.what)
                answer_request(self.files, request, ok=False, message=str(exc))
                continue
            self._taken.add(request.id)
            engine.request_rebuild(request.name, definition, self._answer(request))

    def _answer(self, request: Request) -> Callable[[bool, str], None]:
        def answer(ok: bool, message: str) -> None:
            self._taken.discard(request.id)
            answer_request(self.files, request, ok=ok, message=message)

        return answer

    def _current_definition(self, name: str) -> RollupConfig:
        """The rollup's definition from the pipeline file as it is now (it may have changed)."""
        config = load_pipeline(self.config_path) if self.config_path else self.config
        try:
            return config.rollup(name)
        except KeyError:
            raise ConfigError(
                f"no rollup named {name!r} in {self.config_path or 'the pipeline'}",
                f"use one of: {', '.join(r.name for r in config.rollups) or '(none)'}",
            ) from None

    # --------------------------------------------------------------- status

    def _status_loop(self) -> None:
        reporter = self._reporter
        if reporter is None:
            return
        interval = self.settings.status_interval_s
        while not self._status_stop.wait(interval):
            try:
                document = reporter.write(self.settings.slot_lag_interval_s)
            except Exception:
                log.debug("status not written", exc_info=True)
                continue
            self.display.update(document)

    def _start_server(self, store: DuckDBStore) -> Any:
        from headrace.serve.app import ServerThread, create_app  # noqa: PLC0415 - optional part

        app = create_app(self.serve, store)
        server = ServerThread(app, self.serve).start()
        self.server_url = server.url
        log.info("serving the live store on %s/", server.url)
        return server


def _put(items: ChangeQueue[_Item], item: _Item, stop: threading.Event) -> bool:
    """Put ``item``, waiting while the queue is full (backpressure); False when stopped."""
    while not stop.is_set():
        try:
            changes = item.batch.num_changes if item.batch is not None else 0
            items.put(item, changes, timeout=_PUT_WAIT_S)
            return True
        except queue.Full:
            continue
    return False

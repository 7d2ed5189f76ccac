"""The live broadcaster: each view computed once per store version, pushed to all its viewers.

A *view* is (dashboard, time range, filters, mask policy). Viewers of the same
view share one computation and one pre-encoded SSE event. A new store version
(the store's commit notification, or the read-only poller) marks every view
stale; a single scheduler task recomputes stale views that have viewers, at
most once per ``min_interval_s`` each (versions committed meanwhile coalesce
into the next computation). Each viewer holds only the latest event: a slow
client skips intermediate versions instead of queueing them. Nothing is polled
per viewer. Across views, a tile query that renders the same for several of
them (a filter the tile does not take, the same range) runs once per store
snapshot (see shared_tiles): every computation of one version gets the same
"now" for its relative range (:meth:`LiveHub.bounds_now`).

SSE event ids are ``<version>-<seq>``; a reconnecting EventSource sends the
last one as ``Last-Event-ID`` and gets the current state only if it is newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from headrace.serve.compute import StoreReader, ViewSpec
from headrace.serve.metrics import ServeMetrics
from headrace.serve.settings import LiveSettings

_log = logging.getLogger(__name__)


class ViewError(Exception):
    """A view could not be computed (details in the server log)."""


class Viewer:
    """One SSE connection: holds the newest event not yet sent."""

    __slots__ = ("latest", "wake")

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.latest: bytes | None = None

    def offer(self, event: bytes) -> None:
        self.latest = event
        self.wake.set()

    async def next(self) -> bytes | None:
        """The next event, or None when woken without one (time for a heartbeat)."""
        # No timeout per wait: a timer made and cancelled per event per viewer was
        # ~40% of the event loop's GIL time with 250 viewers (3.1% -> 1.9% of the
        # wall time); the hub's heartbeat task wakes idle viewers instead.
        await self.wake.wait()
        self.wake.clear()
        event, self.latest = self.latest, None
        return event


class LiveView:
    """State of one view: its viewers and its last result."""

    def __init__(self, spec: ViewSpec) -> None:
        self.spec = spec
        self.viewers: set[Viewer] = set()
        self.event: bytes | None = None
        self.event_id = ""
        self.snapshot: bytes | None = None
        self.computed_version = -1
        self.seq = 0
        self.last_started = 0.0
        self.last_done = 0.0
        self.last_used = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.waiters = 0


class LiveHub:
    """Schedules view computations and broadcasts their results."""

    def __init__(self, reader: StoreReader, settings: LiveSettings, metrics: ServeMetrics) -> None:
        self.reader = reader
        self.settings = settings
        self.metrics = metrics
        self.views: dict[Any, LiveView] = {}
        self.viewer_count = 0
        self._kick = asyncio.Event()
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._unsubscribe: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._version_at = 0.0  # wall time the newest store version arrived

    # lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Listen for store versions and run the scheduler."""
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.reader.store.subscribe(self._on_version)
        self._task = asyncio.create_task(self._schedule(), name="headrace-live")
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="headrace-heartbeat")

    async def close(self) -> None:
        """Stop scheduling and end every stream (idempotent)."""
        if self._closed.is_set() and self._task is None:
            return
        self._closed.set()
        self._kick.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        for view in self.views.values():
            for viewer in view.viewers:
                viewer.wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._heartbeat_task is not None:
            await self._heartbeat_task
            self._heartbeat_task = None
        tasks = [v.task for v in self.views.values() if v.task is not None]
        for task in tasks:
            with contextlib.suppress(Exception):
                await task

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _on_version(self, event: Any) -> None:
        # Called from the store's writer or poll thread with a CommitEvent or a version.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._version_arrived, event)

    def _version_arrived(self, event: Any) -> None:
        self._version_at = time.time()
        self.metrics.store_version.set(self.reader.store.version)
        self.metrics.commits.inc()
        self._kick.set()

    async def _heartbeat(self) -> None:
        # Every heartbeat_s, viewers with no event waiting get a keep-alive comment
        # (some may have had an event a moment ago: a comment is harmless).
        while not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.settings.heartbeat_s)
            for view in list(self.views.values()):
                for viewer in view.viewers:
                    if viewer.latest is None:
                        viewer.wake.set()

    # viewers ---------------------------------------------------------------

    def _view(self, spec: ViewSpec) -> LiveView:
        view = self.views.get(spec.key)
        if view is None:
            view = LiveView(spec)
            self.views[spec.key] = view
            self.metrics.views.set(len(self.views))
        view.last_used = time.monotonic()
        return view

    def join(self, spec: ViewSpec, last_event_id: str | None) -> tuple[LiveView, Viewer]:
        """Add a viewer; it gets the current result at once unless it already has it."""
        view = self._view(spec)
        viewer = Viewer()
        view.viewers.add(viewer)
        self.viewer_count += 1
        self.metrics.viewers.set(self.viewer_count)
        if view.event is not None and view.event_id != (last_event_id or ""):
            viewer.offer(view.event)
        self._kick.set()
        return view, viewer

    def leave(self, view: LiveView, viewer: Viewer) -> None:
        """Remove a viewer (its view is kept for a grace period)."""
        if viewer in view.viewers:
            view.viewers.discard(viewer)
            self.viewer_count -= 1
            self.metrics.viewers.set(self.viewer_count)
        view.last_used = time.monotonic()

    async def stream(self, view: LiveView, viewer: Viewer) -> AsyncIterator[bytes]:
        """The SSE byte stream of one viewer."""
        try:
            yield b"retry: 1500\n\n"
            while not self.closed:
                event = await viewer.next()
                if self.closed:
                    break
                yield event if event is not None else b": keep-alive\n\n"
        finally:
            self.leave(view, viewer)

    async def snapshot(self, spec: ViewSpec) -> bytes:
        """The current result of a view as JSON (shares the live computation)."""
        view = self._view(spec)
        if view.snapshot is not None and view.computed_version >= self.reader.store.version:
            return view.snapshot
        view.waiters += 1
        view.ready.clear()
        self._kick.set()
        try:
            await asyncio.wait_for(view.ready.wait(), self.settings.tile_timeout_s * 3)
        finally:
            view.waiters -= 1
        if view.snapshot is None:
            raise ViewError(f"dashboard {spec.dashboard.name!r} could not be computed")
        return view.snapshot

    def bounds_now(self) -> datetime:
        """The "now" relative time ranges end at: when the newest store version arrived.

        Every view computed for one version gets the same bounds, so views that run
        the same tile query share its result (see shared_tiles). Without new
        versions it moves on every ``idle_refresh_s``, as the idle refreshes do.
        """
        wall = time.time()
        idle_step = wall - wall % self.settings.idle_refresh_s
        return datetime.fromtimestamp(max(self._version_at, idle_step), UTC)

    # scheduling ------------------------------------------------------------

    def _due(self, view: LiveView, now: float, version: int) -> bool:
        if view.task is not None or not (view.viewers or view.waiters):
            return False
        if view.computed_version < 0 or (view.waiters and view.computed_version < version):
            return True
        if now - view.last_started < self.settings.min_interval_s:
            return False
        if view.computed_version < version:
            return True
        relative = view.spec.range.start is None
        return relative and now - view.last_done >= self.settings.idle_refresh_s

    async def _schedule(self) -> None:
        while not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(self.settings.min_interval_s, 0.05))
            self._kick.clear()
            now = time.monotonic()
            version = self.reader.store.version
            # Refreshes of views that already have a result may use all read threads
            # but one, so a first computation (a dashboard being opened) never waits
            # behind a queue of refreshes. While a first computation runs no refresh
            # starts: on few cores they compete for the CPU, and a dashboard being
            # opened matters more than a refresh a few hundred ms later.
            refreshing = sum(
                1 for v in self.views.values() if v.task is not None and v.computed_version >= 0
            )
            opening = any(v.task is not None and _first(v) for v in self.views.values())
            budget = 0 if opening else max(1, self.settings.compute_workers - 1) - refreshing
            for key, view in sorted(self.views.items(), key=lambda kv: kv[1].last_started):
                first = _first(view)
                if self._due(view, now, version) and (first or budget > 0):
                    if first:
                        budget = 0
                    else:
                        budget -= 1
                    view.last_started = now
                    view.task = asyncio.create_task(self._compute(view))
                elif (
                    not view.viewers
                    and not view.waiters
                    and view.task is None
                    and now - view.last_used > self.settings.view_grace_s
                ):
                    del self.views[key]
                    self.metrics.views.set(len(self.views))

    async def _compute(self, view: LiveView) -> None:
        try:
            view.seq += 1
            seq = view.seq
            now = self.bounds_now()
            result = await self.reader.call(
                lambda cur: self.reader.compute_view(cur, view.spec, seq, now)
            )
            # Encoded once on the read thread; every viewer is offered the same bytes.
            view.computed_version = result.version
            view.event_id = f"{result.version}-{seq}"
            view.snapshot = result.payload
            view.event = b"".join(
                (
                    b"id: ",
                    view.event_id.encode(),
                    b"\nevent: tiles\ndata: ",
                    result.payload,
                    b"\n\n",
                )
            )
            for viewer in view.viewers:
                viewer.offer(view.event)
            if result.as_of is not None and view.viewers:
                self.metrics.update_lag.observe(
                    max(0.0, (datetime.now(UTC) - result.as_of).total_seconds())
                )
        except Exception:
            # A view that cannot be computed must not stop the others; the error is
            # counted and logged, and the next version tries again.
            self.metrics.errors.labels("view").inc()
            _log.exception("computing live view %s failed", view.spec.key)
        finally:
            view.last_done = time.monotonic()
            view.task = None
            view.ready.set()
            self._kick.set()


def _first(view: LiveView) -> bool:
    """Someone waits for this view's first result (or a fresh snapshot of it)."""
    return view.computed_version < 0 or view.waiters > 0

"""Rebuilding a rollup while streaming goes on (``headrace rebuild`` on a running pipeline).

A rebuild recomputes a rollup's state from the mirror. Done in the writer's
transaction it would stop every batch for as long as the GROUP BY over the
whole mirror takes, so a running pipeline rebuilds in three steps:

1. **start** (writer thread, between two batches, at position P): plan the
   new definition, create an empty temp table of *touched groups*, and open
   a read transaction on a second cursor. Its snapshot is the store exactly
   at P, since no batch is in flight.
2. **compute** (a background thread): the new state and side tables' rows at
   P, read into Arrow tables on that snapshot. Batches keep being applied
   meanwhile, the old definition keeps being maintained and served, and each
   batch adds the groups (bucket and dimension values, under the new
   definition) of its start and end rows to the touched groups.
3. **install** (writer thread, between two batches, or in a batch's
   transaction just before a schema change): in one transaction, replace
   the rollup's tables by the computed rows, recompute the touched groups
   from the current mirror, and recreate the views. The result is exactly the
   rebuild at the current position: every group a batch after P changed is
   recomputed, every other group is the same as at P.

Only the background step reads outside the writer; every write stays on the
writer thread. While the read transaction is open, DuckDB cannot checkpoint
(the store retries after the rebuild).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from headrace.engine.registry import Registry
from headrace.engine.rollup import RollupPlan
from headrace.errors import HeadraceError, StoreError, first_line
from headrace.pipeline.model import RollupConfig
from headrace.store.duckdb.store import DuckDBStore

log = logging.getLogger("headrace.engine")

RebuildDone = Callable[[bool, str], None]
"""Called on the writer thread when a requested rebuild ends: (succeeded, message)."""


@dataclass
class RebuildRequest:
    """A queued rebuild: the rollup, its new definition (None: the current one), and
    whom to tell when it ends."""

    name: str
    config: RollupConfig | None = None
    on_done: RebuildDone | None = None
    requested_at: float = field(default_factory=time.monotonic)


class OnlineRebuild:
    """One rebuild in progress (module docstring)."""

    def __init__(
        self, request: RebuildRequest, plan: RollupPlan, config: RollupConfig, touched: str
    ) -> None:
        self.request = request
        self.plan = plan
        self.config = config
        self.touched = touched
        self.rows: dict[str, pa.Table] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread: threading.Thread | None = None
        self._cursor: duckdb.DuckDBPyConnection | None = None
        self._abandoned = threading.Event()
        self.gate: threading.Event | None = None
        """Set by tests: the computation waits for it (so batches run meanwhile)."""

    @property
    def name(self) -> str:
        return self.request.name

    @classmethod
    def start(
        cls,
        store: DuckDBStore,
        registry: Registry,
        request: RebuildRequest,
        planned: tuple[RollupConfig, RollupPlan],
        *,
        horizon: object | None,
        gate: threading.Event | None = None,
    ) -> OnlineRebuild:
        """Step 1 (writer thread, between batches). ``planned``: the new definition and
        its plan, from :meth:`Registry.plan_rebuild` in a committed transaction."""
        config, plan = planned
        touched = "_hr_rebuild_groups"
        columns = ", ".join(plan.group_columns)
        store.writer.execute(
            f"CREATE OR REPLACE TEMP TABLE {touched} AS SELECT {columns} "
            f"FROM ({plan.projection(plan.table.mirror)}) LIMIT 0"
        )
        rebuild = cls(request, plan, config, touched)
        rebuild.gate = gate
        cursor = store.cursor()
        try:
            cursor.execute("BEGIN TRANSACTION")
            # The first read fixes the snapshot: the store as the last batch left it.
            cursor.execute(f"SELECT count(*) FROM {plan.table.mirror}").fetchall()
        except duckdb.Error:
            cursor.close()
            raise
        rebuild._cursor = cursor
        registry.tracking[request.name] = (plan, touched)
        params = [horizon] if horizon is not None else []
        rebuild._thread = threading.Thread(
            target=rebuild._compute,
            args=(cursor, params),
            name=f"headrace-rebuild-{request.name}",
            daemon=True,
        )
        rebuild._thread.start()
        return rebuild

    def _compute(self, cursor: duckdb.DuckDBPyConnection, params: list[object]) -> None:
        """Step 2, on the snapshot cursor (background thread)."""
        plan, with_horizon = self.plan, bool(params)
        try:
            while self.gate is not None and not self.gate.wait(0.05):
                if self._abandoned.is_set():
                    raise RuntimeError("abandoned")
            for table, select in plan.table_selects(with_horizon).items():
                self.rows[table] = cursor.sql(select(None), params=params or None).to_arrow_table()
        except BaseException as exc:  # reported on the writer thread
            self.error = exc
        finally:
            try:
                cursor.execute("ROLLBACK")
            except duckdb.Error:
                log.debug("closing the rebuild snapshot of %s", self.name, exc_info=True)
            cursor.close()
            self.done.set()

    def install(self, con: duckdb.DuckDBPyConnection, registry: Registry) -> None:
        """Step 3, in the writer's transaction ``con``; raises what step 2 raised."""
        registry.tracking.pop(self.name, None)
        if self.error is not None:
            if isinstance(self.error, duckdb.Error):
                raise StoreError(
                    f"rebuilding {self.name} failed: {first_line(self.error)}",
                    "the rollup keeps its previous state; fix the cause and rebuild again",
                ) from self.error
            raise self.error
        registry.install(
            con, self.name, self.config, self.plan, rows=self.rows, touched=self.touched
        )

    def abandon(self, registry: Registry) -> None:
        """Stop tracking; the background read ends on its own (its result is dropped)."""
        registry.tracking.pop(self.name, None)
        self._abandoned.set()
        cursor = self._cursor
        if cursor is not None and not self.done.is_set():
            try:
                cursor.interrupt()
            except duckdb.Error:
                log.debug("interrupting the rebuild of %s", self.name, exc_info=True)


def describe_failure(name: str, exc: BaseException) -> str:
    """One line for a rebuild that did not happen."""
    if isinstance(exc, HeadraceError):
        return f"rebuild of {name} failed: {exc.what}"
    return f"rebuild of {name} failed: {type(exc).__name__}: {first_line(exc)}"

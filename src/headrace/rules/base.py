"""What every fraud rule shares: its job shell, the transaction row shape, evidence, alerts.

A rule is a :class:`~headrace.jobs.base.StreamJob` whose ``apply`` works in
three steps, all SQL inside the batch's transaction:

1. **triggers**: the rows of this batch that can complete the pattern (new
   rows, or rows whose relevant columns changed: an update can create a
   pattern, e.g. a transaction that becomes declined);
2. **evaluate**: join the triggers with the rule's keyed state (recent rows
   of the same account, or per-account sums) and keep those crossing the
   thresholds, as *candidates* with the numbers and evidence rows;
3. **emit**: :func:`~headrace.alerts.store.emit_incidents` turns candidates
   into at most one alert per incident (dedup key, re-armed after quiet).

and updates its state from the batch's net change (``end - start``), so
an update that cancels a pattern (declined, reversed, deleted) removes the
row from the state before it can complete one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import duckdb

from headrace.errors import ConfigError
from headrace.jobs.base import LATEST, JobContext, TableDelta, TimeRequest, state_table
from headrace.jobs.state import latest, mirror_time
from headrace.pipeline.model import quote_ident
from headrace.rules.config import BaseRuleConfig, RulesConfig
from headrace.rules.recent import RecentTransactions
from headrace.rules.triggers import TX_FIELDS, TriggerSpec
from headrace.source.changes import TableRef

_Config = TypeVar("_Config")

EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
"""The clock of a rule before its first event (nothing is late, nothing is pruned)."""

EVIDENCE_LIMIT = 50
"""Evidence rows kept in an alert's payload (the numbers always cover every row)."""


def present(config: _Config | None, name: str) -> _Config:
    """A rule's section of the configuration (it runs only when the section is present)."""
    if config is None:
        raise ConfigError(f"rules.{name} is not configured", f"add a `{name}:` section under rules")
    return config


def q(name: str) -> str:
    return quote_ident(name)


def tx_evidence(alias: str) -> str:
    """SQL: one evidence row (a struct) of a transaction in the rule shape."""
    fields = ", ".join(f"{name} := {alias}.{name}" for name in TX_FIELDS if name != "t")
    return f"struct_pack(id := {alias}._k0, at := {alias}.t, {fields})"


def evidence_json(rows: str) -> str:
    """SQL: a list of evidence structs, capped, as JSON."""
    return f"to_json(list_slice({rows}, 1, {EVIDENCE_LIMIT}))"


@dataclass(frozen=True)
class Evaluation:
    """What a rule makes of one batch: SQL selecting its candidates (or None), and the
    state updates to run once every rule's candidates are taken."""

    candidates: str | None = None
    after: Callable[[], object] | None = None


class RuleJob(ABC):
    """Base of the six rules: configuration, watermark, triggers (module docstring).

    A rule is run by :class:`~headrace.rules.ruleset.RuleSet`: :meth:`evaluate` updates
    the state the rule reads *after* the batch and returns its candidates' SQL; the
    candidates of every rule are computed in one statement; then each rule's ``after``
    updates the state it read *before* the batch.
    """

    name: str
    ready: bool = False
    """Its state tables exist (cleared when the engine reloads)."""
    trigger: TriggerSpec | None = None
    """Its trigger condition in the batch being evaluated (set by :meth:`tx_triggers`,
    cleared by the rule set before :meth:`evaluate`)."""
    recent: RecentTransactions | None = None
    """The shared recent transactions (set by the rule set on the rules that have a
    :attr:`window_filter`)."""

    def __init__(self, rules: RulesConfig) -> None:
        self.rules = rules
        self.tx = rules.tables.transactions
        self.tx_ref = TableRef.parse(self.tx.table)

    @property
    @abstractmethod
    def config(self) -> BaseRuleConfig:
        """This rule's section of the rules configuration."""

    @property
    def rearm(self) -> timedelta:
        """Quiet time after which the same key opens a new incident."""
        return self.config.rearm_after

    @property
    def window_filter(self) -> str | None:
        """SQL over a transaction: it belongs in the rule's recent rows (None: the rule
        reads no recent transactions; see :mod:`headrace.rules.recent`)."""
        return None

    @property
    def span(self) -> timedelta:
        """How far before its watermark the rule reads recent transactions (window plus
        lateness); only rules with a :attr:`window_filter` read it."""
        return self.rules.lateness

    def keep_recent(self, horizon: datetime | None) -> RecentTransactions:
        """Keep the rule's recent transactions from ``horizon`` on (None: none) this batch
        or rebuild; the shared table they are in."""
        if self.recent is None:
            raise RuntimeError(f"{self.name} reads recent transactions outside a rule set")
        self.recent.set_horizon(self.name, horizon)
        return self.recent

    def recent_rows(self, horizon: datetime) -> str:
        """SQL: the rule's recent transactions this batch, from ``horizon`` on (the rule set
        updates the shared table once every rule has set its horizon, before the triggers'
        prefilters and the candidates read it)."""
        return self.keep_recent(horizon).rows(self.name)

    def recent_check(self, aggregate: Callable[[str], str]) -> str:
        """SQL prefilter over a trigger ``e``: an aggregate over its account's recent rows of
        the rule holds (after :meth:`recent_rows`). ``aggregate`` gets the SQL condition
        "``w`` is one of the rule's rows" and returns a boolean SQL aggregate over the
        rows ``w`` (it may read ``e``); the rules' checks run as one subquery."""
        if self.recent is None:
            raise RuntimeError(f"{self.name} reads recent transactions outside a rule set")
        return self.recent.check(self.name, aggregate(self.recent.own(self.name)))

    def rebuild_recent(self, ctx: JobContext) -> None:
        """Restart the watermark from the transactions mirror and keep the rule's span of
        recent transactions before it (the rule set then refills the shared table)."""
        mirror = ctx.mirror(self.tx_ref)
        watermark = self.restart_watermark(ctx, mirror_time(ctx.con, mirror, q(self.tx.time)))
        self.keep_recent(None if watermark is None else watermark - self.span)

    def inputs(self) -> tuple[TableRef, ...]:
        """Tables whose changes the rule reads."""
        return (self.tx_ref,)

    def reads(self) -> tuple[TableRef, ...]:
        """Every table whose mirror the rule reads."""
        return self.inputs()

    def setup(self, con: duckdb.DuckDBPyConnection) -> None:  # noqa: B027 - optional hook
        """Create fixed tables (idempotent)."""

    @abstractmethod
    def evaluate(self, ctx: JobContext) -> Evaluation:
        """Update the state read after the batch; the candidates' SQL (see the class)."""

    @abstractmethod
    def rebuild(self, ctx: JobContext) -> None:
        """Recompute the state from the mirrors (after a snapshot)."""

    def state(self, part: str) -> str:
        return state_table(self.name, part)

    def advance(self, ctx: JobContext, *times: datetime | None) -> datetime:
        """Move the rule's event-time watermark forward; return the one *before* this batch.

        Horizons are measured from the watermark before the batch, so the rows
        of one batch are never "late" against each other: a row is late when
        it is older than that watermark minus ``rules.lateness``.
        """
        previous = ctx.watermark(self.name)[0]
        ctx.set_watermark(self.name, latest(previous, *times), None)
        return previous if previous is not None else EARLIEST

    def restart_watermark(self, ctx: JobContext, watermark: datetime | None) -> datetime | None:
        """Set the watermark a rebuild starts from (the newest event in the mirrors)."""
        ctx.set_watermark(self.name, watermark, None)
        return watermark

    def times(self) -> tuple[TimeRequest, ...]:
        """The batch times :meth:`evaluate` reads (see :meth:`StreamJob.times`)."""
        return (TimeRequest(LATEST, self.tx_ref, q(self.tx.time)),)

    def tx_time(self, ctx: JobContext) -> datetime | None:
        return ctx.batch_time(self.tx_ref, q(self.tx.time))

    def tx_triggers(
        self,
        delta: TableDelta,
        columns: tuple[str, ...],
        where: str,
        horizon: datetime,
        prefilter: str = "true",
    ) -> str:
        """SQL: the batch's transactions in rule shape that may complete a pattern.

        End rows satisfying ``where`` that are new, whose source ``columns``
        changed, or that did not satisfy ``where`` before the batch; with
        event time within the horizon, and passing ``prefilter`` (SQL over
        the trigger row ``e``, implied by the candidate condition; see
        :class:`~headrace.rules.triggers.TriggerSpec`). Columns:
        ``_k0``, :data:`TX_FIELDS`, ``commit_ts``, ``lsn``.

        The rows come from the batch's shared trigger table
        (:mod:`headrace.rules.triggers`): this records the rule's condition
        in :attr:`trigger`, which the rule set writes before it runs the
        candidates.
        """
        self.trigger = TriggerSpec(self.name, delta, columns, where, horizon, prefilter)
        return self.trigger.select()

"""The fraud rules as one stream job: every rule's candidates in one statement per batch.

Per batch, for the rules whose input tables changed:

1. each rule's :meth:`~headrace.rules.base.RuleJob.evaluate` updates the
   state it reads *after* the batch (recent-row windows, risky logins) and
   returns SQL selecting its candidates;
2. the triggers of all rules (the batch's transactions that may complete a
   pattern) are written once (:mod:`headrace.rules.triggers`);
3. the candidates of the rules that have triggers are computed in one
   statement (a UNION ALL, the first of
   :func:`~headrace.alerts.store.emit_incidents`), and turned into alerts,
   one per incident, for all rules at once;
4. each rule's ``after`` updates the state it read *before* the batch (the
   amount history, the countries seen, the devices seen).

Running the rules together costs one statement for all candidates instead of
several per rule: on DuckDB a statement costs milliseconds whatever its size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import duckdb

from headrace.alerts.config import SinkConfig
from headrace.alerts.store import CANDIDATE_COLUMNS, emit_incidents
from headrace.jobs.base import JobContext, StreamJob, TimeRequest
from headrace.rules.base import RuleJob
from headrace.rules.recent import RecentTransactions
from headrace.rules.triggers import create_tx_triggers
from headrace.source.changes import TableRef


class RuleSet(StreamJob):
    """Every configured rule (module docstring)."""

    name = "rules"

    def __init__(self, rules: Sequence[RuleJob], sinks: tuple[SinkConfig, ...]) -> None:
        self.rules = list(rules)
        self.sinks = sinks
        self.seconds: dict[str, float] = {rule.name: 0.0 for rule in self.rules}
        """Time spent in each rule's own statements (the shared one is not split)."""
        windowed = {rule.name: rule.window_filter for rule in self.rules}
        filters = {name: where for name, where in windowed.items() if where is not None}
        self.recent = RecentTransactions(self.rules[0].tx, filters) if filters else None
        """The recent transactions the window rules share, updated once per batch."""
        for rule in self.rules:
            rule.recent = self.recent if rule.name in filters else None

    def definition(self) -> dict[str, object]:
        """The rules' configuration but their severities (which no state depends on)."""
        exclude = {rule.name: {"severity"} for rule in self.rules}
        return {"rules": self.rules[0].rules.model_dump(mode="json", exclude=exclude)}

    def inputs(self) -> tuple[TableRef, ...]:
        return tuple(dict.fromkeys(ref for rule in self.rules for ref in rule.inputs()))

    def reads(self) -> tuple[TableRef, ...]:
        return tuple(dict.fromkeys(ref for rule in self.rules for ref in rule.reads()))

    def times(self) -> tuple[TimeRequest, ...]:
        return tuple(dict.fromkeys(request for rule in self.rules for request in rule.times()))

    def setup(self, con: duckdb.DuckDBPyConnection) -> None:
        for rule in self.rules:
            rule.ready = False
            rule.setup(con)
        if self.recent is not None:
            self.recent.setup(con)

    def apply(self, ctx: JobContext) -> None:
        active = [rule for rule in self.rules if ctx.touched(rule.inputs())]
        recent = self.recent
        if recent is not None:
            recent.begin()
        evaluations = []
        for rule in active:
            started = time.perf_counter()
            rule.trigger = None
            evaluations.append((rule, rule.evaluate(ctx)))
            self.seconds[rule.name] += time.perf_counter() - started
        con = ctx.con
        if recent is not None and recent.horizons:
            # Every window rule has set its horizon: one update for all of them, before
            # the triggers' prefilters and the candidates read it.
            tx_delta = ctx.delta(active[0].tx_ref)
            if tx_delta is not None:
                recent.update(con, tx_delta)
        specs = [rule.trigger for rule, _ in evaluations if rule.trigger is not None]
        checks = recent.checks_column() if recent is not None else ""
        triggered = create_tx_triggers(con, active[0].tx, specs, checks) if specs else {}
        # A rule whose candidates start from triggers it has none of has no candidates.
        parts = [
            f"SELECT '{rule.name}' AS rule, {CANDIDATE_COLUMNS} FROM ({evaluation.candidates})"
            for rule, evaluation in evaluations
            if evaluation.candidates is not None
            and (rule.trigger is None or triggered.get(rule.name, 0) > 0)
        ]
        if parts:
            # The candidates are computed by emit_incidents' first statement (no table of
            # them: one statement less in the batches that have some).
            emit_incidents(
                con,
                f"({' UNION ALL BY NAME '.join(parts)})",
                rearms={rule.name: rule.rearm for rule in active},
                now=ctx.now,
                sinks=self.sinks,
            )
        for rule, evaluation in evaluations:
            if evaluation.after is not None:
                started = time.perf_counter()
                evaluation.after()
                self.seconds[rule.name] += time.perf_counter() - started

    def rebuild(self, ctx: JobContext) -> None:
        recent = self.recent
        if recent is not None:
            recent.begin()
        for rule in self.rules:
            rule.rebuild(ctx)
            rule.ready = True
        if recent is not None:
            tx_ref = self.rules[0].tx_ref
            recent.rebuild(ctx.con, ctx.mirror(tx_ref), ctx.key(tx_ref))

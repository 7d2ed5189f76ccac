"""Rule 1, velocity burst: too many transactions of one account in a sliding window.

State: the account's transactions matching ``where`` whose event time is
within the longest limit window (plus ``rules.lateness``) of the watermark,
in the rules' shared recent transactions (:mod:`headrace.rules.recent`).

For each new (or moved) transaction ``t`` of the batch, and each limit
``(window, count)``: the account's transactions with event time in
``(t - window, t]`` are counted; ``n >= count`` is a candidate. Of several
limits crossed at once, the alert names the one crossed by the largest
factor. Evidence: the transactions in that window.

Updates: every attempt counts, whatever its status, so a later decline or
reversal neither creates nor cancels a burst; a delete removes the row from
the window (it no longer counts towards later triggers). A transaction whose
time or account changes is checked again at its new place.
"""

from __future__ import annotations

from datetime import timedelta

from headrace.jobs.base import JobContext
from headrace.rules.base import Evaluation, RuleJob, evidence_json, present, tx_evidence
from headrace.rules.config import VelocityBurstConfig


class VelocityBurst(RuleJob):
    """See the module docstring."""

    name = "velocity_burst"

    @property
    def config(self) -> VelocityBurstConfig:
        return present(self.rules.velocity_burst, self.name)

    @property
    def span(self) -> timedelta:
        return max(limit.window for limit in self.config.limits) + self.rules.lateness

    @property
    def window_filter(self) -> str:
        return self.config.where

    def _crossing(self, own: str) -> str:
        """SQL aggregate over the trigger ``e``'s recent rows ``w`` (``own``: one of the
        rule's): some limit is crossed at it (the candidate condition, checked once per
        trigger: the rule joins the candidates statement only in the rare batches with a
        burst)."""
        return " OR ".join(
            f"count(*) FILTER (WHERE {own} AND w.t <= e.t "
            f"AND w.t > e.t - to_seconds({limit.window.total_seconds()})) >= {limit.count}"
            for limit in self.config.limits
        )

    def evaluate(self, ctx: JobContext) -> Evaluation:
        delta = ctx.delta(self.tx_ref)
        if delta is None:
            return Evaluation()
        watermark = self.advance(ctx, self.tx_time(ctx))
        window = self.recent_rows(watermark - self.span)
        triggers = self.tx_triggers(
            delta,
            (self.tx.account, self.tx.time),
            self.config.where,
            watermark - self.rules.lateness,
            prefilter=self.recent_check(self._crossing),
        )
        limits = ", ".join(
            f"({int(limit.window.total_seconds())}, {limit.count})" for limit in self.config.limits
        )
        candidates = f"""
            SELECT t.account AS account_id, 'velocity_burst:' || t.account AS dedup_key,
                   t.t AS event_at, min(w.t) AS started_at, t.commit_ts, t.lsn,
                   '{self.config.severity.value}' AS severity,
                   format('{{}} transactions in {{}} s on account {{}} (limit {{}})',
                          count(*), l.seconds, t.account, l.limit_count) AS summary,
                   json_object(
                       'numbers', json_object('transactions', count(*),
                                              'limit', l.limit_count,
                                              'window_seconds', l.seconds,
                                              'amount', sum(w.amount)),
                       'trigger', t._k0,
                       'evidence', {evidence_json(f"list({tx_evidence('w')} ORDER BY w.t, w._k0)")}
                   ) AS payload,
                   count(*) / l.limit_count AS _factor
            FROM {triggers} t
            CROSS JOIN (VALUES {limits}) l(seconds, limit_count)
            JOIN {window} w
              ON w.account = t.account AND w.t <= t.t AND w.t > t.t - to_seconds(l.seconds)
            GROUP BY t._k0, t.account, t.t, t.commit_ts, t.lsn, l.seconds, l.limit_count
            HAVING count(*) >= l.limit_count
            QUALIFY row_number() OVER (PARTITION BY t._k0 ORDER BY _factor DESC, l.seconds) = 1"""
        return Evaluation(candidates)

    def rebuild(self, ctx: JobContext) -> None:
        self.rebuild_recent(ctx)

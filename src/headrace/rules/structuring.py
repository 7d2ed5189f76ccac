"""Rule 4, structuring: several amounts just under a reporting threshold within a window.

State: the account's transactions matching ``where`` with ``low <= amount <
threshold`` that are not cancelled (``tables.transactions.cancelled``:
declined or reversed), within ``window`` (plus ``rules.lateness``) of the
watermark, in the rules' shared recent transactions
(:mod:`headrace.rules.recent`).

For each transaction of the batch that is now in the band (new, its amount
or account changed, or it was cancelled before and is not any more): the
account's band transactions with event time in ``(t - window, t]`` are
counted; ``n >= min_count`` is a candidate. Evidence: those transactions.

Updates: a band transaction that is later declined or reversed leaves the
state at once, so it no longer counts (the pattern is cancelled unless
enough others remain); an amount corrected into the band can complete a
pattern. An alert already written stays (it was true when written).
"""

from __future__ import annotations

from datetime import timedelta

from headrace.jobs.base import JobContext
from headrace.rules.base import Evaluation, RuleJob, evidence_json, present, q, tx_evidence
from headrace.rules.config import StructuringConfig


class Structuring(RuleJob):
    """See the module docstring."""

    name = "structuring"

    @property
    def config(self) -> StructuringConfig:
        return present(self.rules.structuring, self.name)

    @property
    def span(self) -> timedelta:
        return self.config.window + self.rules.lateness

    @property
    def in_band(self) -> str:
        config = self.config
        amount = q(self.tx.amount)
        return (
            f"({config.where}) AND {amount} >= {config.band_low} AND {amount} < "
            f"{config.threshold} AND NOT coalesce(({self.tx.cancelled}), false)"
        )

    @property
    def window_filter(self) -> str:
        return self.in_band

    def evaluate(self, ctx: JobContext) -> Evaluation:
        delta = ctx.delta(self.tx_ref)
        if delta is None:
            return Evaluation()
        watermark = self.advance(ctx, self.tx_time(ctx))
        band = self.recent_rows(watermark - self.span)
        config = self.config
        window_s = config.window.total_seconds()
        triggers = self.tx_triggers(
            delta,
            (self.tx.account, self.tx.amount, self.tx.time),
            self.in_band,
            watermark - self.rules.lateness,
            # The candidate condition: enough band rows in the window ending at the trigger.
            prefilter=self.recent_check(
                lambda own: (
                    f"count(*) FILTER (WHERE {own} AND w.t <= e.t "
                    f"AND w.t > e.t - to_seconds({window_s})) >= {config.min_count}"
                )
            ),
        )
        candidates = f"""
            SELECT t.account AS account_id, 'structuring:' || t.account AS dedup_key,
                   t.t AS event_at, min(w.t) AS started_at, t.commit_ts, t.lsn,
                   '{config.severity.value}' AS severity,
                   format('{{}} transactions of {{}} to {{}} (total {{}}) within {{}} h on '
                          'account {{}}', count(*), min(w.amount), max(w.amount), sum(w.amount),
                          round({window_s} / 3600, 1), t.account) AS summary,
                   json_object(
                       'numbers', json_object('transactions', count(*),
                                              'min_count', {config.min_count},
                                              'total', sum(w.amount),
                                              'threshold', {config.threshold},
                                              'band_low', {config.band_low},
                                              'window_seconds', {window_s}),
                       'trigger', t._k0,
                       'evidence', {evidence_json(f"list({tx_evidence('w')} ORDER BY w.t, w._k0)")}
                   ) AS payload
            FROM {triggers} t
            JOIN {band} w
              ON w.account = t.account AND w.t <= t.t AND w.t > t.t - to_seconds({window_s})
            GROUP BY t._k0, t.account, t.t, t.commit_ts, t.lsn
            HAVING count(*) >= {config.min_count}"""
        return Evaluation(candidates)

    def rebuild(self, ctx: JobContext) -> None:
        self.rebuild_recent(ctx)

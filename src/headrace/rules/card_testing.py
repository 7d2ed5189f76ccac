"""Rule 5, card testing: many small online attempts or declines across merchants in minutes.

State: the account's online transactions (``tables.transactions.online``)
that are small (``amount < small_amount``) or declined (``declines``),
within ``window`` (plus ``rules.lateness``) of the watermark, in the rules'
shared recent transactions (:mod:`headrace.rules.recent`).

For each attempt of the batch that now qualifies (new, its amount, merchant
or time changed, or it qualifies only now, e.g. it was just declined): the
account's attempts with event time in ``(t - window, t]`` are counted;
at least ``min_attempts`` attempts at at least ``min_merchants`` distinct
merchants is a candidate. Evidence: those attempts; numbers: attempts,
merchants, declined, small.

Updates: a decline arriving later (pending -> declined) can create the
pattern; a deleted attempt leaves the state.
"""

from __future__ import annotations

from datetime import timedelta

from headrace.jobs.base import JobContext
from headrace.rules.base import Evaluation, RuleJob, evidence_json, present, q, tx_evidence
from headrace.rules.config import CardTestingConfig


class CardTesting(RuleJob):
    """See the module docstring."""

    name = "card_testing"

    @property
    def config(self) -> CardTestingConfig:
        return present(self.rules.card_testing, self.name)

    @property
    def span(self) -> timedelta:
        return self.config.window + self.rules.lateness

    @property
    def qualifies(self) -> str:
        small = f"{q(self.tx.amount)} < {self.config.small_amount}"
        if self.config.declines:
            small = f"{small} OR coalesce(({self.config.declines}), false)"
        return f"({self.tx.online}) AND ({small})"

    @property
    def window_filter(self) -> str:
        return self.qualifies

    def evaluate(self, ctx: JobContext) -> Evaluation:
        delta = ctx.delta(self.tx_ref)
        if delta is None:
            return Evaluation()
        watermark = self.advance(ctx, self.tx_time(ctx))
        attempts = self.recent_rows(watermark - self.span)
        config = self.config
        tx = self.tx
        window_s = config.window.total_seconds()

        def crossed(own: str) -> str:
            # Enough attempts in the window ending at the trigger (the candidate condition
            # but for the distinct merchants: a count(DISTINCT) costs ~3 ms per batch here,
            # more than the rare candidates statement it would save).
            return (
                f"count(*) FILTER (WHERE {own} AND w.t <= e.t "
                f"AND w.t > e.t - to_seconds({window_s})) >= {config.min_attempts}"
            )

        triggers = self.tx_triggers(
            delta,
            (tx.account, tx.amount, tx.merchant, tx.time),
            self.qualifies,
            watermark - self.rules.lateness,
            prefilter=self.recent_check(crossed),
        )
        candidates = f"""
            SELECT t.account AS account_id, 'card_testing:' || t.account AS dedup_key,
                   t.t AS event_at, min(w.t) AS started_at, t.commit_ts, t.lsn,
                   '{config.severity.value}' AS severity,
                   format('{{}} small or declined online attempts at {{}} merchants within {{}} s '
                          'on account {{}} ({{}} declined)', count(*), count(DISTINCT w.merchant),
                          {window_s}, t.account, count(*) FILTER (WHERE w.declined)) AS summary,
                   json_object(
                       'numbers', json_object(
                           'attempts', count(*), 'merchants', count(DISTINCT w.merchant),
                           'declined', count(*) FILTER (WHERE w.declined),
                           'small', count(*) FILTER (WHERE w.amount < {config.small_amount}),
                           'min_attempts', {config.min_attempts},
                           'min_merchants', {config.min_merchants},
                           'window_seconds', {window_s}),
                       'trigger', t._k0,
                       'evidence', {evidence_json(f"list({tx_evidence('w')} ORDER BY w.t, w._k0)")}
                   ) AS payload
            FROM {triggers} t
            JOIN {attempts} w
              ON w.account = t.account AND w.t <= t.t AND w.t > t.t - to_seconds({window_s})
            GROUP BY t._k0, t.account, t.t, t.commit_ts, t.lsn
            HAVING count(*) >= {config.min_attempts}
               AND count(DISTINCT w.merchant) >= {config.min_merchants}"""
        return Evaluation(candidates)

    def rebuild(self, ctx: JobContext) -> None:
        self.rebuild_recent(ctx)

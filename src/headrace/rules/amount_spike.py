"""Rule 2, amount spike: a transaction far above the account's own history.

State: ``jobs.amount_spike__history``, per account the number, sum and
largest amount of its transactions matching ``where`` and
``history_where`` (by default: settled purchases), over all its history;
maintained as end rows minus start rows, so a purchase enters the history
when it settles and leaves it again when it is reversed or deleted.

For each new transaction matching ``where`` (or one whose amount or account
changed), against the history *before* the batch: when the account has at
least ``min_history`` transactions, ``amount >= factor x mean`` and
``amount >= min_amount``, it is a candidate. Evidence: the transaction, and
the history's count, mean and largest amount.

Transactions dated more than a day (plus ``rules.lateness``) before the
rule's watermark are not checked (a correction of an old row raises nothing).

Updates: a spike is alerted when it is attempted (pending); a later decline
or reversal does not withdraw the alert, and a reversed purchase no longer
weighs in the mean of later checks.
"""

from __future__ import annotations

from datetime import timedelta

from headrace.jobs.base import JobContext
from headrace.jobs.state import KeyedSums, mirror_time
from headrace.rules.base import Evaluation, RuleJob, evidence_json, present, q, tx_evidence
from headrace.rules.config import AmountSpikeConfig


class AmountSpike(RuleJob):
    """See the module docstring."""

    name = "amount_spike"

    @property
    def config(self) -> AmountSpikeConfig:
        return present(self.rules.amount_spike, self.name)

    def history(self) -> KeyedSums:
        amount = f"CAST({q(self.tx.amount)} AS DECIMAL(38, 4))"
        return KeyedSums(
            table=self.state("history"),
            groups=(("account", q(self.tx.account)),),
            sums=(("total", amount),),
            where=f"({self.config.where}) AND ({self.config.history_where})",
        )

    def crosses(self, tx: str, history: str) -> str:
        """SQL: transaction ``tx`` is a spike against its account's ``history`` row."""
        config = self.config
        return (
            f"{history}.n >= {config.min_history} AND {history}.mean > 0 "
            f"AND {tx}.amount >= {config.factor} * {history}.mean"
        )

    def evaluate(self, ctx: JobContext) -> Evaluation:
        delta = ctx.delta(self.tx_ref)
        if delta is None:
            return Evaluation()
        con = ctx.con
        watermark = self.advance(ctx, self.tx_time(ctx))
        history = self.history()
        if not self.ready:
            history.ensure(con, delta.mirror)
            self.ready = True
        config = self.config
        horizon = watermark - self.rules.lateness - timedelta(days=1)
        mean = (
            f"SELECT account, _rows AS n, CAST(total AS DOUBLE) / _rows AS mean "
            f"FROM {history.table} WHERE _rows > 0"
        )
        triggers = self.tx_triggers(
            delta,
            (self.tx.account, self.tx.amount),
            config.where,
            horizon,
            # The candidate condition itself, against the same history: the rule joins the
            # candidates statement only in the rare batches with a spike.
            prefilter=f"e.amount >= {config.min_amount} AND EXISTS (SELECT 1 FROM "
            f"({mean}) m WHERE m.account = e.account AND {self.crosses('e', 'm')})",
        )
        candidates = f"""
            SELECT t.account AS account_id, 'amount_spike:' || t.account AS dedup_key,
                   t.t AS event_at, t.t AS started_at, t.commit_ts, t.lsn,
                   '{config.severity.value}' AS severity,
                   format('amount {{}} is {{}}x the mean {{}} of {{}} earlier transactions '
                          'of account {{}}', t.amount, round(t.amount / m.mean, 1),
                          round(m.mean, 2), m.n, t.account) AS summary,
                   json_object(
                       'numbers', json_object('amount', t.amount, 'mean', round(m.mean, 2),
                                              'factor', round(t.amount / m.mean, 2),
                                              'threshold_factor', {config.factor},
                                              'min_amount', {config.min_amount},
                                              'history', m.n),
                       'trigger', t._k0,
                       'evidence', {evidence_json(f"[{tx_evidence('t')}]")}
                   ) AS payload
            FROM {triggers} t
            JOIN ({mean}) m ON m.account = t.account
            WHERE {self.crosses("t", "m")} AND t.amount >= {config.min_amount}"""
        return Evaluation(candidates, after=lambda: history.update(con, delta))

    def rebuild(self, ctx: JobContext) -> None:
        con = ctx.con
        mirror = ctx.mirror(self.tx_ref)
        history = self.history()
        history.ensure(con, mirror)
        history.rebuild(con, mirror)
        self.restart_watermark(ctx, mirror_time(con, mirror, q(self.tx.time)))

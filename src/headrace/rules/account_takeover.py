"""Rule 6, account takeover: a large outflow shortly after a risky login.

State:

- ``jobs.account_takeover__devices``: per customer and device, the
  successful logins seen (a login is from a *new device* when its pair was
  never seen before it; see :mod:`headrace.jobs.first_seen`; the health
  score reads it too, so it is updated once every job has run on the batch);
- ``jobs.account_takeover__marks``: *risky logins* within ``window`` (plus
  lateness): a successful login from a new device (``new_device: true``),
  or a failed login that makes ``failed_logins`` failures of the customer
  within ``failed_window``. The failures are read from the logins mirror
  (those within ``failed_window`` plus lateness of the watermark): a window
  table of them would cost two statements per batch to keep, more than the
  scan of the mirror it saves.

For each new outflow (``where``, by default ``tables.transactions.outflow``; or one
whose amount or account changed) of an account with a positive balance:
when a risky login of the account's customer happened in
``[t - window, t]``, ``amount >= min_amount`` and ``amount >=
outflow_share x balance``, it is a candidate. The balance is the account's
balance when the outflow was made: its last version before the outflow's
first change in commit order (so before the outflow settled), or the
balance before the batch when the batch did not change it earlier.
Evidence: the risky logins and the outflow; numbers: share of the balance,
failures, minutes since the login.

Logins and transactions of one batch are handled in order: logins first,
so an outflow committed together with its login is caught. Logins are
assumed to arrive in event-time order (a login arriving after the outflow
it precedes in event time is not matched with it).
"""

from __future__ import annotations

from datetime import datetime

import duckdb

from headrace.jobs.base import LATEST, JobContext, TableDelta, TimeRequest
from headrace.jobs.first_seen import FirstSeen
from headrace.jobs.state import create_like, latest, mirror_time
from headrace.rules.base import (
    Evaluation,
    RuleJob,
    evidence_json,
    present,
    q,
    tx_evidence,
)
from headrace.rules.config import AccountTakeoverConfig, RulesConfig
from headrace.rules.triggers import TX_FIELDS
from headrace.source.changes import TableRef


class AccountTakeover(RuleJob):
    """See the module docstring."""

    name = "account_takeover"

    def __init__(self, rules: RulesConfig) -> None:
        super().__init__(rules)
        self.logins = rules.tables.logins
        self.accounts = rules.tables.accounts
        self.logins_ref = TableRef.parse(self.logins.table)
        self.accounts_ref = TableRef.parse(self.accounts.table)

    @property
    def config(self) -> AccountTakeoverConfig:
        return present(self.rules.account_takeover, self.name)

    def inputs(self) -> tuple[TableRef, ...]:
        return (self.tx_ref, self.logins_ref)

    def reads(self) -> tuple[TableRef, ...]:
        return (self.tx_ref, self.logins_ref, self.accounts_ref)

    def times(self) -> tuple[TimeRequest, ...]:
        return (*super().times(), TimeRequest(LATEST, self.logins_ref, q(self.logins.time)))

    # ------------------------------------------------------------------ state

    def devices(self) -> FirstSeen:
        logins = self.logins
        return FirstSeen(
            table=self.state("devices"),
            owner=q(logins.customer),
            item=q(logins.device),
            time=q(logins.time),
            where=logins.success,
        )

    def failures(self, mirror: str) -> str:
        """SQL: the failed logins (``customer``, ``t``) of the logins ``mirror``."""
        logins = self.logins
        return (
            f"SELECT {q(logins.customer)} AS customer, CAST({q(logins.time)} AS TIMESTAMPTZ) AS t "
            f"FROM {mirror} WHERE NOT coalesce(({logins.success}), false)"
        )

    def setup(self, con: duckdb.DuckDBPyConnection) -> None:
        """Drop the failed-logins window of stores written before it was read from the mirror."""
        con.execute(f"DROP TABLE IF EXISTS {self.state('failed')}")

    @property
    def marks(self) -> str:
        return self.state("marks")

    def _login_columns(self) -> str:
        logins = self.logins
        return (
            f"{q(logins.customer)} AS customer, CAST({q(logins.time)} AS TIMESTAMPTZ) AS t, "
            f"{q(logins.device)} AS device, {q(logins.country)} AS country, "
            f"coalesce(({logins.success}), false) AS success"
        )

    def _ensure(
        self,
        con: duckdb.DuckDBPyConnection,
        mirror: str,
        key: tuple[str, ...],
        before: str | None = None,
    ) -> None:
        self.devices().ensure(con, mirror, before)
        logins = self.logins
        create_like(
            con,
            self.marks,
            f"""SELECT {q(logins.customer)} AS customer,
                       CAST({q(logins.time)} AS TIMESTAMPTZ) AS t,
                       CAST(NULL AS VARCHAR) AS reason, {q(key[0])} AS login,
                       {q(logins.device)} AS device, {q(logins.country)} AS country,
                       CAST(0 AS BIGINT) AS failed, CAST(NULL AS TIMESTAMPTZ) AS commit_ts
                FROM {mirror} LIMIT 0""",
        )

    # ------------------------------------------------------------------ batch

    def evaluate(self, ctx: JobContext) -> Evaluation:
        con = ctx.con
        login_delta = ctx.delta(self.logins_ref)
        tx_delta = ctx.delta(self.tx_ref)
        watermark = self.advance(
            ctx, ctx.batch_time(self.logins_ref, q(self.logins.time)), self.tx_time(ctx)
        )
        if not self.ready:
            mirror = ctx.mirror(self.logins_ref)
            before = login_delta.before() if login_delta is not None else mirror
            self._ensure(con, mirror, ctx.key(self.logins_ref), before)
            self.ready = True
        config = self.config
        if login_delta is not None:
            self._mark(ctx, login_delta, watermark - config.failed_window - self.rules.lateness)
        candidates = (
            self._detect(ctx, tx_delta, watermark - self.rules.lateness)
            if tx_delta is not None
            else None
        )
        horizon = watermark - config.window - self.rules.lateness
        return Evaluation(
            candidates,
            after=lambda: con.execute(f"DELETE FROM {self.marks} WHERE t < ?", [horizon]),
        )

    def _mark(self, ctx: JobContext, delta: TableDelta, horizon: datetime) -> None:
        """Record the batch's risky logins, then (once every job ran) update the devices."""
        con, config = ctx.con, self.config
        devices = self.devices()
        window_s = config.failed_window.total_seconds()
        new_device = "first_seen" if config.new_device else "false"
        # The failures before ``horizon`` are the ones a window of them kept since the
        # last batch would have dropped (the same rows, whatever the batch's late logins).
        failures = self.failures(ctx.mirror(self.logins_ref))
        con.execute(
            f"""INSERT INTO {self.marks}
            WITH _job_ato_logins AS MATERIALIZED (
                SELECT * FROM {devices.new_rows(delta, self._login_columns())})
            SELECT customer, t, 'new_device', _k0, device, country, 0, commit_ts
            FROM _job_ato_logins WHERE {new_device}
            UNION ALL
            SELECT f.customer, f.t, 'failed_logins', f._k0, f.device, f.country, count(*),
                   f.commit_ts
            FROM _job_ato_logins f
            JOIN ({failures}) w ON w.customer = f.customer AND w.t <= f.t
                 AND w.t > f.t - to_seconds({window_s}) AND w.t >= ?
            WHERE NOT f.success
            GROUP BY f.customer, f.t, f._k0, f.device, f.country, f.commit_ts
            HAVING count(*) >= {config.failed_logins}""",
            [horizon],
        )
        # Once every job has run: the health score may read the same devices table.
        ctx.after_jobs(devices.table, lambda: devices.update(con, delta))

    def _detect(self, ctx: JobContext, delta: TableDelta, horizon: datetime) -> str:
        """SQL: the candidates among the batch's outflows."""
        config = self.config
        accounts = self.accounts
        account_delta = ctx.delta(self.accounts_ref)
        before = (
            account_delta.before() if account_delta is not None else ctx.mirror(self.accounts_ref)
        )
        start_accounts = (
            f" UNION ALL SELECT {q(accounts.id)}, {q(accounts.balance)} FROM {account_delta.start}"
            if account_delta is not None
            else ""
        )
        # Every version of the accounts the batch may have priced an outflow at: now, before
        # the batch, and each one the batch wrote (a superset of the balances detection reads).
        balances = (
            f"SELECT {q(accounts.id)}, {q(accounts.balance)} "
            f"FROM {ctx.mirror(self.accounts_ref)}{start_accounts}"
        )
        if account_delta is not None:
            balances += (
                f" UNION ALL SELECT {q(accounts.id)}, {q(accounts.balance)} "
                f"FROM {account_delta.changes} WHERE _hr_op IN ('I', 'U')"
            )
        triggers = self.tx_triggers(
            delta,
            (self.tx.account, self.tx.amount),
            config.where or self.tx.outflow,
            horizon,
            # An alert needs an outflow taking the share of a positive balance the account
            # had (rare: the rule then joins the candidates statement only in the batches
            # with one), then a risky login of its customer, which the candidates check.
            prefilter=f"e.amount >= {config.min_amount} AND EXISTS (SELECT 1 FROM ({balances}) b "
            f"WHERE b.{q(accounts.id)} = e.account AND b.{q(accounts.balance)} > 0 "
            f"AND e.amount >= {config.outflow_share} * b.{q(accounts.balance)})",
        )
        window_s = config.window.total_seconds()
        mark = (
            "struct_pack(reason := m.reason, at := m.t, login := m.login, device := m.device, "
            "country := m.country, failed := m.failed)"
        )
        # The balance when the outflow was made: the account's last version before the
        # outflow's first change in commit order (this batch), else before the batch.
        first_change = (
            f"SELECT {q(delta.key[0])} AS _k0, min(_hr_seq) AS seq FROM {delta.changes} GROUP BY 1"
        )
        if account_delta is not None:
            versions = (
                f"SELECT {q(accounts.id)} AS account, {q(accounts.balance)} AS balance, "
                f"_hr_seq AS seq FROM {account_delta.changes} WHERE _hr_op IN ('I', 'U')"
            )
            priced = (
                f"SELECT t.*, v.balance AS then_balance FROM timed t "
                f"ASOF LEFT JOIN ({versions}) v ON v.account = t.account AND t.seq > v.seq"
            )
        else:
            priced = "SELECT t.*, NULL AS then_balance FROM timed t"
        return f"""            WITH timed AS (
                SELECT t.*, f.seq FROM {triggers} t JOIN ({first_change}) f ON f._k0 = t._k0
            ), priced AS ({priced}),
            outflows AS (
                SELECT p.* EXCLUDE (then_balance, seq), a.customer,
                       coalesce(p.then_balance, a.balance) AS balance
                FROM priced p
                JOIN (SELECT {q(accounts.id)} AS account, {q(accounts.customer)} AS customer,
                             {q(accounts.balance)} AS balance FROM {before}) a
                  ON a.account = p.account
            )
            SELECT t.account AS account_id, 'account_takeover:' || t.account AS dedup_key,
                   t.t AS event_at, min(m.t) AS started_at, t.commit_ts, t.lsn,
                   '{config.severity.value}' AS severity,
                   format('outflow {{}} = {{}}% of the balance {{}} of account {{}}, '
                          '{{}} min after {{}}', t.amount, round(100 * t.amount / t.balance),
                          t.balance, t.account, round((epoch(t.t) - epoch(max(m.t))) / 60, 1),
                          string_agg(DISTINCT m.reason, ' and ' ORDER BY m.reason)) AS summary,
                   json_object(
                       'numbers', json_object(
                           'amount', t.amount, 'balance', t.balance,
                           'share', round(t.amount / t.balance, 3),
                           'outflow_share', {config.outflow_share},
                           'failed_logins', max(m.failed),
                           'minutes_since_login', round((epoch(t.t) - epoch(max(m.t))) / 60, 2),
                           'reasons', list(DISTINCT m.reason ORDER BY m.reason)),
                       'trigger', t._k0,
                       'logins', to_json(list({mark} ORDER BY m.t, m.login, m.reason)),
                       'evidence', {evidence_json(f"[{tx_evidence('t')}]")}
                   ) AS payload
            FROM outflows t
            JOIN {self.marks} m ON m.customer = t.customer AND m.t <= t.t
                 AND m.t >= t.t - to_seconds({window_s})
            WHERE t.balance > 0 AND t.amount >= {config.min_amount}
              AND t.amount >= {config.outflow_share} * t.balance
            GROUP BY t._k0, {", ".join(f"t.{f}" for f in TX_FIELDS)}, t.commit_ts, t.lsn,
                     t.balance"""

    # ---------------------------------------------------------------- rebuild

    def rebuild(self, ctx: JobContext) -> None:
        """Devices from every login; failures and risky logins of the last windows."""
        con = ctx.con
        mirror = ctx.mirror(self.logins_ref)
        key = ctx.key(self.logins_ref)
        self._ensure(con, mirror, key)
        config = self.config
        watermark = self.restart_watermark(
            ctx,
            latest(
                mirror_time(con, mirror, q(self.logins.time)),
                mirror_time(con, ctx.mirror(self.tx_ref), q(self.tx.time)),
            ),
        )
        self.devices().rebuild(con, mirror)
        con.execute(f"DELETE FROM {self.marks}")
        if watermark is None:
            return
        marks_horizon = watermark - config.window - self.rules.lateness
        window_s = config.failed_window.total_seconds()
        logins = self.logins
        if config.new_device:
            con.execute(
                f"""INSERT INTO {self.marks}
                SELECT customer, t, 'new_device', login, device, country, 0, NULL FROM (
                    SELECT {q(logins.customer)} AS customer,
                           CAST({q(logins.time)} AS TIMESTAMPTZ) AS t, {q(key[0])} AS login,
                           {q(logins.device)} AS device, {q(logins.country)} AS country,
                           row_number() OVER (PARTITION BY {q(logins.customer)},
                               {q(logins.device)} ORDER BY {q(logins.time)}, {q(key[0])}) AS n
                    FROM {mirror} WHERE coalesce(({logins.success}), false))
                WHERE n = 1 AND t >= ?""",
                [marks_horizon],
            )
        con.execute(
            f"""INSERT INTO {self.marks}
            WITH failures AS (
                SELECT {q(logins.customer)} AS customer,
                       CAST({q(logins.time)} AS TIMESTAMPTZ) AS t, {q(key[0])} AS login,
                       {q(logins.device)} AS device, {q(logins.country)} AS country
                FROM {mirror}
                WHERE NOT coalesce(({logins.success}), false)
                  AND CAST({q(logins.time)} AS TIMESTAMPTZ) >= ?)
            SELECT f.customer, f.t, 'failed_logins', f.login, f.device, f.country, count(*), NULL
            FROM failures f JOIN failures w
              ON w.customer = f.customer AND w.t <= f.t AND w.t > f.t - to_seconds({window_s})
            WHERE f.t >= ?
            GROUP BY f.customer, f.t, f.login, f.device, f.country
            HAVING count(*) >= {config.failed_logins}""",
            [marks_horizon - config.failed_window, marks_horizon],
        )

"""The account health score: a rolling 0-100 score per account (100: nothing unusual).

Window
    The score of an account looks at its activity in the last ``window``
    (24 h), counted in ``bucket``-wide buckets (5 min): the window as of the
    job's watermark ``W`` (the newest event time seen, capped by commit time)
    is the ``window / bucket`` buckets ending with the one holding ``W``,
    i.e. event times ``t`` with ``floor(t) >= floor(W) - window + bucket``
    where ``floor`` rounds down to a bucket boundary (Unix epoch aligned).

Components (per account ``a``, over the window)
    ``n``            transactions of ``a`` (any type and status)
    ``declined``     of those, declined (``tables.transactions.declined``)
    ``reversed``     of those, reversed (``tables.transactions.reversed``)
    ``outflow``      sum of amounts of outflows not cancelled
    ``inflow``       sum of amounts of inflows not cancelled
    ``failed``       failed logins of ``a``'s customer
    ``new_devices``  successful logins of the customer from a device it never
                     logged in from before (first sighting, by time then id)
    ``balance``      ``a``'s current balance
    ``net_out``      ``outflow - inflow``

Formula (weights ``w`` from ``scores.health.weights``, defaults in brackets)::

    decline   = w.decline [25] * declined / max(n, w.decline_floor [4])
    velocity  = w.velocity [15] * clamp((n - w.velocity_normal [40]) / w.velocity_span [160], 0, 1)
    reversals = min(w.reversal_cap [15], w.reversal [5] * reversed)
    outflow   = w.outflow [20] * clamp(net_out / max(balance + net_out, 1), 0, 1)
    negative  = w.negative_balance [15] if balance < 0 else 0
    logins    = min(w.failed_login_cap [15], w.failed_login [3] * failed)
    devices   = min(w.new_device_cap [20], w.new_device [10] * new_devices)
    score     = clamp(100 - (decline + velocity + reversals + outflow + negative
                             + logins + devices), 0, 100)

    (``balance + net_out`` is the balance at the window's start, so
    ``outflow`` is the share of it that left within the window.)

Incremental maintenance (inside each batch's transaction)
    ``jobs.health_score__tx``: per account and bucket, the counts and sums,
    updated as end rows minus start rows (a decline or reversal moves a
    transaction between components at once). ``jobs.health_score__logins``:
    per customer and bucket, failed logins and first sightings.
    ``jobs.health_score__devices``: the (customer, device) pairs seen (when
    account takeover is configured on the same logins table, its
    ``jobs.account_takeover__devices`` instead: the same pairs; each job reads
    it as of before the batch, and it is updated once after both ran).
    Recomputed each batch: the accounts whose transactions, balance or
    customer's logins changed, and the accounts whose oldest bucket left the
    window (when the watermark enters a new bucket). So every stored score
    equals the formula over the window as of the current watermark.

Stored in ``headrace.health_scores`` (one row per account: ``account_id,
score, scored_at, as_of, components``; ``as_of`` is the watermark) and
``headrace.health_history`` (a row each time an account's score changes).
Account ids are stored as BIGINT. Logins are assumed append-only: deleting a
login retracts its failure but not a first sighting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa

from headrace.errors import ConfigError
from headrace.jobs.base import LATEST, JobContext, StreamJob, TimeRequest, state_table
from headrace.jobs.first_seen import FirstSeen
from headrace.jobs.state import (
    KeyedSums,
    latest,
    mirror_time,
)
from headrace.pipeline.model import quote_ident
from headrace.rules.config import AccountsTable, RulesConfig, TablesConfig
from headrace.scores.config import HealthScoreConfig, ScoresConfig
from headrace.source.changes import TableRef
from headrace.store.duckdb.results import rows_written
from headrace.store.duckdb.schema import META

SCORES = f"{META}.health_scores"
HISTORY = f"{META}.health_history"

SCORES_DDL: tuple[str, ...] = (
    f"""CREATE TABLE IF NOT EXISTS {SCORES} (
        account_id BIGINT PRIMARY KEY,
        score DOUBLE NOT NULL,
        scored_at TIMESTAMPTZ NOT NULL,
        as_of TIMESTAMPTZ,
        components JSON
    )""",
    f"""CREATE TABLE IF NOT EXISTS {HISTORY} (
        account_id BIGINT NOT NULL,
        score DOUBLE NOT NULL,
        scored_at TIMESTAMPTZ NOT NULL,
        as_of TIMESTAMPTZ,
        components JSON
    )""",
)

AFFECTED = "_job_hs_acc"
NEW_SCORES = "_job_hs_new"


def q(name: str) -> str:
    return quote_ident(name)


@dataclass(frozen=True)
class Affected:
    """The accounts a batch makes the job score again.

    ``ids`` are SQL selects of account ids (one column each); ``customers``
    SQL selects of customer ids, meaning every account of those customers.
    """

    ids: Sequence[str]
    customers: Sequence[str]

    def predicate(self, accounts: AccountsTable, alias: str) -> str:
        """SQL: the accounts mirror row ``alias`` is affected (one scan of the mirror,
        no join with a union of the batch's rows)."""
        terms = []
        if self.ids:
            terms.append(f"{alias}.{q(accounts.id)} IN ({' UNION ALL '.join(self.ids)})")
        if self.customers:
            customers = " UNION ALL ".join(self.customers)
            terms.append(f"{alias}.{q(accounts.customer)} IN ({customers})")
        return " OR ".join(terms) if terms else "false"

    def ids_sql(self, accounts: AccountsTable, mirror: str) -> str:
        """SQL: the affected account ids as column ``account``, deleted accounts included."""
        parts = list(self.ids)
        if self.customers:
            customers = " UNION ALL ".join(self.customers)
            key, customer = q(accounts.id), q(accounts.customer)
            parts.append(f"SELECT {key} FROM {mirror} WHERE {customer} IN ({customers})")
        return f"SELECT DISTINCT * FROM ({' UNION ALL '.join(parts)}) AS u(account)"


class HealthScore(StreamJob):
    """See the module docstring."""

    name = "health_score"

    def __init__(self, scores: ScoresConfig, rules: RulesConfig | None) -> None:
        tables = scores.tables or (rules.tables if rules is not None else TablesConfig())
        if scores.health is None:
            raise ConfigError("scores.health is not configured", "add `health: {}` under scores")
        self.config: HealthScoreConfig = scores.health
        self.rules = rules
        self.tx = tables.transactions
        self.accounts = tables.accounts
        self.logins = tables.logins
        self.tx_ref = TableRef.parse(self.tx.table)
        self.accounts_ref = TableRef.parse(self.accounts.table)
        self.logins_ref = TableRef.parse(self.logins.table)
        self.bucket_s = int(self.config.bucket.total_seconds())

    def definition(self) -> dict[str, object]:
        """The score's configuration and the tables and columns it reads."""
        return {
            "health": self.config.model_dump(mode="json"),
            "tables": [t.model_dump(mode="json") for t in (self.tx, self.accounts, self.logins)],
        }

    def inputs(self) -> tuple[TableRef, ...]:
        return (self.tx_ref, self.logins_ref, self.accounts_ref)

    def times(self) -> tuple[TimeRequest, ...]:
        return (
            TimeRequest(LATEST, self.tx_ref, q(self.tx.time)),
            TimeRequest(LATEST, self.logins_ref, q(self.logins.time)),
        )

    # ------------------------------------------------------------------ state

    def _bucket(self, time: str) -> str:
        s = self.bucket_s
        return f"to_timestamp(floor(epoch(CAST({q(time)} AS TIMESTAMPTZ)) / {s}) * {s})"

    def tx_sums(self) -> KeyedSums:
        tx = self.tx
        live = f"NOT coalesce(({tx.cancelled}), false)"
        amount = f"CAST({q(tx.amount)} AS DECIMAL(38, 4))"
        return KeyedSums(
            table=state_table(self.name, "tx"),
            groups=(("account", q(tx.account)), ("bucket", self._bucket(tx.time))),
            sums=(
                ("declined", f"CAST(coalesce(({tx.declined}), false) AS BIGINT)"),
                ("reversed", f"CAST(coalesce(({tx.reversed}), false) AS BIGINT)"),
                ("outflow", f"CASE WHEN ({tx.outflow}) AND {live} THEN {amount} ELSE 0 END"),
                ("inflow", f"CASE WHEN ({tx.inflow}) AND {live} THEN {amount} ELSE 0 END"),
            ),
        )

    def login_sums(self) -> KeyedSums:
        logins = self.logins
        return KeyedSums(
            table=state_table(self.name, "logins"),
            groups=(("customer", q(logins.customer)), ("bucket", self._bucket(logins.time))),
            sums=(
                ("failed", f"CAST(NOT coalesce(({logins.success}), false) AS BIGINT)"),
                ("new_devices", "CAST(0 AS BIGINT)"),
            ),
        )

    @property
    def shares_devices(self) -> bool:
        """Account takeover keeps the same devices table (same logins table and columns):
        one table serves both."""
        return (
            self.rules is not None
            and self.rules.account_takeover is not None
            and self.rules.tables.logins == self.logins
        )

    def devices(self) -> FirstSeen:
        logins = self.logins
        part = ("account_takeover", "devices") if self.shares_devices else (self.name, "devices")
        return FirstSeen(
            table=state_table(*part),
            owner=q(logins.customer),
            item=q(logins.device),
            time=q(logins.time),
            where=logins.success,
        )

    def horizon(self, watermark: datetime | None) -> datetime | None:
        """First bucket of the window ending at ``watermark``."""
        return None if watermark is None else window_start(self.config, watermark)

    def setup(self, con: duckdb.DuckDBPyConnection) -> None:
        for statement in SCORES_DDL:
            con.execute(statement)
        if self.shares_devices:  # an earlier version's own copy
            con.execute(f"DROP TABLE IF EXISTS {state_table(self.name, 'devices')}")

    def _ensure(self, ctx: JobContext, before: str | None = None) -> None:
        con = ctx.con
        mirror = ctx.mirror(self.logins_ref)
        self.tx_sums().ensure(con, ctx.mirror(self.tx_ref))
        self.login_sums().ensure(con, mirror)
        self.devices().ensure(con, mirror, before)

    # ------------------------------------------------------------------ batch

    def apply(self, ctx: JobContext) -> None:
        con = ctx.con
        tx_delta = ctx.delta(self.tx_ref)
        login_delta = ctx.delta(self.logins_ref)
        account_delta = ctx.delta(self.accounts_ref)
        if not self.ready:
            logins_before = (
                login_delta.before() if login_delta is not None else ctx.mirror(self.logins_ref)
            )
            self._ensure(ctx, logins_before)
            self.ready = True
        stored, old_horizon = ctx.watermark(self.name)
        watermark = latest(
            stored,
            ctx.batch_time(self.tx_ref, q(self.tx.time)),
            ctx.batch_time(self.logins_ref, q(self.logins.time)),
        )
        horizon = self.horizon(watermark)
        accounts = self.accounts
        tx_sums, login_sums = self.tx_sums(), self.login_sums()
        # The accounts to score again: by id (their transactions or row changed) and by
        # customer (its logins changed).
        ids: list[str] = []
        if tx_delta is not None:
            account = q(self.tx.account)
            ids += [
                f"SELECT {account} FROM {tx_delta.end}",
                f"SELECT {account} FROM {tx_delta.start}",
            ]
        if account_delta is not None:
            key = q(accounts.id)
            ids += [
                f"SELECT {key} FROM {account_delta.end}",
                f"SELECT {key} FROM {account_delta.start}",
            ]
        customers: list[str] = []
        if login_delta is not None:
            customer = q(self.logins.customer)
            customers += [
                f"SELECT {customer} FROM {login_delta.end}",
                f"SELECT {customer} FROM {login_delta.start}",
            ]
        expired = horizon is not None and old_horizon is not None and horizon > old_horizon
        if expired:
            ids.append(f"SELECT account FROM {tx_sums.table} WHERE bucket < '{horizon}'")
            customers.append(f"SELECT customer FROM {login_sums.table} WHERE bucket < '{horizon}'")
        since = f"bucket >= '{horizon}'" if horizon is not None else "true"
        if tx_delta is not None:
            tx_sums.update(con, tx_delta, since)
        if login_delta is not None:
            # The batch's first sightings of (customer, device) count as new devices
            # of their bucket, in the same statement as the batch's logins.
            devices = self.devices()
            bucket = self._bucket(self.logins.time)
            first_seen = (
                f"SELECT _owner AS customer, bucket, CAST(0 AS BIGINT) AS failed, "
                f"CAST(1 AS BIGINT) AS new_devices, 0 AS _rows "
                f"FROM {devices.new_rows(login_delta, f'{bucket} AS bucket')} WHERE first_seen"
            )
            login_sums.update(con, login_delta, since, extra_rows=first_seen)
            # Once every job has run: account takeover may read the same devices table.
            ctx.after_jobs(devices.table, lambda: devices.update(con, login_delta))
        ctx.set_watermark(self.name, watermark, horizon)
        if ids or customers:
            removed = account_delta is not None and (
                account_delta.deletes > 0 or account_delta.truncated
            )
            self._score(ctx, horizon, watermark, Affected(ids, customers), removed=removed)
        if expired:
            # After scoring: the affected accounts include those of the expired buckets
            # (the scores read only buckets within the window anyway).
            con.execute(
                f"DELETE FROM {tx_sums.table} WHERE bucket < '{horizon}'; "
                f"DELETE FROM {login_sums.table} WHERE bucket < '{horizon}'"
            )

    # ------------------------------------------------------------------ score

    def score_sql(self, horizon: datetime | None, where: str | None) -> str:
        """SQL: score and components of the accounts whose mirror row ``a`` matches
        ``where`` (SQL; all accounts when None)."""
        w = self.config.weights
        accounts = self.accounts
        mirror_filter = f"WHERE {where}" if where is not None else ""
        since = f"bucket >= '{horizon}'" if horizon is not None else "false"
        tx_sums, login_sums = self.tx_sums(), self.login_sums()
        return f"""
        WITH acc AS (
            SELECT a.{q(accounts.id)} AS account, a.{q(accounts.customer)} AS customer,
                   CAST(a.{q(accounts.balance)} AS DOUBLE) AS balance
            FROM {{accounts_mirror}} a {mirror_filter}
        ), tx AS (
            SELECT account, sum(_rows) AS n, sum(declined) AS declined,
                   sum(reversed) AS reversed, CAST(sum(outflow) AS DOUBLE) AS outflow,
                   CAST(sum(inflow) AS DOUBLE) AS inflow
            FROM {tx_sums.table} WHERE {since} AND account IN (SELECT account FROM acc)
            GROUP BY account
        ), lg AS (
            SELECT acc.account, sum(l.failed) AS failed, sum(l.new_devices) AS new_devices
            FROM acc JOIN {login_sums.table} l ON l.customer = acc.customer
            WHERE {since.replace("bucket", "l.bucket")}
            GROUP BY acc.account
        ), c AS (
            SELECT acc.account, acc.balance,
                   CAST(coalesce(tx.n, 0) AS BIGINT) AS n,
                   CAST(coalesce(tx.declined, 0) AS BIGINT) AS declined,
                   CAST(coalesce(tx.reversed, 0) AS BIGINT) AS reversed,
                   coalesce(tx.outflow, 0) AS outflow, coalesce(tx.inflow, 0) AS inflow,
                   CAST(coalesce(lg.failed, 0) AS BIGINT) AS failed,
                   CAST(coalesce(lg.new_devices, 0) AS BIGINT) AS new_devices
            FROM acc LEFT JOIN tx ON tx.account = acc.account
            LEFT JOIN lg ON lg.account = acc.account
        ), p AS (
            SELECT c.*, outflow - inflow AS net_out,
                   {w.decline} * declined / greatest(n, {w.decline_floor}) AS p_decline,
                   {w.velocity} * least(1.0, greatest(0.0,
                       (n - {w.velocity_normal}) / {w.velocity_span})) AS p_velocity,
                   least({w.reversal_cap}, {w.reversal} * reversed) AS p_reversals,
                   {w.outflow} * least(1.0, greatest(0.0, (outflow - inflow)
                       / greatest(coalesce(balance, 0) + outflow - inflow, 1.0))) AS p_outflow,
                   CASE WHEN balance < 0 THEN {w.negative_balance} ELSE 0.0 END AS p_negative,
                   least({w.failed_login_cap}, {w.failed_login} * failed) AS p_logins,
                   least({w.new_device_cap}, {w.new_device} * new_devices) AS p_devices
            FROM c
        )
        SELECT TRY_CAST(account AS BIGINT) AS account_id,
               greatest(0.0, least(100.0, 100.0 - (p_decline + p_velocity + p_reversals
                   + p_outflow + p_negative + p_logins + p_devices))) AS score,
               json_object('transactions', n, 'declined', declined, 'reversed', reversed,
                           'outflow', outflow, 'inflow', inflow, 'net_outflow', net_out,
                           'balance', balance, 'failed_logins', failed,
                           'new_devices', new_devices,
                           'penalties', json_object(
                               'decline', round(p_decline, 3), 'velocity', round(p_velocity, 3),
                               'reversals', p_reversals, 'outflow', round(p_outflow, 3),
                               'negative_balance', p_negative, 'failed_logins', p_logins,
                               'new_devices', p_devices)) AS components
        FROM p"""

    def _score(
        self,
        ctx: JobContext,
        horizon: datetime | None,
        watermark: datetime | None,
        affected: Affected | None,
        *,
        removed: bool = False,
    ) -> None:
        """Recompute the scores of the ``affected`` accounts (all when None); ``removed``:
        some accounts may have been deleted (their scores go too)."""
        con = ctx.con
        mirror = ctx.mirror(self.accounts_ref)
        where = None
        if affected is not None and removed:
            ids = affected.ids_sql(self.accounts, mirror)
            con.execute(f"CREATE OR REPLACE TEMP TABLE {AFFECTED} AS {ids}")
            where = f"a.{q(self.accounts.id)} IN (SELECT account FROM {AFFECTED})"
        elif affected is not None:
            where = affected.predicate(self.accounts, "a")
        sql = self.score_sql(horizon, where).replace("{accounts_mirror}", mirror)
        # One statement computes the new scores and whether each changed (the history
        # rows), so the two writes below only read this small table.
        created = con.execute(
            f"""CREATE OR REPLACE TEMP TABLE {NEW_SCORES} AS
            SELECT n.*, s.account_id IS NULL OR s.score IS DISTINCT FROM n.score AS changed
            FROM ({sql}) n LEFT JOIN {SCORES} s ON s.account_id = n.account_id"""
        )
        scored = rows_written(created)
        now = ctx.now
        if scored:
            con.execute(
                f"""INSERT INTO {HISTORY}
                SELECT account_id, score, ?, ?, components FROM {NEW_SCORES}
                WHERE account_id IS NOT NULL AND changed""",
                [now, watermark],
            )
        if affected is None:
            con.execute(f"DELETE FROM {SCORES}")
        elif removed:
            con.execute(
                f"""DELETE FROM {SCORES} WHERE account_id IN (
                    SELECT TRY_CAST(account AS BIGINT) FROM {AFFECTED}
                    EXCEPT SELECT account_id FROM {NEW_SCORES})"""
            )
        if not scored:
            return
        # Nearly every scored account has its row already: an UPDATE is cheaper than an
        # upsert, and the rows it did not find (new accounts, a rebuild) are inserted after.
        updated = con.execute(
            f"""UPDATE {SCORES} s SET score = n.score, scored_at = ?, as_of = ?,
                components = n.components
            FROM {NEW_SCORES} n WHERE s.account_id = n.account_id""",
            [now, watermark],
        )
        if rows_written(updated) < scored:
            con.execute(
                f"""INSERT INTO {SCORES}
                SELECT n.account_id, n.score, ?, ?, n.components FROM {NEW_SCORES} n
                ANTI JOIN {SCORES} s ON s.account_id = n.account_id
                WHERE n.account_id IS NOT NULL""",
                [now, watermark],
            )

    # ---------------------------------------------------------------- rebuild

    def rebuild(self, ctx: JobContext) -> None:
        """Every bucket of the window, every device, and every account's score from the mirrors."""
        con = ctx.con
        self._ensure(ctx)
        self.ready = True
        tx_mirror, login_mirror = ctx.mirror(self.tx_ref), ctx.mirror(self.logins_ref)
        watermark = latest(
            mirror_time(con, tx_mirror, q(self.tx.time)),
            mirror_time(con, login_mirror, q(self.logins.time)),
        )
        horizon = self.horizon(watermark)
        since = f"bucket >= '{horizon}'" if horizon is not None else "false"
        tx_sums, login_sums, devices = self.tx_sums(), self.login_sums(), self.devices()
        tx_sums.rebuild(con, tx_mirror, since)
        login_sums.rebuild(con, login_mirror, since)
        devices.rebuild(con, login_mirror)
        logins = self.logins
        key = q(ctx.key(self.logins_ref)[0])
        con.execute(
            f"""UPDATE {login_sums.table} l SET new_devices = x.n
            FROM (SELECT customer, bucket, count(*) AS n FROM (
                      SELECT {q(logins.customer)} AS customer,
                             {self._bucket(logins.time)} AS bucket,
                             row_number() OVER (PARTITION BY {q(logins.customer)},
                                 {q(logins.device)} ORDER BY {q(logins.time)}, {key}) AS k
                      FROM {login_mirror} WHERE coalesce(({logins.success}), false))
                  WHERE k = 1 AND {since} GROUP BY ALL) x
            WHERE l.customer = x.customer AND l.bucket = x.bucket"""
        )
        ctx.set_watermark(self.name, watermark, horizon)
        self._score(ctx, horizon, watermark, None)


def worst_accounts(con: duckdb.DuckDBPyConnection, limit: int = 20) -> pa.Table:
    """The ``limit`` accounts with the lowest health score (ties: lowest id first)."""
    return con.sql(
        f"SELECT account_id, score, scored_at, as_of, components FROM {SCORES} "
        "ORDER BY score, account_id LIMIT $limit",
        params={"limit": limit},
    ).to_arrow_table()


def window_start(config: HealthScoreConfig, watermark: datetime) -> datetime:
    """First instant of the window ending at ``watermark`` (for reference computations)."""
    s = int(config.bucket.total_seconds())
    floor = int(watermark.timestamp()) // s * s
    return datetime.fromtimestamp(floor, UTC) - config.window + timedelta(seconds=s)

"""Account takeover evaluated in memory, batch by batch, exactly as the SQL rule does.

:meth:`AccountTakeoverLane.apply` gets every :class:`ChangeBatch` in source order and
returns the alerts the SQL rule (:mod:`headrace.rules.account_takeover` +
:func:`headrace.alerts.store.emit_incidents`) writes for it;
``tests/rules/test_lane_account_takeover.py`` checks the equality on real PostgreSQL
change streams. Per batch (each step named after the SQL code it mirrors):

- **Watermark** (``RuleJob.advance``): ``W`` is the watermark *before* the batch; after
  it ``max(W, least(t, commit_ts))`` over the end rows of the logins *and* of the
  transactions (a batch touching neither leaves it alone).
- **New logins** and **risky logins** (``FirstSeen.new_rows``, ``AccountTakeover._mark``):
  the marks of the batch's new logins (new device, failed-login burst), added before
  the triggers are checked: :mod:`headrace.rules.lane.account_takeover_marks`.
- **Triggers** (``create_tx_triggers``): end rows of transactions matching ``where``
  (default the outflow condition) that are new, whose account or amount changed, or
  that did not match before, with ``t >= W - lateness``. A time change alone does not
  re-trigger, so the start row of *any* transaction may decide: the lane keeps each
  matching transaction's (account, amount) (see "State"; a start row that did not
  match, or none, triggers alike).
- **Balance** (``AccountTakeover._detect``): the account's last version written by the
  batch before the transaction's first change in the batch (``_hr_seq`` order, all of
  the batch's changes, a truncate's earlier ones included), else its balance before the
  batch; the account must exist before the batch (its customer is read there).
- **Candidates**: ``balance > 0``, ``amount >= min_amount``, ``amount >= outflow_share x
  balance`` (decimal arithmetic, as DuckDB with the config's literals), and marks of the
  customer with time in ``[t - window, t]``. Numbers, summary and the payload's logins as
  the SQL computes them: DuckDB divides decimals as doubles, ``round`` rounds a double's
  exact value half away from zero, ``format('{}')`` prints decimals as doubles (``repr``).
- **Incidents** (key ``account_takeover:<account>``): :class:`Incidents`.

State: the accounts (customer, balance) and every matching transaction's (account,
amount): "changed outflow" reads start rows of any age, and pgoutput sends no old
values; so memory grows with the tables (~150 bytes a row), as with the logins'
(:class:`RiskyLogins`). Per changed row the work is Python over the net change's
columns (:class:`NetChange`: no dict per row); the batch's order of changes (balance
versions) is read only when a trigger needs it.

Not ported: unchanged TOAST values (never the rule's columns), batches cut into segments
by a schema change, keys of several columns (the SQL reads ``_k0``). :meth:`seed` is the
SQL ``rebuild`` (the marks, which depend on history: :meth:`RiskyLogins.seed`).
SQL rule findings the lane follows, as they may be bugs: an outflow of an account
inserted in the same batch is never checked (its alert depends on the batch cut; test
``test_account_opened_in_the_batch_of_its_outflow``); marks are never retracted (a
deleted or corrected login still counts, ``test_restart_from_saved_state``) while a
rebuild recomputes them from the mirror, so a snapshot in between changes the alerts.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import duckdb

from headrace.rules.base import EARLIEST, EVIDENCE_LIMIT
from headrace.rules.config import RulesConfig
from headrace.rules.lane.account_takeover_marks import RULE, RiskyLogins
from headrace.rules.lane.alert import Incidents, LaneAlert, from_us, to_us, us_delta
from headrace.rules.lane.changes import (
    Convert,
    NetChange,
    first_column,
    integers,
    key_columns,
    net_change,
)
from headrace.rules.lane.condition import arrow_condition
from headrace.rules.lane.duck_numbers import duck_round, duck_text, sql_literal
from headrace.rules.lane.saved import RuleSaved
from headrace.rules.lane.tx_rule import advance, tx_columns, tx_wanted
from headrace.rules.triggers import TX_FIELDS
from headrace.source.changes import OP, SEQ, ChangeBatch, TableRef, old_name
from headrace.store.duckdb.schema import mirror_table

OUTFLOW = "_lane_outflow"
"""Name of the rule's ``where`` among a net change's values."""


@dataclass(frozen=True)
class AccountTakeoverAlert(LaneAlert):
    """A lane alert with the payload's ``logins`` (the risky logins, as the SQL lists
    them: ordered by time, login, reason)."""

    logins: tuple[Mapping[str, Any], ...] = ()

    def payload(self) -> dict[str, Any]:
        out = super().payload()
        out["logins"] = list(self.logins)
        return out


_Tx = tuple[int | None, Any]
"""A transaction matching ``where``: its (account, amount), what decides whether its
end row is a trigger (a tuple: cheaper to build per row than a NamedTuple)."""


def _times(literal: Decimal | float, value: Decimal) -> Decimal | float:
    return literal * value if isinstance(literal, Decimal) else literal * float(value)


def _at_least(value: Decimal, bound: Decimal | float) -> bool:
    return value >= bound if isinstance(bound, Decimal) else float(value) >= bound


@dataclass
class AccountTakeoverLane:
    """The account-takeover rule over change batches, in memory (module docstring)."""

    rules: RulesConfig
    name: str = RULE
    watermark_us: int | None = None
    accounts: dict[Hashable, tuple[int | None, Any]] = field(default_factory=dict)
    """Account id -> (customer, balance), as before the batch being applied."""
    txs: dict[Hashable, _Tx] = field(default_factory=dict)
    """The start rows (before the batch being applied) of the transactions matching
    ``where``, as triggers read them."""

    def __post_init__(self) -> None:
        config = self.rules.account_takeover
        if config is None:
            raise ValueError("the account takeover lane needs rules.account_takeover")
        self.config = config
        tables = self.rules.tables
        tx = self.tx_table = tables.transactions
        accounts = self.account_table = tables.accounts
        self.tx_ref, self.account_ref = (TableRef.parse(t.table) for t in (tx, accounts))
        self.lateness_us = us_delta(self.rules.lateness)
        self.risky = RiskyLogins(config, tables.logins, self.lateness_us)
        # what the net changes read, converted: ids as int64, times as µs
        self.account_columns: dict[str, Convert | None] = {
            accounts.id: integers,
            accounts.customer: integers,
            accounts.balance: None,
        }
        self.columns = tx_columns(tx)
        self.tx_columns = tx_wanted(self.columns)
        self.where_sql = config.where or tx.outflow
        self.where = arrow_condition(self.where_sql)
        self.earliest_us = to_us(EARLIEST)
        self.min_amount = sql_literal(config.min_amount)
        self.share = sql_literal(config.outflow_share)
        self.incidents = Incidents(us_delta(config.rearm_after))

    def inputs(self) -> tuple[TableRef, ...]:
        return (self.tx_ref, self.risky.ref, self.account_ref)

    # ----------------------------------------------------------- seeding

    def seed(self, con: duckdb.DuckDBPyConnection, saved: RuleSaved | None = None) -> None:
        """Start from the store's mirrors, as the SQL ``rebuild`` does after a snapshot:
        the watermark is the newest ``least(t, now())`` of logins and transactions, the
        devices every login's, the marks the SQL rule's table (it ran as SQL before) or the
        rebuild's. ``saved`` (the lane's own record) gives the watermark, incidents and
        marks instead."""
        logins, tx, accounts = self.risky.table, self.tx_table, self.account_table
        login_mirror, tx_mirror = mirror_table(self.risky.ref), mirror_table(self.tx_ref)
        newest = con.execute(
            "SELECT greatest("
            + ", ".join(
                f'(SELECT max(least(CAST("{time}" AS TIMESTAMPTZ), now())) FROM {mirror})'
                for time, mirror in ((logins.time, login_mirror), (tx.time, tx_mirror))
            )
            + ")"
        ).fetchall()[0][0]
        self.watermark_us = None if newest is None else to_us(newest)
        if saved is not None:
            self.watermark_us = saved.watermark_us
        self.accounts.clear()
        self.txs.clear()
        for account, customer, balance in con.execute(
            f'SELECT "{accounts.id}"::BIGINT, "{accounts.customer}"::BIGINT, '
            f'"{accounts.balance}" FROM {mirror_table(self.account_ref)}'
        ).fetchall():
            self.accounts[account] = (customer, balance)
        key = key_columns(con, self.tx_ref)
        width, names = len(key), ", ".join(f'"{k}"' for k in key)
        for row in con.execute(
            f'SELECT {names}, "{tx.account}"::BIGINT, "{tx.amount}" FROM {tx_mirror} '
            f"WHERE coalesce(({self.where_sql}), false)"
        ).fetchall():
            k: Hashable = row[0] if width == 1 else tuple(row[:width])
            self.txs[k] = (row[-2], row[-1])
        self.risky.seed(con, self.watermark_us, saved)
        self.incidents.restore(con, RULE, saved)

    def take_saved(self) -> RuleSaved:
        """What to record with the lane's position: the watermark, the incidents changed,
        and the marks when they changed (:meth:`RiskyLogins.take_state`)."""
        state = self.risky.take_state()
        return RuleSaved(self.watermark_us, self.incidents.take_touched(), state)

    # ----------------------------------------------------------- per batch

    def apply(self, batch: ChangeBatch) -> list[LaneAlert]:
        """Evaluate one batch (module docstring); the alerts it opens, in event order."""
        login_change = self.risky.change(batch)
        tx_change = net_change(
            batch, self.tx_ref, self.tx_columns, {OUTFLOW: self.where}, mark=self.columns["t"]
        )
        account_change = net_change(batch, self.account_ref, self.account_columns)
        alerts: list[LaneAlert] = []
        if login_change is not None or tx_change is not None:
            previous, self.watermark_us = advance(
                self.watermark_us, self.earliest_us, login_change, tx_change
            )
            if login_change is not None:
                self.risky.apply(login_change, previous)
            if tx_change is not None:
                found = self._detect(batch, tx_change, previous)
                alerts = self.incidents.open(found)
                self._update_txs(tx_change)
            self.risky.prune(previous)
        if account_change is not None:
            self._update_accounts(account_change)
        return alerts

    def _detect(self, batch: ChangeBatch, change: NetChange, previous: int) -> list[LaneAlert]:
        """``_detect``: the candidates among the batch's outflows."""
        cutoff = previous - self.lateness_us
        columns = change.columns
        times, accounts = columns[self.columns["t"]], columns[self.columns["account"]]
        amounts, outflows = columns[self.columns["amount"]], columns[OUTFLOW]
        held, starts, min_amount = self.accounts, self.txs, self.min_amount
        triggers: list[tuple[Hashable, int]] = []
        for key, i, alive in zip(change.keys, change.rows, change.live, strict=True):
            if not alive or not outflows[i]:
                continue
            t, account, amount = times[i], accounts[i], amounts[i]
            # the cheap conditions first (all of them must hold; their order is free)
            if t is None or t < cutoff or amount is None or account not in held:
                continue
            if not _at_least(amount, min_amount):
                continue
            if starts.get(key) == (account, amount):
                continue  # not new, same account and amount, matched before: no trigger
            triggers.append((key, i))
        if not triggers:
            return []
        firsts, versions = self._batch_order(batch, {accounts[i] for _, i in triggers})
        found: list[LaneAlert] = []
        for key, i in triggers:
            account, amount = accounts[i], amounts[i]
            customer, balance = held[account]
            entries = versions.get(account, [])
            index = bisect.bisect_left(entries, (firsts[first_column(key)],)) - 1
            if index >= 0 and entries[index][1] is not None:
                balance = entries[index][1]  # coalesce(then_balance, balance)
            if balance is None or not balance > 0 or customer is None:
                continue
            if _at_least(amount, _times(self.share, balance)):
                alert = self._candidate(
                    key,
                    columns,
                    i,
                    account_then=(customer, balance),
                    commit_us=change.commits[i],
                    lsn=change.lsns[i],
                )
                if alert is not None:
                    found.append(alert)
        return found

    def _batch_order(
        self, batch: ChangeBatch, wanted: set[Any]
    ) -> tuple[dict[Hashable, int], dict[int, list[tuple[int, Any]]]]:
        """Each transaction key's first change (``_hr_seq``), and the versions of the
        ``wanted`` accounts, read from the batch as :func:`net_change` decoded it."""
        key = next(part.schema.key_columns[0] for part in batch.tables if part.table == self.tx_ref)
        tx = net_change(batch, self.tx_ref, {OP: None, SEQ: None, key: None, old_name(key): None})
        firsts: dict[Hashable, int] = {}
        if tx is not None:
            columns = tx.columns
            # a delete's values are its old, a truncate has none
            row_keys = [
                old if op == "D" else None if op == "T" else new
                for op, new, old in zip(
                    columns[OP], columns[key], columns[old_name(key)], strict=True
                )
            ]
            # the first change of a key wins: the last one written of the reversed rows
            firsts = dict(zip(reversed(row_keys), reversed(columns[SEQ]), strict=True))
            firsts.pop(None, None)
        versions: dict[int, list[tuple[int, Any]]] = {}
        table = self.account_table
        accounts = net_change(
            batch,
            self.account_ref,
            {OP: None, SEQ: None, table.id: integers, table.balance: None},
        )
        if accounts is not None:
            columns = accounts.columns
            for op, seq, account, balance in zip(
                columns[OP], columns[SEQ], columns[table.id], columns[table.balance], strict=True
            ):
                if account in wanted and op in ("I", "U"):
                    versions.setdefault(account, []).append((seq, balance))
        return firsts, versions

    def _candidate(
        self,
        key: Hashable,
        columns: dict[str, list[Any]],
        i: int,
        *,
        account_then: tuple[int, Any],
        commit_us: int,
        lsn: int,
    ) -> LaneAlert | None:
        """The alert of a trigger (row ``i`` of the batch's ``columns``) priced at a
        positive balance it takes the share of, when its customer has marks in the window."""
        customer, balance = account_then
        amount: Decimal = columns[self.columns["amount"]][i]
        t: int = columns[self.columns["t"]][i]
        window = self.risky.window(customer, t)
        if not window:
            return None
        account: int = columns[self.columns["account"]][i]
        newest = max(m.t for m in window)
        minutes = (t / 1_000_000 - newest / 1_000_000) / 60
        reasons = sorted({m.reason for m in window})
        percent = duck_round(float(100 * amount) / float(balance))
        listed = sorted(window, key=lambda m: (m.t, m.login, m.reason))
        numbers: dict[str, Any] = {
            "amount": amount,
            "balance": balance,
            "share": duck_round(float(amount) / float(balance), 3),
            "outflow_share": self.config.outflow_share,
            "failed_logins": max(m.failed for m in window),
            "minutes_since_login": duck_round(minutes, 2),
            "reasons": reasons,
        }
        evidence = [
            {
                "id": key,
                "at": from_us(t),
                "account": account,
                **{name: columns[self.columns[name]][i] for name in TX_FIELDS if name != "t"},
            }
        ][:EVIDENCE_LIMIT]
        return AccountTakeoverAlert(
            rule=RULE,
            account=account,
            key=f"{RULE}:{account}",
            trigger=key,
            event_us=t,
            started_us=min(m.t for m in window),
            commit_us=commit_us,
            lsn=lsn,
            severity=self.config.severity.value,
            summary=(
                f"outflow {duck_text(amount)} = {duck_text(percent)}% of the balance "
                f"{duck_text(balance)} of account {account}, "
                f"{duck_text(duck_round(minutes, 1))} min after {' and '.join(reasons)}"
            ),
            numbers=numbers,
            evidence=evidence,
            logins=tuple(
                {"at": from_us(m.t), **{k: v for k, v in m._asdict().items() if k != "t"}}
                for m in listed
            ),
        )

    def _update_txs(self, change: NetChange) -> None:
        """The transactions' start rows of the next batch."""
        if change.truncated:
            self.txs.clear()
        columns, txs = change.columns, self.txs
        accounts, amounts = columns[self.columns["account"]], columns[self.columns["amount"]]
        outflows = columns[OUTFLOW]
        for key, i, alive in zip(change.keys, change.rows, change.live, strict=True):
            if alive and outflows[i]:
                txs[key] = (accounts[i], amounts[i])
            else:
                txs.pop(key, None)

    def _update_accounts(self, change: NetChange) -> None:
        """The accounts' (customer, balance) of the next batch."""
        table, accounts = self.account_table, self.accounts
        if change.truncated:
            accounts.clear()
        columns = change.columns
        ids, customers = columns[table.id], columns[table.customer]
        balances = columns[table.balance]
        for key, i, alive in zip(change.keys, change.rows, change.live, strict=True):
            if alive:
                accounts[ids[i]] = (customers[i], balances[i])
            else:
                accounts.pop(key, None)

"""Applies the generator's actions: each becomes rows of the current tick's batch.

The executor keeps the money in memory as it goes (balances, holds, pending
and reversible transactions, the next id of every table), which is why the
generator must be the only writer of the demo tables while it runs. Actions
that have a follow-up (a pending transaction's outcome, a reversal, a login
after a failed burst) hand it back to the generator's schedule.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from headrace.demo.actions import (
    Action,
    Insert,
    Login,
    NewCustomer,
    NormalLogin,
    NormalTransaction,
    Resolve,
    Reverse,
    Truth,
    TxnSpec,
)
from headrace.demo.batch import TickBatch
from headrace.demo.config import TIERS
from headrace.demo.state import Account
from headrace.demo.traffic import NormalTraffic
from headrace.demo.traits import device_count, spend_scale_cents

_INSUFFICIENT_FUNDS_DELAY_US = 300_000

Schedule = Callable[[int, Action], None]
"""Schedules an action at a simulated time (microseconds)."""


@dataclass
class WorkloadStats:
    """Running totals of what the generator wrote."""

    ticks: int = 0  # ticks run (simulated time = ticks * tick_ms)
    commits: int = 0  # database transactions committed (empty ticks write nothing)
    transactions: int = 0  # rows inserted into transactions
    status_changes: int = 0  # transactions rows updated (settled, declined, reversed)
    ledger_entries: int = 0  # balance changes
    logins: int = 0  # login attempts
    customers: int = 0  # customers opened while running
    changes: int = 0  # every row inserted or updated
    scenarios: Counter[str] = field(default_factory=Counter)  # injected, per family
    skipped: Counter[str] = field(default_factory=Counter)  # no eligible victim, per family
    envelope_breaches: int = 0  # normal transactions that had to exceed the per-account cap
    behind_s: float = 0.0  # how far the last paced tick ran behind its wall-clock slot


class ActionExecutor:
    """Turns actions into rows of :attr:`batch` and keeps the in-memory money state.

    ``traffic`` draws the normal actions (and knows the population);
    ``rng`` is the generator's traffic random generator (normal draws and new
    customers come from it, in execution order); ``schedule`` takes the
    follow-up actions; ``quiet_us`` is how long a new account stays out of
    fraud scenarios.
    """

    def __init__(
        self,
        traffic: NormalTraffic,
        *,
        rng: random.Random,
        schedule: Schedule,
        stats: WorkloadStats,
        quiet_us: int,
    ) -> None:
        self.population = traffic.population
        self.traffic = traffic
        self.stats = stats
        self.batch = TickBatch()
        self._rng = rng
        self._schedule = schedule
        self._quiet_us = quiet_us
        self._next_id = {table: value + 1 for table, value in self.population.max_ids.items()}
        self._pending: dict[int, TxnSpec] = {}
        self._reversible: dict[int, TxnSpec] = {}

    def start_tick(self) -> TickBatch:
        """A new, empty batch that the following actions write into."""
        self.batch = TickBatch()
        return self.batch

    def peek_id(self, table: str) -> int:
        """The id the next row of ``table`` will get."""
        return self._next_id[table]

    def take_id(self, table: str) -> int:
        """The id of a new row of ``table``."""
        value = self._next_id[table]
        self._next_id[table] = value + 1
        return value

    def adopt_pending(self, conn: psycopg.Connection[tuple[object, ...]], due_us: int) -> None:
        """Settle transactions an earlier run left pending, at ``due_us``."""
        by_id = {a.id: a for a in self.population.accounts}
        rows = conn.execute(
            "SELECT id, account_id, type, channel, (amount * 100)::bigint, country "
            "FROM transactions WHERE status = 'pending' ORDER BY id"
        ).fetchall()
        for txn_id, account_id, kind, channel, cents, country in rows:
            spec = TxnSpec(
                account=by_id[int(str(account_id))],
                type=str(kind),
                channel=str(channel),
                amount=int(str(cents)),
                country=str(country),
                normal=False,
            )
            if spec.outflow:
                spec.account.held += spec.amount
            self._pending[int(str(txn_id))] = spec
            self._schedule(due_us, Resolve(int(str(txn_id))))

    def apply(self, at: int, action: Action) -> None:
        """Apply one action at simulated time ``at`` (microseconds)."""
        match action:
            case NormalTransaction():
                self._insert(at, self.traffic.transaction(self._rng, at))
            case Insert(spec):
                self._insert(at, spec)
            case Resolve(txn_id):
                self._resolve(at, txn_id)
            case Reverse(txn_id):
                self._reverse(at, txn_id)
            case Login():
                self._login(at, action)
            case NormalLogin():
                for when, login in self.traffic.login(self._rng, at):
                    if when == at:
                        self._login(at, login)
                    else:
                        self._schedule(when, login)
            case NewCustomer():
                self._new_customer(at)
            case Truth():
                self.batch.add_truth(action, at)

    # -- transactions and money ----------------------------------------------------

    def _insert(self, at: int, spec: TxnSpec) -> None:
        account = spec.account
        if spec.outflow_share is not None:
            spec.amount = max(100, int(account.available * spec.outflow_share))
        txn_id = self.take_id("transactions")
        status = "settled" if spec.outcome == "now" else "pending"
        if spec.outflow and spec.outcome in ("settle", "void") and account.available < spec.amount:
            spec.outcome = "decline"
            spec.decline_reason = "insufficient_funds"
            spec.delay_us = _INSUFFICIENT_FUNDS_DELAY_US
        self.batch.add(
            "transactions",
            (
                txn_id,
                account.id,
                spec.card_id,
                spec.merchant_id,
                spec.parent_id,
                spec.amount,
                account.currency,
                spec.channel,
                spec.type,
                status,
                spec.country,
                spec.device,
                spec.ip,
                at,
            ),
        )
        self.stats.transactions += 1
        if status == "settled":
            self._book(at, account, txn_id, "settlement", _delta(spec))
            return
        if spec.outflow and spec.outcome != "decline":
            account.held += spec.amount
        self._pending[txn_id] = spec
        self._schedule(at + spec.delay_us, Resolve(txn_id))

    def _book(self, at: int, account: Account, txn_id: int | None, kind: str, delta: int) -> None:
        """A ledger entry and the account's new balance."""
        account.balance += delta
        self.batch.add(
            "ledger",
            (self.take_id("ledger_entries"), account.id, txn_id, kind, delta, account.balance, at),
        )
        self.batch.balances[account.id] = (account.balance, at)
        self.stats.ledger_entries += 1

    def _set_status(self, at: int, txn_id: int, status: str, reason: str | None = None) -> None:
        self.batch.status[txn_id] = (status, reason, at)
        self.stats.status_changes += 1

    def _resolve(self, at: int, txn_id: int) -> None:
        spec = self._pending.pop(txn_id)
        account = spec.account
        if spec.outflow and spec.outcome != "decline":
            account.held -= spec.amount
        if spec.outcome == "decline":
            self._set_status(at, txn_id, "declined", spec.decline_reason)
            return
        if spec.outcome == "void":
            self._set_status(at, txn_id, "reversed")
            return
        self._set_status(at, txn_id, "settled")
        self._book(at, account, txn_id, "settlement", _delta(spec))
        if spec.type == "purchase":
            account.purchases += 1
            account.purchase_sum += spec.amount
            self.traffic.remember_settled(txn_id, spec)
        if spec.reverse_after_us is not None:
            self._reversible[txn_id] = spec
            self._schedule(at + spec.reverse_after_us, Reverse(txn_id))
        if spec.fee_cents:
            fee = TxnSpec(
                account=account,
                type="fee",
                channel=spec.channel,
                amount=spec.fee_cents,
                country=spec.country,
                card_id=spec.card_id,
                merchant_id=spec.merchant_id,
                parent_id=txn_id,
                device=spec.device,
                outcome="now",
                normal=spec.normal,
            )
            self._insert(at, fee)

    def _reverse(self, at: int, txn_id: int) -> None:
        spec = self._reversible.pop(txn_id)
        self._set_status(at, txn_id, "reversed")
        self._book(at, spec.account, txn_id, "reversal", -_delta(spec))
        if spec.type == "purchase":
            spec.account.purchases -= 1
            spec.account.purchase_sum -= spec.amount

    # -- logins and new customers ----------------------------------------------------

    def _login(self, at: int, login: Login) -> None:
        self.batch.add(
            "logins",
            (
                self.take_id("logins"),
                login.customer_id,
                login.success,
                login.failure_reason,
                login.device,
                login.ip,
                login.country,
                at,
            ),
        )
        self.stats.logins += 1

    def _new_customer(self, at: int) -> None:
        rng = self._rng
        population = self.population
        template = population.accounts[rng.randrange(len(population.accounts))]
        country = template.country
        customer_id = self.take_id("customers")
        account_id = self.take_id("accounts")
        card_id = self.take_id("cards")
        tier = rng.choices([t.name for t in TIERS], weights=[t.weight for t in TIERS])[0]
        currency = template.currency
        name = f"New Customer {customer_id}"
        self.batch.add(
            "customers",
            (customer_id, name, f"customer.{customer_id}@example.com", country, "low", at),
        )
        self.batch.add("accounts", (account_id, customer_id, tier, 0, currency, at))
        self.batch.add("cards", (card_id, account_id, f"{rng.randrange(10_000):04d}", at))
        account = Account(
            id=account_id,
            customer_id=customer_id,
            country=country,
            tier=tier,
            currency=currency,
            active=True,
            balance=0,
            scale=spend_scale_cents(account_id, tier, currency),
            physical_cards=[card_id],
            online_cards=[card_id],
            quiet_until_us=at + self._quiet_us,
        )
        population.accounts.append(account)
        population.customer_devices[customer_id] = device_count(customer_id)
        self.traffic.sampler.add(account)
        self._book(at, account, None, "opening", max(100, round(account.scale * 40)))
        self.stats.customers += 1


def _delta(spec: TxnSpec) -> int:
    """The balance change of a settled ``spec``."""
    return -spec.amount if spec.outflow else spec.amount

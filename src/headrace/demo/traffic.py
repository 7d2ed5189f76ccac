"""Normal (non-fraud) traffic: the daily rhythm, who is active, what they do.

Every draw keeps inside :class:`~headrace.demo.config.NormalEnvelope`, so
the fraud rules can tell normal traffic from the injected scenarios.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from dataclasses import replace

from headrace.demo.actions import Login, TxnSpec, pos_purchase, transfer
from headrace.demo.clock import DAY_US, SECOND_US
from headrace.demo.config import EUR_PER_UNIT, NormalEnvelope
from headrace.demo.state import Account, Merchant, Population
from headrace.demo.traits import device_ip, known_device, random_ip

DECLINE_REASONS: tuple[str, ...] = ("do_not_honor", "limit_exceeded", "expired_card")


def diurnal_shape(hour: float) -> float:
    """Relative activity (0.15 to 1) at an hour of the day (UTC, 0-24).

    A lunchtime and an evening peak over a quiet night.
    """

    def bump(center: float, width: float) -> float:
        distance = min(abs(hour - center), 24.0 - abs(hour - center))
        return math.exp(-((distance / width) ** 2))

    return 0.15 + 0.85 * max(bump(12.5, 3.5), bump(18.5, 2.5))


def diurnal_factor(time_us: int, amplitude: float) -> float:
    """The rate multiplier at a simulated instant: 1 at the peak, 1 - amplitude at its lowest."""
    hour = (time_us % DAY_US) / (3600.0 * SECOND_US)
    return 1.0 - amplitude * (1.0 - diurnal_shape(hour)) / 0.85


def activity_weights(count: int, seed: int, exponent: float) -> list[float]:
    """Zipf weights of ``count`` accounts in id order: a seeded shuffle assigns ranks.

    The account of rank ``r`` (1-based) has weight ``1 / r**exponent``, so a
    few accounts are very busy and most are quiet, and the busy ones are
    spread over the id range.
    """
    ranks = list(range(1, count + 1))
    random.Random(f"{seed}:activity").shuffle(ranks)  # noqa: S311 - a seeded simulation
    return [1.0 / rank**exponent for rank in ranks]


def login_attempts(
    rng: random.Random, at: int, failures: int, login: Login
) -> list[tuple[int, Login]]:
    """``failures`` bad-password attempts 3-10 s apart from ``login``'s device, then ``login``.

    Returns (time, login) pairs, the first at ``at``.
    """
    failed = replace(login, success=False, failure_reason="bad_password")
    events: list[tuple[int, Login]] = []
    for _ in range(failures):
        events.append((at, replace(failed)))
        at += rng.randrange(3 * SECOND_US, 10 * SECOND_US)
    events.append((at, login))
    return events


def avoid_band(cents: int, envelope: NormalEnvelope) -> int:
    """Move an amount out of the band just under the structuring threshold."""
    if envelope.structuring_band_low_cents <= cents < envelope.structuring_band_high_cents:
        return int(cents * 0.8)
    return cents


class AccountSampler:
    """Draws the account of the next normal transaction: Zipf-skewed, rate-capped.

    An account drawn again before ``min_gap_s`` has passed since its last
    normal transaction is redrawn (up to :data:`TRIES` times by activity, then
    up to as many times uniformly: the hot accounts can all be capped at once
    while most of the population is free), which caps every account at
    ``60 / min_gap_s`` normal transactions a minute however hot it is. When
    every try hits a capped account the last one is used and counted in
    :attr:`breaches`: the population is too small for the rate.
    """

    TRIES = 32

    def __init__(
        self, accounts: list[Account], seed: int, exponent: float, envelope: NormalEnvelope
    ) -> None:
        self._accounts: list[Account] = []
        self._cum: list[float] = []
        self._gap_us = int(envelope.min_gap_s * SECOND_US)
        self.breaches = 0
        weights = activity_weights(len(accounts), seed, exponent)
        self._exponent = exponent
        self._ranked = len(accounts)
        total = 0.0
        for account, weight in zip(accounts, weights, strict=True):
            if account.active:
                total += weight
                self._accounts.append(account)
                self._cum.append(total)

    def add(self, account: Account) -> None:
        """Let a newly opened account take part (with the quietest weight)."""
        self._ranked += 1
        total = self._cum[-1] if self._cum else 0.0
        self._accounts.append(account)
        self._cum.append(total + 1.0 / self._ranked**self._exponent)

    def pick(self, rng: random.Random, now_us: int, *, capped: bool = True) -> Account:
        """The next active account; ``capped`` honours the per-account gap."""
        cum, accounts, draw = self._cum, self._accounts, rng.random
        total, last = cum[-1], len(cum) - 1
        account = accounts[bisect_right(cum, draw() * total, 0, last)]
        if not capped:
            return account
        tries = 1
        while account.next_normal_us > now_us:
            if tries == 2 * self.TRIES:
                self.breaches += 1
                break
            if tries < self.TRIES:
                account = accounts[bisect_right(cum, draw() * total, 0, last)]
            else:
                account = accounts[int(draw() * len(accounts))]
            tries += 1
        account.next_normal_us = now_us + self._gap_us
        return account

    def __len__(self) -> int:
        return len(self._accounts)


class NormalTraffic:
    """Draws normal transactions and logins for the live generator."""

    def __init__(
        self, population: Population, envelope: NormalEnvelope, sampler: AccountSampler
    ) -> None:
        self.population = population
        self.envelope = envelope
        self.sampler = sampler
        # the latest settled purchase of each account that may still be
        # refunded: account id -> (txn id, its spec)
        self.refundable: dict[int, tuple[int, TxnSpec]] = {}

    # -- amounts -----------------------------------------------------------------

    def ticket(self, rng: random.Random, account: Account, merchant: Merchant) -> int:
        """A normal card purchase amount for this account at this merchant (cents)."""
        limit = self.envelope.max_ticket_factor
        noise = min(max(rng.lognormvariate(0.0, 0.5), 1.0 / limit), limit)
        cents = round(account.scale * merchant.factor * noise)
        cents = max(cents, self.envelope.min_card_amount_cents)
        return avoid_band(cents, self.envelope)

    def cash(self, rng: random.Random, account: Account) -> int:
        """A cash withdrawal amount: 20-300 EUR worth, in round tens of the currency."""
        units = rng.uniform(20.0, 300.0) / EUR_PER_UNIT[account.currency]
        return avoid_band(max(1, round(units / 10.0)) * 1000, self.envelope)

    # -- transactions ------------------------------------------------------------

    def transaction(self, rng: random.Random, now_us: int) -> TxnSpec:
        """One normal transaction of a Zipf-drawn account."""
        account = self.sampler.pick(rng, now_us)
        roll = rng.random() * 100.0
        if roll < 1.5 and account.id in self.refundable:
            return self._refund(rng, account)
        if roll < 46.5 and account.physical_cards:
            return self._pos(rng, account)
        if roll < 74.5 and account.online_cards:
            return self._online(rng, account)
        if roll < 80.5 and account.physical_cards:
            return self._withdrawal(rng, account)
        if roll < 90.0:
            spec = self._transfer_out(rng, account)
            if spec is not None:
                return spec
        return self._transfer_in(rng, account)

    def _card_outcome(self, rng: random.Random, spec: TxnSpec) -> TxnSpec:
        roll = rng.random()
        if roll < 0.02:
            spec.outcome = "decline"
            spec.decline_reason = rng.choice(DECLINE_REASONS)
            spec.delay_us = rng.randrange(200_000, 1_500_000)
        elif roll < 0.023:
            spec.outcome = "void"
            spec.delay_us = rng.randrange(2 * SECOND_US, 20 * SECOND_US)
        else:
            spec.delay_us = rng.randrange(SECOND_US, 8 * SECOND_US)
            if roll > 0.995:
                spec.reverse_after_us = rng.randrange(5 * SECOND_US, 90 * SECOND_US)
        return spec

    def known_device(self, rng: random.Random, account: Account) -> tuple[str, str]:
        """One of the customer's own devices (drawn) and its usual address."""
        index = rng.randrange(self.population.customer_devices[account.customer_id])
        return (
            known_device(account.customer_id, index),
            device_ip(account.customer_id, index, account.country),
        )

    def _pos(self, rng: random.Random, account: Account) -> TxnSpec:
        merchant = rng.choice(self.population.pos_by_country[account.country])
        amount = self.ticket(rng, account, merchant)  # drawn before the card: the seed's order
        spec = pos_purchase(account, merchant, rng.choice(account.physical_cards), amount)
        return self._card_outcome(rng, spec)

    def _online(self, rng: random.Random, account: Account) -> TxnSpec:
        local = self.population.online_by_country.get(account.country)
        if local and rng.random() < 0.75:
            merchant = rng.choice(local)
        else:
            merchant = rng.choice(self.population.online_merchants)
        device, ip = self.known_device(rng, account)
        spec = TxnSpec(
            account=account,
            type="purchase",
            channel="online",
            amount=self.ticket(rng, account, merchant),
            country=merchant.country,
            card_id=rng.choice(account.online_cards),
            merchant_id=merchant.id,
            device=device,
            ip=ip,
        )
        return self._card_outcome(rng, spec)

    def _withdrawal(self, rng: random.Random, account: Account) -> TxnSpec:
        atm = rng.choice(self.population.atm_by_country[account.country])
        return TxnSpec(
            account=account,
            type="withdrawal",
            channel="atm",
            amount=self.cash(rng, account),
            country=atm.country,
            card_id=rng.choice(account.physical_cards),
            merchant_id=atm.id,
            device=f"atm-{atm.id}",
            delay_us=rng.randrange(SECOND_US // 2, 3 * SECOND_US),
            fee_cents=rng.randrange(150, 500) if rng.random() < 0.3 else 0,
        )

    def _transfer_out(self, rng: random.Random, account: Account) -> TxnSpec | None:
        ceiling = int(account.available * self.envelope.max_transfer_out_share)
        cents = min(ceiling, round(account.scale * rng.uniform(2.0, 15.0)))
        cents = avoid_band(cents, self.envelope)
        if cents < 100:
            return None
        return self._own_transfer(rng, account, "transfer_out", cents)

    def _transfer_in(self, rng: random.Random, account: Account) -> TxnSpec:
        cents = avoid_band(round(account.scale * rng.uniform(5.0, 40.0)), self.envelope)
        return self._own_transfer(rng, account, "transfer_in", cents)

    def _own_transfer(self, rng: random.Random, account: Account, kind: str, cents: int) -> TxnSpec:
        """A transfer the customer makes from one of their own devices."""
        device, ip = self.known_device(rng, account)
        delay_us = rng.randrange(SECOND_US, 5 * SECOND_US)
        return transfer(account, kind, cents, device=device, ip=ip, delay_us=delay_us)

    def _refund(self, rng: random.Random, account: Account) -> TxnSpec:
        parent_id, parent = self.refundable.pop(account.id)
        full = rng.random() < 0.6
        cents = parent.amount if full else max(1, int(parent.amount * rng.uniform(0.3, 0.9)))
        cents = avoid_band(cents, self.envelope)
        return TxnSpec(
            account=parent.account,
            type="refund",
            channel=parent.channel,
            amount=cents,
            country=parent.country,
            card_id=parent.card_id,
            merchant_id=parent.merchant_id,
            parent_id=parent_id,
            device=parent.device,
            ip=parent.ip,
            delay_us=rng.randrange(SECOND_US, 5 * SECOND_US),
        )

    def remember_settled(self, txn_id: int, spec: TxnSpec) -> None:
        """Offer a settled normal purchase for a later refund (the latest per account)."""
        if spec.normal and spec.reverse_after_us is None:
            self.refundable[spec.account.id] = (txn_id, spec)

    # -- logins ------------------------------------------------------------------

    def login(self, rng: random.Random, now_us: int) -> list[tuple[int, Login]]:
        """A normal login, sometimes after a short failed burst, sometimes a new device.

        Returns (time, login) pairs; failures come first, a few seconds apart.
        """
        account = self.sampler.pick(rng, now_us, capped=False)
        customer = account.customer_id
        country = account.country
        if rng.random() < self.envelope.new_device_login_share:
            bits = rng.getrandbits(40)
            device = f"n{bits:010x}"
            return [(now_us, Login(customer, True, device, random_ip(bits, country), country))]
        device, ip = self.known_device(rng, account)
        failures = rng.randint(1, self.envelope.max_failed_logins) if rng.random() < 0.02 else 0
        return login_attempts(rng, now_us, failures, Login(customer, True, device, ip, country))

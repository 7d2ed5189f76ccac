"""Fraud scenario injectors: one function per family, one family per fraud rule.

Each injector picks a victim account (uniformly among eligible active
accounts that had no scenario within the quiet period), and returns the
timed actions of one incident plus the details of its ground-truth row.
The generator schedules the actions; the ground-truth row is written in the
same database transaction as the incident's last change.

What each family writes (``ScenarioShapes`` holds the numbers) and where a
rule's threshold fits between it and normal traffic (``NormalEnvelope``):

=================  ==========================================  ===========================
family             the incident                                a threshold that separates
=================  ==========================================  ===========================
velocity_burst     10-14 card purchases of normal amounts on    >= 8 transactions of one
                   one account within 25-50 s, at home          account in 60 s (normal: <= 2,
                                                                plus a withdrawal's fee)
amount_spike       one online purchase of 30-60x the account's  amount > 15x the mean of >= 10
                   mean settled purchase, >= 500.00, on an      earlier settled purchases
                   account with >= 10 settled purchases         (normal: <= 5x its spend scale)
impossible_travel  card-present purchase at home, then 1-4 min  card-present use in a country
                   later card-present use >= 3,000 km away      not seen before, or > 900 km/h
                                                                (normal: home only)
structuring        3-5 transfers in, each 9,000.00-9,999.00,    >= 3 amounts in [9,000, 10,000)
                   20-90 s apart                                within 24 h (normal: none in
                                                                [8,500, 10,000))
card_testing       8-12 online attempts of 0.10-1.99 at         >= 5 online attempts < 2.00 at
                   distinct merchants, 15-35 s apart, 50-80%    >= 4 merchants within 10 min
                   declined, from an unknown device             (normal: none below 5.00)
account_takeover   (half the time 3-8 failed logins, then) a    transfer out >= 50% of the
                   login from a new device; 30-180 s later a    balance within 30 min of a new-
                   transfer out of 60-95% of the balance from   device login or >= 3 failures
                   that device                                  (normal: <= 25%, <= 2 failures)
=================  ==========================================  ===========================

Amounts are in units of the account's currency. Card testing runs at about
two attempts a minute so it does not also look like a velocity burst;
every other family uses the account's normal amounts, or an amount only its
own rule looks at, so one incident should raise exactly one rule's alert.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from headrace.demo.actions import Action, Insert, Login, TxnSpec, pos_purchase, transfer
from headrace.demo.clock import SECOND_US
from headrace.demo.config import COUNTRY_BY_CODE, FraudFamily, ScenarioShapes
from headrace.demo.state import Account, Population
from headrace.demo.traffic import NormalTraffic, login_attempts
from headrace.demo.traits import random_ip

CARD_TESTING_DECLINES: tuple[str, ...] = ("invalid_cvv", "do_not_honor", "incorrect_number")


@dataclass
class Scenario:
    """One injected incident: its timed actions and what its ground truth says."""

    family: FraudFamily
    account: Account
    card_id: int | None
    events: list[tuple[int, Action]]  # (simulated time in us, action), in time order
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def started_us(self) -> int:
        """Time of the first change."""
        return self.events[0][0]

    @property
    def ended_us(self) -> int:
        """Time of the change that completes the pattern."""
        return self.events[-1][0]


@dataclass
class ScenarioKit:
    """What injectors draw from: the population, normal amounts, the shapes."""

    population: Population
    traffic: NormalTraffic
    shapes: ScenarioShapes

    def victim(
        self, rng: random.Random, now_us: int, eligible: Callable[[Account], bool]
    ) -> Account | None:
        """A uniformly drawn active, eligible account outside its quiet period."""
        accounts = self.population.accounts
        for _ in range(64):
            account = accounts[rng.randrange(len(accounts))]
            if account.active and account.quiet_until_us <= now_us and eligible(account):
                return account
        return None


def distance_km(a: str, b: str) -> float:
    """Great-circle distance between two countries' centroids."""
    ca, cb = COUNTRY_BY_CODE[a], COUNTRY_BY_CODE[b]
    lat1, lat2 = math.radians(ca.lat), math.radians(cb.lat)
    dlat = lat2 - lat1
    dlon = math.radians(cb.lon - ca.lon)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def _seconds(rng: random.Random, bounds: tuple[float, float]) -> int:
    return int(rng.uniform(*bounds) * SECOND_US)


def _stranger(rng: random.Random, country: str) -> tuple[str, str]:
    """A device and address the customer never used."""
    bits = rng.getrandbits(40)
    return f"x{bits:010x}", random_ip(bits, country)


def velocity_burst(kit: ScenarioKit, rng: random.Random, start_us: int) -> Scenario | None:
    """Many normal-looking card purchases on one account within a minute."""
    account = kit.victim(rng, start_us, lambda a: bool(a.physical_cards))
    if account is None:
        return None
    shapes = kit.shapes
    count = rng.randint(*shapes.velocity_count)
    span = _seconds(rng, shapes.velocity_seconds)
    offsets = sorted([0, span, *(rng.randrange(span) for _ in range(count - 2))])
    card = rng.choice(account.physical_cards)
    shops = rng.sample(
        kit.population.pos_by_country[account.country],
        min(3, len(kit.population.pos_by_country[account.country])),
    )
    events: list[tuple[int, Action]] = []
    for offset in offsets:
        merchant = rng.choice(shops)
        amount = kit.traffic.ticket(rng, account, merchant)
        delay_us = rng.randrange(SECOND_US, 5 * SECOND_US)
        spec = pos_purchase(account, merchant, card, amount, delay_us=delay_us, normal=False)
        events.append((start_us + offset, Insert(spec)))
    detail = {"transactions": count, "seconds": round(span / SECOND_US, 3)}
    return Scenario(FraudFamily.VELOCITY_BURST, account, card, events, detail)


def amount_spike(kit: ScenarioKit, rng: random.Random, start_us: int) -> Scenario | None:
    """One card purchase far above the account's own purchase history."""
    shapes = kit.shapes
    factor = rng.uniform(*shapes.spike_factor)

    def spike_cents(account: Account) -> int:
        mean = account.purchase_sum / account.purchases
        return max(shapes.spike_min_cents, round(mean * factor))

    def eligible(account: Account) -> bool:
        return (
            account.purchases >= shapes.spike_history
            and bool(account.online_cards)
            and account.available >= spike_cents(account) * 1.1
        )

    account = kit.victim(rng, start_us, eligible)
    if account is None:
        return None
    cents = spike_cents(account)
    mean = account.purchase_sum / account.purchases
    card = rng.choice(account.online_cards)
    local = kit.population.online_by_country.get(account.country)
    merchant = rng.choice(local or kit.population.online_merchants)
    device, ip = kit.traffic.known_device(rng, account)
    spec = TxnSpec(
        account=account,
        type="purchase",
        channel="online",
        amount=cents,
        country=merchant.country,
        card_id=card,
        merchant_id=merchant.id,
        device=device,
        ip=ip,
        delay_us=rng.randrange(SECOND_US, 5 * SECOND_US),
        normal=False,
    )
    detail = {
        "amount": cents / 100,
        "mean_purchase": round(mean / 100, 2),
        "factor": round(cents / mean, 2),
        "history": account.purchases,
    }
    return Scenario(FraudFamily.AMOUNT_SPIKE, account, card, [(start_us, Insert(spec))], detail)


def impossible_travel(kit: ScenarioKit, rng: random.Random, start_us: int) -> Scenario | None:
    """Card-present use at home, then minutes later on another continent."""
    account = kit.victim(rng, start_us, lambda a: bool(a.physical_cards))
    if account is None:
        return None
    shapes = kit.shapes
    far = [
        code
        for code, shops in kit.population.pos_by_country.items()
        if shops and distance_km(account.country, code) >= shapes.travel_min_km
    ]
    if not far:
        return None
    abroad = rng.choice(far)
    card = rng.choice(account.physical_cards)
    home_shop = rng.choice(kit.population.pos_by_country[account.country])
    amount = kit.traffic.ticket(rng, account, home_shop)
    first = pos_purchase(account, home_shop, card, amount, normal=False)
    gap = _seconds(rng, shapes.travel_gap_seconds)
    atms = kit.population.atm_by_country.get(abroad)
    if atms and rng.random() < 0.3:
        atm = rng.choice(atms)
        second = TxnSpec(
            account=account,
            type="withdrawal",
            channel="atm",
            amount=kit.traffic.cash(rng, account),
            country=abroad,
            card_id=card,
            merchant_id=atm.id,
            device=f"atm-{atm.id}",
            normal=False,
        )
    else:
        shop = rng.choice(kit.population.pos_by_country[abroad])
        amount = kit.traffic.ticket(rng, account, shop)
        second = pos_purchase(account, shop, card, amount, normal=False)
    detail = {
        "from": account.country,
        "to": abroad,
        "km": round(distance_km(account.country, abroad)),
        "seconds": round(gap / SECOND_US, 3),
    }
    events: list[tuple[int, Action]] = [(start_us, Insert(first)), (start_us + gap, Insert(second))]
    return Scenario(FraudFamily.IMPOSSIBLE_TRAVEL, account, card, events, detail)


def structuring(kit: ScenarioKit, rng: random.Random, start_us: int) -> Scenario | None:
    """Several transfers in, each just under the reporting threshold."""
    account = kit.victim(rng, start_us, lambda a: True)
    if account is None:
        return None
    shapes = kit.shapes
    count = rng.randint(*shapes.structuring_count)
    device, ip = kit.traffic.known_device(rng, account)
    events: list[tuple[int, Action]] = []
    at = start_us
    amounts: list[int] = []
    for n in range(count):
        if n:
            at += _seconds(rng, shapes.structuring_gap_seconds)
        cents = rng.randrange(shapes.structuring_low_cents, shapes.structuring_threshold_cents, 100)
        amounts.append(cents)
        delay_us = rng.randrange(SECOND_US, 5 * SECOND_US)
        spec = transfer(
            account, "transfer_in", cents, device=device, ip=ip, delay_us=delay_us, normal=False
        )
        events.append((at, Insert(spec)))
    detail = {
        "transactions": count,
        "amounts": [c / 100 for c in amounts],
        "threshold": shapes.structuring_threshold_cents / 100,
    }
    return Scenario(FraudFamily.STRUCTURING, account, None, events, detail)


def card_testing(kit: ScenarioKit, rng: random.Random, start_us: int) -> Scenario | None:
    """Small online attempts at many merchants from an unknown device, most declined."""
    account = kit.victim(rng, start_us, lambda a: bool(a.online_cards))
    merchants = kit.population.online_merchants
    shapes = kit.shapes
    count = rng.randint(*shapes.testing_count)
    if account is None or len(merchants) < count:
        return None
    card = rng.choice(account.online_cards)
    shops = rng.sample(merchants, count)
    declined = round(count * rng.uniform(*shapes.testing_declined_share))
    # the first two always fail (that is what testing looks like); the rest mixed
    verdicts = [
        True,
        True,
        *rng.sample([True] * (declined - 2) + [False] * (count - declined), count - 2),
    ]
    device, ip = _stranger(rng, rng.choice(sorted(kit.population.online_by_country)))
    events: list[tuple[int, Action]] = []
    at = start_us
    for n, (shop, decline) in enumerate(zip(shops, verdicts, strict=True)):
        if n:
            at += _seconds(rng, shapes.testing_gap_seconds)
        spec = TxnSpec(
            account=account,
            type="purchase",
            channel="online",
            amount=rng.randint(*shapes.testing_cents),
            country=shop.country,
            card_id=card,
            merchant_id=shop.id,
            device=device,
            ip=ip,
            outcome="decline" if decline else "settle",
            decline_reason=rng.choice(CARD_TESTING_DECLINES) if decline else None,
            delay_us=rng.randrange(200_000, SECOND_US) if decline else 2 * SECOND_US,
            normal=False,
        )
        events.append((at, Insert(spec)))
    detail = {"attempts": count, "declined": declined, "merchants": count, "device": device}
    return Scenario(FraudFamily.CARD_TESTING, account, card, events, detail)


def account_takeover(kit: ScenarioKit, rng: random.Random, start_us: int) -> Scenario | None:
    """A login from a new device (maybe after failed tries), then the balance drained."""
    shapes = kit.shapes
    account = kit.victim(rng, start_us, lambda a: a.available >= shapes.takeover_min_balance_cents)
    if account is None:
        return None
    customer = account.customer_id
    home = account.country
    where = home if rng.random() < 0.5 else rng.choice(sorted(COUNTRY_BY_CODE))
    device, ip = _stranger(rng, where)
    failures = 0
    if rng.random() < shapes.takeover_failed_share:
        failures = rng.randint(*shapes.takeover_failed)
    events: list[tuple[int, Action]] = [
        *login_attempts(rng, start_us, failures, Login(customer, True, device, ip, where))
    ]
    at = events[-1][0] + _seconds(rng, shapes.takeover_delay_seconds)
    share = rng.uniform(*shapes.takeover_outflow_share)
    spec = transfer(
        account,
        "transfer_out",
        0,
        device=device,
        ip=ip,
        delay_us=rng.randrange(SECOND_US, 5 * SECOND_US),
        country=where,
        outflow_share=share,
        normal=False,
    )
    events.append((at, Insert(spec)))
    detail = {
        "failed_logins": failures,
        "device": device,
        "login_country": where,
        "outflow_share": round(share, 3),
    }
    return Scenario(FraudFamily.ACCOUNT_TAKEOVER, account, None, events, detail)


Injector = Callable[[ScenarioKit, random.Random, int], Scenario | None]

INJECTORS: dict[FraudFamily, Injector] = {
    FraudFamily.VELOCITY_BURST: velocity_burst,
    FraudFamily.AMOUNT_SPIKE: amount_spike,
    FraudFamily.IMPOSSIBLE_TRAVEL: impossible_travel,
    FraudFamily.STRUCTURING: structuring,
    FraudFamily.CARD_TESTING: card_testing,
    FraudFamily.ACCOUNT_TAKEOVER: account_takeover,
}
"""The injector of each family, in rule order."""

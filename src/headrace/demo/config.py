"""Settings and reference data of the fintech demo workload.

Everything business-specific about the demo's data lives here: countries,
currencies, merchant categories, account tiers, the envelope normal traffic
stays inside, and the shapes of the injected fraud scenarios. The rule
thresholds of the reference deployment should sit between the two (see
:data:`NORMAL_ENVELOPE` and :class:`ScenarioShapes`).

Money inside the generator is integer cents of the account's currency.
Every transaction is booked in its account's currency (card networks convert
foreign charges), so one account's amounts are always comparable as they are;
the currency mix comes from accounts held in six currencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class FraudFamily(StrEnum):
    """The six labelled fraud scenario families, one per fraud rule.

    The value is also the name of the rule expected to fire
    (``fraud_ground_truth.expected_rule``).
    """

    VELOCITY_BURST = "velocity_burst"
    AMOUNT_SPIKE = "amount_spike"
    IMPOSSIBLE_TRAVEL = "impossible_travel"
    STRUCTURING = "structuring"
    CARD_TESTING = "card_testing"
    ACCOUNT_TAKEOVER = "account_takeover"


@dataclass(frozen=True)
class Country:
    """A country customers live in or merchants sell from."""

    code: str  # ISO 3166-1 alpha-2
    currency: str  # ISO 4217 code of the local currency
    lat: float  # centroid latitude, for travel distances
    lon: float  # centroid longitude
    customer_weight: float  # share of customers living there (0: none)
    merchant_weight: float  # share of merchants located there
    ip_octet: int  # first octet of the (fake) addresses of devices there


COUNTRIES: tuple[Country, ...] = (
    Country("DE", "EUR", 51.2, 10.4, 0.25, 0.16, 31),
    Country("FR", "EUR", 46.6, 2.2, 0.17, 0.12, 37),
    Country("NL", "EUR", 52.1, 5.3, 0.08, 0.06, 45),
    Country("ES", "EUR", 40.4, -3.7, 0.10, 0.08, 77),
    Country("IT", "EUR", 42.8, 12.6, 0.10, 0.08, 79),
    Country("GB", "GBP", 54.0, -2.0, 0.14, 0.10, 81),
    Country("SE", "SEK", 62.0, 15.0, 0.05, 0.04, 83),
    Country("PL", "PLN", 52.0, 19.1, 0.06, 0.05, 89),
    Country("CH", "CHF", 46.8, 8.2, 0.05, 0.04, 85),
    Country("US", "USD", 39.8, -98.6, 0.0, 0.10, 24),
    Country("BR", "BRL", -14.2, -51.9, 0.0, 0.03, 177),
    Country("SG", "SGD", 1.35, 103.8, 0.0, 0.03, 103),
    Country("JP", "JPY", 36.2, 138.3, 0.0, 0.03, 126),
    Country("AU", "AUD", -25.3, 133.8, 0.0, 0.03, 101),
    Country("NG", "NGN", 9.1, 8.7, 0.0, 0.03, 105),
    Country("AE", "AED", 23.4, 53.8, 0.0, 0.02, 94),
)
COUNTRY_BY_CODE: dict[str, Country] = {c.code: c for c in COUNTRIES}

EUR_PER_UNIT: dict[str, float] = {
    "EUR": 1.0,
    "GBP": 1.17,
    "SEK": 0.088,
    "PLN": 0.23,
    "CHF": 1.05,
    "USD": 0.92,
    "BRL": 0.17,
    "SGD": 0.68,
    "JPY": 0.0062,
    "AUD": 0.60,
    "NGN": 0.0006,
    "AED": 0.25,
}
"""Fixed exchange rates (value of one unit in EUR) used to size amounts."""

SECOND_CURRENCIES: tuple[str, ...] = ("EUR", "USD", "GBP", "CHF")
"""Currencies of accounts not held in the home currency."""


@dataclass(frozen=True)
class Category:
    """A merchant category (an ISO 18245 MCC with a readable name)."""

    mcc: str
    name: str
    amount_factor: float  # typical ticket relative to the account's spend scale
    pos_weight: float  # share among card-present merchants (0: none)
    online_weight: float  # share among online merchants (0: none)


CATEGORIES: tuple[Category, ...] = (
    Category("5411", "grocery", 1.0, 30, 5),
    Category("5812", "restaurants", 1.3, 14, 0),
    Category("5814", "fast_food", 0.4, 12, 3),
    Category("5541", "fuel", 1.5, 8, 0),
    Category("5912", "pharmacy", 0.7, 6, 2),
    Category("5311", "department_store", 2.0, 6, 8),
    Category("5732", "electronics", 2.0, 3, 8),
    Category("5999", "misc_retail", 0.9, 8, 10),
    Category("4111", "transit", 0.3, 6, 4),
    Category("4121", "taxi_rides", 0.6, 2, 8),
    Category("5816", "digital_goods", 0.5, 0, 12),
    Category("5942", "books", 0.5, 2, 6),
    Category("7011", "hotels", 2.0, 1, 4),
    Category("4511", "airlines", 2.0, 0, 3),
    Category("7995", "gambling", 1.0, 0, 2),
)
ATM_CATEGORY = Category("6011", "atm_cash", 1.0, 0, 0)
"""Cash machines: the merchants of withdrawals (card-present only)."""
CATEGORY_BY_MCC: dict[str, Category] = {c.mcc: c for c in (*CATEGORIES, ATM_CATEGORY)}


@dataclass(frozen=True)
class Tier:
    """An account tier: how common it is and how much its holders spend."""

    name: str
    weight: float  # share of accounts
    spend_eur: float  # typical card ticket in EUR (each account varies 0.5x-2x)
    opening_eur: float  # typical opening balance in EUR


TIERS: tuple[Tier, ...] = (
    Tier("basic", 0.55, 25.0, 1_500.0),
    Tier("plus", 0.25, 45.0, 4_000.0),
    Tier("premium", 0.12, 90.0, 12_000.0),
    Tier("business", 0.08, 150.0, 30_000.0),
)
TIER_BY_NAME: dict[str, Tier] = {t.name: t for t in TIERS}


@dataclass(frozen=True)
class NormalEnvelope:
    """Limits normal (non-fraud) traffic never crosses, so rules can be precise.

    Each limit is enforced by the generator and the history loader, and
    checked by the tests; rule thresholds belong between these and the
    scenario shapes.
    """

    # Least time between two normal transactions of one account (live
    # generator): at most 60 / min_gap_s per account per minute, however hot.
    min_gap_s: float = 30.0
    # Card purchases are spend scale * category factor (0.3-2) * lognormal
    # noise clipped to [1/f, f] with this f: at most 5x the spend scale. Next
    # to the mean of ten or more earlier purchases, a normal one stays under
    # 15x (simulated: none in 300,000; with five earlier ones 1 in 100,000).
    max_ticket_factor: float = 2.5
    # No normal card purchase below this many units (cents) of any currency:
    # card testing uses amounts under it.
    min_card_amount_cents: int = 500
    # No normal amount of any type falls in [band_low, band_high) cents: the
    # band just under the structuring reporting threshold (10,000).
    structuring_band_low_cents: int = 850_000
    structuring_band_high_cents: int = 1_000_000
    # A normal transfer out takes at most this share of the available balance
    # (live generator; the history has no new-device logins at all).
    max_transfer_out_share: float = 0.25
    # Normal failed-login bursts have at most this many failures, always from
    # one of the customer's known devices.
    max_failed_logins: int = 2
    # Share of normal logins from a new device (a new phone): no large outflow
    # follows them.
    new_device_login_share: float = 0.003
    # Normal card-present use (pos, atm) happens only in the home country.
    card_present_home_only: bool = True


NORMAL_ENVELOPE = NormalEnvelope()


@dataclass(frozen=True)
class ScenarioShapes:
    """How each fraud family looks (times are simulated seconds)."""

    # velocity burst: this many card purchases within burst_seconds
    velocity_count: tuple[int, int] = (10, 14)
    velocity_seconds: tuple[float, float] = (25.0, 50.0)
    # amount spike: one purchase this many times the account's own mean
    # purchase, at least spike_min_cents, on an account with >= spike_history
    # settled purchases
    spike_factor: tuple[float, float] = (30.0, 60.0)
    spike_min_cents: int = 50_000
    spike_history: int = 10
    # impossible travel: a card-present purchase at home, then one in a
    # country at least travel_min_km away, travel_gap_seconds later
    travel_min_km: float = 3_000.0
    travel_gap_seconds: tuple[float, float] = (60.0, 240.0)
    # structuring: this many transfers in, each in
    # [structuring_low_cents, structuring_threshold_cents), spaced apart
    structuring_count: tuple[int, int] = (3, 5)
    structuring_threshold_cents: int = 1_000_000
    structuring_low_cents: int = 900_000
    structuring_gap_seconds: tuple[float, float] = (20.0, 90.0)
    # card testing: this many online attempts of small amounts at distinct
    # merchants, spaced apart, most of them declined
    testing_count: tuple[int, int] = (8, 12)
    testing_cents: tuple[int, int] = (10, 199)
    testing_gap_seconds: tuple[float, float] = (15.0, 35.0)
    testing_declined_share: tuple[float, float] = (0.5, 0.8)
    # account takeover: optional failed logins from a new device, a success
    # from it, then a transfer out of this share of the available balance
    takeover_failed: tuple[int, int] = (3, 8)
    takeover_failed_share: float = 0.5  # share of takeovers preceded by failures
    takeover_outflow_share: tuple[float, float] = (0.6, 0.95)
    takeover_min_balance_cents: int = 200_000
    takeover_delay_seconds: tuple[float, float] = (30.0, 180.0)
    # an account gets at most one scenario per quiet period
    quiet_seconds: float = 3_600.0


@dataclass(frozen=True)
class PopulationSettings:
    """Size and mix of the customers, accounts, cards and merchants."""

    # accounts are about 1.2x, cards about 1.5x this. The per-account rate cap
    # (NormalEnvelope.min_gap_s) holds while accounts >= ~60 x the rate.
    customers: int = 20_000
    merchants: int = 2_000  # plus one cash-machine operator per country
    second_account_share: float = 0.2  # customers holding two accounts
    foreign_currency_share: float = 0.08  # accounts not in the home currency
    virtual_card_share: float = 0.35  # accounts that also have a virtual card
    no_card_share: float = 0.05  # accounts with no card (transfers only)


@dataclass(frozen=True)
class WorkloadSettings:
    """Settings of the live workload generator (``headrace demo generate``).

    Given the same seed, settings, anchor and starting database, the
    generator writes the same statements in the same order.
    """

    dsn: str  # libpq connection string of the demo database
    seed: int = 1  # seeds every random choice
    # new transactions per simulated second at the busiest hour (per wall-clock
    # second at speed 1)
    rate: float = 500.0
    tick_ms: int = 50  # simulated time per commit (one DB transaction per tick)
    speed: float = 1.0  # simulated seconds per wall-clock second (writes scale with it)
    # depth of the daily rhythm: the quietest hour runs at (1 - amplitude) of
    # ``rate``; 0 gives a flat rate
    diurnal_amplitude: float = 0.5
    fraud_every: int = 2_000  # inject one fraud scenario per this many transactions; 0: none
    zipf_exponent: float = 1.0  # skew of account activity (rank r has weight 1/r^s)
    login_ratio: float = 0.1  # logins per new transaction
    new_account_ratio: float = 0.0005  # new customers (with account and card) per transaction
    # the simulated clock's start; None takes the wall clock when the run
    # begins (the only input not derived from the seed)
    anchor: datetime | None = None
    population: PopulationSettings = field(default_factory=PopulationSettings)  # if empty
    envelope: NormalEnvelope = NORMAL_ENVELOPE
    shapes: ScenarioShapes = field(default_factory=ScenarioShapes)


@dataclass(frozen=True)
class HistorySettings:
    """Settings of the bulk history loader (``headrace demo load-history``)."""

    dsn: str  # libpq connection string of the demo database
    seed: int = 1  # seeds every random choice
    months: int = 2  # length of the history, 30-day months ending at the anchor
    transactions_per_account_month: float = 8.0  # mean activity of an account
    logins_per_customer_month: float = 6.0  # mean logins of a customer
    max_transactions_per_account_day: float = 40.0  # caps the hottest accounts
    zipf_exponent: float = 1.0  # skew of account activity, as in the generator
    diurnal_amplitude: float = 0.5  # depth of the daily rhythm, as in the generator
    # end of the history; None takes the wall clock (the only input not
    # derived from the seed)
    anchor: datetime | None = None
    replace: bool = False  # empty the demo tables first instead of refusing
    # 10,000 customers and two months: about 450,000 rows, loaded in well under
    # a minute even on a busy two-core machine
    population: PopulationSettings = field(
        default_factory=lambda: PopulationSettings(customers=10_000)
    )
    envelope: NormalEnvelope = NORMAL_ENVELOPE

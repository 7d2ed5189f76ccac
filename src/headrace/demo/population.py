"""The demo's people and places: customers, accounts, cards and merchants, drawn from a seed.

:func:`build_population` returns them as Arrow tables (ids from 1), which
the history loader and the generator's bootstrap write with COPY
(:func:`write_population`). The live generator reads them back with
:func:`headrace.demo.state.load_population`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
import pyarrow as pa

from headrace.demo.bulk import cents_to_decimal, copy_table
from headrace.demo.clock import DAY_US, from_us, timestamp_array, to_us
from headrace.demo.config import (
    ATM_CATEGORY,
    CATEGORIES,
    CATEGORY_BY_MCC,
    COUNTRIES,
    COUNTRY_BY_CODE,
    EUR_PER_UNIT,
    SECOND_CURRENCIES,
    TIERS,
    PopulationSettings,
)

ATMS_PER_COUNTRY = 3
"""Cash-machine operators (merchants of withdrawals) per country."""

_FIRST = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Hugo", "Ida", "Jonas",
    "Karin", "Lars", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sven", "Tara", "Ugo",
    "Vera", "Willem", "Yara", "Zoe", "Luca", "Elena", "Marta", "Pedro", "Ines", "Tomas",
)  # fmt: skip
_LAST = (
    "Bauer", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Hansen", "Ivanova",
    "Jansen", "Kowalski", "Lopez", "Martin", "Novak", "Olsen", "Petit", "Rossi", "Schmidt",
    "Smith", "Torres", "Vogel", "Weber", "Young", "Ziegler", "Moreau", "Bianchi", "Nowak",
    "Brown", "Keller", "Lindqvist", "Meyer",
)  # fmt: skip
_MERCHANT_PREFIX = (
    "North", "Blue", "Corner", "City", "Star", "Green", "Royal", "Urban", "Metro", "Prime",
    "Alpine", "Harbor", "Sunny", "Iron", "Silver", "Golden", "Little", "Grand", "Swift",
    "Bright",
)  # fmt: skip

_CUSTOMER_COLUMNS = ("id", "full_name", "email", "country", "risk_band", "created_at")
_ACCOUNT_COLUMNS = ("id", "customer_id", "tier", "status", "currency", "opened_at", "updated_at")
_CARD_COLUMNS = (
    "id",
    "account_id",
    "kind",
    "card_present",
    "online",
    "status",
    "last4",
    "issued_at",
    "expires_on",
)
_MERCHANT_COLUMNS = ("id", "name", "mcc", "category", "country", "card_present", "online")


@dataclass
class PopulationTables:
    """A drawn population, ready to COPY (ids start at 1)."""

    customers: pa.Table
    accounts: pa.Table  # its balance column holds the opening deposits
    cards: pa.Table
    merchants: pa.Table
    opening_cents: list[int]  # opening deposit per account, in account order
    opened_us: list[int]  # opening time per account


class _Columns:
    """Rows collected column by column."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.data: dict[str, list[object]] = {name: [] for name in names}

    def add(self, *values: object) -> None:
        for column, value in zip(self.data.values(), values, strict=True):
            column.append(value)

    def table(self, time_columns: tuple[str, ...] = (), **extra: pa.Array) -> pa.Table:
        arrays = {
            name: timestamp_array(values) if name in time_columns else pa.array(values)
            for name, values in self.data.items()
        }
        arrays.update(extra)
        return pa.table(arrays)


class _PopulationDraw:
    """Draws customers with their accounts and cards, one customer at a time."""

    def __init__(
        self,
        settings: PopulationSettings,
        rng: random.Random,
        anchor_us: int,
        recent_us: int | None,
        recent_share: float,
    ) -> None:
        self.settings = settings
        self.rng = rng
        self.anchor_us = anchor_us
        self.recent_us = recent_us
        self.recent_share = recent_share
        homes = [c for c in COUNTRIES if c.customer_weight > 0]
        self.home_codes = [c.code for c in homes]
        self.home_weights = [c.customer_weight for c in homes]
        self.tier_names = [t.name for t in TIERS]
        self.tier_weights = [t.weight for t in TIERS]
        self.opening_eur = {t.name: t.opening_eur for t in TIERS}
        self.customers = _Columns(_CUSTOMER_COLUMNS)
        self.accounts = _Columns(_ACCOUNT_COLUMNS)
        self.cards = _Columns(_CARD_COLUMNS)
        self.opening: list[int] = []
        self.opened: list[int] = []

    def customer(self, customer_id: int) -> None:
        rng = self.rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        country = rng.choices(self.home_codes, weights=self.home_weights)[0]
        gap = self.recent_us or DAY_US
        if self.recent_us is not None and rng.random() < self.recent_share:
            created = self.anchor_us - rng.randrange(self.recent_us)
        else:
            created = self.anchor_us - gap - rng.randrange(5 * 365 * DAY_US)
        band = rng.random()
        self.customers.add(
            customer_id,
            f"{first} {last}",
            f"{first}.{last}.{customer_id}@example.com".lower(),
            country,
            "low" if band < 0.85 else "medium" if band < 0.97 else "high",
            created,
        )
        second = rng.random() < self.settings.second_account_share
        self.account(customer_id, country, created)
        if second:
            self.account(
                customer_id, country, created + rng.randrange(max(1, self.anchor_us - created))
            )

    def account(self, customer_id: int, country: str, opened: int) -> None:
        rng = self.rng
        account_id = len(self.opening) + 1
        tier = rng.choices(self.tier_names, weights=self.tier_weights)[0]
        currency = COUNTRY_BY_CODE[country].currency
        if rng.random() < self.settings.foreign_currency_share:
            currency = rng.choice([c for c in SECOND_CURRENCIES if c != currency])
        roll = rng.random()
        status = "active" if roll < 0.98 else "frozen" if roll < 0.995 else "closed"
        self.accounts.add(account_id, customer_id, tier, status, currency, opened, opened)
        eur = self.opening_eur[tier] * rng.uniform(0.3, 2.0)
        self.opening.append(max(100, round(eur * 100 / EUR_PER_UNIT[currency])))
        self.opened.append(opened)
        if rng.random() < self.settings.no_card_share:
            return
        self.card(account_id, "physical", opened)
        if rng.random() < self.settings.virtual_card_share:
            self.card(account_id, "virtual", opened)

    def card(self, account_id: int, kind: str, issued: int) -> None:
        roll = self.rng.random()
        card_id = len(self.cards.data["id"]) + 1
        expires = (from_us(issued) + timedelta(days=365 * 4)).date().replace(day=1)
        self.cards.add(
            card_id,
            account_id,
            kind,
            kind == "physical",
            True,
            "active" if roll < 0.97 else "blocked" if roll < 0.99 else "expired",
            f"{self.rng.randrange(10_000):04d}",
            issued,  # cards come with the account
            expires,
        )


def build_population(
    settings: PopulationSettings,
    seed: int,
    anchor: datetime,
    *,
    recent_window: timedelta | None = None,
    recent_share: float = 0.05,
) -> PopulationTables:
    """Draw customers, accounts, cards and merchants from ``seed``.

    Customers join between five years and ``recent_window`` (or a day)
    before ``anchor``; with ``recent_window``, ``recent_share`` of them join
    inside it, so the history shows new accounts too.
    """
    rng = random.Random(f"{seed}:population")  # noqa: S311 - a seeded simulation, not security
    recent_us = int(recent_window.total_seconds() * 1e6) if recent_window else None
    draw = _PopulationDraw(settings, rng, to_us(anchor), recent_us, recent_share)
    for customer_id in range(1, settings.customers + 1):
        draw.customer(customer_id)
    return PopulationTables(
        customers=draw.customers.table(("created_at",)),
        accounts=draw.accounts.table(
            ("opened_at", "updated_at"), balance=cents_to_decimal(pa.array(draw.opening))
        ),
        cards=draw.cards.table(("issued_at",)),
        merchants=_merchants(settings, rng),
        opening_cents=draw.opening,
        opened_us=draw.opened,
    )


def _merchants(settings: PopulationSettings, rng: random.Random) -> pa.Table:
    """Cash machines in every country, shops and web shops weighted by country."""
    codes = [c.code for c in COUNTRIES]
    weights = [c.merchant_weight for c in COUNTRIES]
    pos_categories = [c for c in CATEGORIES if c.pos_weight > 0]
    pos_weights = [c.pos_weight for c in pos_categories]
    online_categories = [c for c in CATEGORIES if c.online_weight > 0]
    online_weights = [c.online_weight for c in online_categories]
    merchants = _Columns(_MERCHANT_COLUMNS)

    def add(name: str, mcc: str, country: str, card_present: bool, online: bool) -> None:
        merchant_id = len(merchants.data["id"]) + 1
        category = CATEGORY_BY_MCC[mcc].name
        merchants.add(
            merchant_id, f"{name} {merchant_id}", mcc, category, country, card_present, online
        )

    for country in codes:
        for _ in range(ATMS_PER_COUNTRY):
            add(f"{country} Cash Network", ATM_CATEGORY.mcc, country, True, False)
    for _ in range(settings.merchants):
        country = rng.choices(codes, weights=weights)[0]
        roll = rng.random()
        card_present = roll < 0.75  # 60% shops only, 15% both, 25% web only
        if card_present:
            category = rng.choices(pos_categories, weights=pos_weights)[0]
            online = roll >= 0.6 and category.online_weight > 0
        else:
            category = rng.choices(online_categories, weights=online_weights)[0]
            online = True
        label = category.name.replace("_", " ").title()
        add(f"{rng.choice(_MERCHANT_PREFIX)} {label}", category.mcc, country, card_present, online)
    # so every country has at least one shop and one web shop
    for country in codes:
        add(f"{country} Corner Grocery", "5411", country, True, False)
        add(f"{country} Web Store", "5999", country, False, True)
    return merchants.table()


def opening_ledger(tables: PopulationTables) -> pa.Table:
    """One ``opening`` ledger entry per account (ids 1..n), at its opening time."""
    count = len(tables.opening_cents)
    amounts = cents_to_decimal(pa.array(tables.opening_cents, pa.int64()))
    return pa.table(
        {
            "id": pa.array(range(1, count + 1), pa.int64()),
            "account_id": tables.accounts.column("id"),
            "transaction_id": pa.nulls(count, pa.int64()),
            "kind": pa.array(["opening"] * count),
            "delta": amounts,
            "balance_after": amounts,
            "at": tables.accounts.column("opened_at"),
        }
    )


def write_population(
    conn: psycopg.Connection[tuple[object, ...]],
    tables: PopulationTables,
    *,
    on_rows: Callable[[str, int], None] | None = None,
) -> None:
    """COPY customers, accounts, cards and merchants (not the ledger) into the database."""
    for name, data in (
        ("customers", tables.customers),
        ("accounts", tables.accounts),
        ("cards", tables.cards),
        ("merchants", tables.merchants),
    ):
        copy_table(conn, name, data)
        if on_rows is not None:
            on_rows(name, data.num_rows)

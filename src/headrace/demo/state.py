"""The live generator's in-memory view of the demo database.

:func:`load_population` reads accounts (with balances), cards, merchants and
the largest ids into a :class:`Population`, in id order, so a generator
started on the same database always sees the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import psycopg
from psycopg import sql

from headrace.demo.config import ATM_CATEGORY, CATEGORY_BY_MCC, COUNTRIES
from headrace.demo.traits import device_count, spend_scale_cents

ID_TABLES: tuple[str, ...] = (
    "customers",
    "accounts",
    "cards",
    "transactions",
    "ledger_entries",
    "logins",
)
"""Tables whose ids the generator assigns (plus fraud_ground_truth's scenario ids)."""


@dataclass(slots=True)
class Account:
    """The generator's view of one account (money in cents of its currency)."""

    id: int
    customer_id: int
    country: str  # the customer's home country
    tier: str
    currency: str
    active: bool
    balance: int  # after every change built so far
    scale: float  # typical card ticket, cents
    physical_cards: list[int] = field(default_factory=list)  # usable at terminals
    online_cards: list[int] = field(default_factory=list)  # usable online
    held: int = 0  # outflows of pending transactions
    purchases: int = 0  # settled card purchases seen
    purchase_sum: int = 0  # their total, cents
    next_normal_us: int = 0  # earliest time of its next normal transaction
    quiet_until_us: int = 0  # no fraud scenario on it before this time

    @property
    def available(self) -> int:
        """Balance minus pending outflows."""
        return self.balance - self.held


@dataclass(slots=True)
class Merchant:
    """A merchant the generator can charge at."""

    id: int
    mcc: str
    country: str
    factor: float  # typical ticket relative to an account's spend scale


@dataclass
class Population:
    """Everything the live generator knows about the demo database."""

    accounts: list[Account]
    customer_devices: dict[int, int]  # customer id -> number of known devices
    pos_by_country: dict[str, list[Merchant]]  # shops with terminals (no cash machines)
    atm_by_country: dict[str, list[Merchant]]  # cash machines
    online_merchants: list[Merchant]
    online_by_country: dict[str, list[Merchant]]
    max_ids: dict[str, int]  # per table of ID_TABLES, and fraud_ground_truth


def load_population(conn: psycopg.Connection[tuple[object, ...]]) -> Population:
    """Read the demo tables into a :class:`Population` (in id order)."""
    home: dict[int, str] = {}
    devices: dict[int, int] = {}
    for row in conn.execute("SELECT id, country FROM customers ORDER BY id"):
        customer_id, country = cast(tuple[int, str], row)
        home[customer_id] = country
        devices[customer_id] = device_count(customer_id)
    accounts: list[Account] = []
    by_id: dict[int, Account] = {}
    for row in conn.execute(
        "SELECT id, customer_id, tier, status, currency, (balance * 100)::bigint "
        "FROM accounts ORDER BY id"
    ):
        account_id, customer_id, tier, status, currency, cents = cast(
            tuple[int, int, str, str, str, int], row
        )
        account = Account(
            id=account_id,
            customer_id=customer_id,
            country=home[customer_id],
            tier=tier,
            currency=currency,
            active=status == "active",
            balance=cents,
            scale=spend_scale_cents(account_id, tier, currency),
        )
        accounts.append(account)
        by_id[account_id] = account
    for row in conn.execute(
        "SELECT id, account_id, card_present FROM cards WHERE status = 'active' ORDER BY id"
    ):
        card_id, account_id, card_present = cast(tuple[int, int, bool], row)
        by_id[account_id].online_cards.append(card_id)
        if card_present:
            by_id[account_id].physical_cards.append(card_id)
    for row in conn.execute(
        "SELECT account_id, count(*), (sum(amount) * 100)::bigint FROM transactions "
        "WHERE type = 'purchase' AND status = 'settled' GROUP BY account_id ORDER BY account_id"
    ):
        account_id, count, total = cast(tuple[int, int, int], row)
        by_id[account_id].purchases = count
        by_id[account_id].purchase_sum = total
    population = Population(
        accounts=accounts,
        customer_devices=devices,
        pos_by_country={c.code: [] for c in COUNTRIES},
        atm_by_country={c.code: [] for c in COUNTRIES},
        online_merchants=[],
        online_by_country={c.code: [] for c in COUNTRIES},
        max_ids=_max_ids(conn),
    )
    _load_merchants(conn, population)
    return population


def _load_merchants(conn: psycopg.Connection[tuple[object, ...]], population: Population) -> None:
    for row in conn.execute(
        "SELECT id, mcc, country, card_present, online FROM merchants ORDER BY id"
    ):
        merchant_id, mcc, country, card_present, online = cast(
            tuple[int, str, str, bool, bool], row
        )
        category = CATEGORY_BY_MCC.get(mcc)
        merchant = Merchant(merchant_id, mcc, country, category.amount_factor if category else 1.0)
        if mcc == ATM_CATEGORY.mcc:
            population.atm_by_country.setdefault(country, []).append(merchant)
            continue
        if card_present:
            population.pos_by_country.setdefault(country, []).append(merchant)
        if online:
            population.online_merchants.append(merchant)
            population.online_by_country.setdefault(country, []).append(merchant)


def _max_ids(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, int]:
    found: dict[str, int] = {}
    for table in ID_TABLES:
        query = sql.SQL("SELECT COALESCE(max(id), 0) FROM {}").format(sql.Identifier(table))
        row = conn.execute(query).fetchone()
        found[table] = cast(int, row[0]) if row else 0
    row = conn.execute("SELECT COALESCE(max(scenario_id), 0) FROM fraud_ground_truth").fetchone()
    found["fraud_ground_truth"] = cast(int, row[0]) if row else 0
    return found

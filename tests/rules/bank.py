"""A small bank on the reference fintech schema, driven through the real pipeline.

PostgreSQL (the demo schema) → publication → real pgoutput slot → batcher →
engine with the stream jobs → DuckDB. Tests write rows with explicit event
times, then :meth:`Bank.sync` applies everything committed so far.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from headrace.alerts.store import ALERT_COLUMNS
from headrace.demo.schema import apply_schema
from tests.conftest import PgDatabase
from tests.engine.harness import Harness, make_harness

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
"""Event times of the tests are offsets from here (the past, so commit times cap nothing)."""

TABLES = """
source:
  dsn: "DSN"
  tables:
    customers: {}
    accounts: {}
    merchants: {}
    cards: {}
    transactions: {event_time: created_at}
    logins: {event_time: at}
"""

ALL_RULES = """
rules:
  velocity_burst: {}
  amount_spike: {}
  impossible_travel:
    locations: {DE: [51.2, 10.4], FR: [46.6, 2.2], US: [39.8, -98.6]}
  structuring: {}
  card_testing: {}
  account_takeover: {}
scores:
  health: {}
"""


def only(rule: str, settings: str = "{}") -> str:
    """Pipeline YAML running one rule (faster tests than :data:`ALL_RULES`)."""
    return f"\nrules:\n  {rule}: {settings}\n"


def at(seconds: float) -> datetime:
    """``T0`` plus ``seconds``."""
    return T0 + timedelta(seconds=seconds)


def _sql_time(value: datetime) -> str:
    return f"'{value.isoformat()}'"


def sql_time(seconds: float) -> str:
    """``at(seconds)`` as an SQL literal."""
    return _sql_time(at(seconds))


def insert_transaction(
    id: int,
    account: int,
    amount: float | str,
    created: str,
    *,
    channel: str,
    type: str,
    status: str = "settled",
    country: str = "DE",
    merchant: int | None = None,
    card: int | None = None,
    device: str | None = None,
    updated: str | None = None,
) -> str:
    """The INSERT of one transaction with these values (none derived from another but the
    decline reason a declined one needs). ``created`` and ``updated`` are SQL times
    (:func:`sql_time`, or an expression); ``updated`` is ``created`` unless given."""
    values = (
        f"({id}, {account}, {_n(card)}, {_n(merchant)}, {amount}, 'EUR', '{channel}', "
        f"'{type}', '{status}', {_decline_reason(status)}, '{country}', {_s(device)}, "
        f"{created}, {updated or created})"
    )
    return (
        "INSERT INTO transactions (id, account_id, card_id, merchant_id, amount, currency, "
        "channel, type, status, decline_reason, country, device, created_at, updated_at) "
        f"VALUES {values}"
    )


def insert_login(id: int, customer: int, when: str, success: bool, device: str) -> str:
    """The INSERT of one login from Germany (``when``: an SQL time)."""
    return (
        "INSERT INTO logins (id, customer_id, success, failure_reason, device, ip, country, "
        f"at) VALUES ({id}, {customer}, {str(success).lower()}, {login_result(success)}, "
        f"'{device}', '10.0.0.1', 'DE', {when})"
    )


def login_result(success: bool) -> str:
    """The failure reason a login needs (the schema's check): NULL exactly on success."""
    return "NULL" if success else "'bad_password'"


def new_status(status: str) -> str:
    """The SET clause giving a transaction ``status`` (and the decline reason it needs)."""
    return f"status = '{status}', decline_reason = {_decline_reason(status)}"


def new_time(when: str) -> str:
    """The SET clause moving a transaction to ``when`` (an SQL time)."""
    return f"created_at = {when}, updated_at = {when}"


def _decline_reason(status: str) -> str:
    """The schema wants a reason exactly on declined transactions."""
    return "'do_not_honor'" if status == "declined" else "NULL"


@dataclass
class Bank:
    """The pipeline under test and helpers to write fintech rows."""

    harness: Harness
    next_tx: int = 1000
    next_login: int = 1

    @property
    def store(self) -> Any:
        return self.harness.store

    def sync(self) -> None:
        self.harness.sync()

    def restart(self) -> None:
        """Close the store and open it again with a new engine (a process restart)."""
        self.harness.reopen()

    def execute(self, *statements: str) -> None:
        self.harness.execute(*statements)

    def tx(
        self,
        account: int,
        amount: float,
        seconds: float,
        *,
        channel: str = "pos",
        type: str = "purchase",
        status: str = "settled",
        country: str = "DE",
        merchant: int | None = 1,
        card: int | None = None,
        device: str | None = None,
        id: int | None = None,
        commit: bool = True,
    ) -> int:
        """Insert one transaction (its own database transaction unless ``commit`` is False)."""
        if id is None:
            id = self.next_tx
            self.next_tx += 1
        if card is None and channel in ("pos", "atm", "online"):
            card = account
        if channel == "transfer":
            merchant = None
            card = None
        statement = insert_transaction(
            id,
            account,
            amount,
            sql_time(seconds),
            channel=channel,
            type=type,
            status=status,
            country=country,
            merchant=merchant,
            card=card,
            device=device,
        )
        if commit:
            self.execute(statement)
        return id

    def outflow_and_balance(
        self, id: int, account: int, amount: float, seconds: float, *, balance: float, device: str
    ) -> None:
        """A transfer out of ``account`` and the account's new ``balance``, in one transaction."""
        self.harness.transaction(
            insert_transaction(
                id,
                account,
                amount,
                sql_time(seconds),
                channel="transfer",
                type="transfer_out",
                device=device,
            ),
            f"UPDATE accounts SET balance = {balance} WHERE id = {account}",
        )

    def set_status(self, tx_id: int, status: str) -> None:
        self.execute(f"UPDATE transactions SET {new_status(status)} WHERE id = {tx_id}")

    def login(
        self, customer: int, seconds: float, *, success: bool = True, device: str = "phone-1"
    ) -> int:
        login_id = self.next_login
        self.next_login += 1
        self.execute(insert_login(login_id, customer, sql_time(seconds), success, device))
        return login_id

    def set_balance(self, account: int, balance: float) -> None:
        self.execute(f"UPDATE accounts SET balance = {balance} WHERE id = {account}")

    # ------------------------------------------------------------ reading

    def duck(self, sql: str) -> list[tuple[Any, ...]]:
        return self.harness.duck(sql)

    def alerts(self, rule: str | None = None) -> list[dict[str, Any]]:
        where = f" WHERE rule = '{rule}'" if rule else ""
        rows = self.duck(
            f"SELECT {', '.join(ALERT_COLUMNS)} FROM headrace.alerts{where} ORDER BY id"
        )
        out = []
        for row in rows:
            alert = dict(zip(ALERT_COLUMNS, row, strict=True))
            alert["payload"] = json.loads(alert["payload"])
            out.append(alert)
        return out

    def close(self) -> None:
        self.harness.close()


def _n(value: int | None) -> str:
    return "NULL" if value is None else str(value)


def _s(value: str | None) -> str:
    return "NULL" if value is None else f"'{value}'"


ACCOUNTS = 8
"""Customers n = 1..8, each with account n (balance 5000 EUR) and physical card n."""


def seed(db: PgDatabase) -> None:
    """Customers with an account and a physical card each; merchants 1-10 in DE, 11 FR, 12 US."""
    with db.connect() as conn:
        apply_schema(conn)
    created = _sql_time(T0 - timedelta(days=400))
    people = range(1, ACCOUNTS + 1)
    db.execute(
        "INSERT INTO customers VALUES "
        + ", ".join(
            f"({n}, 'Customer {n}', 'c{n}@example.com', 'DE', 'low', {created})" for n in people
        )
    )
    db.execute(
        "INSERT INTO accounts VALUES "
        + ", ".join(
            f"({n}, {n}, 'plus', 'active', 5000, 'EUR', {created}, {created})" for n in people
        )
    )
    db.execute(
        "INSERT INTO cards VALUES "
        + ", ".join(
            f"({n}, {n}, 'physical', true, true, 'active', '{n:04d}', {created}, '2030-01-01')"
            for n in people
        )
    )
    merchants = []
    for merchant in range(1, 13):
        country = "US" if merchant == 12 else ("FR" if merchant == 11 else "DE")
        merchants.append(
            f"({merchant}, 'shop {merchant}', '5411', 'grocery', '{country}', true, true)"
        )
    db.execute(f"INSERT INTO merchants VALUES {', '.join(merchants)}")


def open_bank(
    db: PgDatabase,
    tmp_path: Path,
    config: str = ALL_RULES,
    before_snapshot: tuple[str, ...] = (),
    **kwargs: Any,
) -> Bank:
    """Seed the schema (and run ``before_snapshot``), snapshot it into a new store, and
    stream from then on."""
    seed(db)
    for statement in before_snapshot:
        db.execute(statement)
    harness = make_harness(db, tmp_path, TABLES + config, **kwargs)
    return Bank(harness)

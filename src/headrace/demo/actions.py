"""What the generator can do at a simulated instant.

Normal traffic and fraud scenarios both produce these; the generator
(:mod:`headrace.demo.generator`) schedules them and its executor
(:mod:`headrace.demo.executor`) applies them in time order, each becoming
rows of one tick's database transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from headrace.demo.state import Account, Merchant

OUTFLOW_TYPES = frozenset({"purchase", "withdrawal", "transfer_out", "fee"})
"""Transaction types that take money out of the account."""

DEFAULT_DELAY_US = 1_000_000
"""How long a pending transaction waits for its outcome unless told otherwise."""


@dataclass(slots=True)
class TxnSpec:
    """A transaction to insert; it becomes a ``transactions`` row (pending or settled)."""

    account: Account
    type: str  # purchase, refund, withdrawal, transfer_in, transfer_out, fee
    channel: str  # pos, online, atm, transfer
    amount: int  # cents of the account's currency; ignored when outflow_share is set
    country: str
    card_id: int | None = None
    merchant_id: int | None = None
    parent_id: int | None = None
    device: str | None = None
    ip: str | None = None
    # what happens to it: "settle" (pending, settled after delay_us),
    # "decline" (pending, declined after delay_us), "void" (pending,
    # authorisation reversed after delay_us), "now" (inserted settled)
    outcome: str = "settle"
    decline_reason: str | None = None
    delay_us: int = DEFAULT_DELAY_US
    reverse_after_us: int | None = None  # settled, then reversed this much later
    fee_cents: int = 0  # a fee booked with it when it settles (withdrawals)
    outflow_share: float | None = None  # amount = this share of the available balance
    normal: bool = True  # normal traffic (False: part of a fraud scenario)

    @property
    def outflow(self) -> bool:
        """Whether it takes money out of the account."""
        return self.type in OUTFLOW_TYPES


def pos_purchase(
    account: Account,
    merchant: Merchant,
    card_id: int,
    amount: int,
    *,
    delay_us: int = DEFAULT_DELAY_US,
    normal: bool = True,
) -> TxnSpec:
    """A card-present purchase of ``amount`` cents at ``merchant``'s terminal."""
    return TxnSpec(
        account=account,
        type="purchase",
        channel="pos",
        amount=amount,
        country=merchant.country,
        card_id=card_id,
        merchant_id=merchant.id,
        device=f"pos-{merchant.id}",
        delay_us=delay_us,
        normal=normal,
    )


def transfer(
    account: Account,
    kind: str,
    amount: int,
    *,
    device: str,
    ip: str,
    delay_us: int,
    country: str | None = None,
    outflow_share: float | None = None,
    normal: bool = True,
) -> TxnSpec:
    """A bank transfer (``kind``: transfer_in or transfer_out) made from ``device``.

    ``country`` defaults to the account's home country.
    """
    return TxnSpec(
        account=account,
        type=kind,
        channel="transfer",
        amount=amount,
        country=account.country if country is None else country,
        device=device,
        ip=ip,
        delay_us=delay_us,
        outflow_share=outflow_share,
        normal=normal,
    )


@dataclass(slots=True)
class Insert:
    """Insert a transaction."""

    spec: TxnSpec


@dataclass(slots=True)
class Resolve:
    """Move a pending transaction to its outcome (settled, declined or reversed)."""

    txn_id: int


@dataclass(slots=True)
class Reverse:
    """Reverse a settled transaction (merchant reversal or chargeback)."""

    txn_id: int


@dataclass(slots=True)
class Login:
    """A login attempt of a customer."""

    customer_id: int
    success: bool
    device: str
    ip: str
    country: str
    failure_reason: str | None = None


@dataclass(slots=True)
class Truth:
    """Write a fraud scenario's ground-truth row."""

    scenario_id: int
    family: str
    account: Account
    card_id: int | None
    started_us: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class NormalTransaction:
    """Placeholder for one normal transaction, drawn when executed."""


@dataclass(slots=True)
class NormalLogin:
    """Placeholder for one normal login (possibly a failed burst), drawn when executed."""


@dataclass(slots=True)
class NewCustomer:
    """Placeholder for a new customer opening an account, drawn when executed."""


Action = Insert | Resolve | Reverse | Login | Truth | NormalTransaction | NormalLogin | NewCustomer

"""The ``rules:`` section of ``headrace.yaml``: where the rules read, and their thresholds.

A rule runs when its section is present. ``tables`` says which tables and
columns play which part; its defaults name the reference fintech schema
(``transactions``, ``accounts``, ``logins``), so another schema only
rewrites the names. Conditions (``declined``, ``outflow``, ``where``...)
are DuckDB SQL over one row of the table. Amounts are in the units of the
amount column (one account's transactions are compared with each other,
never across currencies). Example::

    rules:
      velocity_burst:
        limits: [{window: 1m, count: 8}]
      structuring: {threshold: 10000, min_count: 3}
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from headrace.alerts.config import Severity
from headrace.pipeline.durations import Duration
from headrace.pipeline.expressions import ExpressionError, parse_row_expression


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_sql(value: str) -> str:
    try:
        parse_row_expression(value)
    except ExpressionError as exc:
        raise ValueError(str(exc)) from None
    return value


Condition = Annotated[str, AfterValidator(_check_sql)]
"""A DuckDB SQL condition over one row, checked when the file is loaded."""


class TransactionsTable(_Model):
    """The table of money movements, one row per transaction (its primary key identifies it)."""

    table: str = Field(default="transactions", description="Source table (a mirrored table).")
    account: str = Field(default="account_id", description="Column: the account the row is on.")
    time: str = Field(
        default="created_at", description="Column: when the transaction happened (event time)."
    )
    amount: str = Field(default="amount", description="Column: the amount (positive).")
    merchant: str = Field(default="merchant_id", description="Column: the merchant (or NULL).")
    card: str = Field(default="card_id", description="Column: the card used (or NULL).")
    country: str = Field(default="country", description="Column: where it happened.")
    device: str = Field(default="device", description="Column: device or terminal used.")
    status: str = Field(default="status", description="Column: the status (shown in evidence).")
    channel: str = Field(default="channel", description="Column: the channel (shown in evidence).")
    type: str = Field(default="type", description="Column: the type (shown in evidence).")
    declined: Condition = Field(
        default="status = 'declined'", description="Condition: the transaction was declined."
    )
    reversed: Condition = Field(
        default="status = 'reversed'", description="Condition: the transaction was reversed."
    )
    cancelled: Condition = Field(
        default="status IN ('declined', 'reversed')",
        description="Condition: no money moved in the end (declined or reversed).",
    )
    outflow: Condition = Field(
        default="type IN ('purchase', 'withdrawal', 'transfer_out', 'fee')",
        description="Condition: money leaves the account.",
    )
    inflow: Condition = Field(
        default="type IN ('refund', 'transfer_in')",
        description="Condition: money comes into the account.",
    )
    card_present: Condition = Field(
        default="channel IN ('pos', 'atm')",
        description="Condition: the card was physically present (terminal, cash machine).",
    )
    online: Condition = Field(
        default="channel = 'online'", description="Condition: an online payment."
    )


class AccountsTable(_Model):
    """The table of accounts (balance, owner)."""

    table: str = Field(default="accounts", description="Source table (a mirrored table).")
    id: str = Field(default="id", description="Column: the account id (transactions' `account`).")
    customer: str = Field(
        default="customer_id", description="Column: the customer owning the account."
    )
    balance: str = Field(default="balance", description="Column: the current balance.")


class LoginsTable(_Model):
    """The table of login attempts, one row per attempt."""

    table: str = Field(default="logins", description="Source table (a mirrored table).")
    customer: str = Field(
        default="customer_id", description="Column: the customer (accounts' `customer`)."
    )
    time: str = Field(default="at", description="Column: when the attempt happened.")
    success: Condition = Field(default="success", description="Condition: the attempt succeeded.")
    device: str = Field(default="device", description="Column: the device used.")
    country: str = Field(default="country", description="Column: where from (shown in evidence).")


class TablesConfig(_Model):
    """Which tables and columns the rules and scores read."""

    transactions: TransactionsTable = Field(
        default_factory=TransactionsTable, description="The transactions table."
    )
    accounts: AccountsTable = Field(
        default_factory=AccountsTable, description="The accounts table."
    )
    logins: LoginsTable = Field(default_factory=LoginsTable, description="The logins table.")


class BaseRuleConfig(_Model):
    """What every rule's configuration has."""

    severity: Severity = Field(default=Severity.HIGH, description="Severity of the rule's alerts.")
    rearm_after: Duration = Field(
        default=timedelta(hours=1),
        description=(
            "One alert per incident: after an alert, the rule stays quiet for the same key "
            "until its condition has not held for this long."
        ),
    )


class VelocityLimit(_Model):
    """At most ``count - 1`` transactions of one account within ``window``."""

    window: Duration = Field(description="Length of the sliding window, e.g. `1m`.")
    count: int = Field(ge=2, description="Transactions within the window that raise an alert.")


class VelocityBurstConfig(BaseRuleConfig):
    """(1) Velocity burst: too many transactions of one account in a short sliding window."""

    limits: list[VelocityLimit] = Field(
        default_factory=lambda: [
            VelocityLimit(window=timedelta(minutes=1), count=8),
            VelocityLimit(window=timedelta(minutes=5), count=20),
        ],
        min_length=1,
        description="Sliding windows and counts; the alert names the one crossed.",
    )
    where: Condition = Field(
        default="type IN ('purchase', 'withdrawal', 'transfer_out')",
        description="Condition: which transactions count (customer-initiated ones).",
    )
    rearm_after: Duration = Field(
        default=timedelta(minutes=10), description="Quiet time that ends an incident."
    )


class AmountSpikeConfig(BaseRuleConfig):
    """(2) Amount spike: a transaction far above the account's own mean."""

    factor: float = Field(
        default=10.0, gt=1.0, description="Alert when amount >= factor x the account's mean."
    )
    min_amount: float = Field(
        default=500.0, ge=0.0, description="Smaller amounts never alert, whatever the factor."
    )
    min_history: int = Field(
        default=5, ge=1, description="Transactions the account needs in its history first."
    )
    where: Condition = Field(
        default="type = 'purchase'",
        description="Condition: which transactions are checked and form the history.",
    )
    history_where: Condition = Field(
        default="status = 'settled'",
        description=(
            "Condition: which of them count in the history (a reversal takes one out again)."
        ),
    )
    severity: Severity = Field(default=Severity.HIGH, description="Severity of its alerts.")


class ImpossibleTravelConfig(BaseRuleConfig):
    """(3) Impossible travel / new country for card-present use."""

    max_speed_kmh: float = Field(
        default=900.0,
        gt=0.0,
        description=(
            "Alert when two consecutive card-present uses imply a faster journey (needs "
            "`locations` for both countries)."
        ),
    )
    window: Duration = Field(
        default=timedelta(hours=12),
        description="How far back the previous card-present use is looked for.",
    )
    new_country: bool = Field(
        default=True,
        description="Also alert on card-present use in a country the account never used before.",
    )
    min_history: int = Field(
        default=1,
        ge=0,
        description="Card-present uses the account needs before a new country counts.",
    )
    locations: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Country (as in the country column) -> [latitude, longitude] of its centre.",
    )
    rearm_after: Duration = Field(
        default=timedelta(hours=6), description="Quiet time that ends an incident."
    )


class StructuringConfig(BaseRuleConfig):
    """(4) Structuring: several amounts just under a reporting threshold within a window."""

    threshold: float = Field(default=10_000.0, gt=0.0, description="The reporting threshold.")
    low: float | None = Field(
        default=None,
        description="Amounts in [low, threshold) count; default 90% of the threshold.",
    )
    min_count: int = Field(default=3, ge=2, description="Such transactions that raise an alert.")
    window: Duration = Field(default=timedelta(hours=24), description="Sliding window.")
    where: Condition = Field(default="true", description="Condition: which transactions count.")
    severity: Severity = Field(default=Severity.MEDIUM, description="Severity of its alerts.")
    rearm_after: Duration = Field(
        default=timedelta(hours=24), description="Quiet time that ends an incident."
    )

    @model_validator(mode="after")
    def _low_below(self) -> StructuringConfig:
        if self.low is not None and not 0 <= self.low < self.threshold:
            raise ValueError("low must be at least 0 and below threshold")
        return self

    @property
    def band_low(self) -> float:
        return self.low if self.low is not None else self.threshold * 0.9


class CardTestingConfig(BaseRuleConfig):
    """(5) Card testing: many small online attempts or declines across merchants in minutes."""

    small_amount: float = Field(
        default=2.0, gt=0.0, description="Online attempts below this amount count."
    )
    declines: Condition | None = Field(
        default="status = 'declined'",
        description=(
            "Condition: declined online attempts that count whatever their amount "
            "(e.g. only wrong CVV or card number); none when empty."
        ),
    )
    min_attempts: int = Field(default=5, ge=2, description="Attempts that raise an alert.")
    min_merchants: int = Field(
        default=4, ge=1, description="...at at least this many distinct merchants."
    )
    window: Duration = Field(default=timedelta(minutes=10), description="Sliding window.")


class AccountTakeoverConfig(BaseRuleConfig):
    """(6) Account takeover: a large outflow soon after a risky login."""

    outflow_share: float = Field(
        default=0.5,
        gt=0.0,
        description="Alert when one outflow takes at least this share of the balance.",
    )
    min_amount: float = Field(default=0.0, ge=0.0, description="Smaller outflows never alert.")
    where: Condition | None = Field(
        default=None,
        description=(
            "Condition: which transactions are outflows checked "
            "(default: `tables.transactions.outflow`)."
        ),
    )
    window: Duration = Field(
        default=timedelta(minutes=30),
        description="How soon after the risky login the outflow must come.",
    )
    new_device: bool = Field(
        default=True,
        description="A successful login from a device the customer never logged in from is risky.",
    )
    failed_logins: int = Field(
        default=3, ge=1, description="This many failed logins within `failed_window` are risky."
    )
    failed_window: Duration = Field(
        default=timedelta(minutes=10), description="Window of the failed-login burst."
    )
    severity: Severity = Field(default=Severity.CRITICAL, description="Severity of its alerts.")


IN_MEMORY_RULES = (
    "velocity_burst",
    "amount_spike",
    "impossible_travel",
    "structuring",
    "card_testing",
    "account_takeover",
)
"""Rules with an in-memory implementation (:mod:`headrace.rules.lane`)."""


class RulesConfig(_Model):
    """The fraud rules; each runs when its section is present."""

    tables: TablesConfig = Field(
        default_factory=TablesConfig, description="Which tables and columns the rules read."
    )
    lateness: Duration = Field(
        default=timedelta(minutes=5),
        description=(
            "How far behind the newest event time an event may arrive and still be checked "
            "against a complete window (state is kept this much longer than the windows)."
        ),
    )
    velocity_burst: VelocityBurstConfig | None = Field(
        default=None, description="(1) Velocity burst."
    )
    amount_spike: AmountSpikeConfig | None = Field(default=None, description="(2) Amount spike.")
    impossible_travel: ImpossibleTravelConfig | None = Field(
        default=None, description="(3) Impossible travel / new country, card present."
    )
    structuring: StructuringConfig | None = Field(default=None, description="(4) Structuring.")
    card_testing: CardTestingConfig | None = Field(default=None, description="(5) Card testing.")
    account_takeover: AccountTakeoverConfig | None = Field(
        default=None, description="(6) Account takeover."
    )
    in_memory: list[str] = Field(
        default_factory=list,
        description=(
            "Rules evaluated in memory on every decoded batch, beside the engine (the rules "
            "lane): their alerts are committed and sent within milliseconds of the source's "
            "commit instead of after the engine's batch, and the engine no longer runs their "
            "SQL. Each must be configured and have an in-memory implementation "
            "(headrace.rules.lane: see IN_MEMORY_RULES)."
        ),
    )

    @model_validator(mode="after")
    def _in_memory_rules_exist(self) -> RulesConfig:
        for name in self.in_memory:
            if name not in IN_MEMORY_RULES:
                raise ValueError(
                    f"rules.in_memory: {name!r} has no in-memory implementation "
                    f"(available: {', '.join(IN_MEMORY_RULES)}); remove it to run it as SQL"
                )
            if getattr(self, name) is None:
                raise ValueError(
                    f"rules.in_memory names {name!r}, which is not configured: "
                    f"add a `{name}:` section under rules, or remove it from in_memory"
                )
        if len(set(self.in_memory)) != len(self.in_memory):
            raise ValueError("rules.in_memory names a rule twice")
        return self

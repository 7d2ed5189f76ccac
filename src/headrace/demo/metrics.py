"""The reference deployment's metrics, each with its exact definition as PostgreSQL SQL.

The deployment file (``headrace.yaml`` beside this module) maintains these
metrics incrementally as rollups; this catalog says what each one *is*, as
SQL over the source tables, so that it can be checked against PostgreSQL at
the same LSN (``tests/demo/test_metrics_*.py``) and documented
(``docs/metrics.md``). A metric's value in ``rollup.<rollup>_<grain>`` for a
bucket and a combination of dimension values equals :func:`reference_sql`
run on the source database.

Buckets are epoch-aligned in UTC (``floor(epoch / grain) * grain``), on the
row's event time (``created_at``, ``at``, ``opened_at``).

>>> [m.name for m in METRICS][:3]
['tx_count', 'volume', 'avg_amount']
>>> len(METRICS), len(SOURCE_METRICS)
(24, 22)
"""

from __future__ import annotations

from dataclasses import dataclass

DIMENSIONS: tuple[str, ...] = (
    "merchant_category",
    "merchant_country",
    "channel",
    "currency",
    "account_tier",
    "tx_type",
    "status",
)
"""The seven dimensions, named the same in every rollup and on the dashboard."""


def eur_rate_sql(prefix: str = "") -> str:
    """Value of one unit of an account currency in EUR: the deployment's fixed reference rates.

    ``prefix`` qualifies the column (``"t."``).
    """
    return (
        f"CASE {prefix}currency WHEN 'EUR' THEN 1.0 WHEN 'GBP' THEN 1.17 WHEN 'SEK' THEN 0.088 "
        "WHEN 'PLN' THEN 0.23 WHEN 'CHF' THEN 1.05 WHEN 'USD' THEN 0.92 END"
    )


def cross_border_sql(prefix: str = "") -> str:
    """A transaction outside the currency area of its (the account's) currency."""
    country = f"{prefix}country"
    return (
        f"CASE {prefix}currency"
        f" WHEN 'EUR' THEN {country} NOT IN ('AT', 'BE', 'DE', 'ES', 'FI', 'FR', 'IE', 'IT',"
        " 'NL', 'PT')"
        f" WHEN 'GBP' THEN {country} <> 'GB' WHEN 'SEK' THEN {country} <> 'SE'"
        f" WHEN 'PLN' THEN {country} <> 'PL' WHEN 'CHF' THEN {country} NOT IN ('CH', 'LI')"
        f" WHEN 'USD' THEN {country} <> 'US' END"
    )


def high_value_sql(prefix: str = "") -> str:
    """At least 1,000 EUR at the reference rates."""
    return f"{prefix}amount * ({eur_rate_sql(prefix)}) >= 1000"


@dataclass(frozen=True)
class MetricSource:
    """Where metrics come from: the rows, their time and their dimensions."""

    rollup: str
    """The rollup maintaining the metrics (views ``rollup.<rollup>_5m``, ``_1h``, ``_1d``);
    for metrics over the store, a name for the group of metrics."""
    table: str
    """The source table whose rows are aggregated."""
    time: str
    """Event-time column (SQL over ``from_sql``) placing a row in a bucket."""
    from_sql: str
    """PostgreSQL FROM clause: the table, joined to the tables dimensions are looked up in."""
    dimensions: dict[str, str]
    """Dimension name → PostgreSQL SQL over ``from_sql`` (only the dimensions that apply)."""
    in_store: bool = False
    """The rows are what headrace derives itself (alerts, scores): ``from_sql`` and the
    metric SQL are DuckDB SQL over the store, and there is no rollup of them."""


@dataclass(frozen=True)
class Metric:
    """One metric: its name (the rollup column), its source, and its definition."""

    name: str
    source: MetricSource
    sql: str
    """The aggregate over the source rows of one group: PostgreSQL SQL (DuckDB SQL over the
    store when the source is ``in_store``)."""
    meaning: str
    """The definition in words (docs/metrics.md)."""
    unit: str = ""


_TX_FROM = (
    "transactions t LEFT JOIN merchants m ON m.id = t.merchant_id "
    "LEFT JOIN accounts a ON a.id = t.account_id"
)
_TX_DIMENSIONS = {
    "merchant_category": "m.category",
    "merchant_country": "m.country",
    "channel": "t.channel",
    "currency": "t.currency",
    "account_tier": "a.tier",
    "tx_type": "t.type",
    "status": "t.status",
}

TX = MetricSource("tx", "transactions", "t.created_at", _TX_FROM, _TX_DIMENSIONS)
TX_REACH = MetricSource("tx_reach", "transactions", "t.created_at", _TX_FROM, _TX_DIMENSIONS)
FLOWS = MetricSource(
    "flows",
    "ledger_entries",
    "l.at",
    "ledger_entries l LEFT JOIN accounts a ON a.id = l.account_id "
    "LEFT JOIN transactions t ON t.id = l.transaction_id",
    {
        "account_tier": "a.tier",
        "currency": "a.currency",
        "tx_type": "t.type",
        "channel": "t.channel",
    },
)
LOGINS = MetricSource("logins", "logins", "g.at", "logins g", {})
LOGIN_DEVICES = MetricSource("login_devices", "logins", "g.at", "logins g", {})
ACCOUNTS = MetricSource(
    "accounts",
    "accounts",
    "a.opened_at",
    "accounts a",
    {"account_tier": "a.tier", "currency": "a.currency"},
)

FRAUD_ALERTS = MetricSource(
    "fraud_alerts",
    "headrace.alerts",
    "al.event_at",
    "headrace.alerts al LEFT JOIN mirror.accounts a ON a.id = al.account_id "
    "WHERE al.kind = 'fraud'",
    {"account_tier": "a.tier", "currency": "a.currency"},
    in_store=True,
)
HEALTH = MetricSource(
    "health",
    "headrace.health_history",
    "h.as_of",
    "headrace.health_history h LEFT JOIN mirror.accounts a ON a.id = h.account_id",
    {"account_tier": "a.tier", "currency": "a.currency"},
    in_store=True,
)

SOURCES: tuple[MetricSource, ...] = (TX, TX_REACH, FLOWS, LOGINS, LOGIN_DEVICES, ACCOUNTS)
"""The rollups of source tables, checked against PostgreSQL."""
STORE_SOURCES: tuple[MetricSource, ...] = (FRAUD_ALERTS, HEALTH)
"""The metrics over what headrace derives itself."""


METRICS: tuple[Metric, ...] = (
    Metric("tx_count", TX, "count(*)", "Transactions created in the bucket (any status)."),
    Metric(
        "volume",
        TX,
        "sum(t.amount)",
        "Sum of their amounts, in the transaction's currency (add currencies up only after "
        "converting, e.g. with the EUR reference rates).",
        "currency",
    ),
    Metric("avg_amount", TX, "avg(t.amount)", "Average amount (volume / tx_count).", "currency"),
    Metric("min_amount", TX, "min(t.amount)", "Smallest amount.", "currency"),
    Metric("max_amount", TX, "max(t.amount)", "Largest amount.", "currency"),
    Metric(
        "declined_count",
        TX,
        "count(*) FILTER (WHERE t.status = 'declined')",
        "Transactions whose current status is declined.",
    ),
    Metric(
        "declined_volume",
        TX,
        "sum(t.amount) FILTER (WHERE t.status = 'declined')",
        "Their amounts (NULL when there is none).",
        "currency",
    ),
    Metric(
        "refund_count",
        TX,
        "count(*) FILTER (WHERE t.type = 'refund')",
        "Refunds (type refund, any status).",
    ),
    Metric(
        "refund_volume",
        TX,
        "sum(t.amount) FILTER (WHERE t.type = 'refund')",
        "Their amounts (NULL when there is none).",
        "currency",
    ),
    Metric(
        "reversal_count",
        TX,
        "count(*) FILTER (WHERE t.status = 'reversed')",
        "Transactions whose current status is reversed (voided while pending, or reversed "
        "after settlement).",
    ),
    Metric(
        "cross_border_count",
        TX,
        f"count(*) FILTER (WHERE {cross_border_sql('t.')})",
        "Transactions made outside the currency area of their currency: a EUR account used "
        "outside AT BE DE ES FI FR IE IT NL PT, a GBP account outside GB, SEK outside SE, "
        "PLN outside PL, CHF outside CH LI, USD outside US. The place is the transaction's "
        "country (the merchant's for card and online payments, the account holder's home "
        "for transfers).",
    ),
    Metric(
        "cross_border_volume",
        TX,
        f"sum(t.amount) FILTER (WHERE {cross_border_sql('t.')})",
        "Their amounts (NULL when there is none).",
        "currency",
    ),
    Metric(
        "high_value_count",
        TX,
        f"count(*) FILTER (WHERE {high_value_sql('t.')})",
        "Transactions of at least 1,000 EUR at the reference rates (EUR 1, GBP 1.17, "
        "SEK 0.088, PLN 0.23, CHF 1.05, USD 0.92 EUR per unit).",
    ),
    Metric(
        "distinct_accounts",
        TX_REACH,
        "count(DISTINCT t.account_id)",
        "Accounts with at least one transaction in the group. Exact per group; distinct "
        "counts do not add up across groups.",
    ),
    Metric(
        "distinct_merchants",
        TX_REACH,
        "count(DISTINCT t.merchant_id)",
        "Merchants with at least one transaction in the group (transfers have none). Exact "
        "per group; distinct counts do not add up across groups.",
    ),
    Metric(
        "inflow",
        FLOWS,
        "sum(l.delta) FILTER (WHERE l.delta > 0)",
        "Money credited to accounts: the positive ledger entries (openings, incoming "
        "transfers, refunds, reversals of debits). NULL when there is none.",
        "currency",
    ),
    Metric(
        "outflow",
        FLOWS,
        "sum(-l.delta) FILTER (WHERE l.delta < 0)",
        "Money debited, as a positive number: the negative ledger entries (purchases, "
        "withdrawals, outgoing transfers, fees, reversals of credits). NULL when there is none.",
        "currency",
    ),
    Metric(
        "net_flow",
        FLOWS,
        "sum(l.delta)",
        "Every balance change added up: inflow - outflow.",
        "currency",
    ),
    Metric("logins", LOGINS, "count(*)", "Login attempts, successful or not."),
    Metric(
        "failed_logins",
        LOGINS,
        "count(*) FILTER (WHERE NOT g.success)",
        "Failed login attempts.",
    ),
    Metric(
        "distinct_devices",
        LOGIN_DEVICES,
        "count(DISTINCT g.device)",
        "Devices that attempted a login.",
    ),
    Metric(
        "new_accounts",
        ACCOUNTS,
        "count(*)",
        "Accounts opened in the bucket (by opened_at), by their tier and currency.",
    ),
    Metric(
        "fraud_alerts",
        FRAUD_ALERTS,
        "count(*)",
        "Fraud alerts raised by the six rules (one per incident), bucketed by the event time "
        "of the change that completed the pattern; by the tier and currency of the alert's "
        "account.",
    ),
    Metric(
        "avg_health_score",
        HEALTH,
        "avg(h.score)",
        "Average of the account health scores (0-100) recorded in the bucket (a score is "
        "recorded whenever an account's score changes; bucketed by the score's as-of event "
        "time); by the tier and currency of the scored account.",
    ),
)
"""Every metric of the reference deployment, in documentation order."""

SOURCE_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if not m.source.in_store)
"""The metrics maintained as rollups of source tables (checked against PostgreSQL)."""


def metrics_of(source: MetricSource) -> list[Metric]:
    """The metrics a rollup maintains, in its column order."""
    return [m for m in METRICS if m.source is source]


def bucket_sql(time: str, grain_seconds: int, *, duckdb: bool = False) -> str:
    """The epoch-aligned UTC bucket start of ``time`` (a timestamptz), PostgreSQL or DuckDB."""
    g = int(grain_seconds)
    epoch = f"epoch({time})" if duckdb else f"extract(epoch FROM {time})"
    return f"to_timestamp(floor({epoch} / {g}) * {g})"


def reference_sql(source: MetricSource, grain_seconds: int) -> str:
    """SQL computing the source's metrics from scratch, per bucket and dimension values.

    For a rollup of a source table: PostgreSQL SQL whose result equals
    ``rollup.<rollup>_<grain>``; for an ``in_store`` source: DuckDB SQL over
    the store. Columns: ``bucket``, the source's dimensions (in
    :data:`DIMENSIONS` order), then its metrics; one row per non-empty group.
    """
    dims = [d for d in DIMENSIONS if d in source.dimensions]
    bucket = bucket_sql(source.time, grain_seconds, duckdb=source.in_store)
    columns = [f"{bucket} AS bucket"]
    columns += [f"{source.dimensions[d]} AS {d}" for d in dims]
    columns += [f"{m.sql} AS {m.name}" for m in metrics_of(source)]
    groups = ", ".join(str(i) for i in range(1, len(dims) + 2))
    select = ", ".join(columns)
    return f"SELECT {select} FROM {source.from_sql} GROUP BY {groups}"  # noqa: S608 - constants


def view_columns(source: MetricSource) -> list[str]:
    """Columns :func:`reference_sql` and :func:`view_sql` return, in order."""
    dims = [d for d in DIMENSIONS if d in source.dimensions]
    return ["bucket", *dims, *(m.name for m in metrics_of(source))]


def view_sql(source: MetricSource, grain_label: str) -> str:
    """DuckDB reading the same columns, in the same order, from the rollup view."""
    columns = ", ".join(view_columns(source))
    return f"SELECT {columns} FROM rollup.{source.rollup}_{grain_label}"  # noqa: S608 - constants

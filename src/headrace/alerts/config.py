"""The ``sinks:`` and ``metric_alerts:`` sections of ``headrace.yaml``.

Sinks are where alerts go (webhook, Slack-compatible incoming webhook, email,
log); metric alerts watch a rollup. Every field is documented here; unknown
keys are errors. Example::

    sinks:
      - name: ops
        type: webhook
        url: https://ops.example.com/headrace
        secret_env: OPS_WEBHOOK_SECRET
        min_severity: high
        keep_delivered: 3d     # records of successful deliveries kept (default 7d)
      - {name: console, type: log}
    metric_alerts:
      - name: declines_spike
        rollup: tx_metrics
        measure: declined_count
        condition: zscore
        above: 4
"""

from __future__ import annotations

import os
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from headrace.pipeline.durations import Duration
from headrace.pipeline.expressions import ExpressionError, parse_row_expression

SINK_NAME = r"^[A-Za-z0-9_.-]{1,64}$"

DEFAULT_KEEP_DELIVERED = timedelta(days=7)
"""How long a delivered outbox row is kept when its sink does not say."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Severity(StrEnum):
    """How urgent an alert is; sinks can drop alerts below a level."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return SEVERITY_RANK[self.value]


SEVERITY_RANK: dict[str, int] = {"low": 1, "medium": 2, "high": 3, "critical": 4}


class AlertKind(StrEnum):
    """Where an alert comes from."""

    FRAUD = "fraud"
    METRIC = "metric"


class RetryConfig(_Model):
    """How a failed delivery is retried: exponential backoff, then given up and recorded."""

    attempts: int = Field(
        default=6, ge=1, le=100, description="Attempts in total (the first one included)."
    )
    backoff: Duration = Field(
        default=timedelta(seconds=1),
        description="Wait before the second attempt; doubles after each failure.",
    )
    max_backoff: Duration = Field(
        default=timedelta(seconds=60),
        description="Longest wait between two attempts.",
    )


class _SinkBase(_Model):
    name: str = Field(
        pattern=SINK_NAME,
        description="Unique name of the sink (recorded with every delivery attempt).",
    )
    min_severity: Severity = Field(
        default=Severity.LOW, description="Only alerts at least this severe go to this sink."
    )
    rules: list[str] | None = Field(
        default=None,
        description=(
            "Only alerts of these rules (fraud rule names or metric alert names); all when absent."
        ),
    )
    kinds: list[AlertKind] | None = Field(
        default=None, description="Only these kinds of alerts (`fraud`, `metric`); all when absent."
    )
    retry: RetryConfig = Field(
        default_factory=RetryConfig, description="Retries of a failed delivery."
    )
    timeout: Duration = Field(
        default=timedelta(seconds=10),
        description="Time allowed for one delivery attempt (connect, send, answer).",
    )
    keep_delivered: Duration = Field(
        default=DEFAULT_KEEP_DELIVERED,
        description=(
            "How long the record of a successful delivery stays in "
            "`headrace.alert_deliveries` (deleted between batches once older). "
            "Failed deliveries are kept as long as their alerts."
        ),
    )


def _secret(value: str | None, env: str | None) -> str | None:
    if value is not None:
        return value
    if env is not None:
        return os.environ.get(env)
    return None


class WebhookSinkConfig(_SinkBase):
    """HTTP POST of the alert as JSON, signed with HMAC-SHA256 when a secret is set.

    Headers: ``Content-Type: application/json``, ``Idempotency-Key`` (the same
    for every attempt of one alert to this sink), ``X-Headrace-Timestamp``
    (Unix seconds) and ``X-Headrace-Signature: sha256=<hex>``, the
    HMAC-SHA256 of ``<timestamp>.<body>`` with the secret. Any 2xx answer is
    success; 408, 429 and 5xx answers and network errors are retried; other
    answers fail at once.
    """

    type: Literal["webhook"] = Field(description="`webhook`.")
    url: str = Field(pattern=r"^https?://", description="The endpoint (http:// or https://).")
    secret: str | None = Field(
        default=None, description="HMAC key (prefer `secret_env` to keep it out of the file)."
    )
    secret_env: str | None = Field(
        default=None, description="Name of an environment variable holding the HMAC key."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers sent with every request."
    )

    def resolved_secret(self) -> str | None:
        """The HMAC key, read from the environment when `secret_env` is set."""
        return _secret(self.secret, self.secret_env)


class SlackSinkConfig(_SinkBase):
    """A Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat...).

    Posts ``{"text": ..., "blocks": [...]}``; 2xx is success, retried like a webhook.
    """

    type: Literal["slack"] = Field(description="`slack`.")
    url: str | None = Field(
        default=None, pattern=r"^https?://", description="The incoming webhook URL."
    )
    url_env: str | None = Field(
        default=None, description="Name of an environment variable holding the URL (a secret)."
    )

    @model_validator(mode="after")
    def _one_url(self) -> SlackSinkConfig:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url and url_env")
        return self

    def resolved_url(self) -> str | None:
        """The webhook URL, read from the environment when `url_env` is set."""
        return _secret(self.url, self.url_env)


class EmailSinkConfig(_SinkBase):
    """One email per alert over SMTP (plain, STARTTLS or implicit TLS).

    The ``Message-ID`` is derived from the alert's idempotency key, so a copy
    sent again after a crash can be recognised as the same message.
    """

    type: Literal["email"] = Field(description="`email`.")
    host: str = Field(default="localhost", description="SMTP server host.")
    port: int = Field(default=25, ge=1, le=65535, description="SMTP server port.")
    security: Literal["none", "starttls", "ssl"] = Field(
        default="none", description="`none`, `starttls` (upgrade) or `ssl` (implicit TLS)."
    )
    username: str | None = Field(default=None, description="SMTP login, if the server needs one.")
    password_env: str | None = Field(
        default=None, description="Name of an environment variable holding the SMTP password."
    )
    sender: str = Field(alias="from", description="The From address.")
    to: list[str] = Field(min_length=1, description="Recipient addresses.")
    subject_prefix: str = Field(default="[headrace]", description="Start of every subject.")

    def resolved_password(self) -> str | None:
        return _secret(None, self.password_env)


class LogSinkConfig(_SinkBase):
    """One log line per alert (logger ``headrace.alerts``); never fails."""

    type: Literal["log"] = Field(description="`log`.")
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="warning", description="Log level of the lines."
    )


SinkConfig = Annotated[
    WebhookSinkConfig | SlackSinkConfig | EmailSinkConfig | LogSinkConfig,
    Field(discriminator="type"),
]


class MetricCondition(StrEnum):
    """What a metric alert compares."""

    THRESHOLD = "threshold"
    CHANGE = "change"
    ZSCORE = "zscore"


class MetricAlertConfig(_Model):
    """An alert on a rollup: a threshold, a % change against the previous window, or a
    z-score against a trailing baseline; with hysteresis and one notification per incident.

    The value is computed per bucket of the rollup's view (``rollup.<rollup>_<grain>``),
    over the rows matching ``where``, per combination of ``group_by`` dimensions.
    The alert fires when the value crosses ``above`` (or goes under ``below``) and
    stays firing, without notifying again, until the value is back inside the
    threshold by the ``hysteresis`` margin; then it is resolved.
    """

    name: str = Field(
        pattern=r"^[a-z_][a-z0-9_]{0,63}$",
        description="Identifier of the alert (its `rule` in headrace.alerts).",
    )
    rollup: str = Field(description="Name of the rollup watched.")
    grain: Duration | None = Field(
        default=None, description="Which grain's view to read (default: the rollup's `grain`)."
    )
    measure: str | None = Field(
        default=None,
        description=(
            "A measure of the rollup; the value is its sum over the group's rows of the "
            "bucket: a count or sum measure (or any measure when group_by names every "
            "dimension of the rollup)."
        ),
    )
    value: str | None = Field(
        default=None,
        description=(
            "Instead of `measure`: an aggregate DuckDB SQL expression over the view's columns, "
            "e.g. `sum(declined) / nullif(sum(tx_count), 0)`."
        ),
    )
    where: str | None = Field(
        default=None,
        description="Only rows where this DuckDB SQL condition on dimensions holds count.",
    )
    group_by: list[str] = Field(
        default_factory=list,
        description="Dimensions evaluated separately (one incident per combination).",
    )
    condition: MetricCondition = Field(
        default=MetricCondition.THRESHOLD,
        description=(
            "`threshold`: the value itself; `change`: percent change against the previous "
            "bucket; `zscore`: (value - mean) / stddev of the `baseline` buckets before it."
        ),
    )
    above: float | None = Field(
        default=None, description="Fire when the compared number is at or above this."
    )
    below: float | None = Field(
        default=None, description="Fire when the compared number is at or below this."
    )
    hysteresis: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description=(
            "Resolve only when the number is back inside the threshold by this fraction of it "
            "(0.1: a 100 threshold resolves under 90)."
        ),
    )
    baseline: int = Field(
        default=12, ge=3, le=10_000, description="Buckets in the trailing baseline of `zscore`."
    )
    bucket: Literal["previous", "current"] = Field(
        default="previous",
        description=(
            "Evaluate the last complete bucket (`previous`) or the one still filling (`current`)."
        ),
    )
    severity: Severity = Field(default=Severity.MEDIUM, description="Severity of its alerts.")
    notify_resolved: bool = Field(
        default=True, description="Also write (and deliver) an alert when it resolves."
    )

    @model_validator(mode="after")
    def _check(self) -> MetricAlertConfig:
        if (self.measure is None) == (self.value is None):
            raise ValueError("give exactly one of measure and value")
        if self.above is None and self.below is None:
            raise ValueError("give above, below or both")
        return self

    @field_validator("where")
    @classmethod
    def _where_expression(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_row_expression(value)
            except ExpressionError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def value_sql(self) -> str:
        """The aggregate expression computing the value."""
        if self.value is not None:
            return self.value
        return f'sum("{self.measure}")'

"""The ``scores:`` section of ``headrace.yaml``: the account health score.

Example::

    scores:
      health:
        window: 24h
        weights: {new_device: 15}

The formula and every weight are described in :mod:`headrace.scores.health`.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, model_validator

from headrace.pipeline.durations import Duration
from headrace.rules.config import TablesConfig


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthWeights(_Model):
    """Penalty points of each component (the score is 100 minus their sum, at least 0)."""

    decline: float = Field(
        default=25.0, ge=0, description="Points at a decline ratio of 1 (declined / attempts)."
    )
    decline_floor: int = Field(
        default=4,
        ge=1,
        description=(
            "Attempts the decline ratio divides by at least (one decline of one is not 100%)."
        ),
    )
    velocity: float = Field(
        default=15.0, ge=0, description="Points when the window's transactions reach the top."
    )
    velocity_normal: int = Field(
        default=40, ge=0, description="Transactions in the window that cost nothing."
    )
    velocity_span: int = Field(
        default=160,
        ge=1,
        description="Transactions above `velocity_normal` that cost all the velocity points.",
    )
    reversal: float = Field(default=5.0, ge=0, description="Points per reversed transaction.")
    reversal_cap: float = Field(default=15.0, ge=0, description="At most this for reversals.")
    outflow: float = Field(
        default=20.0,
        ge=0,
        description="Points when the net outflow takes the whole balance of the window's start.",
    )
    negative_balance: float = Field(
        default=15.0, ge=0, description="Points while the balance is negative."
    )
    failed_login: float = Field(default=3.0, ge=0, description="Points per failed login.")
    failed_login_cap: float = Field(default=15.0, ge=0, description="At most this for them.")
    new_device: float = Field(
        default=10.0, ge=0, description="Points per successful login from a new device."
    )
    new_device_cap: float = Field(default=20.0, ge=0, description="At most this for them.")


class HealthScoreConfig(_Model):
    """The rolling account health score (0-100, 100 is healthy)."""

    window: Duration = Field(
        default=timedelta(hours=24), description="The rolling window the score looks at."
    )
    bucket: Duration = Field(
        default=timedelta(minutes=5),
        description=(
            "Granularity of the window: activity is kept per account and bucket, and the "
            "window is the last window/bucket buckets, the newest one included."
        ),
    )
    weights: HealthWeights = Field(
        default_factory=HealthWeights, description="Penalty points of each component."
    )

    @model_validator(mode="after")
    def _buckets(self) -> HealthScoreConfig:
        window, bucket = self.window.total_seconds(), self.bucket.total_seconds()
        if bucket <= 0 or window % bucket or window < bucket:
            raise ValueError("window must be a whole multiple of bucket")
        return self


class ScoresConfig(_Model):
    """Scores kept per account."""

    tables: TablesConfig | None = Field(
        default=None,
        description="Which tables and columns the scores read (default: `rules.tables`).",
    )
    health: HealthScoreConfig | None = Field(
        default=None, description="The account health score; computed when present."
    )

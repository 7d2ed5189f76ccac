"""Scoring ``headrace bench fraud``: alerts against the labelled ground truth, and latencies.

An **incident** is a row of ``fraud_ground_truth`` (one injected scenario:
account, family, first and last change). An alert of rule ``R`` **matches**
an incident when the incident's expected rule is ``R``, the account is the
same, and the alert's event time lies within
``[started_at - before, ended_at + after]`` (the pattern completes at or
before the scenario's last change; ``after`` leaves room for a status
change that completes it later).

Per rule: recall = incidents matched by at least one alert / incidents;
precision = alerts matching an incident / alerts. An alert on an account
with no incident of its family (normal traffic, or a scenario of another
family) is a false positive.

>>> from datetime import datetime, timedelta, UTC
>>> t = datetime(2026, 1, 1, tzinfo=UTC)
>>> truth = [Incident(1, "velocity_burst", 7, t, t + timedelta(seconds=40))]
>>> alerts = [AlertSeen(1, "velocity_burst", 7, t + timedelta(seconds=30)),
...           AlertSeen(2, "velocity_burst", 8, t)]
>>> score = score_rules(truth, alerts, ["velocity_burst"])["velocity_burst"]
>>> score.recall, score.precision
(1.0, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

MATCH_BEFORE = timedelta(seconds=1)
MATCH_AFTER = timedelta(minutes=5)


@dataclass(frozen=True)
class Incident:
    """One labelled scenario (a row of ``fraud_ground_truth``)."""

    scenario_id: int
    rule: str
    account_id: int
    started_at: datetime
    ended_at: datetime


@dataclass(frozen=True)
class AlertSeen:
    """One fraud alert (from the store's ``headrace.alerts``)."""

    id: int
    rule: str
    account_id: int | None
    event_at: datetime | None


@dataclass
class RuleScore:
    """Precision and recall of one rule."""

    rule: str
    incidents: int = 0
    detected: int = 0
    alerts: int = 0
    true_alerts: int = 0
    false_alerts: list[int] = field(default_factory=list)
    """Ids of alerts matching no incident (the first few, for a look at them)."""
    missed: list[int] = field(default_factory=list)
    """Scenario ids no alert matched (the first few)."""

    @property
    def recall(self) -> float | None:
        return round(self.detected / self.incidents, 4) if self.incidents else None

    @property
    def precision(self) -> float | None:
        return round(self.true_alerts / self.alerts, 4) if self.alerts else None

    def as_dict(self) -> dict[str, object]:
        return {
            "incidents": self.incidents,
            "detected": self.detected,
            "alerts": self.alerts,
            "true_alerts": self.true_alerts,
            "recall": self.recall,
            "precision": self.precision,
            "false_alert_ids": self.false_alerts[:10],
            "missed_scenario_ids": self.missed[:10],
        }


def _matches(incident: Incident, alert: AlertSeen) -> bool:
    if alert.rule != incident.rule or alert.account_id != incident.account_id:
        return False
    if alert.event_at is None:
        return False
    return incident.started_at - MATCH_BEFORE <= alert.event_at <= incident.ended_at + MATCH_AFTER


def score_rules(
    incidents: Sequence[Incident], alerts: Sequence[AlertSeen], rules: Iterable[str]
) -> dict[str, RuleScore]:
    """Per rule precision and recall (module docstring)."""
    scores = {rule: RuleScore(rule) for rule in rules}
    by_account: dict[tuple[str, int], list[Incident]] = {}
    for incident in incidents:
        by_account.setdefault((incident.rule, incident.account_id), []).append(incident)
        score = scores.setdefault(incident.rule, RuleScore(incident.rule))
        score.incidents += 1
    detected: set[int] = set()
    for alert in alerts:
        score = scores.setdefault(alert.rule, RuleScore(alert.rule))
        score.alerts += 1
        candidates = by_account.get((alert.rule, alert.account_id or -1), [])
        hits = [i for i in candidates if _matches(i, alert)]
        if hits:
            score.true_alerts += 1
            detected.update(i.scenario_id for i in hits)
        else:
            score.false_alerts.append(alert.id)
    for incident in incidents:
        score = scores[incident.rule]
        if incident.scenario_id in detected:
            score.detected += 1
        else:
            score.missed.append(incident.scenario_id)
    return scores


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` quantile (nearest rank) of ``values``, None when empty.

    >>> percentile([5.0, 1.0, 3.0], 0.5)
    3.0
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]

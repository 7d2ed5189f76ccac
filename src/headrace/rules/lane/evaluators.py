"""The lane's evaluators by rule name (what ``rules.in_memory`` may name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import duckdb

from headrace.rules.config import RulesConfig
from headrace.rules.lane.account_takeover import AccountTakeoverLane
from headrace.rules.lane.alert import LaneAlert
from headrace.rules.lane.amount_spike import AmountSpikeLane
from headrace.rules.lane.card_testing import CardTestingLane
from headrace.rules.lane.impossible_travel import ImpossibleTravelLane
from headrace.rules.lane.saved import RuleSaved
from headrace.rules.lane.structuring import StructuringLane
from headrace.rules.lane.velocity import VelocityBurstLane
from headrace.source.changes import ChangeBatch


class Evaluator(Protocol):
    """One rule in memory: the alerts its SQL rule would write for each batch."""

    name: str

    def seed(self, con: duckdb.DuckDBPyConnection, saved: RuleSaved | None = None) -> None:
        """Rebuild the state from the store's mirrors (and the lane's record of the rule)."""

    def apply(self, batch: ChangeBatch) -> list[LaneAlert]:
        """Evaluate one batch; the alerts (incidents) it opens."""

    def take_saved(self) -> RuleSaved:
        """The watermark and the incidents changed since the last call (to record)."""


def make_evaluator(name: str, rules: RulesConfig) -> Evaluator:
    """The evaluator of rule ``name`` (see :data:`headrace.rules.config.IN_MEMORY_RULES`)."""
    makers: dict[str, Callable[[RulesConfig], Evaluator]] = {
        "velocity_burst": VelocityBurstLane,
        "card_testing": CardTestingLane,
        "amount_spike": AmountSpikeLane,
        "structuring": StructuringLane,
        "impossible_travel": ImpossibleTravelLane,
        "account_takeover": AccountTakeoverLane,
    }
    maker = makers.get(name)
    if maker is not None:
        return maker(rules)
    raise ValueError(f"no in-memory implementation of rule {name!r}")

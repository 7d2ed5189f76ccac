"""Every fraud rule, registered in one tuple."""

from __future__ import annotations

from headrace.rules.account_takeover import AccountTakeover
from headrace.rules.amount_spike import AmountSpike
from headrace.rules.base import RuleJob
from headrace.rules.card_testing import CardTesting
from headrace.rules.config import RulesConfig
from headrace.rules.impossible_travel import ImpossibleTravel
from headrace.rules.structuring import Structuring
from headrace.rules.velocity_burst import VelocityBurst

RULES: tuple[type[RuleJob], ...] = (
    VelocityBurst,
    AmountSpike,
    ImpossibleTravel,
    Structuring,
    CardTesting,
    AccountTakeover,
)
"""Every rule, in number order; a rule's ``name`` is also its section under ``rules:``."""


def build_rules(rules: RulesConfig) -> list[RuleJob]:
    """The rules whose section is present in ``rules`` and that run as SQL in the engine
    (not in memory: ``rules.in_memory``)."""
    return [
        rule(rules)
        for rule in RULES
        if getattr(rules, rule.name) is not None and rule.name not in rules.in_memory
    ]

"""``rules.in_memory``: which rules may run in the rules lane, and the errors when not."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from headrace.errors import ConfigError
from headrace.jobs.runtime import StreamJobs
from headrace.pipeline.load import parse_pipeline
from headrace.rules.config import IN_MEMORY_RULES, RulesConfig
from headrace.rules.lane.condition import arrow_condition
from headrace.rules.lane.evaluators import make_evaluator
from tests.rules.bank import TABLES


def test_every_named_rule_has_an_evaluator() -> None:
    rules = RulesConfig.model_validate({name: {} for name in IN_MEMORY_RULES})
    for name in IN_MEMORY_RULES:
        assert make_evaluator(name, rules).name == name


def test_a_rule_without_an_in_memory_implementation_is_refused() -> None:
    with pytest.raises(ValidationError, match="no in-memory implementation"):
        RulesConfig.model_validate({"in_memory": ["no_such_rule"]})


def test_an_unconfigured_rule_is_refused() -> None:
    with pytest.raises(ValidationError, match="not configured"):
        RulesConfig.model_validate({"in_memory": ["velocity_burst"]})


def test_a_rule_named_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="twice"):
        RulesConfig.model_validate(
            {"in_memory": ["velocity_burst", "velocity_burst"], "velocity_burst": {}}
        )


def test_the_engine_leaves_in_memory_rules_out() -> None:
    config = parse_pipeline(
        TABLES.replace("DSN", "postgresql://x")
        + "rules:\n  in_memory: [velocity_burst]\n  velocity_burst: {}\n  structuring: {}\n"
    )
    (job,) = [job for job in StreamJobs.from_config(config).jobs if job.name == "rules"]
    assert [rule.name for rule in job.rules] == ["structuring"]  # type: ignore[attr-defined]
    only_lane = parse_pipeline(
        TABLES.replace("DSN", "postgresql://x")
        + "rules:\n  in_memory: [velocity_burst]\n  velocity_burst: {}\n"
    )
    assert "rules" not in [job.name for job in StreamJobs.from_config(only_lane).jobs]


def test_a_condition_the_lane_cannot_compile_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"rules\.in_memory"):
        arrow_condition("type LIKE 'x%'")

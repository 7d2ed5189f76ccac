"""``headrace bench fraud``'s parts: scoring against the ground truth, the webhook receiver."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from headrace.alerts.message import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from headrace.bench.fraud_receiver import WebhookReceiver
from headrace.bench.fraud_score import AlertSeen, Incident, percentile, score_rules
from headrace.demo.deployment import deployment_text, pipeline_part, replace_section
from headrace.pipeline.load import parse_pipeline

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_scores_count_matches_misses_and_false_alerts() -> None:
    truth = [
        Incident(1, "velocity_burst", 10, _at(0), _at(40)),
        Incident(2, "velocity_burst", 11, _at(100), _at(140)),
        Incident(3, "structuring", 12, _at(0), _at(200)),
    ]
    alerts = [
        AlertSeen(1, "velocity_burst", 10, _at(35)),  # matches incident 1
        AlertSeen(2, "velocity_burst", 10, _at(36)),  # a second alert for it: still true
        AlertSeen(3, "velocity_burst", 12, _at(50)),  # account of another family: false
        AlertSeen(4, "velocity_burst", 11, _at(1000)),  # long after incident 2: false
        AlertSeen(5, "structuring", 12, _at(200)),
    ]
    scores = score_rules(truth, alerts, ["velocity_burst", "structuring", "card_testing"])
    burst = scores["velocity_burst"]
    assert (burst.incidents, burst.detected, burst.alerts, burst.true_alerts) == (2, 1, 4, 2)
    assert burst.recall == 0.5
    assert burst.precision == 0.5
    assert burst.missed == [2]
    assert burst.false_alerts == [3, 4]
    assert (scores["structuring"].recall, scores["structuring"].precision) == (1.0, 1.0)
    assert (scores["card_testing"].recall, scores["card_testing"].precision) == (None, None)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([], 0.5) is None


def test_receiver_checks_signatures_and_keeps_first_copies() -> None:
    secret = "not-a-real-secret"  # noqa: S105 - a test key
    document = {"id": 7, "rule": "structuring", "kind": "fraud", "commit_ts": T0.isoformat()}
    body = json.dumps(document).encode()
    with WebhookReceiver(secret) as receiver, httpx.Client(timeout=5) as client:
        for signature in (sign(secret, "123", body), sign(secret, "123", body), "sha256=00"):
            answer = client.post(
                receiver.url,
                content=body,
                headers={
                    TIMESTAMP_HEADER: "123",
                    SIGNATURE_HEADER: signature,
                    IDEMPOTENCY_HEADER: "hr-7" if signature != "sha256=00" else "hr-8",
                    "Content-Type": "application/json",
                },
            )
            assert answer.status_code == 200
        received = receiver.received()
    assert receiver.requests == 3
    assert receiver.duplicates == 1
    assert len(receiver.alerts) == 2
    assert [r.signed for r in received] == [True, False]
    assert receiver.alerts["hr-7"].document == document


def test_bench_pipeline_file_sends_fraud_alerts_to_the_webhook(tmp_path: Path) -> None:
    text = pipeline_part(deployment_text("dbname=bank", tmp_path / "x.duckdb"))
    sink = "sinks:\n  - {name: bench, type: webhook, url: 'http://127.0.0.1:9/a', kinds: [fraud]}\n"
    config = parse_pipeline(replace_section(text, "sinks", sink))
    assert [s.name for s in config.sinks] == ["bench"]
    assert config.rules is not None
    assert config.rules.velocity_burst is not None
    assert config.rules.account_takeover is not None
    assert {r.name for r in config.rollups} >= {"tx", "flows", "logins", "accounts"}

"""Each sink against a real local receiver, including failure and retry."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest

from headrace.alerts.config import (
    EmailSinkConfig,
    LogSinkConfig,
    RetryConfig,
    Severity,
    SinkConfig,
    SlackSinkConfig,
    WebhookSinkConfig,
)
from headrace.alerts.message import verify
from headrace.alerts.worker import backoff
from tests.alerts.outbox import (
    add_alert,
    deliver_one_alert,
    deliveries,
    open_store,
    settled,
    start,
    wait_for,
)
from tests.alerts.receivers import http_receiver, smtp_receiver

FAST = RetryConfig(attempts=3, backoff=timedelta(milliseconds=50), max_backoff=timedelta(seconds=1))


def test_webhook_signed_retried_then_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "s3cret")
    store = open_store(tmp_path / "store.duckdb")
    with http_receiver(statuses=[503, 502]) as receiver:
        sink = WebhookSinkConfig(
            name="ops",
            type="webhook",
            url=receiver.url,
            secret_env="HOOK_SECRET",  # noqa: S106 - the name of a variable, not a secret
            retry=FAST,
        )
        alert_id = add_alert(store, [sink])
        delivery = start(store, [sink])
        try:
            wait_for(settled(store, 1))
        finally:
            delivery.stop()
    (row,) = deliveries(store)
    assert (row["state"], row["attempts"], row["last_error"]) == ("delivered", 3, None)
    assert len(receiver.requests) == 3
    keys = {r.headers["Idempotency-Key"] for r in receiver.requests}
    assert keys == {row["idempotency_key"]}
    last = receiver.requests[-1]
    assert verify(
        "s3cret",
        last.headers["X-Headrace-Timestamp"],
        last.body,
        last.headers["X-Headrace-Signature"],
    )
    assert not verify(
        "wrong",
        last.headers["X-Headrace-Timestamp"],
        last.body,
        last.headers["X-Headrace-Signature"],
    )
    document = json.loads(last.body)
    assert (document["id"], document["rule"]) == (alert_id, "velocity_burst")
    assert document["payload"]["numbers"] == {"transactions": 9, "limit": 8}
    assert [a.state for a in delivery.attempts] == ["pending", "pending", "delivered"]
    store.close()


def test_webhook_failures_are_recorded(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.duckdb")
    with http_receiver(default=500) as down, http_receiver(default=404) as wrong:
        sinks: list[SinkConfig] = [
            WebhookSinkConfig(name="down", type="webhook", url=down.url, retry=FAST),
            WebhookSinkConfig(name="wrong", type="webhook", url=wrong.url, retry=FAST),
            WebhookSinkConfig(
                name="picky",
                type="webhook",
                url=wrong.url,
                retry=FAST,
                min_severity=Severity.CRITICAL,
            ),
        ]
        deliver_one_alert(store, sinks, settle=2)
    rows = {r["sink"]: r for r in deliveries(store)}
    assert set(rows) == {"down", "wrong"}  # "picky" only takes critical alerts
    assert (rows["down"]["state"], rows["down"]["attempts"]) == ("failed", 3)
    assert rows["down"]["last_error"].startswith("HTTP 500")
    assert (rows["wrong"]["state"], rows["wrong"]["attempts"]) == ("failed", 1)  # 4xx: no retry
    assert (len(down.requests), len(wrong.requests)) == (3, 1)
    store.close()


def test_slack_and_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(tmp_path / "store.duckdb")
    with http_receiver(statuses=[429]) as slack:
        sinks: list[SinkConfig] = [
            SlackSinkConfig(name="chat", type="slack", url=slack.url, retry=FAST),
            LogSinkConfig(name="console", type="log", level="warning"),
        ]
        add_alert(store, sinks)
        with caplog.at_level(logging.WARNING, logger="headrace.alerts"):
            delivery = start(store, sinks)
            try:
                wait_for(settled(store, 2))
            finally:
                delivery.stop()
    states = {r["sink"]: (r["state"], r["attempts"]) for r in deliveries(store)}
    assert states == {"chat": ("delivered", 2), "console": ("delivered", 1)}
    message = json.loads(slack.requests[-1].body)
    assert message["text"].startswith("[high] velocity_burst: 9 transactions in 60 s")
    assert message["blocks"][0]["type"] == "section"
    assert any("alert 1 [high] velocity_burst" in r.getMessage() for r in caplog.records)


def test_email_retried_after_a_temporary_refusal(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.duckdb")
    with smtp_receiver(fail_first=1) as smtp:
        sink = EmailSinkConfig.model_validate(
            {
                "name": "mail",
                "type": "email",
                "host": "127.0.0.1",
                "port": smtp.port,
                "from": "headrace@example.com",
                "to": ["fraud@example.com", "ops@example.com"],
                "retry": FAST,
            }
        )
        add_alert(store, [sink])
        delivery = start(store, [sink])
        try:
            wait_for(settled(store, 1))
        finally:
            delivery.stop()
    (row,) = deliveries(store)
    assert (row["state"], row["attempts"]) == ("delivered", 2)
    (message,) = smtp.messages
    assert message["Subject"].startswith("[headrace] [high] velocity_burst: 9 transactions")
    assert message["Message-ID"] == f"<{row['idempotency_key']}@headrace>"
    assert message["To"] == "fraud@example.com, ops@example.com"
    assert '"limit": 8' in message.get_payload()
    store.close()


def _email(port: int) -> EmailSinkConfig:
    return EmailSinkConfig.model_validate(
        {
            "name": "mail",
            "type": "email",
            "host": "127.0.0.1",
            "port": port,
            "from": "headrace@example.com",
            "to": ["fraud@example.com"],
            "retry": FAST,
        }
    )


def test_email_refused_for_good_is_not_retried(tmp_path: Path) -> None:
    """An SMTP 5xx is permanent: recorded as failed at once, with the server's answer."""
    store = open_store(tmp_path / "store.duckdb")
    with smtp_receiver(refuse="554 5.7.1 relaying denied") as smtp:
        deliver_one_alert(store, [_email(smtp.port)], settle=1)
    (row,) = deliveries(store)
    assert (row["state"], row["attempts"]) == ("failed", 1)
    assert "SMTP 554" in row["last_error"]
    assert "relaying denied" in row["last_error"]
    assert (smtp.refused, smtp.messages) == (1, [])
    store.close()


def test_slack_failing_until_the_attempts_run_out(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.duckdb")
    with http_receiver(default=503) as slack:
        sink = SlackSinkConfig(name="chat", type="slack", url=slack.url, retry=FAST)
        deliver_one_alert(store, [sink], settle=1)
    (row,) = deliveries(store)
    assert (row["state"], row["attempts"]) == ("failed", 3)
    assert row["last_error"].startswith("HTTP 503")
    assert len(slack.requests) == 3
    store.close()


def test_the_wait_between_attempts_doubles_up_to_the_cap() -> None:
    retry = RetryConfig(attempts=8, backoff=timedelta(seconds=1), max_backoff=timedelta(seconds=5))
    waits = [backoff(retry, attempts).total_seconds() for attempts in range(1, 6)]
    assert waits == [1, 2, 4, 5, 5]

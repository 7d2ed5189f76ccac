"""Alerts handed over at commit: sent without reading the outbox, never before the commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from headrace.alerts.config import SinkConfig, WebhookSinkConfig
from headrace.alerts.delivery import SUMMARY, AlertDelivery, summary
from tests.alerts.outbox import RolledBack, add_alert, deliveries, open_store, settled, wait_for
from tests.alerts.receivers import http_receiver


def test_committed_alerts_are_sent_without_reading_the_outbox(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.duckdb")
    with http_receiver() as receiver:
        sinks: list[SinkConfig] = [WebhookSinkConfig(name="ops", type="webhook", url=receiver.url)]
        first = add_alert(store, sinks, key="velocity_burst:1")
        # The outbox is read at start (the first alert) and then not for a minute:
        # only the handover can deliver the next ones in time.
        with AlertDelivery(store, sinks, poll_interval=60.0) as delivery:
            wait_for(settled(store, 1))
            later = [add_alert(store, sinks, key=f"velocity_burst:{n}") for n in (2, 3, 4)]
            wait_for(settled(store, 4))
    ids = [json.loads(r.body)["id"] for r in receiver.requests]
    assert ids == [first, *later]
    rows = deliveries(store)
    assert [(r["state"], r["attempts"]) for r in rows] == [("delivered", 1)] * 4
    assert all(r["delivered_at"] is not None for r in rows)
    assert [a.alert_id for a in delivery.attempts] == [first, *later]
    # The first alert came from the outbox read at start, the others at their commit.
    latencies = delivery.after_commit_ms()["ops"]
    assert len(latencies) == 3
    assert all(0 <= ms < 10_000 for ms in latencies)
    (worker,) = delivery._workers
    line = SUMMARY.search(summary(worker))
    assert line is not None
    assert (line["sink"], line["sent"]) == ("ops", "3")
    assert summary(worker).endswith("; 1 attempt(s) from the outbox")
    store.close()


def test_an_alert_whose_transaction_rolled_back_is_never_sent(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.duckdb")
    with http_receiver() as receiver:
        sinks: list[SinkConfig] = [WebhookSinkConfig(name="ops", type="webhook", url=receiver.url)]
        with AlertDelivery(store, sinks, poll_interval=60.0):
            first = add_alert(store, sinks, key="velocity_burst:1")
            wait_for(settled(store, 1))
            with pytest.raises(RolledBack):
                add_alert(store, sinks, key="velocity_burst:rolled-back", roll_back=True)
            # The next commit carries the rolled-back rows too: they are dropped,
            # and the outbox (where they never landed) is read instead.
            second = add_alert(store, sinks, key="velocity_burst:2")
            wait_for(settled(store, 2))
    documents = [json.loads(r.body) for r in receiver.requests]
    assert [(d["id"], d["key"]) for d in documents] == [
        (first, "velocity_burst:1"),
        (second, "velocity_burst:2"),
    ]
    assert second == first + 1  # the rolled-back alert's id was taken again
    store.close()

"""Failed deliveries are visible (status file, ``headrace status``, the HTTP API) and
delivered rows are pruned after their sink's retention."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from headrace.alerts.config import RetryConfig, SinkConfig, WebhookSinkConfig
from headrace.alerts.delivery import prune_delivered, prune_deliveries
from headrace.alerts.store import DELIVERIES
from headrace.cli.main import app
from headrace.run.control import RunFiles
from headrace.run.state import RunState
from headrace.run.status import StatusReporter
from headrace.run.status_render import render_status
from headrace.serve.app import ServerThread, create_app
from headrace.store.duckdb.store import DuckDBStore
from tests.alerts.outbox import (
    deliver_one_alert,
    deliveries,
    open_store,
)
from tests.alerts.receivers import http_receiver
from tests.serve.conftest import add_users, make_settings

FAST = RetryConfig(attempts=2, backoff=timedelta(milliseconds=20), max_backoff=timedelta(seconds=1))


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[DuckDBStore]:
    """A store whose outbox holds, after real delivery attempts to real receivers,
    one delivery to ``ok`` (delivered) and one to ``down`` (failed: HTTP 500)."""
    store = open_store(tmp_path / "store.duckdb")
    with http_receiver(default=200) as up, http_receiver(default=500) as down:
        sinks: list[SinkConfig] = [
            WebhookSinkConfig(name="ok", type="webhook", url=up.url, retry=FAST),
            WebhookSinkConfig(name="down", type="webhook", url=down.url, retry=FAST),
        ]
        deliver_one_alert(store, sinks, settle=2)
    try:
        yield store
    finally:
        store.close()


def test_status_shows_a_failed_delivery_with_its_error(outbox: DuckDBStore, tmp_path: Path) -> None:
    reporter = StatusReporter(
        RunState(), outbox, RunFiles(outbox.path), config_path=None, queue_capacity=4
    )
    reporter.write()
    document = json.loads(RunFiles(outbox.path).status.read_text())
    sinks = {s["sink"]: s for s in document["alert_deliveries"]}
    assert (sinks["ok"]["delivered"], sinks["ok"]["pending"], sinks["ok"]["failed"]) == (1, 0, 0)
    down = sinks["down"]
    assert (down["delivered"], down["pending"], down["failed"]) == (0, 0, 1)
    assert down["last_failed_error"].startswith("HTTP 500")
    assert down["last_attempt_at"] is not None

    console = Console(record=True, width=200)
    render_status(document, console)
    text = console.export_text()
    assert "alert deliveries" in text
    line = next(row for row in text.splitlines() if "down" in row)
    assert "HTTP 500" in line

    # `headrace status` on the stopped pipeline reads the same figures from the store.
    outbox.close()
    config = tmp_path / "headrace.yaml"
    config.write_text(
        "source:\n  dsn: postgresql://127.0.0.1/x\n  tables:\n    t: {}\n"
        f"store:\n  path: {outbox.path}\n"
    )
    result = CliRunner().invoke(app, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "alert deliveries" in result.output
    assert "HTTP 500" in result.output


def test_status_reads_the_outbox_at_most_every_interval(outbox: DuckDBStore) -> None:
    reporter = StatusReporter(
        RunState(), outbox, RunFiles(outbox.path), config_path=None, queue_capacity=4
    )
    first = reporter.build()["alert_deliveries"]
    with outbox.transaction() as con:
        con.execute(f"DELETE FROM {DELIVERIES}")
    assert reporter.build()["alert_deliveries"] == first  # within the interval: not re-read
    assert reporter._deliveries.get(0.0) == []  # past the interval: read again


def test_api_lists_failed_deliveries_for_analysts_only(outbox: DuckDBStore, tmp_path: Path) -> None:
    settings = make_settings(outbox.path, dashboards=[])
    tokens = add_users(settings)
    server = ServerThread(create_app(settings, outbox), settings).start()
    try:

        def get(role: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {tokens[role]}"}
            return httpx.get(f"{server.url}/api/alerts/deliveries", headers=headers, timeout=30)

        assert get("viewer").status_code == 403
        for role in ("analyst", "admin"):
            reply = get(role)
            assert reply.status_code == 200, reply.text
            body = reply.json()
            sinks = {s["sink"]: s for s in body["sinks"]}
            assert (sinks["down"]["failed"], sinks["ok"]["delivered"]) == (1, 1)
            (failed,) = body["failed"]
            assert (failed["sink"], failed["attempts"]) == ("down", 2)
            assert failed["last_error"].startswith("HTTP 500")
            assert failed["alert_id"] == 1
            assert failed["last_attempt_at"] is not None
        schema = httpx.get(f"{server.url}/api/openapi.json", timeout=30).json()
        operation = schema["paths"]["/api/alerts/deliveries"]["get"]
        assert operation["description"] == "Requires the analyst role."
    finally:
        server.stop()


def test_pruning_deletes_old_delivered_rows_only(outbox: DuckDBStore) -> None:
    def states() -> list[tuple[str, str]]:
        return [(r["sink"], r["state"]) for r in deliveries(outbox)]

    assert states() == [("down", "failed"), ("ok", "delivered")]
    now = datetime.now(UTC)
    with outbox.transaction() as con:  # the rows are fresh: nothing is old enough
        assert prune_deliveries(con, now - timedelta(days=7)) == 0
        assert prune_delivered(con, [], now) == 0
    # Age every row by 10 days: the delivered one goes, the failed one stays.
    with outbox.transaction() as con:
        con.execute(
            f"""UPDATE {DELIVERIES} SET delivered_at = delivered_at - INTERVAL 10 DAY,
                   last_attempt_at = last_attempt_at - INTERVAL 10 DAY,
                   created_at = created_at - INTERVAL 10 DAY"""
        )
    with outbox.transaction() as con:
        assert prune_deliveries(con, now - timedelta(days=7)) == 1
    assert states() == [("down", "failed")]


def test_each_sink_keeps_delivered_rows_as_configured(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.duckdb")
    with http_receiver(default=200) as up:
        sinks: list[SinkConfig] = [
            WebhookSinkConfig(name="short", type="webhook", url=up.url, retry=FAST),
            WebhookSinkConfig(
                name="long",
                type="webhook",
                url=up.url,
                retry=FAST,
                keep_delivered=timedelta(days=30),
            ),
        ]
        deliver_one_alert(store, sinks, settle=2)
    with store.transaction() as con:
        con.execute(f"UPDATE {DELIVERIES} SET delivered_at = delivered_at - INTERVAL 10 DAY")
    now = datetime.now(UTC)
    with store.transaction() as con:
        assert prune_delivered(con, sinks, now) == 1  # "short" keeps the default 7 days
    assert [(r["sink"], r["state"]) for r in deliveries(store)] == [("long", "delivered")]
    with store.transaction() as con:  # a sink no longer configured: the default applies
        assert prune_delivered(con, sinks[:1], now + timedelta(days=30)) == 1
    assert deliveries(store) == []
    store.close()

"""A real DuckDB store holding alerts and their outbox rows, without a pipeline."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from headrace.alerts.config import SinkConfig
from headrace.alerts.delivery import AlertDelivery
from headrace.alerts.store import DELIVERIES, insert_alerts, setup_alerts
from headrace.store.duckdb.store import DuckDBStore


def open_store(path: Path) -> DuckDBStore:
    store = DuckDBStore(path)
    with store.transaction() as con:
        setup_alerts(con)
    return store


class RolledBack(Exception):  # noqa: N818 - names what happened to the transaction
    """Raised by :func:`add_alert` to roll its transaction back."""


def add_alert(
    store: DuckDBStore,
    sinks: Sequence[SinkConfig],
    *,
    rule: str = "velocity_burst",
    severity: str = "high",
    key: str = "velocity_burst:7",
    kind: str = "fraud",
    roll_back: bool = False,
) -> int:
    """Write one alert and its outbox rows as the engine does (one transaction); its id.

    ``roll_back``: the transaction fails after writing them (no commit is published).
    """
    now = datetime.now(UTC)
    payload = json.dumps({"numbers": {"transactions": 9, "limit": 8}, "evidence": [{"id": 1}]})
    with store.transaction() as con:
        insert_alerts(
            con,
            f"""SELECT '{rule}' AS rule, '{severity}' AS severity, 7::BIGINT AS account_id,
                       '{key}' AS key, TIMESTAMPTZ '2026-03-02 12:00:00+00' AS started_at,
                       CAST(? AS TIMESTAMPTZ) AS detected_at, '{payload}'::JSON AS payload,
                       '{kind}' AS kind, 'firing' AS status, '9 transactions in 60 s' AS summary,
                       TIMESTAMPTZ '2026-03-02 12:00:40+00' AS event_at,
                       CAST(? AS TIMESTAMPTZ) AS commit_ts, 1::UBIGINT AS lsn,
                       1.5::DOUBLE AS latency_ms""".replace("?", f"'{now.isoformat()}'"),
            sinks,
            now,
        )
        row = con.execute("SELECT max(id) FROM _job_new_alerts").fetchall()
        con.execute("DROP TABLE _job_new_alerts")
        if roll_back:
            raise RolledBack
    store.publish(0, None, [], 0)
    return int(row[0][0])


def deliveries(store: DuckDBStore) -> list[dict[str, Any]]:
    table = store.query(
        f"SELECT alert_id, sink, state, attempts, last_error, idempotency_key, delivered_at "
        f"FROM {DELIVERIES} ORDER BY alert_id, sink"
    )
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def settled(store: DuckDBStore, count: int) -> Callable[[], bool]:
    """True once ``count`` deliveries are no longer pending."""

    def check() -> bool:
        rows = deliveries(store)
        return sum(1 for r in rows if r["state"] != "pending") >= count

    return check


def start(store: DuckDBStore, sinks: Sequence[SinkConfig]) -> AlertDelivery:
    return AlertDelivery(store, sinks, poll_interval=0.05).start()


def deliver_one_alert(store: DuckDBStore, sinks: Sequence[SinkConfig], settle: int) -> None:
    """Add one alert, run the delivery until ``settle`` deliveries are no longer pending,
    stop it."""
    add_alert(store, sinks)
    delivery = start(store, sinks)
    try:
        wait_for(settled(store, settle))
    finally:
        delivery.stop()

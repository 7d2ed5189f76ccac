"""`headrace run` with velocity burst in memory (``rules.in_memory``): the lane's alert
reaches a local webhook, once per incident, across restarts and a kill -9."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

from headrace.alerts.store import LANE_DB, LANE_OUTBOX
from headrace.pipeline.load import load_pipeline
from headrace.rules.lane.store import RULES_TABLE, lane_file
from tests.alerts.receivers import http_receiver
from tests.conftest import PgDatabase
from tests.rules.bank import T0, seed
from tests.run.pipeline import Pipeline, RunProcess, running, wait_caught_up, wait_until

PIPELINE = """
source:
  dsn: "{dsn}"
  slot: s_lane
  publication: p_lane
  tables:
    customers: {{}}
    accounts: {{}}
    merchants: {{}}
    cards: {{}}
    transactions: {{event_time: created_at}}
    logins: {{event_time: at}}
store:
  path: "{store}"
rules:
  in_memory: [velocity_burst]
  velocity_burst: {{}}
  amount_spike: {{}}
sinks:
  - {{name: ops, type: webhook, url: "{url}", secret: s3cret}}
"""


def _burst(db: PgDatabase, first_id: int, account: int, seconds: list[int]) -> None:
    values = ", ".join(
        f"({first_id + n}, {account}, 1, 1, 20, 'EUR', 'pos', 'purchase', 'settled', 'DE', "
        f"'{T0.isoformat()}'::timestamptz + interval '{s} seconds', "
        f"'{T0.isoformat()}'::timestamptz + interval '{s} seconds')"
        for n, s in enumerate(seconds)
    )
    db.execute(
        "INSERT INTO transactions (id, account_id, card_id, merchant_id, amount, "
        "currency, channel, type, status, country, created_at, updated_at) "
        f"VALUES {values}"
    )


def _pipeline(db: PgDatabase, tmp_path: Path, url: str) -> Pipeline:
    seed(db)
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(dsn=db.dsn, store=tmp_path / "store.duckdb", url=url))
    return Pipeline(db, path, load_pipeline(path))


def _wal_lsn(db: PgDatabase) -> int:
    with db.connect() as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(str(row[0]))


def _store_rows(pipeline: Pipeline, sql: str) -> list[tuple[object, ...]]:
    con = duckdb.connect(pipeline.config.store.path, read_only=True)
    try:
        lane = lane_file(pipeline.config.store.path)
        con.execute(f"ATTACH '{lane}' AS {LANE_DB} (READ_ONLY)")
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_lane_alert_once_per_incident_across_restarts(pg_db: PgDatabase, tmp_path: Path) -> None:
    with http_receiver() as receiver:
        pipeline = _pipeline(pg_db, tmp_path, receiver.url)
        with running(pipeline):
            _burst(pg_db, 1000, 1, [5 * n for n in range(8)])
            wait_until(lambda: len(receiver.accepted()) == 1, 30, "the lane's alert")
        with running(pipeline) as (runner, _):  # the same incident goes on: no second alert
            _burst(pg_db, 1100, 1, [40 + 5 * n for n in range(6)])
            wait_caught_up(runner, _wal_lsn(pg_db))
        with running(pipeline):  # past the re-arm time: a new incident
            _burst(pg_db, 1300, 1, [1300 + n for n in range(8)])
            wait_until(lambda: len(receiver.accepted()) == 2, 30, "the second alert")
        documents = [json.loads(r.body) for r in receiver.requests]
    assert [(d["rule"], d["account_id"]) for d in documents] == [("velocity_burst", 1)] * 2
    assert [d["payload"]["numbers"]["transactions"] for d in documents] == [8, 8]
    alerts = _store_rows(pipeline, "SELECT id, rule, account_id FROM headrace.alerts ORDER BY id")
    assert [(rule, account) for _, rule, account in alerts] == [("velocity_burst", 1)] * 2
    assert len({alert_id for alert_id, _, _ in alerts}) == 2
    (lane_position,), (store_position,) = (
        _store_rows(pipeline, f"SELECT position FROM {RULES_TABLE}")[0],
        _store_rows(pipeline, "SELECT lsn FROM headrace.position")[0],
    )
    assert int(str(lane_position)) >= int(str(store_position))
    # the lane's outbox says delivered, once each
    assert _store_rows(
        pipeline, f"SELECT state, attempts FROM {LANE_OUTBOX.deliveries} ORDER BY alert_id"
    ) == [("delivered", 1), ("delivered", 1)]


def test_lane_after_kill_9(pg_db: PgDatabase, tmp_path: Path) -> None:
    """kill -9 while bursts arrive: after a restart, one alert per incident in the store,
    and every one delivered (a second copy only with the same idempotency key)."""
    with http_receiver() as receiver:
        pipeline = _pipeline(pg_db, tmp_path, receiver.url)
        process = RunProcess(pipeline)
        process.wait_streaming()
        for account in range(1, 4):
            _burst(pg_db, 1000 * account, account, [5 * n for n in range(8)])
        process.kill()
        for account in range(1, 4):  # more of the same incidents, and new ones
            _burst(pg_db, 1000 * account + 100, account, [40 + 5 * n for n in range(4)])
        _burst(pg_db, 5000, 5, [5 * n for n in range(8)])
        process = RunProcess(pipeline)
        process.wait_streaming()
        wait_until(
            lambda: len({json.loads(r.body)["account_id"] for r in receiver.requests}) == 4,
            30,
            "an alert per account",
        )
        wait_until(lambda: _lane_alerts(pipeline) > 0, 10, "the lane figures in the status")
        lane = pipeline.status()["rules_lane"]
        assert isinstance(lane, dict)
        assert lane["rules"] == ["velocity_burst"]
        assert lane["freshness_ms"]["changes"] > 0
        collector = pipeline.status()["collector"]  # the start-up heap frozen while streaming
        assert isinstance(collector, dict)
        assert collector["frozen_objects"] > 0
        process.terminate()
        documents = [json.loads(r.body) for r in receiver.requests]
        keys = {r.headers["Idempotency-Key"] for r in receiver.requests}
    alerts = _store_rows(pipeline, "SELECT account_id FROM headrace.alerts ORDER BY account_id")
    assert alerts == [(1,), (2,), (3,), (5,)]
    assert sorted({d["account_id"] for d in documents}) == [1, 2, 3, 5]
    assert len(keys) == 4


def _lane_alerts(pipeline: Pipeline) -> int:
    lane = pipeline.status().get("rules_lane")
    return int(lane.get("alerts") or 0) if isinstance(lane, dict) else 0

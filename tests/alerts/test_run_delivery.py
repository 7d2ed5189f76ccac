"""`headrace run` end to end: a committed burst reaches a local webhook, signed, once."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from headrace.alerts.message import verify
from headrace.pipeline.load import load_pipeline
from tests.alerts.receivers import http_receiver
from tests.conftest import PgDatabase
from tests.rules.bank import T0, seed
from tests.run.pipeline import Pipeline, running, wait_until

PIPELINE = """
source:
  dsn: "{dsn}"
  slot: s_alerts
  publication: p_alerts
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
  velocity_burst: {{}}
sinks:
  - {{name: ops, type: webhook, url: "{url}", secret: s3cret}}
"""


def test_alert_delivered_from_a_running_pipeline(pg_db: PgDatabase, tmp_path: Path) -> None:
    seed(pg_db)
    with http_receiver() as receiver:
        path = tmp_path / "pipeline.yaml"
        path.write_text(
            PIPELINE.format(dsn=pg_db.dsn, store=tmp_path / "store.duckdb", url=receiver.url)
        )
        pipeline = Pipeline(pg_db, path, load_pipeline(path))
        with running(pipeline):
            values = ", ".join(
                f"({1000 + n}, 1, 1, 1, 20, 'EUR', 'pos', 'purchase', 'settled', 'DE', "
                f"'{T0.isoformat()}'::timestamptz + interval '{5 * n} seconds', "
                f"'{T0.isoformat()}'::timestamptz + interval '{5 * n} seconds')"
                for n in range(8)
            )
            pg_db.execute(
                "INSERT INTO transactions (id, account_id, card_id, merchant_id, amount, "
                "currency, channel, type, status, country, created_at, updated_at) "
                f"VALUES {values}"
            )
            wait_until(lambda: bool(receiver.accepted()), 30, "the webhook to receive the alert")
        (request,) = receiver.requests
    document = json.loads(request.body)
    assert (document["rule"], document["account_id"]) == ("velocity_burst", 1)
    assert document["payload"]["numbers"]["transactions"] == 8
    assert verify(
        "s3cret",
        request.headers["X-Headrace-Timestamp"],
        request.body,
        request.headers["X-Headrace-Signature"],
    )
    assert document["latency_ms"] >= 0
    commit = datetime.fromisoformat(document["commit_ts"]).timestamp()
    print(f"commit -> webhook received: {(request.received_at - commit) * 1000:.0f} ms")

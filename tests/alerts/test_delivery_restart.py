"""Through the whole pipeline: an incident is delivered once, across restarts."""

from __future__ import annotations

import json
from pathlib import Path

from headrace.alerts.delivery import AlertDelivery, delivery_status
from tests.alerts.outbox import deliveries, wait_for
from tests.alerts.receivers import http_receiver
from tests.conftest import PgDatabase
from tests.rules.bank import open_bank

CONFIG = """
rules:
  velocity_burst: {{}}
sinks:
  - name: ops
    type: webhook
    url: {url}
    secret: s3cret
    retry: {{attempts: 50, backoff: 1s, max_backoff: 1s}}
"""


def test_no_duplicate_delivery_after_restarts(pg_db: PgDatabase, tmp_path: Path) -> None:
    with http_receiver(default=503) as receiver:
        bank = open_bank(pg_db, tmp_path, CONFIG.format(url=receiver.url))
        delivery = AlertDelivery.from_config(bank.harness.config, bank.store)
        assert delivery is not None
        delivery.poll_interval = 0.05
        delivery.start()
        for n in range(8):
            bank.tx(1, 20, n * 5)
        bank.sync()  # the commit wakes the delivery thread: the receiver is down (503)
        wait_for(lambda: len(receiver.requests) >= 1)
        delivery.stop()
        (row,) = deliveries(bank.store)
        assert row["state"] == "pending"
        assert row["attempts"] >= 1
        assert row["last_error"].startswith("HTTP 503")

        bank.restart()  # the pending delivery survives in the store
        receiver.default = 200
        delivery = AlertDelivery.from_config(bank.harness.config, bank.store)
        assert delivery is not None
        delivery.poll_interval = 0.05
        with delivery:
            wait_for(lambda: deliveries(bank.store)[0]["state"] == "delivered")
            for n in range(8, 14):  # the same incident goes on: no new alert
                bank.tx(1, 20, n * 5)
            bank.sync()
        assert len(bank.alerts("velocity_burst")) == 1

        bank.restart()
        delivery = AlertDelivery.from_config(bank.harness.config, bank.store)
        assert delivery is not None
        delivery.poll_interval = 0.05
        with delivery:
            bank.tx(2, 20, 200)
            bank.sync()
            delivery.wake()
            wait_for(lambda: not delivery._wakes["ops"].is_set())  # a round of the loop ran
        bodies = [json.loads(r.body) for r in receiver.requests]
        assert {b["id"] for b in bodies} == {1}
        assert len(receiver.accepted()) == 1  # delivered exactly once
        assert len({r.headers["Idempotency-Key"] for r in receiver.requests}) == 1
        (final,) = deliveries(bank.store)
        assert final["state"] == "delivered"
        assert final["attempts"] == len(receiver.requests)
        status = delivery_status(bank.store)
        assert [(s["sink"], s["state"], s["deliveries"]) for s in status] == [
            ("ops", "delivered", 1)
        ]
        bank.close()

"""Metric alerts on a rollup: threshold with hysteresis, % change, z-score; notify once."""

from __future__ import annotations

from pathlib import Path

import pytest

from headrace.errors import ConfigError
from tests.conftest import PgDatabase
from tests.rules.bank import TABLES, open_bank

MINUTE = 60.0

CONFIG = """
rollups:
  - name: tx
    table: transactions
    time: created_at
    grain: 5m
    coarser: [1h]
    dimensions: [channel]
    measures:
      - {name: n, fn: count}
      - {name: volume, fn: sum, column: amount}
metric_alerts:
  - {name: busy, rollup: tx, measure: n, bucket: current, above: 5, hysteresis: 0.2,
     severity: high}
  - {name: jump, rollup: tx, measure: n, condition: change, above: 100}
  - {name: unusual, rollup: tx, measure: n, condition: zscore, above: 3, baseline: 6}
  - {name: online_volume, rollup: tx, value: "sum(volume)", where: "channel = 'online'",
     group_by: [channel], above: 1000000}
"""


def test_metric_alerts(pg_db: PgDatabase, tmp_path: Path) -> None:
    bank = open_bank(pg_db, tmp_path, CONFIG)
    for bucket, count in enumerate([2, 3, 2, 3, 2, 3]):  # a steady start: 12:00 - 12:30
        for n in range(count):
            bank.tx(1 + n, 10, bucket * 5 * MINUTE + n)
    bank.sync()
    assert bank.alerts() == []

    for n in range(20):  # 12:30 - 12:35: twenty
        bank.tx(1 + n % 8, 10, 30 * MINUTE + n)
    bank.sync()
    (busy,) = bank.alerts()
    assert (busy["rule"], busy["kind"], busy["status"], busy["severity"]) == (
        "busy",
        "metric",
        "firing",
        "high",
    )
    assert busy["payload"]["numbers"]["value"] == 20
    assert busy["account_id"] is None
    bank.tx(1, 10, 31 * MINUTE)  # still firing: nothing new
    bank.sync()
    assert len(bank.alerts()) == 1

    bank.tx(2, 10, 36 * MINUTE)  # 12:35: the current bucket holds 1 (< 5 - 20%): resolved;
    bank.sync()  # the previous bucket (21) jumped from 3 and is far off its baseline
    alerts = {(a["rule"], a["status"]): a for a in bank.alerts()}
    assert set(alerts) == {
        ("busy", "firing"),
        ("busy", "resolved"),
        ("jump", "firing"),
        ("unusual", "firing"),
    }
    jump = alerts[("jump", "firing")]["payload"]["numbers"]
    assert (jump["value"], jump["previous"], jump["number"]) == (21, 3, 600)
    unusual = alerts[("unusual", "firing")]["payload"]["numbers"]
    assert (unusual["mean"], unusual["baseline_buckets"]) == (2.5, 6)
    assert unusual["number"] > 30
    assert alerts[("busy", "resolved")]["started_at"] == busy["started_at"]

    bank.tx(3, 10, 37 * MINUTE)
    bank.sync()
    assert len(bank.alerts()) == 4
    states = dict(bank.duck("SELECT name, firing FROM headrace.metric_alert_state ORDER BY name"))
    assert states == {"busy": False, "jump": True, "unusual": True}
    bank.close()


LATE_CONFIG = """
rollups:
  - name: tx
    table: transactions
    time: created_at
    grain: 5m
    measures:
      - {name: n, fn: count}
metric_alerts:
  - {name: late, rollup: tx, measure: n, above: 4}
"""


def test_late_rows_reach_an_evaluated_bucket(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A batch whose rows all lie after the evaluated bucket is not evaluated again; late
    rows landing in that bucket are."""
    bank = open_bank(pg_db, tmp_path, LATE_CONFIG)
    bank.tx(1, 10, 0)  # 12:00
    bank.tx(1, 10, 5 * MINUTE + 1)  # 12:05: the previous bucket, 12:00, is evaluated
    bank.sync()
    bank.tx(2, 10, 6 * MINUTE)  # 12:06: nothing in the evaluated bucket changes
    bank.sync()
    assert bank.alerts() == []
    for n in range(4):  # late rows of 12:00: it now holds 5
        bank.tx(3, 10, 2 * MINUTE + n)
    bank.sync()
    (late,) = bank.alerts()
    assert (late["rule"], late["status"]) == ("late", "firing")
    assert late["payload"]["numbers"]["value"] == 5
    bank.close()


_SPLIT = """
rollups:
  - name: tx
    table: transactions
    grain: 5m
    dimensions: [channel, currency]
    measures:
      - {name: n, fn: count}
      - {name: largest, fn: max, column: amount}
      - {name: accounts, fn: count_distinct, column: account_id}
metric_alerts:
"""


def test_a_measure_whose_groups_do_not_add_up_is_refused() -> None:
    """The alert's value is its measure summed over the bucket's groups: a max, min,
    average or distinct count summed over channels and currencies would be a wrong
    number, so the configuration says what to write instead; over whole groups (every
    dimension in group_by) one row is summed, and any measure is right."""
    from headrace.jobs.runtime import StreamJobs  # noqa: PLC0415
    from headrace.pipeline.load import parse_pipeline  # noqa: PLC0415

    def jobs(alert: str) -> StreamJobs:
        text = TABLES.replace("DSN", "postgresql://x") + _SPLIT + f"  - {alert}\n"
        return StreamJobs.from_config(parse_pipeline(text))

    with pytest.raises(ConfigError, match=r'largest is a max measure.*use value: max\("largest"\)'):
        jobs("{name: big, rollup: tx, measure: largest, above: 1000}")
    with pytest.raises(ConfigError, match=r"accounts is a count_distinct measure.*per currency"):
        jobs("{name: many, rollup: tx, measure: accounts, group_by: [channel], above: 9}")
    jobs("{name: many, rollup: tx, measure: accounts, group_by: [channel, currency], above: 9}")
    jobs("{name: busy, rollup: tx, measure: n, above: 9}")

"""End to end in Chromium: a transaction committed in PostgreSQL appears on the open dashboard.

PostgreSQL → pgoutput → engine → DuckDB store → live broadcaster → EventSource,
with the server embedded in the run loop (``Runner(serve=...)``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from headrace.run.runner import Runner
from headrace.run.settings import RunSettings
from headrace.serve.settings import AuthSettings, ServeSettings
from headrace.serve.tiles import ChartType, Dashboard, Dimension, Tile
from tests.conftest import PgDatabase
from tests.run.pipeline import make_pipeline, wait_until
from tests.serve.test_browser import ARGS, ARTIFACTS, CHROMIUM

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]

DASHBOARD = Dashboard(
    name="flows",
    title="Flows",
    dimension_source="rollup.tx_volume_5m",
    dimensions=[Dimension(name="status")],
    tiles=[
        Tile(
            name="count",
            title="Transactions",
            chart=ChartType.STAT,
            query="SELECT coalesce(sum(tx_count), 0) AS n FROM rollup.tx_volume_5m WHERE {filters}",
        ),
        Tile(
            name="latest",
            title="Latest",
            chart=ChartType.TABLE,
            query="SELECT id, amount, status, created_at FROM mirror.transactions "
            "WHERE {filters} ORDER BY id DESC LIMIT 5",
        ),
    ],
)


def test_a_postgres_commit_appears_on_the_open_page(pg_db: PgDatabase, tmp_path: Path) -> None:
    pipeline = make_pipeline(pg_db, tmp_path, base_rows=300)
    serve = ServeSettings(
        store=Path(pipeline.config.store.path),
        port=0,
        dashboards=[DASHBOARD],
        auth=AuthSettings(enabled=False),
    )
    runner = Runner(
        pipeline.config,
        settings=RunSettings(status_interval_s=0.2, heartbeat_interval_s=0.5),
        config_path=pipeline.path,
        serve=serve,
    )
    thread = threading.Thread(target=runner.run, name="test-runner")
    thread.start()
    try:
        wait_until(lambda: runner.state.phase == "streaming" and bool(runner.server_url), 60)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.goto(f"{runner.server_url}/dashboard/flows")
                stat = page.get_by_test_id("tile-count").locator(".stat")
                expect(stat).to_have_attribute("data-value", "300")
                pg_db.execute(
                    "INSERT INTO transactions VALUES (100000, 1, 12.34, 'approved', 'm1', now())"
                )
                committed = time.monotonic()
                expect(stat).to_have_attribute("data-value", "301", timeout=2000)
                assert time.monotonic() - committed < 2.0
                expect(
                    page.get_by_test_id("tile-latest").locator("tbody tr").first
                ).to_contain_text("100000")
                page.screenshot(path=str(ARTIFACTS / "09-postgres-commit.png"), full_page=True)
            finally:
                browser.close()
    finally:
        runner.stop.set()
        thread.join(30)
    assert not thread.is_alive()

"""The UI in Debian's Chromium (Playwright): login, live updates, filters, drill-down, SQL, roles.

Screenshots go to test-artifacts/serve/. Skipped when /usr/bin/chromium is missing
(``scripts/system-deps`` installs it); never downloads a browser.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.serve.conftest import PASSWORDS, Served

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "serve"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def login(browser: Browser, served: Served, role: str) -> Page:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.goto(f"{served.url}/dashboard/payments")
    expect(page).to_have_url(f"{served.url}/login?next=/dashboard/payments")
    page.fill("#username", role)
    page.fill("#password", PASSWORDS[role])
    page.click("#submit")
    expect(page.get_by_test_id("who")).to_contain_text(role)
    return page


def stat(page: Page, tile: str) -> float:
    value = page.get_by_test_id(f"tile-{tile}").locator(".stat").get_attribute("data-value")
    return float(value or 0)


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_dashboard_live_filters_and_drill_down(browser: Browser, served: Served) -> None:
    earlier = (datetime.now(UTC) - timedelta(minutes=25)).replace(second=0, microsecond=0)
    served.writer.write(6, at=earlier, currency="GBP")
    served.writer.write(4, at=earlier, currency="USD")
    page = login(browser, served, "analyst")
    expect(page.get_by_test_id("status")).to_have_text("live")
    expect(page.get_by_test_id("tile-tx_count").locator(".stat")).to_be_visible()
    expect(page.get_by_test_id("lag-tx_count")).to_contain_text("as of")
    shot(page, "01-dashboard")

    # A commit shows up on the open page, without a reload, within 2 s.
    before = stat(page, "tx_count")
    committed = time.monotonic()
    served.writer.write(7)
    page.wait_for_function(
        "([v]) => Number(document.querySelector('[data-testid=tile-tx_count] .stat')"
        ".dataset.value) >= v",
        arg=[before + 7],
        timeout=2000,
    )
    assert time.monotonic() - committed < 2.0
    page.evaluate("window.__marker = 'same page'")
    shot(page, "02-live-update")

    # A filter changes every tile that accepts it.
    bodies = {
        name: page.get_by_test_id(f"tile-{name}").inner_html()
        for name in ("tx_count", "volume", "avg_amount", "by_channel", "recent")
    }
    sums = {
        n: page.get_by_test_id(f"tile-{n}").get_attribute("data-sum")
        for n in ("volume_5m", "count_5m")
    }
    page.get_by_test_id("filter-currency").select_option("GBP")
    expect(page).to_have_url(f"{served.url}/dashboard/payments?f.currency=GBP")
    for name, html in bodies.items():
        page.wait_for_function(
            "([n, h]) => document.querySelector(`[data-testid=tile-${n}]`).innerHTML !== h",
            arg=[name, html],
            timeout=3000,
        )
    for name, total in sums.items():
        page.wait_for_function(
            "([n, s]) => document.querySelector(`[data-testid=tile-${n}]`).dataset.sum !== s",
            arg=[name, total],
            timeout=3000,
        )
    expect(page.locator("[data-tile=alerts] .note")).to_contain_text("filter not applied: currency")
    assert page.evaluate("window.__marker") == "same page"
    shot(page, "03-filtered")

    # Drill-down from the point of the earlier bucket opens exactly its GBP rows.
    bucket = earlier.replace(minute=earlier.minute - earlier.minute % 5).timestamp()
    x, y = page.evaluate(
        "([b]) => { const u = D.tiles['count_5m'].plot; const r = u.over.getBoundingClientRect();"
        " const i = u.data[0].indexOf(b); return [r.left + u.valToPos(b, 'x'),"
        " r.top + u.valToPos(u.data[1][i], 'y')]; }",
        [bucket],
    )
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    drill = page.get_by_test_id("drill")
    expect(drill).to_be_visible()
    expect(page.get_by_test_id("drill-count")).to_contain_text("6 rows in mirror.transactions")
    expect(drill.locator("tbody tr")).to_have_count(6)
    shot(page, "04-drill-down")
    page.context.close()


def test_sql_editor_runs_downloads_and_rejects(browser: Browser, served: Served) -> None:
    page = login(browser, served, "analyst")
    page.click("[data-nav=sql]")
    expect(page.get_by_test_id("schema")).to_contain_text("transactions")
    page.get_by_test_id("sql-input").fill(
        "SELECT currency, count(*) AS n FROM mirror.transactions GROUP BY currency ORDER BY 1"
    )
    page.get_by_test_id("run").click()
    expect(page.get_by_test_id("sql-result").locator("tbody tr")).to_have_count(3)
    expect(page.get_by_test_id("sql-info")).to_contain_text("3 rows")
    shot(page, "05-sql-result")

    with page.expect_download() as download_info:
        page.get_by_test_id("download-csv").click()
    download = download_info.value
    assert download.suggested_filename == "query.csv"
    rows = list(csv.reader(io.StringIO(Path(download.path()).read_text())))
    assert rows[0] == ["currency", "n"]
    assert [r[0] for r in rows[1:]] == ["EUR", "GBP", "USD"]

    page.get_by_test_id("sql-input").fill("DROP TABLE mirror.transactions")
    page.get_by_test_id("run").click()
    expect(page.get_by_test_id("sql-error")).to_contain_text("DROP is not allowed")
    shot(page, "06-sql-rejected")
    page.get_by_test_id("sql-input").fill("SELECT card_number FROM mirror.transactions LIMIT 2")
    page.get_by_test_id("run").click()
    expect(page.get_by_test_id("sql-result").locator("tbody td").first).to_have_text("****")
    page.context.close()


def test_viewer_cannot_reach_sql_and_sees_masks(browser: Browser, served: Served) -> None:
    page = login(browser, served, "viewer")
    expect(page.locator("[data-nav=sql]")).to_have_count(0)
    expect(page.get_by_test_id("tile-recent").locator("tbody tr").first).to_contain_text("****")
    page.goto(f"{served.url}/sql")
    expect(page.locator("#forbidden")).to_contain_text("viewer role cannot open this page")
    shot(page, "07-viewer-no-sql")
    page.goto(f"{served.url}/account/1")
    expect(page.get_by_test_id("account")).to_contain_text("tier")
    shot(page, "08-account")
    page.context.close()
